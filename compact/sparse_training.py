"""AST, Adaptive Sparse Training (arXiv 2407.20584): N:M sparse training by distillation.

The loop is compact.train's (run by compact.distill); AST is a set of TrainHooks around it:
- the targeted linears compute with W~ = m * W; the backward is straight-through, so the dense W
  receives the gradient of W~ unchanged and pruned weights can grow back;
- the boolean masks are recomputed from |W| every `mask_interval` optimizer steps; the flip rate
  against the previous and the initial masks is logged;
- pruned weights are decayed with lambda(t) = alpha * min(t, T0) (the paper's annealed decay),
  inside the Adam step as the paper's update rule has it (AstAdamW);
- optionally SLoRB: a trainable S per linear on group sums of the input (compact.sparsity);
- at the end the masked weights become exact zeros and the modules are plain again, so the
  checkpoint is an ordinary one (SLoRB's S goes to a side file that compact.models.load reads).
"""

from __future__ import annotations

import math
import os
import re
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from compact import distill, sparsity, train
from compact.arch import weight_oi
from compact.errors import Cancelled, UserError
from compact.options import option

# When --decay-alpha is not given: the paper's GPT-2 run, a linear ramp to 1e-4 over the first
# quarter of training (10k of 40k steps).
DEFAULT_DECAY_MAX = 1e-4
DEFAULT_DECAY_RAMP = 0.25


@dataclass(kw_only=True)
class AstConfig(train.TrainingOptions):
    model: str = option("default", "the dense model to sparsify (the student starts from it)")
    out: str = option("", "folder for the sparse checkpoint")
    teacher: str | None = option(None, "AST teacher (default: the dense --model)")
    pattern: str = option("2:4", "N:M, N kept in every M input columns")
    # The paper: KL at tau = 2 mixed with CE (GPT-2: 0.67 / 0.33).
    temperature: float = option(2.0, "distillation temperature")
    kd_weight: float = option(0.67, "KL(teacher||student) weight (times T^2)")
    ce_weight: float = option(0.33, "cross-entropy weight")
    mask_interval: int = option(10, "AST: steps between mask updates")
    mask_margin: float = option(0.0, "AST: a pruned weight must exceed a kept one by this fraction to "
                                     "take its place (0 = plain magnitude, the paper)")
    decay_alpha: float | None = option(None, "AST: decay slope per step (default: ramp to 1e-4 over "
                                             "the first quarter)")
    decay_t0: int | None = option(None, "AST: step where the decay stops growing")
    slorb_k: int = option(0, "AST: SLoRB block size (0 = off)")

    @property
    def n(self) -> int:
        return sparsity.parse_pattern(self.pattern)[0]

    @property
    def m(self) -> int:
        return sparsity.parse_pattern(self.pattern)[1]

    def total_steps(self) -> int:
        return max(1, self.tokens // (self.seq_len * self.batch * self.grad_accum))

    def decay(self) -> tuple[float, int]:
        """(alpha, T0) with the defaults filled in."""
        t0 = self.decay_t0 if self.decay_t0 is not None else \
            max(1, round(DEFAULT_DECAY_RAMP * self.total_steps()))
        alpha = self.decay_alpha if self.decay_alpha is not None else DEFAULT_DECAY_MAX / t0
        return float(alpha), int(t0)

    def check(self) -> None:
        sparsity.parse_pattern(self.pattern)
        if self.mask_interval < 1:
            raise UserError("the mask interval must be at least 1 step")
        if self.mask_margin < 0:
            raise UserError("the mask margin cannot be negative")
        if self.slorb_k < 0:
            raise UserError("the SLoRB block size must be positive (or 0 for none)")
        if self.decay_alpha is not None and self.decay_alpha < 0:
            raise UserError("the decay alpha cannot be negative")
        if self.decay_t0 is not None and self.decay_t0 < 0:
            raise UserError("the decay T0 cannot be negative")


def decay_lambda(step: int, alpha: float, t0: int) -> float:
    """The annealed decay on pruned weights: alpha * t up to T0, then alpha * T0."""
    return alpha * min(step, t0)


class MaskedWeight(torch.autograd.Function):
    """W~ = m * W forward; straight-through backward (dW = dW~), so pruned weights keep learning."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class AstAdamW(torch.optim.Optimizer):
    """AdamW with AST's decay of pruned weights inside the Adam step (the paper's update rule).

    For a masked weight W with keep-mask m and gradient g (of the masked weight W~, straight
    through):  m1 <- b1 m1 + (1-b1) g;  u = m1^ + lambda * (~m * W);  v <- b2 v + (1-b2) u^2;
    W <- W - lr * u / (sqrt(v^) + eps), with ^ the bias corrections and lambda = the group's
    "ast_decay". The decay term is outside gradient clipping and joins the direction, not the
    momentum, so it acts at once when the masks move. Every other parameter gets plain AdamW
    (decoupled weight decay, as torch.optim.AdamW). `masks` maps a parameter to its keep-mask in
    the parameter's own layout; the tensors are read at each step, so masks updated in place
    take effect at once.
    """

    def __init__(self, params, masks: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "ast_decay": 0.0})
        self.masks = masks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, lam = group["lr"], group["eps"], group["ast_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
                p.mul_(1 - lr * group["weight_decay"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1 - beta1)
                keep = self.masks.get(p)
                if keep is None:  # plain AdamW, in torch's own order of operations
                    exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
                    p.addcdiv_(exp_avg, denom, value=-lr / bc1)
                    continue
                u = exp_avg / bc1
                if lam:
                    u.add_(p * (1 - keep.to(p.dtype)), alpha=lam)
                exp_avg_sq.mul_(beta2).addcmul_(u, u, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(u, denom, value=-lr)
        return loss


def flip_rate(a: Tensor, b: Tensor) -> tuple[int, int]:
    """(entries that differ, entries) between two masks."""
    return int((a != b).sum()), a.numel()


def block_index(name: str) -> int:
    """The transformer block a linear belongs to: the first number in its qualified name."""
    return int(re.search(r"\.(\d+)\.", f".{name}.").group(1))


def _ast_forward(self, x: Tensor) -> Tensor:
    w = MaskedWeight.apply(self.weight, self.ast_mask)
    y = F.linear(x, w.T if isinstance(self, Conv1D) else w, self.bias)
    if hasattr(self, "slorb_s"):
        y = y + F.linear(sparsity.group_sum(x, self.slorb_k), self.slorb_s)
    return y


def _stored(mask_oi: Tensor, module: nn.Module) -> Tensor:
    """A (out, in) mask in the module's own weight layout."""
    return mask_oi.T.contiguous() if isinstance(module, Conv1D) else mask_oi


