"""Knowledge distillation of a student toward a teacher.

Minitron retraining: logit KL, optional CE and intermediate-state losses, optional teacher
correction, trained in compact.train's loop (see there for accelerate, exact resume and the
output folder). AST sparse training (compact.sparse_training) is this run with its TrainHooks.
Distillation adds to the output folder:
  teacher_corrected/   the fine-tuned teacher, when teacher correction is on
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
from dataclasses import dataclass, fields

import torch
from torch import nn

from compact import data, liger, losses, models, scoreboard, train
from compact.errors import Cancelled, UserError
from compact.options import LoadOptions, option, options
from compact.scoreboard import ScoreOptions
from compact.train import TrainHooks

# Options that change how a run is carried out or reported, not what it computes: a resumed run
# may change them (and the load options); every other option must match its checkpoint's.
RUN_ONLY = ("out", "resume", "checkpoint_every", "eval_tokens", "report_to", "score")
TOKENIZER_PROBE = "Distillation needs the same tokenizer: naïve café, 12345, <tags> and\ttabs.\n"


@dataclass(kw_only=True)
class DistillConfig(ScoreOptions, train.TrainingOptions):
    teacher: str = option(help="teacher REF")
    student: str = option(help="student REF (e.g. a pruned checkpoint)")
    out: str = option("", "folder for the trained student and checkpoints")
    hidden_weight: float = option(0.0, "intermediate-state loss weight (times the dynamic alpha)")
    teacher_correction_steps: int = option(0, "fine-tune the teacher on the data first (2408.11796)")

    def check(self) -> None:
        if not self.out:
            raise UserError("distillation needs an output folder (--out)")
        self.check_training()
        weights = (self.kd_weight, self.ce_weight, self.hidden_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise UserError("loss weights must be >= 0 with at least one positive "
                            "(--kd-weight, --ce-weight, --hidden-weight)")
        if self.teacher_correction_steps < 0:
            raise UserError("step and token counts must not be negative")
        if self.compile != "off" and self.hidden_weight > 0:
            # The states are caught by forward hooks made per step; compiled code replays the
            # hooks it was traced with (torch does not guard on submodules' hooks), not new ones.
            raise UserError("--compile does not combine with --hidden-weight (the intermediate "
                            "states are captured by hooks that a compiled body does not run); drop one")

    def training_settings(self) -> dict:
        """The options that change what training computes: run.json holds them, resume checks them."""
        skip = {f.name for f in fields(LoadOptions)} | set(RUN_ONLY)
        return {f.name: getattr(self, f.name) for f in options(self) if f.name not in skip}

@contextlib.contextmanager
def capture_norms(model, arch, blocks: list[int]):
    """Collect the intermediate states of the given blocks during a forward pass (the outputs of
    their input norms; a model without an adapter: the blocks' inputs)."""
    found: dict[int, torch.Tensor] = {}
    all_blocks = arch.blocks(model)
    handles = [arch.state_hook(all_blocks[i], lambda out, i=i: found.__setitem__(i, out)) for i in blocks]
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
    softcap: float | None = None  # final logit soft-capping (Gemma 2)


@torch.no_grad()
def teacher_forward(model, arch, ids: torch.Tensor, state_ids: list[int] | None = None,
                    body=None) -> TeacherOutput:
    """The teacher's final states (its logits are made chunk by chunk later) and paired states.

    body: what computes the base model's states, when not arch.base(model) itself (a compiled
    wrapper of it, see compiled_body; compile_blocks compiles in place instead)."""
    layers = arch.shape(model.config).layers
    state_ids = state_ids or []
    with capture_norms(model, arch, [j for j in state_ids if j < layers]) as found:
        body = arch.base(model) if body is None else body
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    head = arch.lm_head(model)
    return TeacherOutput(hidden, head.weight, getattr(head, "bias", None),
                         _states(found, hidden, state_ids, layers), logit_softcap(model))


def logit_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def compile_problem(device: torch.device) -> str | None:
    """Why --compile cannot run here (None: it can): on a CPU, inductor builds C++ code."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        return ("--compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); install one "
                "or drop --compile")
    return None


def compiled_body(model, arch):
    """--compile model: torch.compile of the model's transformer body as a separate wrapper; the
    model itself, its parameters and state_dict keys stay as they are."""
    return torch.compile(arch.base(model))


def compile_blocks(model, arch):
    """--compile layers: torch.compile of each transformer block, in place (nn.Module.compile).
    The blocks run the same code, so one compilation serves them all: several times faster to
    compile than the whole body (README, "Speed"), at the cost of fusions across layers.
    Parameters and state_dict keys stay as they are. Returns the function that makes the blocks
    plain again; run() calls it when training ends, so a model passed in leaves as it came."""
    blocks = list(arch.blocks(model))
    for block in blocks:
        block.compile()

    def undo():
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set
    return undo


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
        # compile_body() puts a compiled wrapper here; a list, so that it is no submodule (its
        # parameters would be listed twice, and its state_dict keys differ)
        self.bodies: list = []
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

    def compile_body(self) -> None:
        """This module's forward runs the student's body through torch.compile from now on."""
        self.bodies = [compiled_body(self.model, self.arch)]

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
            body = self.bodies[0] if self.bodies else self.arch.base(self.model)
            h = body(input_ids=ids, use_cache=False).last_hidden_state
        head = self.arch.lm_head(self.model)
        t_h = teacher.hidden[:, :-1] if teacher is not None and kd_w != 0 else None
        total, kd, ce = losses.head_losses(
            h[:, :-1], head.weight, getattr(head, "bias", None), ids[:, 1:], t_h,
            teacher.weight if teacher is not None else None,
            teacher.bias if teacher is not None else None,
            cfg.temperature, kd_w, ce_w, cfg.chunk, logit_softcap(self.model),
            teacher.softcap if teacher is not None else None, cfg.loss_kernel)
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

    accelerator = train.make_accelerator(cfg, compute_dtype, fresh=False)  # the run's own settings
    model = copy.deepcopy(teacher.model).float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    tcfg = copy.copy(cfg)
    tcfg.kd_weight, tcfg.ce_weight, tcfg.hidden_weight = 0.0, 1.0, 0.0
    module = DistillModule(model, teacher.arch, tcfg)
    steps = cfg.teacher_correction_steps
    per_step = cfg.batch * cfg.grad_accum * accelerator.num_processes
    take = torch.cat([blocks] * -(-steps * per_step // len(blocks)))[: steps * per_step]
    optimizer = train.make_optimizer([p for p in module.parameters()], cfg, accelerator.device)
    scheduler = train.make_scheduler(optimizer, cfg, steps)
    loader = DataLoader(take, batch_size=cfg.batch, shuffle=False, drop_last=True)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    step, ce = 0, 0.0
    train.step_seed(cfg.seed + 1, 0)  # its own seed sequence, apart from the student's steps
    for ids in loader:
        with accelerator.accumulate(module):
            out = module(ids)
            accelerator.backward(out["loss"])
            ce += float(out["ce"]) / cfg.grad_accum
            train.optimizer_step(accelerator, module, optimizer, scheduler, cfg.clip)
        if accelerator.sync_gradients:
            step += 1
            if on_event and accelerator.is_main_process:
                on_event({"kind": "teacher_correction", "step": step, "steps": steps, "loss": ce,
                          "ce": ce})
            ce = 0.0
            train.step_seed(cfg.seed + 1, step)
    corrected = accelerator.unwrap_model(module).model
    corrected.eval().requires_grad_(False)
    accelerator.free_memory()
    return corrected.to(compute_dtype)


# -- a distillation run ----------------------------------------------------------------------

LOSS_KEYS = ("loss", "kd", "ce", "hidden")  # DistillModule's outputs, averaged per step


def run(cfg: DistillConfig, hooks: TrainHooks | None = None, on_event=None, should_stop=None,
        teacher: models.Loaded | None = None, student: models.Loaded | None = None,
        progress=None) -> dict:
    """Distill cfg.student toward cfg.teacher; see the module docstring.

    teacher/student: already-loaded models to use instead of loading the refs. The student is
    trained in place (pass a copy to keep the original); the teacher is never changed.
    on_event(dict) gets one event per optimizer step and a final one with kind "done", and
    progress(fraction, message) a line per step (main process only). should_stop() is asked
    after every step: when true, a checkpoint is saved and Cancelled is raised with the result
    (status "cancelled"; resume it with cfg.resume=True).
    """
    hooks = hooks or TrainHooks()
    cfg.check()
    loop = train.start(cfg, hooks)
    emit = train.relay(on_event, progress) if loop.main else (lambda e: None)
    device = loop.accelerator.device
    why = (liger.problem(device) if cfg.loss_kernel == "liger" else None) \
        or (compile_problem(device) if cfg.compile != "off" else None)
    if why:
        raise UserError(why)  # before anything is loaded
    teacher, student = _load(cfg, loop, teacher, student)
    # Scored from disk before training: the output folder may be the student's own.
    before = scoreboard.score(cfg.student, load=cfg) if cfg.score and loop.main else None
    blocks, val = _data(cfg, loop, teacher, train.data_progress(emit))
    train.open_folder(loop)
    teacher_model = _teacher_model(cfg, loop, teacher, blocks, emit)
    teacher_was_training = teacher_model.training
    teacher_model.eval()
    original_dtype = next(student.model.parameters()).dtype
    raw = _prepare_student(cfg, loop, teacher, student, blocks)
    _start(loop, teacher_model, val, emit)
    need_teacher = cfg.kd_weight != 0 or bool(raw.pairs)
    teacher_body = compiled_body(teacher_model, teacher.arch) \
        if cfg.compile == "model" and need_teacher else None
    plain_again = []  # --compile layers: the blocks stay compiled in place until training ends
    if cfg.compile == "layers":
        plain_again.append(compile_blocks(raw.model, student.arch))
        if need_teacher:
            plain_again.append(compile_blocks(teacher_model, teacher.arch))

    def forward(ids: torch.Tensor) -> dict:
        t_out = teacher_forward(teacher_model, teacher.arch, ids, raw.teacher_state_ids, teacher_body) \
            if need_teacher else None
        return loop.module(ids, t_out)

    try:
        train.train(loop, forward, LOSS_KEYS, lambda mean: _step_losses(cfg, raw, mean), emit,
                    should_stop)
    finally:
        teacher_model.train(teacher_was_training)
        for undo in plain_again:
            undo()
    result = _finish(cfg, loop, student, val)
    train.close(loop, original_dtype)
    if before is not None and result["status"] != "cancelled":
        result["canonical"] = scoreboard.pair(before, scoreboard.score(result["out"], load=cfg))
    emit({"kind": "done", **result})
    if result["status"] == "cancelled":
        raise Cancelled(f"stopped after step {result['steps']}; a checkpoint is saved (--resume continues)",
                        result)
    return result


def _load_kw(cfg: DistillConfig, loop: train.Loop) -> dict:
    return {"device": str(loop.accelerator.device), "trust_remote_code": cfg.trust_remote_code,
            "allow_pickle": cfg.allow_pickle}


def _load(cfg: DistillConfig, loop: train.Loop, teacher, student):
    """The teacher (compute dtype) and the student (fp32), loaded unless given, checked to match."""
    kw = _load_kw(cfg, loop)
    teacher = teacher or models.load(cfg.teacher, dtype=loop.compute_dtype, **kw)
    student = student or models.load(cfg.student, dtype=torch.float32, **kw)
    if student.model is teacher.model:
        raise UserError("the student must be its own copy of a model, not the teacher itself")
    check_compatible(teacher, student)
    for loaded, who in ((teacher, "teacher"), (student, "student")):
        check_head(loaded)
        if cfg.loss_kernel == "liger":
            liger.check_head(loaded.arch.lm_head(loaded.model), logit_softcap(loaded.model), who)
    return teacher, student


@torch.no_grad()
def check_head(loaded: models.Loaded) -> None:
    """The losses take logits as the LM head applied to the base model's final states; a model
    without an adapter is checked on a few tokens to really compute its logits that way (a family
    that soft-caps or scales them after the head would be trained toward the wrong target)."""
    if loaded.arch.minitron:
        return  # the adapter families are known to
    model, arch = loaded.model, loaded.arch
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(min(8, loaded.shape.vocab or 8), device=loaded.device)[None]
        logits = model(input_ids=ids, use_cache=False).logits
        head = arch.lm_head(model)(arch.base(model)(input_ids=ids, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    if not torch.allclose(logits.float(), head.float(), rtol=1e-2, atol=1e-2):  # bf16 on a GPU
        raise UserError(f"this {arch.family} model changes its logits after the LM head (soft-capping "
                        "or scaling), which distillation does not model; compact distills such a "
                        "family only with an adapter")


def _data(cfg: DistillConfig, loop: train.Loop, teacher: models.Loaded, progress=None):
    """The training blocks of the whole run (one fixed, seeded sequence) and validation blocks."""
    steps = train.plan_steps(loop)
    tok = teacher.tokenizer
    blocks = data.blocks(cfg.data, tok, "train", steps * loop.per_step, cfg.seq_len, cfg.seed,
                         model=teacher.model, progress=progress)
    val = data.blocks(cfg.data, tok, "validation", max(1, cfg.eval_tokens // cfg.seq_len),
                      cfg.seq_len, cfg.seed, model=teacher.model) if cfg.eval_tokens else None
    return blocks, val


def _teacher_model(cfg: DistillConfig, loop: train.Loop, teacher: models.Loaded, blocks, emit):
    """The teacher to distill from: as given, or corrected first (kept on disk for resume)."""
    if not cfg.teacher_correction_steps:
        return teacher.model
    corrected_dir = loop.out / "teacher_corrected"
    if loop.resumed is not None and (corrected_dir / "compact.json").exists():
        return models.load(str(corrected_dir), dtype=loop.compute_dtype, **_load_kw(cfg, loop)).model
    teacher_model = correct_teacher(cfg, teacher, blocks, loop.compute_dtype, on_event=emit)
    if loop.main:
        models.save(teacher_model, teacher.tokenizer, corrected_dir,
                    {"kind": "teacher_correction", "teacher": cfg.teacher, "data": cfg.data,
                     "steps": cfg.teacher_correction_steps, "lr": cfg.lr}, dtype=teacher.source_dtype)
    loop.accelerator.wait_for_everyone()
    return teacher_model


def _prepare_student(cfg: DistillConfig, loop: train.Loop, teacher: models.Loaded,
                     student: models.Loaded, blocks: torch.Tensor) -> DistillModule:
    """The student with its hooks and losses, prepared for the loop (and resumed)."""
    model = student.model
    # fp32 master weights; autocast does the low precision.
    model.to(device=loop.accelerator.device, dtype=torch.float32)
    loop.hooks.prepare(model)
    module = DistillModule(model, student.arch, cfg, teacher.shape, student.meta.get("kept_layers"))
    module.train()
    train.prepare(loop, module, blocks)
    raw = loop.accelerator.unwrap_model(loop.module)
    if cfg.compile == "model":  # after prepare: what is compiled is the body as accelerate wrapped it
        raw.compile_body()
    return raw


def _start(loop: train.Loop, teacher_model, val, emit) -> None:
    """Validation losses before training (a resumed run has them from its checkpoint)."""
    if loop.resumed is not None:
        val_before, teacher_val = loop.resumed.get("val_before"), loop.resumed.get("teacher_val")
    else:
        val_before = validation_loss(loop.accelerator, loop.module, val, loop.cfg.batch) \
            if val is not None else None
        teacher_val = None
        if val is not None:
            from compact import evaluate

            teacher_val = evaluate.loss_on(teacher_model, val, loop.cfg.batch)
    loop.progress = {"val_before": val_before, "teacher_val": teacher_val}
    emit({"kind": "start", "steps": loop.steps, "start_step": loop.start_step,
          "total_tokens": loop.tokens(loop.steps), "val_loss_before": val_before,
          "val_ppl_before": _ppl(val_before), "teacher_val_loss": teacher_val})


def _step_losses(cfg: DistillConfig, raw: DistillModule, mean: dict) -> dict:
    """A step's losses; None for those not computed."""
    return {"loss": mean["loss"], "kd": mean["kd"] if cfg.kd_weight else None,
            "ce": mean["ce"] if cfg.ce_weight or not cfg.kd_weight else None,
            "hidden": mean["hidden"] if raw.pairs else None}


def _finish(cfg: DistillConfig, loop: train.Loop, student: models.Loaded, val) -> dict:
    """run's result; a run that was not cancelled is validated and the student saved."""
    val_before, teacher_val = loop.progress["val_before"], loop.progress["teacher_val"]
    result = {"status": loop.status, "steps": loop.step, "total_steps": loop.steps,
              "tokens": loop.tokens(loop.step), **{k: loop.last.get(k) for k in LOSS_KEYS},
              "val_loss_before": val_before, "val_ppl_before": _ppl(val_before),
              "val_loss_after": None, "val_ppl_after": None,
              "teacher_val_loss": teacher_val, "teacher_val_ppl": _ppl(teacher_val),
              "tokens_per_s": loop.speed(), "train_seconds": loop.seconds, "out": str(loop.out),
              "device": str(loop.accelerator.device), "processes": loop.world,
              "params": sum(p.numel() for p in student.model.parameters())}
    if loop.status == "cancelled":
        result["checkpoint"] = str(loop.checkpoint)
        return result
    val_after = validation_loss(loop.accelerator, loop.module, val, cfg.batch) if val is not None else None
    result.update(val_loss_after=val_after, val_ppl_after=_ppl(val_after))
    meta = {"kind": loop.hooks.name, "teacher": cfg.teacher, "student": cfg.student,
            "data": cfg.data, "tokens": loop.tokens(loop.step), "steps": loop.step,
            "hyperparameters": {k: v for k, v in cfg.training_settings().items()
                                if k not in ("teacher", "student", "data")},
            "processes": loop.world,
            "losses": loop.last,
            "validation": {"loss_before": val_before, "ppl_before": _ppl(val_before),
                           "loss_after": val_after, "ppl_after": _ppl(val_after),
                           "teacher_loss": teacher_val, "teacher_ppl": _ppl(teacher_val),
                           "tokens": int(val.numel()) if val is not None else 0},
            "tokens_per_s": loop.speed(),
            "student_meta": student.meta or None}
    train.save_model(loop, student.tokenizer, meta, dtype=student.source_dtype)
    return result
