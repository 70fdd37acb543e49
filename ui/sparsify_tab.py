"""Sparsify tab: N:M one-shot (magnitude, Wanda, SparseGPT) or AST training, with SLoRB.

Shows per-layer sparsity of the result and, for AST, the loss and mask flip-rate curves live.
AST and the calibrated methods run in a worker process (ui/lanes.py); magnitude, which needs no
data and takes seconds, in the server.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from compact import hardware, models, sparsify, sparsity
from compact.arch import weight_oi
from compact.jobs import command_line
from compact.options import default
from compact.sparsify import METHODS, SparsifyConfig
from ui import jobs, lanes, plots
from ui import state as st
from ui.common import (
    DATA_CHOICES,
    LONG,
    SIZES,
    Ctx,
    eval_note,
    follow_models,
    job_buttons,
    model_choices,
    saved,
    scored,
)

# Smaller than the command line's default so that a one-shot click answers quickly on a CPU.
APP_SAMPLES = SIZES["sparsify_samples"]


def weights(result: dict | None):
    """The sparsified weights' names, for the mask view's picker (after a job)."""
    if not result or not result.get("out") or not Path(result["out"]).is_dir():
        return gr.Dropdown(choices=[], value=None)
    names = list(sparsity.target_linears(st.CACHE.get(result["out"]).model))
    return gr.Dropdown(choices=names, value=names[0])


@jobs.user_errors
def mask_plot(result: dict | None, name: str | None):
    """One weight of the saved sparse model as a zoomable mask."""
    if not result or not name:
        return gr.skip()
    model = st.CACHE.get(result["out"]).model
    if name not in sparsity.target_linears(model):
        raise gr.Error(f"Weight: '{name}' is not one of this model's sparsified weights")
    n, m = sparsity.parse_pattern(result["pattern"])
    return plots.weight_mask(weight_oi(model.get_submodule(name)), name, n, m)


def flip_plot(events: list[dict]):
    return plots.mask_flips(events)


def loss_plot(events: list[dict]):
    return plots.curves(events, "tokens", ["loss", "kd", "ce"], "AST training loss", "loss")


@jobs.user_errors
def run(model: str | None, method: str, pattern: str, src: str, samples: int, seq_len: int,
        tokens: int, batch: int, lr: float, slorb_k: int, mask_interval: int, mask_margin: float,
        resume: bool, state: dict | None, request: gr.Request, progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    model = st.check_ref(model or state["ref"])
    if method not in METHODS:
        raise gr.Error(f"unknown method '{method}'")
    if resume and method == "ast":
        previous = st.resumable(state, "sparse", method="ast")
        if previous is None:
            raise gr.Error("nothing to resume: this session has no cancelled AST run")
        out = Path(previous.path)
    else:
        need = st.checkpoint_bytes(st.CACHE.get(model), training=method == "ast")
        out = st.next_output(sid, "sparse", need)
    # eval_tokens=0, score: the canonical evaluation replaces the job's own
    cfg = SparsifyConfig(model=model, out=str(out), method=method, pattern=pattern,
                         data=st.check_data(src), samples=int(samples), seq_len=int(seq_len),
                         eval_tokens=0, score=True, tokens=int(tokens), batch=int(batch), lr=float(lr),
                         slorb_k=int(slorb_k or 0), mask_interval=int(mask_interval),
                         mask_margin=float(mask_margin or 0), resume=bool(resume and method == "ast"))
    cfg.check()
    sparsity.check_widths(st.CACHE.get(model).model, cfg.m)  # fail fast, before any worker starts
    yield from sparsify_job(cfg, state, sid, progress)


def sparsify_job(cfg: SparsifyConfig, state: dict, sid: str, progress):
    """Sparsify (a worker process for AST and the calibrated methods; magnitude, quick, in the
    server) and yield the tab's outputs as it goes."""
    cfg.check()
    ref, method, out = cfg.model, cfg.method, Path(cfg.out)
    events: list[dict] = []

    def in_process(job: jobs.Job):
        # one-shot prunes, AST trains a copy in place; only AST can resume (be sliced)
        return lanes.run_here(sparsify.run, cfg, job, resumable=method == "ast", preload=lambda: dict(
            progress=job.progress, dense=st.CACHE.get(ref), student=st.CACHE.copy(ref)))

    def work(job: jobs.Job):
        in_worker = lanes.enabled() and method != "magnitude"
        result = lanes.run_worker(cfg, job, sid) if in_worker else in_process(job)
        st.CACHE.drop(str(out))  # a resumed run rewrites the folder
        sparse = st.CACHE.get(str(out)).model  # what the job saved, from disk
        result["check"] = sparsity.check_pattern(sparse, cfg.n, cfg.m)
        if job.record is not None:
            canonical = result["canonical"]
            job.record.metrics = {"ppl": canonical["ppl_after"], "setting": canonical["setting"],
                                  "sparsity": result["check"]["sparsity"]}
            job.record.counts(result)
        return result

    result, cancelled = None, False
    for what, payload in jobs.run(work, sid, "sparsify", base_model=ref, inputs=vars(cfg),
                                  artifact=str(out), config=cfg):
        if what == "progress":
            progress(payload[0], desc=payload[1])
        elif what == "event":
            if payload.get("kind") == "step":
                events.append(payload)
                progress(payload["step"] / payload["steps"],
                         desc=f"AST step {payload['step']}/{payload['steps']}, "
                              f"{payload.get('tokens_per_s', 0):.0f} tokens/s")
                if payload["step"] % 5 == 0 or payload["step"] == payload["steps"]:
                    yield gr.skip(), loss_plot(events), flip_plot(events), gr.skip(), \
                        f"AST step {payload['step']}/{payload['steps']}", gr.skip()
        else:
            result, cancelled = payload, what == "cancelled"
    if cancelled:
        msg = "Cancelled."
        if method == "ast" and result is not None:
            msg += " Tick *Resume* and start again, or pick the run under *Resume run*, to continue."
            st.add_output(state, st.Output("sparse", str(out), "", ref,
                                           {"status": "cancelled", "method": "ast"}))
        yield gr.skip(), gr.skip(), gr.skip(), result or {}, msg, state
        return
    check = result.pop("check")
    st.add_output(state, st.Output("sparse", str(out), command_line(dataclasses.replace(cfg, resume=False)),
                                   ref, result))
    msg = (f"{result['pattern']} {method}: {check['sparsity']:.1%} zeros, pattern "
           f"{'exact' if result['pattern_ok'] else 'NOT exact'}; {scored(result['canonical'])}. "
           f"{saved(out, 'sparsify')}")
    yield (gr.skip(), loss_plot(events) if events else gr.skip(),
           flip_plot(events) if events else gr.skip(), result, msg, state)