class AstHooks(train.TrainHooks):
    """AST inside compact.train's loop. State (masks, step) goes into its checkpoints."""

    name = "ast"

    def __init__(self, cfg: AstConfig):
        cfg.check()
        self.cfg = cfg
        self.alpha, self.t0 = cfg.decay()
        self.linears: dict[str, nn.Module] = {}
        self.masks: dict[str, Tensor] = {}          # current, (out, in), bool
        self.initial: dict[str, Tensor] = {}        # at the start of training
        self.step = 0
        self.last = {"flip_prev": 0.0, "flip_init": 0.0}
        self.block_flips: list[float] | None = None  # per block, at a step that re-chose the masks
        self.slorb: dict | None = None
        self.summary: dict | None = None

    # -- set-up
    def prepare(self, student) -> None:
        sparsity.check_widths(student, self.cfg.m)
        if self.cfg.slorb_k:
            sparsity.check_widths(student, self.cfg.slorb_k)
        self.linears = sparsity.target_linears(student)
        for name, mod in self.linears.items():
            keep = sparsity.nm_mask(weight_oi(mod), self.cfg.n, self.cfg.m)
            self.masks[name], self.initial[name] = keep, keep.clone()
            mod.register_buffer("ast_mask", _stored(keep, mod).to(mod.weight.dtype), persistent=False)
            if self.cfg.slorb_k:
                s = sparsity.slorb_init(weight_oi(mod), keep, self.cfg.slorb_k)
                mod.slorb_s = nn.Parameter(s.to(mod.weight.device, mod.weight.dtype))
                mod.slorb_k = self.cfg.slorb_k
            mod.forward = types.MethodType(_ast_forward, mod)
        if self.cfg.slorb_k:
            self.slorb = sparsity.slorb_params(student, self.cfg.slorb_k, self.cfg.n, self.cfg.m)

    # -- each step
    def before_step(self, step, student, optimizer) -> None:
        self.step = step
        if step > 0 and step % self.cfg.mask_interval == 0:
            self._update_masks()

    @torch.no_grad()
    def _update_masks(self) -> None:
        prev = init = total = 0
        per_block: dict[int, list[int]] = {}  # block index -> [flipped, weights]: the app's heatmap
        for name, mod in self.linears.items():
            w = weight_oi(mod).detach().abs().float()
            if self.cfg.mask_margin:  # the current mask wins ties and near-ties
                w = w * (1 + self.cfg.mask_margin * self.masks[name])
            keep = sparsity.nm_mask(w, self.cfg.n, self.cfg.m)
            p, t = flip_rate(keep, self.masks[name])
            i, _ = flip_rate(keep, self.initial[name])
            prev, init, total = prev + p, init + i, total + t
            counts = per_block.setdefault(block_index(name), [0, 0])
            counts[0], counts[1] = counts[0] + p, counts[1] + t
            self.masks[name] = keep
            mod.ast_mask.copy_(_stored(keep, mod).to(mod.ast_mask.dtype))
        self.last = {"flip_prev": prev / total, "flip_init": init / total}
        self.block_flips = [f / t for _, (f, t) in sorted(per_block.items())]

    def make_optimizer(self, params, cfg) -> AstAdamW:
        masks = {mod.weight: mod.ast_mask for mod in self.linears.values()}
        return AstAdamW(train.param_groups(params, cfg), masks, lr=cfg.lr, betas=train.BETAS)

    def after_backward(self, step, student, optimizer) -> None:
        # lambda(t) travels in the param groups, so the optimizer's saved state carries it too
        for group in optimizer.param_groups:
            group["ast_decay"] = decay_lambda(step, self.alpha, self.t0)

    def after_step(self, step, student, optimizer) -> dict:
        extra = {"decay_lambda": decay_lambda(step, self.alpha, self.t0), **self.last}
        if self.block_flips is not None:  # masks were re-chosen at this step
            extra["flip_blocks"], self.block_flips = self.block_flips, None
        return extra

    # -- checkpoints
    def release(self) -> None:
        """Plain modules again without touching the weights (after a cancelled run)."""
        for mod in self.linears.values():
            if "forward" in mod.__dict__:
                del mod.forward
            if hasattr(mod, "ast_mask"):
                del mod.ast_mask
            if hasattr(mod, "slorb_s"):
                sparsity.detach_slorb(mod)

    def settings(self) -> dict:
        c = self.cfg
        return {"pattern": f"{c.n}:{c.m}", "mask_interval": c.mask_interval, "mask_margin": c.mask_margin,
                "decay_alpha": self.alpha, "decay_t0": self.t0, "slorb_k": c.slorb_k}

    def state_dict(self) -> dict:
        return {"settings": self.settings(), "step": self.step, "last": dict(self.last),
                "masks": {k: v.cpu() for k, v in self.masks.items()},
                "initial": {k: v.cpu() for k, v in self.initial.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for key, value in state["settings"].items():  # distill checks only its own settings
            if self.settings().get(key) != value:
                raise UserError(f"--resume needs the same AST settings: {key} was {value!r}, "
                                f"now {self.settings().get(key)!r}")
        self.step, self.last = int(state["step"]), dict(state["last"])
        for name, mod in self.linears.items():
            keep = state["masks"][name].to(mod.weight.device, torch.bool)
            self.masks[name] = keep
            self.initial[name] = state["initial"][name].to(mod.weight.device, torch.bool)
            mod.ast_mask.copy_(_stored(keep, mod).to(mod.ast_mask.dtype))

    # -- the end
    @torch.no_grad()
    def finalize(self, student) -> dict:
        """Masked weights to exact zeros, modules back to plain ones (SLoRB kept for inference)."""
        slorb_s = {}
        for name, mod in self.linears.items():
            weight_oi(mod).mul_(self.masks[name].to(mod.weight.dtype))
            del mod.forward
            del mod.ast_mask
            if hasattr(mod, "slorb_s"):
                slorb_s[name] = sparsity.detach_slorb(mod)
        meta = {"ast": {**self.settings(), **self.last},
                "sparsity": sparsity.sparsity_summary(student, self.cfg.n, self.cfg.m)}
        self.summary = meta["sparsity"]
        if slorb_s:
            sparsity.attach_slorb_all(student, slorb_s, self.cfg.slorb_k)
            if self.cfg.out:
                meta["slorb"] = sparsity.save_slorb(student, self.cfg.out, self.cfg.slorb_k)
        return meta


def distill_config(cfg: AstConfig) -> distill.DistillConfig:
    return distill.DistillConfig(teacher=cfg.teacher or cfg.model, student=cfg.model, out=cfg.out,
                                 **cfg.training_options())


def run_ast(cfg: AstConfig, on_event=None, should_stop=None, teacher=None, student=None,
            progress=None) -> dict:
    """Sparsify cfg.model to N:M by AST; returns distill.run's result plus sparsity and flips.

    teacher, student: already-loaded compact.models.Loaded to use instead of loading the refs
    (the student is trained in place). Cancel with should_stop() (raises Cancelled with the
    result); resume with cfg.resume.
    """
    cfg.check()
    if not cfg.out:
        raise UserError("AST needs an output folder")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # masks are chosen from whole weight rows; FSDP gives each process a flat shard
        raise UserError("AST cannot run under FSDP (its masks need whole weights): use one GPU or "
                        "DDP (configs/accelerate_ddp.yaml)")
    hooks = AstHooks(cfg)

    def with_ast(result: dict) -> dict:
        result = {**result, "ast": {**hooks.settings(), **hooks.last}}
        if hooks.slorb:
            result["slorb"] = hooks.slorb
        return result

    try:
        result = distill.run(distill_config(cfg), hooks=hooks, on_event=on_event, should_stop=should_stop,
                             teacher=teacher, student=student, progress=progress)
    except Cancelled as stop:
        hooks.release()  # an in-memory student is left as it was loaded, weights as trained
        raise Cancelled(str(stop), with_ast(stop.result)) from None
    return with_ast({**result, "sparsity": hooks.summary})
