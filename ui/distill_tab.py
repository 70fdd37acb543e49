"""Distill tab: teacher, student, data and the main hyperparameters; live loss, cancel, resume.

The distillation runs in a worker process (ui/lanes.py) that the tab follows; a run that a
cancel or a server restart stopped resumes from its checkpoint with its own settings.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import gradio as gr

from compact import distill
from compact.distill import DistillConfig
from compact.jobs import command_line
from compact.options import default
from ui import jobs, lanes, plots
from ui import state as st
from ui.common import (
    DATA_CHOICES,
    LONG,
    SIZES,
    Ctx,
    eval_note,
    job_buttons,
    model_choices,
    saved,
    scored,
    take_upload,
    upload_box,
)


def loss_plot(events: list[dict]):
    return plots.curves(events, "tokens", ["loss", "kd", "ce", "hidden"], "Distillation loss", "loss")


def status_line(e: dict) -> str:
    eta = e.get("eta_s")
    return (f"step {e['step']}/{e['steps']} · {e['tokens']:,} of {e['total_tokens']:,} tokens · "
            f"loss {e['loss']:.4f} · {e.get('tokens_per_s', 0):.0f} tokens/s"
            + (f" · ETA {eta:.0f} s" if eta is not None else ""))


@jobs.user_errors
def run(teacher: str, student: str, src: str, tokens: int, seq_len: int, batch: int, lr: float,
        temperature: float, kd_weight: float, ce_weight: float, hidden_weight: float, resume: bool,
        state: dict | None, request: gr.Request, progress=gr.Progress()):
    state = st.session(state)
    sid = jobs.session_id(request)
    teacher = st.check_ref(teacher or state["ref"])
    if not student or not str(student).strip():
        raise gr.Error("pick a student: a pruned model from this session or any model reference")
    student = st.check_ref(student)
    src = st.check_data(src)
    previous = st.resumable(state, "distilled", student=student)
    if resume and previous is None:
        raise gr.Error("nothing to resume: this session has no cancelled distillation of that student")
    if resume:
        out = Path(previous.path)
    else:
        out = st.next_output(sid, "distilled", st.checkpoint_bytes(st.CACHE.get(student), training=True))
    cfg = DistillConfig(teacher=teacher, student=student, data=src, out=str(out), tokens=int(tokens),
                        seq_len=int(seq_len), batch=int(batch), lr=float(lr), temperature=float(temperature),
                        kd_weight=float(kd_weight), ce_weight=float(ce_weight),
                        hidden_weight=float(hidden_weight), resume=bool(resume),
                        eval_tokens=0, score=True)  # the canonical evaluation replaces the job's own
    yield from train(cfg, state, sid, progress)


def train(cfg: DistillConfig, state: dict, sid: str, progress):
    """Run the distillation (a worker process, or in the server without workers); yield the tab's
    outputs as it goes: loss plot, status, result, state."""
    cfg.check()
    teacher, student, out = cfg.teacher, cfg.student, Path(cfg.out)
    events: list[dict] = []

    def in_process(job: jobs.Job):
        # the teacher is never changed by distill.run; the student is trained in place: a copy
        return lanes.run_here(distill.run, cfg, job, preload=lambda: dict(
            teacher=st.CACHE.get(teacher), student=st.CACHE.copy(student)))

    def work(job: jobs.Job):
        result = lanes.run_worker(cfg, job, sid) if lanes.enabled() else in_process(job)
        if job.record is not None:
            canonical = result.get("canonical") or {}
            job.record.metrics = {"loss": result.get("loss"), "ppl": canonical.get("ppl_after"),
                                  "setting": canonical.get("setting")}
            job.record.counts(result)
        return result

    # A resumed run is reproduced by the run it continues: the command never says --resume.
    cmd = command_line(dataclasses.replace(cfg, resume=False))
    # Recorded before training ends, so that a cancelled run can be resumed from this session.
    st.add_output(state, st.Output("distilled", str(out), cmd, teacher, {"student": student,
                                                                           "status": "running"}))
    result, cancelled = None, False
    for what, payload in jobs.run(work, sid, "distill", base_model=student,
                                  inputs=cfg.training_settings(), artifact=str(out), config=cfg):
        if what == "progress":
            progress(payload[0], desc=payload[1])
        elif what == "event":
            kind = payload.get("kind")
            if kind == "step":
                events.append(payload)
                progress(payload["step"] / payload["steps"], desc=status_line(payload))
                yield loss_plot(events), status_line(payload), gr.skip(), gr.skip()
            elif kind == "start":
                yield gr.skip(), f"Training {payload['steps']} steps", gr.skip(), gr.skip()
        else:
            result, cancelled = payload, what == "cancelled"
    if cancelled:
        st.add_output(state, st.Output("distilled", str(out), cmd, teacher,
                                       {"student": student, "status": "cancelled"}))
        yield gr.skip(), "Cancelled: a checkpoint was saved; tick *Resume* and start again, or pick the " \
            "run under *Resume run*, to continue.", result or {}, state
        return
    st.add_output(state, st.Output("distilled", str(out), cmd, teacher, {"student": student, **result}))
    st.CACHE.drop(str(out))  # a resumed run rewrites the folder
    msg = (f"Done: {result['steps']} steps, {result['tokens']:,} tokens at "
           f"{result['tokens_per_s']:.0f} tokens/s; {scored(result.get('canonical'))}. "
           f"{saved(out, 'distill')}")
    yield loss_plot(events) if events else gr.skip(), msg, result, state


def choices(state: dict | None):
    return gr.Dropdown(choices=model_choices(state))


def build(ctx: Ctx) -> None:
    d = functools.partial(default, DistillConfig)  # widget defaults are the config's
    with gr.Tab("Distill", id="distill"):
        gr.Markdown("Train a pruned student toward its teacher with logit distillation (KL at a "
                    "temperature), optionally with cross-entropy and hidden-state losses.")
        with gr.Row():
            teacher = gr.Dropdown(model_choices(None, roots=True), value="default", allow_custom_value=True,
                                  label="Teacher")
            student = gr.Dropdown([], value=None, allow_custom_value=True, label="Student (pruned model)")
            src = gr.Dropdown(DATA_CHOICES, value="builtin", allow_custom_value=True, label="Data")
        with gr.Row():
            tokens = gr.Number(value=SIZES["train_tokens"], precision=0, minimum=1, label="Training tokens")
            seq_len = gr.Number(value=SIZES["train_seq_len"], precision=0, minimum=2, label="Sequence length")
            batch = gr.Number(value=SIZES["train_batch"], precision=0, minimum=1, label="Batch")
            lr = gr.Number(value=d("lr"), label="Learning rate")
        with gr.Row():
            temperature = gr.Number(value=d("temperature"), label="Temperature")
            kd_weight = gr.Number(value=d("kd_weight"), label="KD weight")
            ce_weight = gr.Number(value=d("ce_weight"), label="CE weight")
            hidden_weight = gr.Number(value=d("hidden_weight"), label="Hidden-state weight")
            resume = gr.Checkbox(value=False, label="Resume the last run of this student")
        jobs.fields(tokens=tokens, seq_len=seq_len, batch=batch, lr=lr, temperature=temperature,
                    kd_weight=kd_weight, ce_weight=ce_weight, hidden_weight=hidden_weight, resume=resume)
        upload = upload_box("training")
        gr.Markdown(eval_note())
        with gr.Row():
            go, stop = job_buttons("Distill")
        pick, again, interrupted = lanes.resume_controls("distill", "distillation")
        status = gr.Markdown()
        loss = gr.Plot(plots.empty("The loss appears here as training runs"), label="Loss")
        result = gr.JSON(visible=False)
    event = go.click(run, [teacher, student, src, tokens, seq_len, batch, lr, temperature, kd_weight,
                           ce_weight, hidden_weight, resume, ctx.state],
                     [loss, status, result, ctx.state], api_name="distill", **LONG)
    resumed = again.click(lanes.resume_handler("distill", train), [pick, ctx.state],
                          [loss, status, result, ctx.state],
                          api_name="distill_resume", **LONG)
    ctx.output_events += [event, resumed]
    ctx.on_outputs.append((interrupted, [], [pick]))
    ctx.on_load.append((interrupted, [], [pick]))
    stop.click(jobs.cancel, None, status, queue=False, api_visibility="private")
    upload.upload(take_upload, upload, src, api_name="upload_distill_data")
    ctx.on_outputs.append((choices, [ctx.state], [student]))
    # A newly loaded model joins the choices; what is picked stays picked.
    ctx.on_model.append((lambda state: gr.Dropdown(choices=model_choices(state, roots=True)), [ctx.state],
                         [teacher]))
