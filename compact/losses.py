"""Distillation losses: forward KL at a temperature, cross-entropy, intermediate states.

Full-vocabulary logits are the largest tensors in a distillation step (49k x tokens, twice:
teacher and student). The logit losses here never materialise them whole: they walk the
token positions in chunks, compute both models' logits for one chunk, its loss and the
gradient of that loss with respect to the student's logits, and keep only what backward needs
(the gradient with respect to the student's hidden states and head weight). Backward then only
scales those, so nothing is recomputed and no chunk's logits outlive its iteration.

Conventions (Minitron, arXiv 2407.14679): KL(teacher || student) on softmax(logits / T),
multiplied by T^2 so gradients keep their size across temperatures, averaged per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1024  # token positions per chunk: 1024 x 49k fp32 logits are 200 MB
IGNORE_INDEX = -100


def _kl_chunk(zs: torch.Tensor, zt: torch.Tensor, temperature: float, want_grad: bool):
    """Sum over rows of KL(softmax(zt/T) || softmax(zs/T)), and d(sum)/d(zs) (both fp32)."""
    log_q = F.log_softmax(zs.float() / temperature, dim=-1)
    log_p = F.log_softmax(zt.float() / temperature, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum()
    grad = None
    if want_grad:
        # d/dzs sum_v p_v (log p_v - log q_v) = (q - p) / T
        grad = log_q.exp_().sub_(p).div_(temperature)
    return kl, grad


def _ce_chunk(zs: torch.Tensor, labels: torch.Tensor, want_grad: bool):
    """Sum of next-token cross-entropy over rows with a label, and d(sum)/d(zs)."""
    log_s = F.log_softmax(zs.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp_min(0)
    picked = log_s.gather(1, safe[:, None]).squeeze(1)
    ce = -(picked * valid).sum()
    grad = None
    if want_grad:
        grad = log_s.exp_()
        grad[torch.arange(len(labels), device=grad.device), safe] -= 1.0
        grad.mul_(valid[:, None])
    return ce, grad


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, chunk, want_grad):
        zs = student_logits.reshape(-1, student_logits.size(-1))
        zt = teacher_logits.reshape(-1, teacher_logits.size(-1))
        n = zs.size(0)
        total = torch.zeros((), dtype=torch.float32, device=zs.device)
        grad = torch.empty(zs.shape, dtype=zs.dtype, device=zs.device) if want_grad else None
        for i in range(0, n, chunk):
            kl, g = _kl_chunk(zs[i:i + chunk], zt[i:i + chunk].detach(), temperature, want_grad)
            total += kl
            if want_grad:
                grad[i:i + chunk] = g * (temperature ** 2 / n)
        ctx.save_for_backward(grad if want_grad else None)
        ctx.shape = student_logits.shape
        return total * (temperature ** 2 / n)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).view(ctx.shape), None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2, mean over tokens (all leading dims).

    Computed chunk by chunk along the tokens, so only the gradient buffer (which backward needs
    anyway) has the logits' size; the teacher gets no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} "
                         f"vs {tuple(teacher_logits.shape)}")
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedKL.apply(student_logits, teacher_logits, float(temperature), int(chunk), want_grad)


def _matmul(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype,
            softcap: float = 0.0) -> torch.Tensor:
    z = h.to(dtype) @ w.to(dtype).t()
    z = z if b is None else z + b.to(dtype)
    # Gemma 2's final logit soft-capping: cap * tanh(z / cap), as its own forward does.
    return torch.tanh(z / softcap) * softcap if softcap else z


class _HeadLosses(torch.autograd.Function):
    """Student and teacher LM heads applied chunk by chunk, fused with the logit losses."""

    @staticmethod
    def forward(ctx, h, w, b, t_h, t_w, t_b, labels, temperature, kd_weight, ce_weight, chunk,
                compute_dtype, want_grad, softcap, teacher_softcap):
        with torch.autocast(h.device.type, enabled=False):
            n = h.size(0)
            # a tensor, not a Python int: reading it would make the host wait for the GPU mid-step
            n_valid = (labels != IGNORE_INDEX).sum().clamp_min(1).float()
            use_kd = kd_weight != 0 and t_h is not None
            use_ce = ce_weight != 0 or not use_kd  # CE is always reported when there is no teacher
            kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            w_c = w.to(compute_dtype)
            grad_h = torch.empty_like(h) if want_grad else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grad else None
            grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) \
                if want_grad and b is not None else None
            for i in range(0, n, chunk):
                h_c = h[i:i + chunk].to(compute_dtype)
                zs = _matmul(h_c, w_c, b, compute_dtype, softcap)
                g = None
                if use_kd:
                    zt = _matmul(t_h[i:i + chunk], t_w, t_b, t_w.dtype, teacher_softcap)
                    kl, g_kd = _kl_chunk(zs, zt, temperature, want_grad)
                    del zt
                    kd_sum += kl
                    if want_grad:
                        g = g_kd.mul_(kd_weight * temperature ** 2 / n)
                if use_ce:
                    ce, g_ce = _ce_chunk(zs, labels[i:i + chunk], want_grad and ce_weight != 0)
                    ce_sum += ce
                    if g_ce is not None:
                        g_ce.mul_(ce_weight / n_valid)
                        g = g_ce if g is None else g.add_(g_ce)
                if want_grad:
                    if g is None:  # every weight is zero
                        g = torch.zeros(h_c.size(0), w.size(0), device=h.device)
                    if softcap:  # back through the cap: d(cap tanh(z / cap))/dz = 1 - (capped / cap)^2
                        g = g * (1 - (zs.float() / softcap) ** 2)
                del zs
                if want_grad:
                    g_c = g.to(compute_dtype)
                    grad_h[i:i + chunk] = (g_c @ w_c).to(h.dtype)
                    grad_w += (g_c.t() @ h_c).float()
                    if grad_b is not None:
                        grad_b += g.sum(0)
            kd = kd_sum * (temperature ** 2 / n)
            ce = ce_sum / n_valid
            total = (kd * kd_weight if use_kd else 0.0) + (ce * ce_weight if ce_weight != 0 else 0.0)
            total = torch.as_tensor(total, dtype=torch.float32, device=h.device)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(w.dtype),
                                  grad_b.to(b.dtype) if grad_b is not None else None)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_total
        return (grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype),
                None if grad_b is None else grad_b * scale.to(grad_b.dtype),
                None, None, None, None, None, None, None, None, None, None, None, None)


def head_losses(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, teacher_h: torch.Tensor | None = None,
                teacher_weight: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                chunk: int = DEFAULT_CHUNK, softcap: float | None = None,
                teacher_softcap: float | None = None,
                kernel: str = "compact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight * KD + ce_weight * CE, KD, CE) from final post-norm hidden states.

    h: (..., H) student states at the positions that predict `labels` (..., same leading dims);
    teacher_h: the teacher's states at the same positions (None: CE only). Only the first value
    carries gradient (to h, weight and bias); KD and CE are detached values for logging.
    Under autocast the head matmuls run in the autocast dtype, softmax and sums in fp32.
    softcap / teacher_softcap: a final logit soft-capping (Gemma 2's final_logit_softcapping).
    kernel "liger": liger-kernel's fused losses for steps with a gradient (compact.liger; CUDA).
    """
    h2 = h.reshape(-1, h.size(-1))
    lab = labels.reshape(-1)
    t2 = None if teacher_h is None else teacher_h.reshape(-1, teacher_h.size(-1)).detach()
    if t2 is not None and t2.size(0) != h2.size(0):
        raise ValueError("teacher and student states cover different positions")
    dev = h.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if kernel == "liger" and want_grad:
        from compact import liger

        return liger.head_losses(h2, weight, lab, t2, teacher_weight, temperature, kd_weight, ce_weight,
                                 compute_dtype)
    tw = None if teacher_weight is None else teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    return _HeadLosses.apply(h2, weight, bias, t2, tw, tb, lab, float(temperature), float(kd_weight),
                             float(ce_weight), int(chunk), compute_dtype, want_grad, float(softcap or 0),
                             float(teacher_softcap or 0))


def state_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Which teacher state each student state is matched to, by relative depth.

    State j < layers is the output of block j's input norm (the normalised residual stream
    entering block j); state j == layers is the final norm's output. The embedding (j = 0) is
    left out. Equal depths pair j with j; a shallower student takes evenly spaced teacher states,
    always ending with final norm against final norm.
    """
    return [(j, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def hidden_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                proj: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between paired states, the student's mapped by one shared linear map."""
    losses = []
    for s, t in zip(student_states, teacher_states, strict=True):
        s = proj(s) if proj is not None else s
        losses.append(F.mse_loss(s.float(), t.detach().float()))
    return torch.stack(losses).mean()
