"""Where a compressed model parts from its original, token by token, on the same text.

Both models read the same ids (the prompt and the original's continuation) in one forward pass
each. At every continuation token we report the KL divergence KL(p_original || p_compressed) of
the two next-token distributions that predicted it, and the rank the compressed model gives the
token the original wrote (0 = its own first choice). When the original decoded greedily, the
first token whose rank is not 0 is exactly where the compressed model's own greedy output
would first differ: up to there both continuations are the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compact.errors import UserError


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities (T - start) x vocab of the tokens ids[start:], in float32."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)[None]).logits[0, start - 1:-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def divergence(original, compressed, ids: torch.Tensor | list[int], start: int) -> dict:
    """Per-token divergence of `compressed` from `original` over ids[start:] (1-D token ids).

    Returns per token: `kl` (nats) and `rank`; overall: `mean_kl`, `top1_agreement` (share of
    tokens with rank 0) and `first_difference` (index into the continuation of the first token
    with rank > 0, None if there is none).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if not 0 < start < len(ids):
        raise UserError("divergence needs a prompt and at least one continuation token")
    ref, new = _log_probs(original, ids, start), _log_probs(compressed, ids, start)
    if ref.shape[-1] != new.shape[-1]:
        raise UserError(f"the models have different vocabularies ({ref.shape[-1]} and {new.shape[-1]} "
                        "tokens): divergence compares models that share a tokenizer")
    kl = F.kl_div(new, ref, log_target=True, reduction="none").sum(-1).clamp_min(0)
    target = ids[start:]
    chosen = new.gather(-1, target[:, None])
    # Rank: how many tokens the compressed model prefers to the original's (ties count for it).
    rank = (new > chosen).sum(-1)
    parted = (rank > 0).nonzero()
    return {
        "kl": kl.tolist(),
        "rank": rank.tolist(),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((rank == 0).float().mean()),
        "first_difference": int(parted[0]) if len(parted) else None,
    }


def shade(kl: float) -> float:
    """KL mapped into [0, 1) for colouring: 1 - exp(-KL), 0.5 at KL = ln 2."""
    return 1.0 - float(torch.exp(torch.tensor(-kl)))
