"""Experiments tab: one click runs a paper finding on the loaded model (compact.experiments),
in a worker process (ui/lanes.py)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from compact import experiments
from compact.experiments import EXPERIMENTS, ExperimentConfig
from compact.jobs import command_line
from ui import jobs, lanes, plots
from ui import state as st
from ui.common import LONG, NEXT, SIZES, Ctx, eval_note, follow_models, job_buttons, model_choices

ABOUT = {
    "axis-ablation": "Prune to the same parameter count along depth, MLP, attention, embedding "
                     "channels and their combinations, distill each the same tokens, and compare with "
                     "the same shape from random initialization (Minitron, Table 1).",
    "kd-vs-ce": "The same pruned student retrained with logit distillation and with cross-entropy only.",
    "sparse-methods": "2:4 by magnitude, Wanda and SparseGPT one-shot, and AST with and without SLoRB.",
}


def table(result: dict) -> dict:
    rows = result["rows"]
    headers = [k for k in dict.fromkeys(k for r in rows for k in r)]
    return {"headers": headers, "data": [[r.get(h) for h in headers] for r in rows]}


def figure(result: dict):
    """The arms' canonical perplexity (the workspace's, as everywhere in the app)."""
    rows = [r for r in result["rows"] if r.get("canonical_ppl") is not None]
    if not rows:
        return plots.empty("No arm finished")
    label = "arm" if "arm" in rows[0] else "method"
    return plots.bars([r[label] for r in rows], [r["canonical_ppl"] for r in rows],
                      f"{result['experiment']}: perplexity ({result['canonical']})", "perplexity")


@jobs.user_errors
def run(model: str | None, name: str, keep: float, tokens: int, seq_len: int, batch: int, samples: int,
        eval_tokens: int, src: str, state: dict | None, request: gr.Request, progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    model = st.check_ref(model or state["ref"])
    if name not in EXPERIMENTS:
        raise gr.Error(f"unknown experiment '{name}'")
    if min(int(tokens), int(batch), int(samples), int(eval_tokens)) < 1 or int(seq_len) < 2:
        raise gr.Error("tokens, sequence length, batch, samples and evaluation tokens must be positive")
    out = st.next_output(sid, "experiment")
    cfg = ExperimentConfig(name=name, model=model, out=str(out), data=st.check_data(src),
                           keep=float(keep), tokens=int(tokens), seq_len=int(seq_len), batch=int(batch),
                           samples=int(samples), eval_tokens=int(eval_tokens), score=True, session=sid)
    cfg.check()

    def work(job: jobs.Job):
        if lanes.enabled():  # the arms record themselves, under this session, from the worker
            return lanes.run_worker(cfg, job, sid)
        return lanes.run_here(experiments.run, cfg, job, resumable=False,
                              preload=lambda: dict(progress=job.progress))

    result = jobs.run_to_end(work, sid, f"experiment:{name}", progress, base_model=model,
                             inputs={"keep": cfg.keep, "tokens": cfg.tokens}, artifact=str(out),
                             config=cfg)
    cmd = command_line(cfg)
    st.add_output(state, st.Output("experiment", str(out), cmd, model, {"experiment": name}))
    msg = f"Results in **{Path(out).name}** (results.md, results.json). {NEXT['experiment']}"
    return table(result), figure(result), msg, state


def build(ctx: Ctx) -> None:
    with gr.Tab("Experiments", id="experiments"):
        gr.Markdown("Test the papers' findings on the loaded model. Every arm is a recorded run; "
                    "small budgets fit a CPU, the papers used billions of tokens.")
        with gr.Row():
            model = gr.Dropdown(model_choices(None, roots=True), value="default", allow_custom_value=True,
                                label="Model", elem_id="exp-model")
            name = gr.Dropdown(list(EXPERIMENTS), value="axis-ablation", label="Experiment")
            keep = gr.Slider(0.3, 0.95, value=0.8, step=0.05, label="Parameters kept")
            tokens = gr.Number(value=SIZES["experiment_tokens"], precision=0, minimum=1,
                               label="Training tokens per arm")
            seq_len = gr.Number(value=128, precision=0, minimum=2, label="Sequence length")
            batch = gr.Number(value=4, precision=0, minimum=1, label="Batch")
            samples = gr.Number(value=SIZES["experiment_samples"], precision=0, minimum=1,
                                label="Calibration samples")
            eval_tokens = gr.Number(value=SIZES["experiment_eval_tokens"], precision=0, minimum=1,
                                    label="Validation tokens of the arms' own loss columns")
            src = gr.Textbox(value="builtin", label="Data")
        jobs.fields(keep=keep)
        about = gr.Markdown(ABOUT["axis-ablation"])
        gr.Markdown(eval_note() + " The loss columns are each experiment's own validation, on its "
                    "sequence length and tokens; canonical_ppl is the workspace's.")
        with gr.Row():
            go, stop = job_buttons("Run experiment")
        status = gr.Markdown()
        results = gr.Dataframe(label="Results", interactive=False)
        fig = gr.Plot(plots.empty("Run an experiment"), label="Perplexity per arm")
    name.change(lambda n: ABOUT[n], name, about, queue=False, api_visibility="private")
    event = go.click(run, [model, name, keep, tokens, seq_len, batch, samples, eval_tokens, src, ctx.state],
                     [results, fig, status, ctx.state], api_name="experiment", **LONG)
    stop.click(jobs.cancel, None, status, queue=False, api_visibility="private")
    ctx.output_events.append(event)
    follow_models(ctx, model)
