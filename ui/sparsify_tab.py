"""Sparsify tab: N:M one-shot (magnitude, Wanda, SparseGPT) or AST training, with SLoRB.

Shows per-layer sparsity of the result and, for AST, the loss and mask flip-rate curves live.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import gradio as gr

from compact import data, evaluate, models, sparsity
from ui import jobs, plots
from ui import state as st
from ui.common import DATA_CHOICES, HEAVY, Ctx, current, gpu, job_buttons

METHODS = ["magnitude", "wanda", "sparsegpt", "ast"]
EVAL_SEQ_LEN = 256


def layer_plot(check: dict, pattern: str):
    names = list(check["layers"])
    short = [n.replace("model.layers.", "L").replace("transformer.h.", "L") for n in names]
    return plots.bars(short, [check["layers"][n]["sparsity"] for n in names],
                      f"Sparsity per weight ({pattern}; overall {check['sparsity']:.1%})", "zeros", (0, 1))


def flip_plot(events: list[dict]):
    return plots.curves(events, "step", ["flip_prev", "flip_init"],
                        "Mask flip rate (vs previous masks, vs initial masks)", "fraction of weights")


def loss_plot(events: list[dict]):
    return plots.curves(events, "tokens", ["loss", "kd", "ce"], "AST training loss", "loss")


def command(ref: str, out: str, method: str, pattern: str, src: str, samples: int, seq_len: int,
            eval_tokens: int, tokens: int, batch: int, lr: float, slorb_k: int, mask_interval: int,
            mask_margin: float, resume: bool) -> str:
    parts = ["python", "-m", "compact", "sparsify", "--model", ref, "--out", out, "--method", method,
             "--pattern", pattern, "--data", src, "--seq-len", str(seq_len),
             "--eval-tokens", str(eval_tokens)]
    if method in ("wanda", "sparsegpt"):
        parts += ["--samples", str(samples)]
    if method == "ast":
        parts += ["--tokens", str(tokens), "--batch", str(batch), "--lr", str(lr),
                  "--mask-interval", str(mask_interval)]
        if mask_margin:
            parts += ["--mask-margin", str(mask_margin)]
        if slorb_k:
            parts += ["--slorb-k", str(slorb_k)]
        if resume:
            parts.append("--resume")
    return shlex.join(parts)


@gpu
@jobs.user_errors
def run(method: str, pattern: str, src: str, samples: int, seq_len: int, eval_tokens: int,
        tokens: int, batch: int, lr: float, slorb_k: int, mask_interval: int, mask_margin: float,
        resume: bool, state: dict | None, request: gr.Request, progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    src = st.check_data(src)
    n, m = sparsity.parse_pattern(pattern)
    samples, seq_len, eval_tokens = int(samples), int(seq_len), int(eval_tokens)
    tokens, batch, slorb_k, mask_interval = int(tokens), int(batch), int(slorb_k or 0), int(mask_interval)
    if method not in METHODS:
        raise gr.Error(f"unknown method '{method}'")
    dense = current(state)
    sparsity.check_widths(dense.model, m)
    if resume and method == "ast":
        previous = st.resumable(state, "sparse", method="ast")
        if previous is None:
            raise gr.Error("nothing to resume: this session has no cancelled AST run")
        out = Path(previous.path)
    else:
        out = st.next_output(sid, "sparse")
    events: list[dict] = []

    def work(job: jobs.Job):
        seq = min(seq_len, evaluate.context_length(dense.model))
        val = data.blocks(src, dense.tokenizer, "validation", data.n_blocks_for(eval_tokens, seq), seq,
                          model=dense.model)
        job.progress(0.02, "validation perplexity of the dense model")
        before = evaluate.perplexity(dense.model, val)
        result = {"model": state["ref"], "method": method, "pattern": f"{n}:{m}", "out": str(out)}
        if method == "ast":
            from compact import sparse_training

            cfg = sparse_training.AstConfig(
                model=state["ref"], out=str(out), data=src, n=n, m=m, tokens=tokens, seq_len=seq, batch=batch,
                lr=float(lr), mask_interval=mask_interval, mask_margin=float(mask_margin or 0),
                slorb_k=slorb_k, resume=bool(resume), eval_tokens=eval_tokens)
            student = st.CACHE.copy(state["ref"])  # trained in place
            trained = sparse_training.run_ast(cfg, on_event=job.event, should_stop=job.should_stop,
                                              teacher=dense, student=student)
            result["training"] = trained
            if trained.get("status") == "cancelled":
                return {**result, "status": "cancelled"}
            st.CACHE.drop(str(out))
            sparse = st.CACHE.get(str(out)).model
        else:
            calib = None
            if method != "magnitude":
                calib = data.blocks(src, dense.tokenizer, "calibration", samples, seq, model=dense.model)
            work_copy = st.CACHE.copy(state["ref"])  # one-shot prunes in place
            report = sparsity.one_shot(work_copy.model, method, n, m, calib,
                                       progress=lambda f, desc="": job.progress(0.05 + 0.8 * f, desc),
                                       should_stop=job.should_stop)
            if report.get("stopped"):
                return None
            models.save(work_copy.model, dense.tokenizer, out, {
                "source": state["ref"], "sparsify": {"method": method, "pattern": f"{n}:{m}",
                                                     "data": src, "samples": samples}})
            sparse = work_copy.model
            result["layers_pruned"] = len(report["layers"])
        job.progress(0.9, "validation perplexity of the sparse model")
        after = evaluate.perplexity(sparse, val)
        check = sparsity.check_pattern(sparse, n, m)
        result.update(status="done", **sparsity.sparsity_summary(sparse, n, m), ppl_before=before["ppl"],
                      ppl_after=after["ppl"], eval_tokens=before["tokens"], check=check)
        if job.record is not None:
            job.record.metrics = {"ppl": after["ppl"], "sparsity": check["sparsity"]}
        return result

    result = None
    for what, payload in jobs.run(work, sid, "sparsify", base_model=state["ref"],
                                  inputs={"method": method, "pattern": f"{n}:{m}"}, artifact=str(out)):
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
            result = payload
    if result is None or result.get("status") == "cancelled":
        msg = "Cancelled."
        if method == "ast" and result is not None:
            msg += " Tick *Resume* to continue the AST run."
            st.add_output(state, st.Output("sparse", str(out), "", state["ref"],
                                           {"status": "cancelled", "method": "ast"}))
        yield gr.skip(), gr.skip(), gr.skip(), result or {}, msg, state
        return
    check = result.pop("check")
    cmd = command(state["ref"], str(out), method, f"{n}:{m}", src, samples, seq_len, eval_tokens,
                  tokens, batch, lr, slorb_k, mask_interval, mask_margin, bool(resume))
    st.add_output(state, st.Output("sparse", str(out), cmd, state["ref"], result))
    msg = (f"{result['pattern']} {method}: {check['sparsity']:.1%} zeros, pattern "
           f"{'exact' if result['pattern_ok'] else 'NOT exact'}; validation perplexity "
           f"{result['ppl_before']:.2f} → **{result['ppl_after']:.2f}**. Saved to `{out}`.")
    yield (layer_plot(check, result["pattern"]), loss_plot(events) if events else gr.skip(),
           flip_plot(events) if events else gr.skip(), result, msg, state)


def build(ctx: Ctx) -> None:
    with gr.Tab("Sparsify", id="sparsify"):
        gr.Markdown("N:M semi-structured sparsity. 2:4 can use the sparse tensor cores of NVIDIA Ampere "
                    "and newer GPUs, but is only faster for large layers and many tokens (see the README's "
                    "Performance section); the sparse checkpoint here runs with dense kernels. One-shot: "
                    "magnitude, Wanda, SparseGPT. AST trains the sparse model by distillation from the "
                    "dense one, re-choosing masks as it goes; SLoRB adds a small low-rank term.")
        with gr.Row():
            method = gr.Radio(METHODS, value="wanda", label="Method")
            pattern = gr.Textbox(value="2:4", label="Pattern N:M")
            src = gr.Dropdown(DATA_CHOICES, value="builtin", allow_custom_value=True, label="Data")
            samples = gr.Number(value=32, precision=0, minimum=1, label="Calibration samples")
            seq_len = gr.Number(value=256, precision=0, minimum=16, label="Tokens per sample")
            eval_tokens = gr.Number(value=4096, precision=0, minimum=256, label="Validation tokens")
        with gr.Accordion("AST training", open=False):
            with gr.Row():
                tokens = gr.Number(value=65536, precision=0, minimum=1, label="Training tokens")
                batch = gr.Number(value=8, precision=0, minimum=1, label="Batch")
                lr = gr.Number(value=1e-4, label="Learning rate")
                mask_interval = gr.Number(value=10, precision=0, minimum=1,
                                          label="Mask update interval (steps)")
                mask_margin = gr.Number(value=0.0, minimum=0, label="Mask margin (a pruned weight must "
                                        "beat a kept one by this fraction; 0 = the paper)")
                slorb_k = gr.Dropdown([0, 16, 32, 64], value=0, label="SLoRB block size (0 = off)")
                resume = gr.Checkbox(value=False, label="Resume the last AST run")
        with gr.Row():
            go, stop = job_buttons("Sparsify")
        status = gr.Markdown()
        per_layer = gr.Plot(plots.empty("Per-layer sparsity appears here"), label="Per-layer sparsity")
        with gr.Row():
            loss = gr.Plot(plots.empty("AST loss"), label="AST loss")
            flips = gr.Plot(plots.empty("AST mask flip rate"), label="Mask flip rate")
        result = gr.JSON(visible=False)
    event = go.click(run, [method, pattern, src, samples, seq_len, eval_tokens, tokens, batch, lr, slorb_k,
                           mask_interval, mask_margin, resume, ctx.state],
                     [per_layer, loss, flips, result, status, ctx.state], api_name="sparsify", **HEAVY)
    ctx.output_events.append(event)
    stop.click(jobs.cancel, None, status, queue=False, api_visibility="private")
