"""The training loop under compact.distill (and through its hooks compact.sparse_training).

accelerate does device placement, mixed precision (by hardware, compact.hardware: bf16 on
Ampere and newer GPUs, fp16 with loss scaling on older ones, fp32 on CPU), gradient
accumulation and checkpoint state, so `accelerate launch -m compact distill ...` runs the loop on
many GPUs (DDP, FSDP) with no distributed code here.

A run is small set-up steps, then a plain loop: start() (accelerator, output folder check),
plan_steps(), open_folder(), prepare() (optimizer, scheduler, loader, resume), train(), then
save_model() and close(). What is trained comes from the caller: a module with its losses in
forward, a forward(ids) -> dict of scalar tensors ("loss" is trained on), and TrainHooks.

Exact resume: the training blocks are one fixed, seeded sequence and each optimizer step takes
the next `batch x grad_accum x processes` of them; a checkpoint (accelerator.save_state) holds
the model, optimizer, scheduler, hooks' state and RNG, and the global RNG is reseeded from
(seed, step) at every step, so a resumed run repeats the uninterrupted one bit for bit.

Folder layout of a run (`out`):
  run.json             the settings, written at the start (checked on --resume)
  metrics.jsonl        one line per optimizer step
  checkpoint/          the last checkpoint and its progress.json (removed when the run finishes)
  model.safetensors, config.json, tokenizer files, compact.json   the trained model
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compact import hardware, liger, losses, models
from compact.errors import UserError
from compact.options import LoadOptions, option

TRACKERS = ("none", "tensorboard", "trackio", "wandb")  # accelerate's names (log_with)
# --compile: "layers" compiles each transformer block in place (they all run the same code, so one
# compilation serves every layer: seconds), "model" each whole transformer body (one graph: longer
# to compile, fusions across layers too). What each costs and gains: the README's "Speed".
COMPILE = ("off", "layers", "model")


def compile_mode(value) -> str:
    """A --compile value; true/false as recorded before it had modes (runs store, run.json)."""
    return ("model" if value else "off") if isinstance(value, bool) else value


@dataclass(kw_only=True)
class TrainingOptions(LoadOptions):
    """What every training run takes (distillation and AST): data, budget, optimizer, loss mix."""

    data: str = option("builtin", "training/validation text (SRC)")
    tokens: int = option(65536, "training tokens (rounded down to whole optimizer steps)")
    seq_len: int = option(256, "tokens per sequence")
    batch: int = option(8, "sequences per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr x this")
    warmup_steps: int = option(10, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "max gradient norm (0: off)")
    temperature: float = option(1.0, "distillation temperature")
    kd_weight: float = option(1.0, "KL(teacher||student) weight (times T^2)")
    ce_weight: float = option(0.0, "cross-entropy weight")
    checkpoint_every: int = option(50, "optimizer steps between checkpoints (0: only at cancel)")
    eval_tokens: int = option(8192, "validation tokens for the before/after loss")
    seed: int = option(0, "seed of the data order and of every step")
    chunk: int = option(losses.DEFAULT_CHUNK, "token positions per logit-loss chunk (memory bound)")
    loss_kernel: str = option("compact", "logit-loss kernel: compact's chunked loss (any device) or "
                                         "liger-kernel's fused Triton kernels (CUDA)", choices=liger.KERNELS)
    compile: str = option("off", "torch.compile the student's and teacher's transformer layers "
                                 "(each layer: fast to compile) or whole bodies (model: slower to "
                                 "compile); meant for GPUs", choices=COMPILE)
    resume: bool = option(False, "continue the run in --out exactly")
    report_to: str = option("none", "also send each step's metrics to this tracker, through accelerate "
                                    "(tensorboard writes under --out/logs)", choices=TRACKERS)

    def __post_init__(self):
        self.compile = compile_mode(self.compile)

    def check_training(self) -> None:
        if self.tokens <= 0:
            raise UserError("the token budget must be positive")
        if self.seq_len < 2:
            raise UserError("sequence length must be at least 2")
        for name in ("batch", "grad_accum", "chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise UserError("the learning rate must be positive")
        if not self.temperature > 0:
            raise UserError("the temperature must be positive")
        if self.checkpoint_every < 0 or self.eval_tokens < 0:
            raise UserError("step and token counts must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError("min-lr-ratio must be between 0 and 1")
        if not self.out:
            raise UserError("training needs an output folder (--out)")
        check_tracker(self.report_to)
        if self.compile not in COMPILE:
            raise UserError(f"unknown --compile '{self.compile}': use {', '.join(COMPILE)}")
        if self.loss_kernel not in liger.KERNELS:
            raise UserError(f"unknown loss kernel '{self.loss_kernel}': use {', '.join(liger.KERNELS)}")
        if self.device:
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise UserError(f"unknown device '{self.device}'") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise UserError("--device cuda was asked for but no CUDA GPU is available")

    def training_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(TrainingOptions)}

if TYPE_CHECKING:
    from compact.distill import DistillConfig


class TrainHooks:
    """Extension points of the loop (AST subclasses this). Every method may be left as is.

    `step` is the 0-based index of the optimizer step being taken, the same in before_step,
    after_backward and after_step. `student` is the plain (unwrapped) model.
    """

    name = "distill"

    def prepare(self, student) -> None:
        """Once, after the student is loaded, before the optimizer is built (may wrap modules)."""

    def make_optimizer(self, params, cfg: DistillConfig) -> torch.optim.Optimizer | None:
        return None  # None: the default AdamW

    def before_step(self, step: int, student, optimizer) -> None:
        pass

    def after_backward(self, step: int, student, optimizer) -> None:
        """Gradients are present (accumulated and synchronised), before clipping and the step."""

    def after_step(self, step: int, student, optimizer) -> dict:
        return {}  # extra metrics for the event and metrics.jsonl

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finalize(self, student) -> dict:
        return {}  # extra meta for compact.json


class HooksState:
    """Lets accelerator.save_state carry the hooks' state."""

    def __init__(self, hooks: TrainHooks):
        self.hooks = hooks

    def state_dict(self) -> dict:
        return {"name": self.hooks.name, "state": self.hooks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.hooks.load_state_dict(state["state"])


# -- accelerate ------------------------------------------------------------------------------

def check_tracker(name: str) -> None:
    """A tracker that is not installed is refused here; accelerate would only skip it quietly."""
    import accelerate.utils as au

    if name not in TRACKERS:
        raise UserError(f"unknown tracker '{name}': use {', '.join(TRACKERS)}")
    if name != "none" and not getattr(au, f"is_{name}_available")():
        raise UserError(f"--report-to {name} needs the '{name}' package: pip install {name}")


def make_accelerator(cfg: DistillConfig, compute_dtype: torch.dtype, fresh: bool = True):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ
    if fresh and not launched:
        # In one process (CLI, app, tests) each run may pick another device or precision;
        # accelerate keeps those in process-wide singletons, so start them afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    mixed = None if launched and cfg.dtype in (None, "auto") else hardware.mixed_precision(compute_dtype)
    # accelerate only spreads CPU processes (torchrun, accelerate launch) when told cpu=True.
    cpu = models.pick_device(cfg.device).type == "cpu"
    if cfg.device and torch.device(cfg.device).type == "cuda" and torch.device(cfg.device).index \
            is not None and not launched:
        torch.cuda.set_device(torch.device(cfg.device))
    # Trackers log nothing until Loop's init_trackers; their local files go to <out>/logs.
    out = Path(cfg.out).expanduser()
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    return Accelerator(mixed_precision=mixed, cpu=cpu, gradient_accumulation_steps=cfg.grad_accum,
                       log_with=None if cfg.report_to == "none" else cfg.report_to, project_config=project)


# -- optimizer, schedule, seeds --------------------------------------------------------------

BETAS = (0.9, 0.95)


def param_groups(params: list[nn.Parameter], cfg: DistillConfig) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: list[nn.Parameter], cfg: DistillConfig, device: torch.device):
    return torch.optim.AdamW(param_groups(params, cfg), lr=cfg.lr, betas=BETAS, fused=device.type == "cuda")