def build(ctx: Ctx) -> None:
    with gr.Tab("Sparsify", id="sparsify"):
        gr.Markdown("N:M semi-structured sparsity. 2:4 can use the sparse tensor cores of NVIDIA Ampere "
                    "and newer GPUs, but is only faster for large layers and many tokens (see the README's "
                    "Performance section); the sparse checkpoint here runs with dense kernels. One-shot: "
                    "magnitude, Wanda, SparseGPT. AST trains the sparse model by distillation from the "
                    "dense one, re-choosing masks as it goes; SLoRB adds a small low-rank term.\n\n"
                    f"This server: {hardware.summary(hardware.props(models.pick_device()))}.")
        with gr.Row():
            model = gr.Dropdown(model_choices(None, roots=True), value="default", allow_custom_value=True,
                                label="Model to sparsify", elem_id="sparsify-model")
            method = gr.Radio(list(METHODS), value="wanda", label="Method")
            pattern = gr.Textbox(value=default(SparsifyConfig, "pattern"), label="Pattern N:M")
            src = gr.Dropdown(DATA_CHOICES, value="builtin", allow_custom_value=True, label="Data")
            samples = gr.Number(value=APP_SAMPLES, precision=0, minimum=1, label="Calibration samples")
            seq_len = gr.Number(value=default(SparsifyConfig, "seq_len"), precision=0, minimum=16,
                                label="Tokens per sample")
        with gr.Accordion("AST training", open=False):
            with gr.Row():
                tokens = gr.Number(value=SIZES["train_tokens"], precision=0, minimum=1,
                                   label="Training tokens")
                batch = gr.Number(value=SIZES["train_batch"], precision=0, minimum=1, label="Batch")
                lr = gr.Number(value=default(SparsifyConfig, "lr"), label="Learning rate")
                mask_interval = gr.Number(value=default(SparsifyConfig, "mask_interval"), precision=0,
                                          minimum=1, label="Mask update interval (steps)")
                mask_margin = gr.Number(value=default(SparsifyConfig, "mask_margin"), minimum=0,
                                        label="Mask margin (a pruned weight must beat a kept one by this "
                                              "fraction; 0 = the paper)")
                slorb_k = gr.Dropdown([0, 16, 32, 64], value=default(SparsifyConfig, "slorb_k"),
                                      label="SLoRB block size (0 = off)")
                resume = gr.Checkbox(value=False, label="Resume the last AST run")
        jobs.fields(method=method, pattern=pattern, mask_interval=mask_interval, mask_margin=mask_margin,
                    slorb_k=slorb_k)
        with gr.Row():
            gr.Markdown(eval_note())
            go, stop = job_buttons("Sparsify")
        pick, again, interrupted = lanes.resume_controls("sparsify", "AST run")
        status = gr.Markdown()
        gr.Markdown("**The mask.** One weight of the result, its first 128 outputs x 128 inputs: kept "
                    "weights coloured by |w|, pruned ones empty. Under N:M every group of M neighbouring "
                    "inputs in a row keeps N; zoom in (drag a box) to see single groups. Pick any weight.")
        # custom values: the choices arrive only after a job, and the API may name any weight
        weight = gr.Dropdown([], value=None, allow_custom_value=True, label="Weight",
                             elem_id="sparsify-weight")
        per_layer = gr.Plot(plots.empty("The mask of one weight appears here after a run"), label="Mask")
        with gr.Row():
            loss = gr.Plot(plots.empty("AST loss"), label="AST loss")
            flips = gr.Plot(plots.empty("AST mask flips per block and the decay schedule"),
                            label="Mask flips and decay")
        gr.Markdown("AST (arXiv 2407.20584) re-chooses each mask from |w| every *mask "
                    "update interval* steps and decays pruned weights by λ(t), so that masks settle: the "
                    "heatmap's rows are blocks, its columns mask updates, its colour the share of a "
                    "block's weights whose mask flipped; it should fade as λ grows.")
        result = gr.JSON(visible=False)
    event = go.click(run, [model, method, pattern, src, samples, seq_len, tokens, batch, lr, slorb_k,
                           mask_interval, mask_margin, resume, ctx.state],
                     [per_layer, loss, flips, result, status, ctx.state], api_name="sparsify", **LONG)
    resumed = again.click(lanes.resume_handler("sparsify", sparsify_job), [pick, ctx.state],
                          [per_layer, loss, flips, result, status, ctx.state],
                          api_name="sparsify_resume", **LONG)
    ctx.output_events += [event, resumed]
    result.change(weights, result, weight, api_visibility="private")
    weight.change(mask_plot, [result, weight], per_layer, api_name="sparsify_mask")
    follow_models(ctx, model)
    ctx.on_outputs.append((interrupted, [], [pick]))
    ctx.on_load.append((interrupted, [], [pick]))
    stop.click(jobs.cancel, None, status, queue=False, api_visibility="private")
