"""Importance tab: calibration settings, a cancellable run, heatmaps of every axis."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from compact import importance, validation
from compact.jobs import command_line
from compact.options import default
from ui import jobs, plots
from ui import state as st
from ui.common import (
    DATA_CHOICES,
    HEAVY,
    NEXT,
    SIZES,
    Ctx,
    follow_models,
    gpu,
    job_buttons,
    model_choices,
    take_upload,
    upload_box,
)

# Smaller than the command line's defaults on a CPU, so that a click answers in about a minute.
DEFAULT_SAMPLES = SIZES["importance_samples"]
DEFAULT_SEQ_LEN = SIZES["importance_seq_len"]


def figures(scores: importance.Scores | None, plan=None) -> tuple:
    """The four figures: heads, neurons, channels, layers; with a prune plan, what it keeps."""
    if scores is None:
        msg = plots.empty("Run importance to see scores")
        return msg, msg, msg, msg
    kept_layers = kept_heads = kept_neurons = kept_channels = None
    if plan is not None:
        n_layers = plan.source.layers
        kept_layers = plan.layers
        kept_heads, kept_neurons = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
        for i, layer in enumerate(plan.layers):
            kept_heads[layer], kept_neurons[layer] = plan.heads[i], plan.neurons[i]
        kept_channels = plan.channels
    return (plots.heads(scores.heads, kept_layers, kept_heads),
            plots.neurons(scores.neurons, kept_layers, kept_neurons),
            plots.channels(scores.channels, scores.channels_per_layer, kept_channels, kept_layers),
            plots.layers(scores.layers_bi, scores.layers_ppl, kept_layers))


def validation_figure(scores: importance.Scores | None):
    """Each metric against the ablation truth, for the axes the scores were validated on."""
    axes = {}
    for axis, t in (scores.truth if scores is not None else {}).items():
        spearman = scores.meta.get("validation", {}).get(axis, {}).get("spearman", {})
        axes[axis] = {"truth": t["loss"], "units": t["units"], "spearman": spearman,
                      "metrics": validation.metric_values(axis, scores, t["units"].long())}
    return plots.metrics_vs_truth(axes)


def summary(scores: importance.Scores) -> dict:
    def shape(t):
        return None if t is None else list(t.shape)
    return {"heads": shape(scores.heads), "neurons": shape(scores.neurons),
            "channels": shape(scores.channels), "channels_per_layer": shape(scores.channels_per_layer),
            "layers_bi": shape(scores.layers_bi), "layers_ppl": shape(scores.layers_ppl),
            "meta": scores.meta}


@gpu
@jobs.user_errors
def run(model: str | None, src: str, samples: int, seq_len: int, batch_agg: str, seq_agg: str,
        depth_ppl: bool, state: dict | None, request: gr.Request, extra_metrics: bool = False,
        validate: list[str] | None = None, progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    samples, seq_len = int(samples), int(seq_len)
    if samples < 1 or seq_len < 2:
        raise gr.Error("samples must be at least 1 and the sequence length at least 2")
    ref = st.check_ref(model or state["ref"])
    loaded = st.CACHE.get(ref)
    loaded.require_minitron()
    out = st.next_output(sid, "importance").with_suffix(".safetensors")
    cfg = importance.ImportanceConfig(model=ref, data=st.check_data(src), samples=samples,
                                      seq_len=seq_len, batch_agg=batch_agg, seq_agg=seq_agg,
                                      depth_ppl=bool(depth_ppl), extra_metrics=bool(extra_metrics),
                                      validate=",".join(validate or []) or None, out=str(out))
    work = jobs.computing(lambda job: importance.run(cfg, job.progress, job.should_stop, loaded=loaded))
    jobs.run_to_end(work, sid, "importance", progress, base_model=ref, inputs=vars(cfg), artifact=str(out),
                    config=cfg)
    scores = importance.Scores.load(out)
    cmd = command_line(cfg)
    # Prune works on the model these scores are of (ui.prune_tab.source)
    state.update(scores=scores, scores_path=str(out), scores_ref=ref, scores_command=cmd)
    st.add_output(state, st.Output("importance", str(out), cmd, ref, summary(scores)))
    msg = f"Scores saved as **{Path(out).name}**. {NEXT['importance']}"
    return (*figures(scores), validation_figure(scores), summary(scores), msg, state)


SCORES_HELP = """
- **Activation score** (Minitron, arXiv 2407.14679, section 2.2): run calibration text through the
  model and measure how large each part's output is. A head's score is the size of its attention
  output, a neuron's the size of its activation entering the MLP's down projection, a channel's the
  size of the normalised hidden state in that channel. Small output = little influence.
- **Aggregation** turns one value per token into one score per part, first over the tokens of a
  sample (*sequence aggregation*), then over samples (*batch aggregation*): **mean** = mean of
  absolute values, **l2** = square root of the sum of squares (favours rare large outputs),
  **var** = variance (favours parts whose output changes with the input). The paper's best: l2
  over the batch, mean over the sequence.
- **Block Influence** (ShortGPT, arXiv 2403.03853): 1 − the mean cosine similarity between a layer's
  input and output hidden states. A layer that barely turns the hidden state scores near 0.