def make_scheduler(optimizer, cfg: DistillConfig, steps: int):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(cfg.warmup_steps, max(steps - 1, 0)), steps, min_lr_rate=cfg.min_lr_ratio)


def step_seed(seed: int, step: int) -> None:
    """Reseed everything from (seed, step): a resumed step draws what the uninterrupted one did."""
    from accelerate.utils import set_seed

    set_seed((seed * 1_000_003 + step) % 2**32, device_specific=True)


def optimizer_step(accelerator, module, optimizer, scheduler, clip: float,
                   after_backward: Callable[[], None] | None = None):
    """Inside accelerator.accumulate, after backward: at the last micro-batch of an accumulation,
    after_backward(), clipping (clip > 0), the optimizer and scheduler steps and zeroed grads.

    Returns the gradient norm before clipping; None between accumulations or without clipping.
    """
    if not accelerator.sync_gradients:
        return None  # gradients are still being accumulated
    if after_backward is not None:
        after_backward()
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), clip) if clip > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# -- the output folder -----------------------------------------------------------------------

def _run_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def run_settings(cfg: DistillConfig, world: int, hooks: TrainHooks) -> dict:
    """What run.json holds, and what a resumed run must match."""
    return {**cfg.training_settings(), "processes": world, "hooks": hooks.name}


