"""liger-kernel's fused linear losses (Triton, CUDA only) in place of compact.losses' chunked ones.

The same quantities and conventions as losses.head_losses, so either kernel trains the same run:
  KD: KL(teacher || student) at temperature T, times T^2, averaged over every position. liger's
      generalized JSD with beta = 0 is exactly this forward KL; without labels it averages over
      all rows, as compact does.
  CE: next-token cross-entropy averaged over the labelled positions.
liger computes the gradients during forward, like compact's loss, but with its own Triton
kernels for the softmax part. It has no bias on the LM head and no logit soft-capping in its JSD,
so such heads stay with compact's loss (the run refuses --loss-kernel liger up front).
Under no gradient (validation) compact's loss is used: liger's would compute gradients anyway.
"""

from __future__ import annotations

import torch

from compact.errors import UserError

KERNELS = ("compact", "liger")


def problem(device: torch.device | str) -> str | None:
    """Why --loss-kernel liger cannot run on this device, in one sentence (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"--loss-kernel liger needs a CUDA GPU (liger-kernel's Triton kernels), not the "
                f"{device.type}; use --loss-kernel compact")
    try:
        import liger_kernel.transformers.functional  # noqa: F401  (imports triton too)
    except ImportError as e:
        return f"--loss-kernel liger needs the liger-kernel package ({e}): pip install liger-kernel"
    return None


def check_head(head, softcap: float | None, who: str) -> None:
    """A UserError when liger cannot compute this model's logit losses (the device: problem())."""
    if getattr(head, "bias", None) is not None:
        raise UserError(f"--loss-kernel liger has no LM-head bias and the {who}'s head has one; "
                        "use --loss-kernel compact")
    if softcap:
        raise UserError(f"--loss-kernel liger does not soft-cap logits as the {who} does "
                        "(final_logit_softcapping); use --loss-kernel compact")


def head_losses(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                teacher_h: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                temperature: float, kd_weight: float, ce_weight: float,
                compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight * KD + ce_weight * CE, KD, CE) as compact.losses.head_losses gives them.

    h: (N, H) student states, labels (N,), teacher_h (N, H') or None. The head matmuls run in
    compute_dtype (the autocast dtype): liger's kernels take one dtype for states and weights.
    Weight gradients accumulate in fp32.
    """
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_fused_linear_jsd,
    )

    from compact.losses import IGNORE_INDEX

    hs = h.to(compute_dtype)
    ws = weight.to(compute_dtype)
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    total, kd, ce = zero, zero, zero
    use_kd = kd_weight != 0 and teacher_h is not None
    # The inputs already are in the compute dtype; autocast stays out of liger's own matmuls.
    with torch.autocast(h.device.type, enabled=False):
        if use_kd:
            kl = liger_fused_linear_jsd(hs, ws, teacher_h.detach().to(compute_dtype),
                                        teacher_weight.detach().to(compute_dtype), None, jsd_beta=0.0,
                                        temperature=temperature, accum_dtype=torch.float32)
            kl = kl.float() * temperature ** 2
            total, kd = total + kd_weight * kl, kl.detach()
        if ce_weight != 0 or not use_kd:  # reported untrained too when there is no KD, as compact does
            xent = liger_fused_linear_cross_entropy(hs, ws, labels, ignore_index=IGNORE_INDEX,
                                                    accum_dtype=torch.float32).float()
            if ce_weight != 0:
                total = total + ce_weight * xent
            ce = xent.detach()
    return total, kd, ce