- **Layer perplexity**: the validation perplexity with that one layer removed: slower (one pass
  per layer) but measures the damage directly.
- **Other metrics** (*Extra metrics*, one backward pass), each usable for pruning on the Prune tab:
  **activation_out** = what a head or neuron writes into the residual stream (its output through
  the output projection); **taylor** = |gradient × weight| summed over its output-projection
  columns (a channel: over its norm weights); **wanda** = |weight| × input norm, summed likewise.
  **Angular distance** (layers): the mean angle between a layer's input and output.
- **Validate against the truth**: for each part (every head and layer, 64 sampled neurons and
  channels), the calibration loss increase when that part alone is removed (one pass per part,
  slow), and each metric's Spearman rank correlation with it; the scatter plots below show them.
"""


def build(ctx: Ctx) -> None:
    with gr.Tab("Importance", id="importance"):
        gr.Markdown("Minitron importance from forward passes on calibration text: per head, MLP "
                    "neuron, embedding channel and layer. Needs no gradients.")
        with gr.Row():
            model = gr.Dropdown(model_choices(None, roots=True), value=None, allow_custom_value=True,
                                label="Model (empty: the Model tab's)", elem_id="imp-model")
            src = gr.Dropdown(DATA_CHOICES, value="builtin", allow_custom_value=True,
                              label="Data (builtin, teacher, .txt/.jsonl path, hf:NAME)")
            samples = gr.Number(value=DEFAULT_SAMPLES, precision=0, minimum=1, label="Samples",
                                elem_id="imp-samples")
            seq_len = gr.Number(value=DEFAULT_SEQ_LEN, precision=0, minimum=2, label="Tokens per sample",
                                elem_id="imp-seq-len")
            batch_agg = gr.Dropdown(list(importance.AGGREGATIONS), label="Batch aggregation",
                                    value=default(importance.ImportanceConfig, "batch_agg"))
            seq_agg = gr.Dropdown(list(importance.AGGREGATIONS), label="Sequence aggregation",
                                  value=default(importance.ImportanceConfig, "seq_agg"))
            depth_ppl = gr.Checkbox(value=default(importance.ImportanceConfig, "depth_ppl"),
                                    label="Layer perplexity (one pass per layer, slower)")
            extra_metrics = gr.Checkbox(value=default(importance.ImportanceConfig, "extra_metrics"),
                                        label="Extra metrics (output, Taylor, Wanda; one backward pass)")
            validate = gr.CheckboxGroup(list(validation.AXES), value=[], elem_id="imp-validate",
                                        label="Validate against the truth (one pass per part, slow)")
        jobs.fields(data=src, samples=samples, seq_len=seq_len, batch_agg=batch_agg, seq_agg=seq_agg,
                    depth_ppl=depth_ppl, extra_metrics=extra_metrics, validate=validate)
        upload = upload_box("calibration")
        with gr.Row():
            go, stop = job_buttons("Estimate importance")
        status = gr.Markdown(elem_id="imp-status")
        with gr.Accordion("What the scores mean", open=False):
            gr.Markdown(SCORES_HELP)
        with gr.Row():
            with gr.Column():
                heads = gr.Plot(plots.empty("Run importance to see scores"), label="Heads",
                                elem_id="imp-heads")
                gr.Markdown("One row per layer, one cell per attention head; colour = the head's "
                            "activation score (Minitron section 2.2). Dark heads write little and are "
                            "pruned first; Prune keeps the same number of heads in every layer.")
            with gr.Column():
                layers = gr.Plot(plots.empty("Run importance to see scores"), label="Layers")
                gr.Markdown("Block Influence per layer: how much the layer changes the hidden state "
                            "(higher = more important). With *Layer perplexity* ticked, also the "
                            "perplexity with that layer removed (higher = more important).")
        neurons = gr.Plot(plots.empty("Run importance to see scores"), label="MLP neurons",
                          elem_id="imp-neurons")
        gr.Markdown("Each row is a layer's MLP neurons sorted by score, most important on the left; colour "
                    "on a log scale. A steep fall means a few neurons carry the layer: its width can go.")
        channels = gr.Plot(plots.empty("Run importance to see scores"), label="Embedding channels")
        gr.Markdown("Embedding (hidden) channels sorted by their score summed over layers (the norms' "
                    "outputs); pruning hidden size removes the right-hand channels from every layer at once.")
        truth = gr.Plot(plots.metrics_vs_truth({}), label="Metrics against the truth", elem_id="imp-truth")
        gr.Markdown("With validation: each metric (x) against the loss increase when that part alone is "
                    "removed (y); ρ is Spearman's rank correlation (1: the metric orders parts exactly "
                    "as their removal hurts).")
        result = gr.JSON(label="Scores", visible=False)
    follow_models(ctx, model)
    go.click(run, [model, src, samples, seq_len, batch_agg, seq_agg, depth_ppl, ctx.state, extra_metrics,
                   validate],
             [heads, neurons, channels, layers, truth, result, status, ctx.state], api_name="importance",
             **HEAVY)
    stop.click(jobs.cancel, None, status, queue=False, api_name="cancel")
    upload.upload(take_upload, upload, src, api_name="upload_importance_data")