def check_out(cfg: DistillConfig, world: int, hooks: TrainHooks) -> dict | None:
    """The output folder is new/empty, or (with resume) holds a matching checkpoint.

    Returns the checkpoint's progress.json when resuming, else None.
    """
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")
    progress_file = out / "checkpoint" / "progress.json"
    if not cfg.resume:
        if _run_files(out):
            what = "another run" if (out / "run.json").exists() or (out / "compact.json").exists() \
                else "files"
            raise UserError(f"output folder {out} already holds {what}; pass --resume to continue "
                            "a run or choose an empty folder")
        return None
    if not progress_file.exists():
        done = " (the run there has finished)" if (out / "compact.json").exists() else ""
        raise UserError(f"nothing to resume in {out}: no checkpoint{done}")
    if not (out / "run.json").exists():
        raise UserError(f"cannot resume in {out}: its run.json (the run's settings) is missing")
    saved = json.loads((out / "run.json").read_text())
    if "compile" in saved:
        saved["compile"] = compile_mode(saved["compile"])
    now = run_settings(cfg, world, hooks)
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"--resume needs the same settings as the run in {out}: {k} was "
                        f"{saved[k]!r}, now {now[k]!r}")
    return json.loads(progress_file.read_text())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a crashed run wrote after its last checkpoint, so the file has each step once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# -- a run -----------------------------------------------------------------------------------

@dataclass
class Loop:
    """One training run: start(), plan_steps() and prepare() fill it in, train() advances it."""

    cfg: DistillConfig
    hooks: TrainHooks
    accelerator: Any
    compute_dtype: torch.dtype
    out: Path
    resumed: dict | None  # the checkpoint's progress.json when resuming
    per_step: int = 0  # sequences per optimizer step, all processes together
    steps: int = 0  # optimizer steps of the whole run
    module: Any = None  # as accelerator.prepare returned it (possibly wrapped)
    model: Any = None  # the plain model inside it, as the hooks see it
    optimizer: Any = None
    scheduler: Any = None
    loader: Any = None
    start_step: int = 0
    step: int = 0  # optimizer steps taken
    status: str = "done"  # or "cancelled"
    last: dict = field(default_factory=dict)  # the last step's losses
    progress: dict = field(default_factory=dict)  # the caller's extra fields for progress.json
    seconds: float = 0.0  # spent in train()

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"

    def tokens(self, steps: int) -> int:
        return steps * self.per_step * self.cfg.seq_len

    def speed(self) -> float:
        """Tokens per second trained by this call of train() (a resumed run's own steps)."""
        return self.tokens(self.step - self.start_step) / self.seconds if self.seconds > 0 else 0.0


