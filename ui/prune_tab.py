"""Prune tab: target controls with a live size readout, keep/drop heatmaps, shape search, prune.

The readout is arithmetic on compact.shapes (no model touched) so it follows every control
change at once; the heatmaps come from compact.prune.plan, also model-free.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from compact import prune, shapes
from compact.errors import UserError
from compact.jobs import command_line
from compact.metrics import WIDTH_METRICS
from compact.shapes import Shape
from ui import importance_tab, jobs
from ui import state as st
from ui.common import HEAVY, Ctx, eval_note, gib, gpu, human, job_buttons, saved, scored


def targets(base: Shape, layers, hidden, ffn, heads) -> dict:
    """Only the axes that change, as prune_and_save and the CLI take them."""
    want = {"layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads}
    return {k: int(v) for k, v in want.items() if v is not None and int(v) != getattr(base, k)}


def readout(base: Shape | None, layers, hidden, ffn, heads, context: int = 1024) -> str:
    if base is None:
        return "Load a model to set a target."
    try:
        target, _ = prune.resolve_targets(base, **targets(base, layers, hidden, ffn, heads))
    except UserError as e:
        return f"⚠️ {e}"
    p0, p1 = base.params, target.params
    f0, f1 = shapes.flops_per_token(base, context), shapes.flops_per_token(target, context)
    return (
        f"| | original | target | kept |\n|---|---|---|---|\n"
        f"| parameters | {human(p0)} | **{human(p1)}** | {p1 / p0:.1%} |\n"
        f"| memory (bf16) | {gib(shapes.memory_bytes(base, 2))} | {gib(shapes.memory_bytes(target, 2))} | |\n"
        f"| FLOPs / token @{context} | {human(f0)} | {human(f1)} | {f1 / f0:.1%} |\n"
        f"| shape (L, H, F, heads) | {base.layers}, {base.hidden}, {base.ffn}, {base.heads} | "
        f"{target.layers}, {target.hidden}, {target.ffn}, {target.heads} | |"
    )


def source(state: dict | None) -> str:
    """The model Prune works on: the one the last importance run scored (its scores decide what
    is cut), else the one the Model tab loaded."""
    state = st.session(state)
    return state.get("scores_ref") or state["ref"]


def heatmaps(state: dict | None, base: Shape | None, layers, hidden, ffn, heads, depth_metric: str):
    scores = st.session(state).get("scores")
    if base is None or scores is None:
        return importance_tab.figures(None)
    try:
        plan = prune.plan(scores, base, depth_metric=depth_metric, family=scores.meta.get("family"),
                          **targets(base, layers, hidden, ffn, heads))
    except UserError:
        return importance_tab.figures(scores)  # the readout already says what is wrong
    return importance_tab.figures(scores, plan)


def sliders_for(base: Shape) -> list:
    many_heads = base.kv_heads == base.heads
    step = 1 if many_heads else base.kv_heads
    return [
        gr.Slider(1, base.layers, value=base.layers, step=1),
        gr.Slider(1, base.hidden, value=base.hidden, step=1),
        gr.Slider(1, base.ffn, value=base.ffn, step=1),
        gr.Slider(step, base.heads, value=base.heads, step=step,
                  info=None if many_heads else f"a multiple of the {base.kv_heads} KV heads"),
    ]


@jobs.user_errors
def refresh(state: dict | None, shown: Shape | None = None, layers=None, hidden=None, ffn=None,
            heads=None, depth_metric: str = "bi"):
    """Controls follow the session's model (loaded on first use) and are kept while it stays the
    same; the heatmaps are redrawn, since the scores may be new."""
    ref = source(state)
    loaded = st.CACHE.get(ref)
    loaded.require_minitron()
    base = loaded.shape
    which = (f"Pruning **{Path(ref).name}**"
             + (" (the model of the last importance run)" if ref != st.session(state)["ref"] else ""))
    if shown == base:
        return [*[gr.skip()] * 6, *heatmaps(state, base, layers, hidden, ffn, heads, depth_metric), which]
    return [base, *sliders_for(base), readout(base, None, None, None, None),
            *heatmaps(state, base, None, None, None, None, depth_metric), which]


@jobs.user_errors
def find_shapes(base: Shape | None, target_m: float, tolerance: float, state: dict | None):
    from compact import search

    if base is None:
        loaded = st.CACHE.get(source(state))
        loaded.require_minitron()
        base = loaded.shape
    if not target_m or target_m <= 0:
        raise gr.Error("give a parameter budget in millions")
    found = search.candidates(base, int(target_m * 1e6), tolerance=float(tolerance))
    rows = [[s.layers, s.hidden, s.ffn, s.heads, round(s.params / 1e6, 2), round(s.params / base.params, 3)]
            for s in found]
    if not rows:
        raise gr.Error(f"no shape within {tolerance:.0%} of {target_m}M parameters")
    return rows


def pick_row(rows, base: Shape | None, state: dict | None, depth_metric: str, evt: gr.SelectData):
    """One click on a candidate fills the controls."""
    row = list(rows.iloc[evt.index[0]]) if hasattr(rows, "iloc") else list(rows[evt.index[0]])
    layers, hidden, ffn, heads = (int(v) for v in row[:4])
    return (layers, hidden, ffn, heads, readout(base, layers, hidden, ffn, heads),
            *heatmaps(state, base, layers, hidden, ffn, heads, depth_metric))


@gpu
@jobs.user_errors
def run_prune(base: Shape | None, layers, hidden, ffn, heads, depth_metric: str, state: dict | None,
              request: gr.Request, head_metric: str = "activation", neuron_metric: str = "activation",
              channel_metric: str = "activation", progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    ref = source(state)
    loaded = st.CACHE.get(ref)
    loaded.require_minitron()
    tg = targets(loaded.shape, layers, hidden, ffn, heads)
    if not tg:
        raise gr.Error("the target is the model's own shape: lower at least one control")
    scores = state.get("scores")
    params = loaded.shape.with_targets(**tg).params
    out = st.next_output(sid, "pruned", st.checkpoint_bytes(loaded, params))
    cfg = prune.PruneConfig(model=ref, out=str(out), **tg, depth_metric=depth_metric,
                            importance=state.get("scores_path"), score=True,
                            head_metric=head_metric or "activation",
                            neuron_metric=neuron_metric or "activation",
                            channel_metric=channel_metric or "activation")
    prune.plan(cfg.ranked(scores), loaded.shape, depth_metric=depth_metric, family=loaded.arch.family,
               **tg)  # fail fast

    @jobs.computing
    def work(job: jobs.Job):
        result = prune.run(cfg, job.progress, job.should_stop, loaded=loaded, scores=scores)
        if job.record is not None:
            canonical = result["canonical"]
            job.record.params = result["params"]
            job.record.metrics = {"ppl": canonical["ppl_after"], "setting": canonical["setting"]}
        return result

    result = jobs.run_to_end(work, sid, "prune", progress, base_model=ref, inputs=vars(cfg),
                             artifact=str(out), config=cfg)
    cmd = command_line(cfg)
    if state.get("scores_command"):
        cmd = state["scores_command"] + "\n" + cmd
    st.add_output(state, st.Output("pruned", str(out), cmd, ref, result))
    kept = result["params"] / result["source_params"]
    msg = (f"Pruned to {human(result['params'])} parameters ({kept:.1%}); {scored(result['canonical'])}. "
           f"{saved(out, 'prune')}")
    return result, msg, state


def build(ctx: Ctx) -> None:
    with gr.Tab("Prune", id="prune") as tab:
        base = gr.State(None)
        which = gr.Markdown(elem_id="prune-source")
        gr.Markdown("Pick a target shape. Heads stay a multiple of the KV heads (KV groups are kept). "
                    "The heatmaps grey out what the target drops; run Importance first.")
        with gr.Row():
            with gr.Column(scale=2):
                layers = gr.Slider(1, 30, value=30, step=1, label="Layers", elem_id="prune-layers")
                hidden = gr.Slider(1, 576, value=576, step=1, label="Hidden (embedding channels)",
                                   elem_id="prune-hidden")
                ffn = gr.Slider(1, 1536, value=1536, step=1, label="FFN (MLP neurons per layer)",
                                elem_id="prune-ffn")
                heads = gr.Slider(3, 9, value=9, step=3, label="Attention heads", elem_id="prune-heads")
                depth_metric = gr.Radio(list(prune.DEPTH_METRICS), value="bi",
                                        label="Layers to drop by (bi: Block Influence, angular: angular "
                                              "distance, ppl: perplexity)")
                with gr.Row():
                    # Metrics other than activation need Importance's "Extra metrics".
                    head_metric = gr.Dropdown(list(WIDTH_METRICS["heads"]), value="activation",
                                              label="Rank heads by", elem_id="prune-head-metric")
                    neuron_metric = gr.Dropdown(list(WIDTH_METRICS["neurons"]), value="activation",
                                                label="Rank neurons by")
                    channel_metric = gr.Dropdown(list(WIDTH_METRICS["channels"]), value="activation",
                                                 label="Rank channels by")
                jobs.fields(head_metric=head_metric, neuron_metric=neuron_metric,
                            channel_metric=channel_metric)
            with gr.Column(scale=2):
                size = gr.Markdown(readout(None, None, None, None, None))
                with gr.Accordion("Find shapes within a budget", open=False):
                    with gr.Row():
                        budget = gr.Number(value=90, label="Parameters (millions)")
                        tolerance = gr.Slider(0.01, 0.3, value=0.05, step=0.01, label="Tolerance")
                    find = gr.Button("Find shapes")
                    table = gr.Dataframe(headers=["layers", "hidden", "ffn", "heads", "params (M)", "kept"],
                                         interactive=False, label="Candidates (click a row to use it)",
                                         elem_id="prune-candidates")
        with gr.Row():
            gr.Markdown(eval_note())
            go, stop = job_buttons("Prune")
        status = gr.Markdown(elem_id="prune-status")
        result = gr.JSON(label="Pruned model", visible=False)
        with gr.Row():
            p_heads = gr.Plot(label="Heads kept")
            p_layers = gr.Plot(label="Layers kept")
        p_neurons = gr.Plot(label="Neurons kept", elem_id="prune-neurons")
        p_channels = gr.Plot(label="Channels kept")

    controls = [layers, hidden, ffn, heads]
    figs = [p_heads, p_neurons, p_channels, p_layers]
    refresh_outputs = [base, *controls, size, *figs, which]
    refresh_inputs = [ctx.state, base, *controls, depth_metric]
    # Not on the heavy queue: a cached model makes this instant, even while a job runs.
    tab.select(refresh, refresh_inputs, refresh_outputs, api_name="prune_refresh")
    ctx.on_model.append((refresh, refresh_inputs, refresh_outputs))
    for c in controls:
        c.change(readout, [base, *controls], size, queue=False, trigger_mode="always_last",
                 api_visibility="private")
        c.release(heatmaps, [ctx.state, base, *controls, depth_metric], figs, trigger_mode="always_last",
                  api_visibility="private")
    depth_metric.change(heatmaps, [ctx.state, base, *controls, depth_metric], figs, api_visibility="private")
    find.click(find_shapes, [base, budget, tolerance, ctx.state], table, api_name="search")
    table.select(pick_row, [table, base, ctx.state, depth_metric], [*controls, size, *figs],
                 api_visibility="private")
    event = go.click(run_prune, [base, *controls, depth_metric, ctx.state, head_metric, neuron_metric,
                                 channel_metric],
                     [result, status, ctx.state], api_name="prune", **HEAVY)
    ctx.output_events.append(event)
    stop.click(jobs.cancel, None, status, queue=False, api_visibility="private")
