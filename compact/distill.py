"""Knowledge distillation of a student toward a teacher, on accelerate.

One loop serves Minitron retraining (logit KL, optional CE and intermediate-state losses,
optional teacher correction) and, through TrainHooks, AST sparse training. accelerate does
device placement, mixed precision (bf16 on CUDA, fp32 on CPU), gradient accumulation and
checkpoint state, so `accelerate launch -m compact distill ...` runs it on many GPUs (DDP, FSDP)
with no distributed code here.

Exact resume: the training blocks are one fixed, seeded sequence and each optimizer step takes
the next `batch x grad_accum x processes` of them; a checkpoint (accelerator.save_state) holds
the model, optimizer, scheduler, hooks' state and RNG, and the global RNG is reseeded from
(seed, step) at every step, so a resumed run repeats the uninterrupted one bit for bit.

Folder layout of a run (`out`):
  run.json             the settings, written at the start (checked on --resume)
  metrics.jsonl        one line per optimizer step
  checkpoint/          the last checkpoint (removed when the run finishes)
  teacher_corrected/   the fine-tuned teacher, when teacher correction is on
  model.safetensors, config.json, tokenizer files, compact.json   the trained student
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compact import data, losses, models
from compact.errors import UserError

# Settings that change what training computes; a resumed run must match them.
TRAINING_KEYS = ("teacher", "student", "data", "tokens", "seq_len", "batch", "grad_accum", "lr",
                 "min_lr_ratio", "warmup_steps", "weight_decay", "clip", "temperature", "kd_weight",
                 "ce_weight", "hidden_weight", "teacher_correction_steps", "seed", "chunk")
TOKENIZER_PROBE = "Distillation needs the same tokenizer: naïve café, 12345, <tags> and\ttabs.\n"


@dataclass
class DistillConfig:
    teacher: str
    student: str
    data: str = "builtin"
    out: str = ""
    tokens: int = 65536  # training tokens (rounded down to whole optimizer steps)
    seq_len: int = 256
    batch: int = 8  # sequences per micro-batch and process
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    temperature: float = 1.0
    kd_weight: float = 1.0  # forward KL(teacher || student) * T^2
    ce_weight: float = 0.0  # next-token cross-entropy on the data
    hidden_weight: float = 0.0  # intermediate-state MSE, scaled by the dynamic alpha
    teacher_correction_steps: int = 0  # fine-tune the teacher on the data first (2408.11796)
    checkpoint_every: int = 50  # optimizer steps between checkpoints; 0: only at cancel
    eval_tokens: int = 8192  # validation tokens for the before/after loss
    seed: int = 0
    resume: bool = False
    device: str | None = None
    dtype: str | None = None  # compute dtype; the student's master weights stay fp32
    chunk: int = losses.DEFAULT_CHUNK  # token positions per logit-loss chunk
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def check(self) -> None:
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
        weights = (self.kd_weight, self.ce_weight, self.hidden_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise UserError("loss weights must be >= 0 with at least one positive "
                            "(--kd-weight, --ce-weight, --hidden-weight)")
        if self.teacher_correction_steps < 0 or self.checkpoint_every < 0 or self.eval_tokens < 0:
            raise UserError("step and token counts must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError("min-lr-ratio must be between 0 and 1")
        if not self.out:
            raise UserError("distillation needs an output folder (--out)")
        if self.device:
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise UserError(f"unknown device '{self.device}'") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise UserError("--device cuda was asked for but no CUDA GPU is available")

    def training_settings(self) -> dict:
        return {k: getattr(self, k) for k in TRAINING_KEYS}


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


class _HooksState:
    """Lets accelerator.save_state carry the hooks' state."""

    def __init__(self, hooks: TrainHooks):
        self.hooks = hooks

    def state_dict(self) -> dict:
        return {"name": self.hooks.name, "state": self.hooks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.hooks.load_state_dict(state["state"])


@contextlib.contextmanager
def capture_norms(model, arch, blocks: list[int]):
    """Collect the outputs of the input norms of the given blocks during a forward pass."""
    found: dict[int, torch.Tensor] = {}
    handles = []
    all_blocks = arch.blocks(model)
    for i in blocks:
        norm = arch.block_norms(all_blocks[i])[0]
        handles.append(norm.register_forward_hook(
            lambda _m, _a, out, i=i: found.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _states(found: dict, final: torch.Tensor, indices: list[int], layers: int) -> list[torch.Tensor]:
    return [final if j == layers else found[j] for j in indices]


@dataclass
class TeacherOutput:
    hidden: torch.Tensor  # final post-norm states, (B, T, H)
    weight: torch.Tensor  # LM head
    bias: torch.Tensor | None
    states: list[torch.Tensor]  # post-norm intermediate states paired with the student's


@torch.no_grad()
def teacher_forward(model, arch, ids: torch.Tensor, state_ids: list[int] | None = None) -> TeacherOutput:
    """The teacher's final states (its logits are made chunk by chunk later) and paired states."""
    layers = arch.shape(model.config).layers
    state_ids = state_ids or []
    with capture_norms(model, arch, [j for j in state_ids if j < layers]) as found:
        hidden = arch.base(model)(input_ids=ids, use_cache=False).last_hidden_state
    head = arch.lm_head(model)
    return TeacherOutput(hidden, head.weight, getattr(head, "bias", None),
                         _states(found, hidden, state_ids, layers))


class DistillModule(nn.Module):
    """The student with its losses in forward, so accelerate (DDP/FSDP, autocast) wraps it whole.

    forward(ids, teacher) -> {"loss", "kd", "ce", "hidden"}: losses on next-token positions;
    teacher None gives cross-entropy only (validation, teacher correction).
    """

    def __init__(self, model, arch, cfg: DistillConfig, teacher_shape=None, kept_layers=None):
        super().__init__()
        self.model = model
        self.arch = arch
        self.cfg = cfg
        shape = arch.shape(model.config)
        self.layers = shape.layers
        self.pairs: list[tuple[int, int]] = []
        self.proj = None
        if cfg.hidden_weight > 0 and teacher_shape is not None:
            self.pairs = state_pairs(shape.layers, teacher_shape.layers, kept_layers)
            if shape.hidden != teacher_shape.hidden:
                # One shared learned map from the student's width up to the teacher's (Minitron).
                self.proj = nn.Linear(shape.hidden, teacher_shape.hidden, bias=False,
                                      device=next(model.parameters()).device)
                with torch.no_grad():
                    self.proj.weight.zero_()
                    n = min(shape.hidden, teacher_shape.hidden)
                    self.proj.weight[:n, :n] = torch.eye(n)

    @property
    def teacher_state_ids(self) -> list[int]:
        return [t for _, t in self.pairs]

    def forward(self, ids: torch.Tensor, teacher: TeacherOutput | None = None,
                kd_weight: float | None = None, ce_weight: float | None = None) -> dict:
        cfg = self.cfg
        kd_w = cfg.kd_weight if kd_weight is None else kd_weight
        ce_w = cfg.ce_weight if ce_weight is None else ce_weight
        use_hidden = bool(self.pairs) and teacher is not None and teacher.states
        student_ids = [s for s, _ in self.pairs] if use_hidden else []
        with capture_norms(self.model, self.arch, [j for j in student_ids if j < self.layers]) as found:
            h = self.arch.base(self.model)(input_ids=ids, use_cache=False).last_hidden_state
        head = self.arch.lm_head(self.model)
        t_h = teacher.hidden[:, :-1] if teacher is not None and kd_w != 0 else None
        total, kd, ce = losses.head_losses(
            h[:, :-1], head.weight, getattr(head, "bias", None), ids[:, 1:], t_h,
            teacher.weight if teacher is not None else None,
            teacher.bias if teacher is not None else None,
            cfg.temperature, kd_w, ce_w, cfg.chunk)
        hidden = torch.zeros((), device=h.device)
        if use_hidden:
            l_is = losses.hidden_loss(_states(found, h, student_ids, self.layers), teacher.states, self.proj)
            # Minitron's dynamic alpha = L_logits / L_is: the state loss gets the logit loss's size.
            logit_loss = kd if kd_w != 0 else ce
            alpha = logit_loss / l_is.detach().clamp_min(1e-12)
            total = total + cfg.hidden_weight * alpha * l_is
            hidden = l_is.detach()
        return {"loss": total, "kd": kd, "ce": ce, "hidden": hidden}


def state_pairs(student_layers: int, teacher_layers: int, kept_layers: list[int] | None = None):
    """Student state j paired with a teacher state (see compact.losses.state_pairs).

    A depth-pruned student (compact.json's kept_layers) pairs block j's input with the input of
    the teacher block it came from.
    """
    if kept_layers and len(kept_layers) == student_layers and max(kept_layers) < teacher_layers:
        return [(j, kept_layers[j]) for j in range(1, student_layers)] + [(student_layers, teacher_layers)]
    return losses.state_pairs(student_layers, teacher_layers)


# -- checks ----------------------------------------------------------------------------------

def check_compatible(teacher: models.Loaded, student: models.Loaded) -> None:
    """Same vocabulary size and the same tokenizer (token ids of a probe), or a UserError."""
    tv, sv = teacher.shape.vocab, student.shape.vocab
    if tv != sv:
        raise UserError(f"vocabularies differ: the teacher has {tv} tokens, the student {sv}")
    tt, st = teacher.tokenizer, student.tokenizer
    if tt is st:
        return
    same = (len(tt) == len(st) and tt.get_vocab() == st.get_vocab()
            and tt(TOKENIZER_PROBE)["input_ids"] == st(TOKENIZER_PROBE)["input_ids"]
            and tt.eos_token_id == st.eos_token_id)
    if not same:
        raise UserError("the student's tokenizer differs from the teacher's; distillation "
                        "compares their outputs token by token, so both must use the same one")


def _run_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def check_out(cfg: DistillConfig, world: int, hooks: TrainHooks) -> dict | None:
    """The output folder is new/empty, or (with resume) holds a matching checkpoint."""
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
    now = {**cfg.training_settings(), "processes": world, "hooks": hooks.name}
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"--resume needs the same settings as the run in {out}: {k} was "
                        f"{saved[k]!r}, now {now[k]!r}")
    return json.loads(progress_file.read_text())


# -- accelerate ------------------------------------------------------------------------------

def _mixed_precision(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(cfg: DistillConfig, compute_dtype: torch.dtype, fresh: bool = True):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ
    if fresh and not launched:
        # In one process (CLI, app, tests) each run may pick another device or precision;
        # accelerate keeps those in process-wide singletons, so start them afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    mixed = None if launched and cfg.dtype is None else _mixed_precision(compute_dtype)
    # accelerate only spreads CPU processes (torchrun, accelerate launch) when told cpu=True.
    cpu = models.pick_device(cfg.device).type == "cpu"
    if cfg.device and torch.device(cfg.device).type == "cuda" and torch.device(cfg.device).index \
            is not None and not launched:
        torch.cuda.set_device(torch.device(cfg.device))
    return Accelerator(mixed_precision=mixed, cpu=cpu, gradient_accumulation_steps=cfg.grad_accum)


BETAS = (0.9, 0.95)


def param_groups(params: list[nn.Parameter], cfg: DistillConfig) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(params: list[nn.Parameter], cfg: DistillConfig, device: torch.device):
    return torch.optim.AdamW(param_groups(params, cfg), lr=cfg.lr, betas=BETAS, fused=device.type == "cuda")


def _scheduler(optimizer, cfg: DistillConfig, steps: int):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(cfg.warmup_steps, max(steps - 1, 0)), steps, min_lr_rate=cfg.min_lr_ratio)


def _step_seed(seed: int, step: int) -> None:
    from accelerate.utils import set_seed

    set_seed((seed * 1_000_003 + step) % 2**32, device_specific=True)


@torch.no_grad()
def validation_loss(accelerator, module, blocks: torch.Tensor, batch: int) -> float:
    """Mean next-token CE of the student on the blocks (every process scores all of them)."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch].to(accelerator.device)
        out = module(ids, None, kd_weight=0.0, ce_weight=1.0)
        n = ids[:, 1:].numel()
        total += float(out["ce"]) * n
        count += n
    module.train(was_training)
    return total / max(count, 1)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


# -- teacher correction ----------------------------------------------------------------------

def correct_teacher(cfg: DistillConfig, teacher: models.Loaded, blocks: torch.Tensor,
                    compute_dtype: torch.dtype, on_event=None) -> nn.Module:
    """A copy of the teacher fine-tuned with CE for cfg.teacher_correction_steps on the data."""
    from torch.utils.data import DataLoader

    accelerator = make_accelerator(cfg, compute_dtype, fresh=False)  # the run's own settings
    model = copy.deepcopy(teacher.model).float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    tcfg = copy.copy(cfg)
    tcfg.kd_weight, tcfg.ce_weight, tcfg.hidden_weight = 0.0, 1.0, 0.0
    module = DistillModule(model, teacher.arch, tcfg)
    steps = cfg.teacher_correction_steps
    per_step = cfg.batch * cfg.grad_accum * accelerator.num_processes
    take = torch.cat([blocks] * -(-steps * per_step // len(blocks)))[: steps * per_step]
    optimizer = _optimizer([p for p in module.parameters()], cfg, accelerator.device)
    scheduler = _scheduler(optimizer, cfg, steps)
    loader = DataLoader(take, batch_size=cfg.batch, shuffle=False, drop_last=True)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    step, ce = 0, 0.0
    _step_seed(cfg.seed + 1, 0)
    for ids in loader:
        with accelerator.accumulate(module):
            out = module(ids)
            accelerator.backward(out["loss"])
            ce += float(out["ce"]) / cfg.grad_accum
            if accelerator.sync_gradients:
                if cfg.clip > 0:
                    accelerator.clip_grad_norm_(module.parameters(), cfg.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            step += 1
            if on_event and accelerator.is_main_process:
                on_event({"kind": "teacher_correction", "step": step, "steps": steps, "loss": ce,
                          "ce": ce})
            ce = 0.0
            _step_seed(cfg.seed + 1, step)
    corrected = accelerator.unwrap_model(module).model
    corrected.eval().requires_grad_(False)
    accelerator.free_memory()
    return corrected.to(compute_dtype)


# -- the loop --------------------------------------------------------------------------------

def run(cfg: DistillConfig, hooks: TrainHooks | None = None, on_event=None, should_stop=None,
        teacher: models.Loaded | None = None, student: models.Loaded | None = None) -> dict:
    """Distill cfg.student toward cfg.teacher; see the module docstring.

    teacher/student: already-loaded models to use instead of loading the refs. The student is
    trained in place (pass a copy to keep the original); the teacher is never changed.
    on_event(dict) gets one event per optimizer step and a final one with kind "done" (main
    process only). should_stop() is asked after every step: when true, a checkpoint is saved and
    the run returns with status "cancelled" (resume it with cfg.resume=True).
    """
    from torch.utils.data import DataLoader

    hooks = hooks or TrainHooks()
    cfg.check()
    device = models.pick_device(cfg.device)
    compute_dtype = models.pick_dtype(device, cfg.dtype)
    accelerator = make_accelerator(cfg, compute_dtype)
    device = accelerator.device
    world = accelerator.num_processes
    main = accelerator.is_main_process
    out = Path(cfg.out).expanduser()
    resumed = check_out(cfg, world, hooks)
    emit = on_event if (on_event and main) else (lambda e: None)

    load_kw = dict(device=str(device), trust_remote_code=cfg.trust_remote_code,
                   allow_pickle=cfg.allow_pickle)
    teacher = teacher or models.load(cfg.teacher, dtype=compute_dtype, **load_kw)
    student = student or models.load(cfg.student, dtype=torch.float32, **load_kw)
    if student.model is teacher.model:
        raise UserError("the student must be its own copy of a model, not the teacher itself")
    check_compatible(teacher, student)
    tok = teacher.tokenizer

    per_step = cfg.batch * cfg.grad_accum * world
    steps = (cfg.tokens // cfg.seq_len) // per_step
    if steps == 0:
        raise UserError(f"{cfg.tokens} tokens do not fill one optimizer step of {per_step} "
                        f"sequences of {cfg.seq_len} tokens; raise --tokens or lower --batch")
    blocks = data.blocks(cfg.data, tok, "train", steps * per_step, cfg.seq_len, cfg.seed,
                         model=teacher.model)
    val = data.blocks(cfg.data, tok, "validation", max(1, cfg.eval_tokens // cfg.seq_len),
                      cfg.seq_len, cfg.seed, model=teacher.model) if cfg.eval_tokens else None

    accelerator.wait_for_everyone()  # every process has checked the folder before it is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resumed is None:
            (out / "run.json").write_text(json.dumps(
                {**cfg.training_settings(), "processes": world, "hooks": hooks.name}, indent=2))

    # The teacher: frozen, eval mode, optionally corrected first (kept on disk for resume).
    teacher_model = teacher.model
    corrected_dir = out / "teacher_corrected"
    if cfg.teacher_correction_steps:
        if resumed is not None and (corrected_dir / "compact.json").exists():
            teacher_model = models.load(str(corrected_dir), dtype=compute_dtype, **load_kw).model
        else:
            teacher_model = correct_teacher(cfg, teacher, blocks, compute_dtype, on_event=emit)
            if main:
                models.save(teacher_model, tok, corrected_dir,
                            {"kind": "teacher_correction", "teacher": cfg.teacher, "data": cfg.data,
                             "steps": cfg.teacher_correction_steps, "lr": cfg.lr})
            accelerator.wait_for_everyone()
    teacher_was_training = teacher_model.training
    teacher_model.eval()
    teacher_val = None

    # The student: fp32 master weights (autocast does the low precision), hooks, optimizer.
    model = student.model
    original_dtype = next(model.parameters()).dtype
    model.to(device=device, dtype=torch.float32)
    hooks.prepare(model)
    module = DistillModule(model, student.arch, cfg, teacher.shape, student.meta.get("kept_layers"))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = hooks.make_optimizer(params, cfg) or _optimizer(params, cfg, device)
    scheduler = _scheduler(optimizer, cfg, steps)
    loader = DataLoader(blocks, batch_size=cfg.batch, shuffle=False, drop_last=True)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler, _HooksState(hooks))
    raw = accelerator.unwrap_model(module)
    need_teacher = cfg.kd_weight != 0 or bool(raw.pairs)

    ckpt = out / "checkpoint"
    start_step = 0
    if resumed is not None:
        accelerator.load_state(str(ckpt))
        start_step = int(resumed["step"])
        val_before, teacher_val = resumed.get("val_before"), resumed.get("teacher_val")
        if main:
            _truncate_metrics(out / "metrics.jsonl", start_step)
    else:
        val_before = validation_loss(accelerator, module, val, cfg.batch) if val is not None else None
        if val is not None:
            from compact import evaluate

            teacher_val = evaluate.loss_on(teacher_model, val, cfg.batch)
    total_tokens = steps * per_step * cfg.seq_len
    emit({"kind": "start", "steps": steps, "start_step": start_step, "total_tokens": total_tokens,
          "val_loss_before": val_before, "val_ppl_before": _ppl(val_before),
          "teacher_val_loss": teacher_val})

    def save_checkpoint(step: int, last: dict) -> None:
        tmp = out / "checkpoint.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        # Tied embeddings are stored once; accelerate warns about it on every save.
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / "progress.json").write_text(json.dumps(
                {"step": step, "tokens": step * per_step * cfg.seq_len, "val_before": val_before,
                 "teacher_val": teacher_val, "last": last}, indent=2))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
        accelerator.wait_for_everyone()

    step = start_step
    status = "done"
    last: dict = {}
    metrics_file = open(out / "metrics.jsonl", "a") if main else None
    batches = accelerator.skip_first_batches(loader, start_step * cfg.grad_accum) if start_step else loader
    sums = torch.zeros(4, device=device)
    micro = 0
    started = time.perf_counter()
    try:
        for ids in batches:
            if micro % cfg.grad_accum == 0:
                _step_seed(cfg.seed, step)
                hooks.before_step(step, raw.model, optimizer)
            micro += 1
            with accelerator.accumulate(module):
                t_out = teacher_forward(teacher_model, teacher.arch, ids, raw.teacher_state_ids) \
                    if need_teacher else None
                res = module(ids, t_out)
                accelerator.backward(res["loss"])
                sums += torch.stack([res["loss"].detach().float(), res["kd"], res["ce"], res["hidden"]])
                grad_norm = None
                if accelerator.sync_gradients:
                    hooks.after_backward(step, raw.model, optimizer)
                    if cfg.clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            extra = hooks.after_step(step, raw.model, optimizer) or {}
            step += 1
            mean = (accelerator.reduce(sums, "mean") / cfg.grad_accum).tolist()
            sums.zero_()
            elapsed = time.perf_counter() - started
            done_here = (step - start_step) * per_step * cfg.seq_len
            speed = done_here / elapsed if elapsed > 0 else 0.0
            last = {"loss": mean[0], "kd": mean[1] if cfg.kd_weight else None,
                    "ce": mean[2] if cfg.ce_weight or not cfg.kd_weight else None,  # not computed
                    "hidden": mean[3] if raw.pairs else None}
            event = {"kind": "step", "step": step, "steps": steps,
                     "tokens": step * per_step * cfg.seq_len, "total_tokens": total_tokens, **last,
                     "lr": scheduler.get_last_lr()[0],
                     "grad_norm": float(grad_norm) if grad_norm is not None else None,
                     "tokens_per_s": speed,
                     "eta_s": (steps - step) * per_step * cfg.seq_len / speed if speed else None,
                     **extra}
            if metrics_file:
                metrics_file.write(json.dumps(event, default=float) + "\n")
                metrics_file.flush()
            emit(event)
            if should_stop is not None and step < steps and should_stop():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                status = "cancelled"
                save_checkpoint(step, last)
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                save_checkpoint(step, last)
    finally:
        if metrics_file:
            metrics_file.close()
        teacher_model.train(teacher_was_training)

    train_seconds = time.perf_counter() - started
    tokens_done = step * per_step * cfg.seq_len
    speed = (step - start_step) * per_step * cfg.seq_len / train_seconds if train_seconds > 0 else 0.0
    result = {"status": status, "steps": step, "total_steps": steps, "tokens": tokens_done,
              **{k: last.get(k) for k in ("loss", "kd", "ce", "hidden")},
              "val_loss_before": val_before, "val_ppl_before": _ppl(val_before),
              "val_loss_after": None, "val_ppl_after": None,
              "teacher_val_loss": teacher_val, "teacher_val_ppl": _ppl(teacher_val),
              "tokens_per_s": speed, "train_seconds": train_seconds, "out": str(out),
              "device": str(device), "processes": world}
    if status == "cancelled":
        result["checkpoint"] = str(ckpt)
    else:
        losses_val = validation_loss(accelerator, module, val, cfg.batch) if val is not None else None
        result.update(val_loss_after=losses_val, val_ppl_after=_ppl(losses_val))
        extra_meta = hooks.finalize(raw.model) or {}
        state_dict = None
        if accelerator.distributed_type.name == "FSDP":
            full = accelerator.get_state_dict(module)
            state_dict = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        if main:
            meta = {"kind": hooks.name, "teacher": cfg.teacher, "student": cfg.student,
                    "data": cfg.data, "tokens": tokens_done, "steps": step,
                    "hyperparameters": {k: v for k, v in cfg.training_settings().items()
                                        if k not in ("teacher", "student", "data")},
                    "processes": world,
                    "losses": last,
                    "validation": {"loss_before": val_before, "ppl_before": _ppl(val_before),
                                   "loss_after": losses_val, "ppl_after": _ppl(losses_val),
                                   "teacher_loss": teacher_val, "teacher_ppl": _ppl(teacher_val),
                                   "tokens": int(val.numel()) if val is not None else 0},
                    "tokens_per_s": speed,
                    "student_meta": student.meta or None,
                    **extra_meta}
            models.save(raw.model, student.tokenizer, out, meta, state_dict=state_dict)
            shutil.rmtree(ckpt, ignore_errors=True)
        accelerator.wait_for_everyone()
    raw.model.eval()
    if original_dtype != torch.float32:
        raw.model.to(original_dtype)
    accelerator.free_memory()
    emit({"kind": "done", **result})
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a crashed run wrote after its last checkpoint, so the file has each step once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