def start(cfg: DistillConfig, hooks: TrainHooks) -> Loop:
    """The accelerator, and the output folder checked (nothing is written yet)."""
    device = models.pick_device(cfg.device)
    compute_dtype = models.pick_dtype(device, cfg.dtype)
    accelerator = make_accelerator(cfg, compute_dtype)
    resumed = check_out(cfg, accelerator.num_processes, hooks)
    return Loop(cfg, hooks, accelerator, compute_dtype, Path(cfg.out).expanduser(), resumed)


def plan_steps(loop: Loop) -> int:
    """The run's optimizer steps: the token budget in whole steps."""
    cfg = loop.cfg
    loop.per_step = cfg.batch * cfg.grad_accum * loop.world
    loop.steps = (cfg.tokens // cfg.seq_len) // loop.per_step
    if loop.steps == 0:
        raise UserError(f"{cfg.tokens} tokens do not fill one optimizer step of {loop.per_step} "
                        f"sequences of {cfg.seq_len} tokens; raise --tokens or lower --batch")
    return loop.steps


def open_folder(loop: Loop) -> None:
    """The output folder, with run.json on a fresh run."""
    loop.accelerator.wait_for_everyone()  # every process has checked the folder before it is written
    if loop.main:
        loop.out.mkdir(parents=True, exist_ok=True)
        if loop.resumed is None:
            (loop.out / "run.json").write_text(json.dumps(run_settings(loop.cfg, loop.world, loop.hooks),
                                                          indent=2))
    if loop.cfg.report_to != "none":
        settings = run_settings(loop.cfg, loop.world, loop.hooks)
        loop.accelerator.init_trackers(f"compact-{loop.hooks.name}", config={
            k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))})


def prepare(loop: Loop, module: nn.Module, blocks: torch.Tensor) -> None:
    """Optimizer, scheduler and loader for `module` (which holds the trained model as .model and
    computes its losses in forward), through accelerator.prepare; on resume, the checkpoint."""
    from torch.utils.data import DataLoader

    cfg, acc = loop.cfg, loop.accelerator
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = loop.hooks.make_optimizer(params, cfg) or make_optimizer(params, cfg, acc.device)
    loop.scheduler = make_scheduler(optimizer, cfg, loop.steps)
    loader = DataLoader(blocks, batch_size=cfg.batch, shuffle=False, drop_last=True)
    loop.module, loop.optimizer, loop.loader = acc.prepare(module, optimizer, loader)
    acc.register_for_checkpointing(loop.scheduler, HooksState(loop.hooks))
    loop.model = acc.unwrap_model(loop.module).model
    if loop.resumed is not None:
        acc.load_state(str(loop.checkpoint))
        loop.start_step = loop.step = int(loop.resumed["step"])
        if loop.main:
            truncate_metrics(loop.out / "metrics.jsonl", loop.start_step)


def train(loop: Loop, forward: Callable[[torch.Tensor], dict], keys: tuple[str, ...],
          summarize: Callable[[dict], dict], emit: Callable[[dict], None], should_stop=None) -> None:
    """The plain loop over the run's remaining micro-batches, one optimizer step per grad_accum.

    forward(ids) -> dict of scalar tensors: "loss" is trained on, `keys` of it are averaged over
    the step's micro-batches and processes; summarize({key: mean}) -> loop.last, the step's
    losses. Every step is written to metrics.jsonl and emitted; should_stop() true saves a
    checkpoint and ends the loop with loop.status "cancelled".
    """
    acc, cfg, hooks = loop.accelerator, loop.cfg, loop.hooks
    metrics_file = open(loop.out / "metrics.jsonl", "a") if loop.main else None
    batches = acc.skip_first_batches(loop.loader, loop.start_step * cfg.grad_accum) \
        if loop.start_step else loop.loader
    sums = torch.zeros(len(keys), device=acc.device)
    micro = 0
    started = time.perf_counter()
    try:
        for ids in batches:
            if micro % cfg.grad_accum == 0:  # the first micro-batch of a step
                step_seed(cfg.seed, loop.step)
                hooks.before_step(loop.step, loop.model, loop.optimizer)
            micro += 1
            with acc.accumulate(loop.module):
                res = forward(ids)
                acc.backward(res["loss"])
                sums += torch.stack([res[k].detach().float() for k in keys])
                grad_norm = optimizer_step(
                    acc, loop.module, loop.optimizer, loop.scheduler, cfg.clip,
                    lambda: hooks.after_backward(loop.step, loop.model, loop.optimizer))
            if not acc.sync_gradients:
                continue
            extra = hooks.after_step(loop.step, loop.model, loop.optimizer) or {}
            loop.step += 1
            mean = (acc.reduce(sums, "mean") / cfg.grad_accum).tolist()
            sums.zero_()
            loop.last = summarize(dict(zip(keys, mean, strict=True)))
            event = _step_event(loop, grad_norm, extra, time.perf_counter() - started)
            if metrics_file:
                metrics_file.write(json.dumps(event, default=float) + "\n")
                metrics_file.flush()
            if cfg.report_to != "none":  # the same numbers to the tracker (main process only)
                acc.log(tracked(event), step=loop.step)
            emit(event)
            if _stop_or_save(loop, should_stop):
                break
    finally:
        if metrics_file:
            metrics_file.close()
    loop.seconds = time.perf_counter() - started


def tracked(event: dict) -> dict:
    """A step event's numbers for a tracker, under train/ (the step is the tracker's own axis)."""
    return {f"train/{k}": v for k, v in event.items() if k not in ("kind", "step", "steps", "total_tokens")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _step_event(loop: Loop, grad_norm, extra: dict, elapsed: float) -> dict:
    speed = loop.tokens(loop.step - loop.start_step) / elapsed if elapsed > 0 else 0.0
    return {"kind": "step", "step": loop.step, "steps": loop.steps, "tokens": loop.tokens(loop.step),
            "total_tokens": loop.tokens(loop.steps), **loop.last,
            "lr": loop.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": speed,
            "eta_s": loop.tokens(loop.steps - loop.step) / speed if speed else None,
            **extra}


def _stop_or_save(loop: Loop, should_stop) -> bool:
    """After a step: True when cancelled (checkpoint saved); else the periodic checkpoint."""
    acc, step = loop.accelerator, loop.step
    if should_stop is not None and step < loop.steps and should_stop():
        acc.set_trigger()  # check_trigger() sees it on every process, so all stop at this step
    if acc.check_trigger():
        loop.status = "cancelled"
        save_checkpoint(loop)
        return True
    every = loop.cfg.checkpoint_every
    if every and step % every == 0 and step < loop.steps:
        save_checkpoint(loop)
    return False


def save_checkpoint(loop: Loop) -> None:
    """accelerator.save_state and progress.json into checkpoint.tmp, then swapped in whole, so a
    crash mid-save leaves the previous checkpoint."""
    acc, tmp = loop.accelerator, loop.out / "checkpoint.tmp"
    if loop.main:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    # Tied embeddings are stored once; accelerate warns about it on every save.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if loop.main:
        (tmp / "progress.json").write_text(json.dumps(
            {"step": loop.step, "tokens": loop.tokens(loop.step), **loop.progress, "last": loop.last},
            indent=2))
        shutil.rmtree(loop.checkpoint, ignore_errors=True)
        tmp.rename(loop.checkpoint)
    acc.wait_for_everyone()


def save_model(loop: Loop, tokenizer, meta: dict, dtype: torch.dtype | None = None) -> None:
    """hooks.finalize, then the trained model with meta (and the hooks' extra) into the output
    folder, whose checkpoint is no longer needed. dtype: the dtype to write (the student's
    source's; the fp32 master weights stay in memory)."""
    extra_meta = loop.hooks.finalize(loop.model) or {}
    state_dict = None
    if loop.accelerator.distributed_type.name == "FSDP":
        # Every process holds a shard; all of them take part in gathering the whole weights.
        full = loop.accelerator.get_state_dict(loop.module)
        state_dict = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    if loop.main:
        models.save(loop.model, tokenizer, loop.out, {**meta, **extra_meta}, state_dict=state_dict,
                    dtype=dtype)
        shutil.rmtree(loop.checkpoint, ignore_errors=True)
    loop.accelerator.wait_for_everyone()


def close(loop: Loop, dtype: torch.dtype) -> None:
    """The model in eval mode and back in `dtype` (its own before training); trackers closed and
    accelerate let go."""
    loop.model.eval()
    if dtype != torch.float32:
        loop.model.to(dtype)
    # Each tracker's finish() is what accelerator.end_training() does, minus destroying the
    # process group, which a caller under `accelerate launch` (search, experiments) still needs.
    for tracker in loop.accelerator.trackers:
        tracker.finish()
    loop.accelerator.trackers.clear()
    loop.accelerator.free_memory()


# -- progress lines ------------------------------------------------------------------------------

def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def describe(event: dict) -> str | None:
    """One line of text for a training event (None for events that need none)."""
    kind = event.get("kind")
    if kind == "step":
        parts = [f"step {event['step']}/{event['steps']}", f"tokens {event['tokens']:,}",
                 f"loss {event['loss']:.4f}"]
        parts += [f"{k} {event[k]:.4f}" for k in ("kd", "ce", "hidden") if event.get(k)]
        parts += [f"lr {event['lr']:.2e}", f"{event['tokens_per_s']:,.0f} tok/s",
                  f"eta {_duration(event.get('eta_s'))}"]
        return "  ".join(parts)
    if kind == "teacher_correction":
        return f"teacher correction {event['step']}/{event['steps']}  ce {event['ce']:.4f}"
    if kind == "start":
        before = event.get("val_ppl_before")
        return (f"{event['steps']} steps, {event['total_tokens']:,} tokens"
                + (f"; validation ppl before {before:.2f}" if before else "")
                + (f"; resuming at step {event['start_step']}" if event.get("start_step") else ""))
    return None


def relay(on_event=None, progress=None) -> Callable[[dict], None]:
    """One event sink: events to on_event as they are, steps to progress(fraction, message).

    An experiment announces each arm with an "arm" event; its steps then fill that arm's share
    of one bar, and every message says which arm of how many is running."""
    arm: dict = {}

    def report(fraction: float, message: str) -> None:
        if arm:  # inside an arm: that arm's share of the bar, and its name first
            fraction, message = (arm["arm"] - 1 + fraction) / arm["arms"], f"{arm_label(arm)}: {message}"
        progress(fraction, message)

    def emit(event: dict) -> None:
        if on_event is not None:
            on_event(event)
        if progress is None:
            return
        kind = event.get("kind")
        if kind == "data":  # the data source's own progress (the teacher source generating)
            report(event["fraction"], event["message"])
        elif kind == "arm":
            arm.update(event)
            progress((event["arm"] - 1) / event["arms"], arm_label(arm))
        elif kind in ("step", "start", "teacher_correction"):
            report(event["step"] / event["steps"] if kind != "start" else 0.0, describe(event))

    return emit


def data_progress(emit: Callable[[dict], None]) -> Callable[[float, str], None]:
    """progress(fraction, message) for compact.data, as "data" events through an event sink."""
    return lambda fraction, message: emit({"kind": "data", "fraction": fraction, "message": message})


def arm_label(event: dict) -> str:
    return f"arm {event['arm']} of {event['arms']} ({event['name']})"
