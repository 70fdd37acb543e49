"""Importance metrics beside Minitron's activation score, to compare against it and prune by.

Per head and MLP neuron (and Taylor per channel), from one forward and backward pass over the
calibration blocks:
- activation_out: the size of what the unit writes into the residual stream, i.e. its activation
  through its output-projection columns: per token ||W_o[:, head] x_head||_2 (a neuron:
  ||W_down[:, n]|| |x_n|), reduced over sequence and batch like the activation score;
- taylor: first-order Taylor, |gradient x weight| of the mean calibration loss summed over the
  unit's output-projection columns (a channel: its weight and bias in every residual norm), the
  first-order estimate of zeroing exactly what the ablation truth zeroes (compact.validation);
- wanda: |W| * ||X||_2 (Wanda, arXiv 2306.11695) summed over the unit's output-projection
  columns, X the projection's input over every calibration token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from compact import arch as arch_mod
from compact.arch import own_thread, weight_oi
from compact.errors import Cancelled

# axis -> metric name -> what it is; "activation" is the Minitron score compact.importance computes.
WIDTH_METRICS = {
    "heads": {"activation": "the head's attention output (Minitron)",
              "activation_out": "what the head writes: its output through the output projection",
              "taylor": "|gradient x weight| over the head's output-projection columns",
              "wanda": "|W| x ||X|| over the head's output-projection columns"},
    "neurons": {"activation": "the activation entering the down projection (Minitron)",
                "activation_out": "what the neuron writes: its activation x its down-projection column",
                "taylor": "|gradient x weight| over the neuron's down-projection column",
                "wanda": "|W| x ||X|| over the neuron's down-projection column"},
    "channels": {"activation": "the residual norms' outputs (Minitron)",
                 "taylor": "|gradient x weight| of the channel's weight (and bias) in every residual norm"},
}


def _oriented(module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like module.weight, as (out_features, in_features)."""
    return t.T if isinstance(module, Conv1D) else t


def _norm_taylor(norm, grads: dict) -> torch.Tensor:
    out = (grads[norm.weight] * norm.weight).abs().float()
    bias = getattr(norm, "bias", None)
    if bias is not None:
        out = out + (grads[bias] * bias).abs().float()
    return out


def extra(model, blocks: torch.Tensor, batch_agg: str = "l2", seq_agg: str = "mean", batch_size: int = 8,
          progress: Callable[[float, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{axis: {metric: tensor}}: heads and neurons (layers, n) for activation_out, taylor and wanda;
    channels (hidden,) and channels_per_layer (layers, hidden) for taylor."""
    from compact.importance import _BatchStat, _seq_reduce

    arch = arch_mod.for_model(model)
    shape = arch.shape(model.config)
    layers = list(arch.blocks(model))
    outs, downs = [arch.attn_out(b) for b in layers], [arch.mlp_out(b) for b in layers]
    norms = [arch.block_norms(b) for b in layers]
    final = arch.final_norm(model)
    device = next(model.parameters()).device
    head_stats, neuron_stats = [_BatchStat() for _ in layers], [_BatchStat() for _ in layers]
    head_sq = [torch.zeros(shape.heads * shape.head_dim, dtype=torch.float64, device=device) for _ in layers]
    neuron_sq = [torch.zeros(shape.ffn, dtype=torch.float64, device=device) for _ in layers]
    batch_now = [0]

    def on_heads(i):
        def hook(module, args):
            x = args[0].detach().float()
            x = x.view(batch_now[0], -1, x.shape[-1])
            w = weight_oi(module).detach().float()
            d = shape.head_dim
            # Per head, the norm over the hidden size of its share of the output projection.
            parts = [x[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T for h in range(shape.heads)]
            per_head = torch.stack([torch.linalg.vector_norm(p, dim=-1) for p in parts], dim=-1)
            head_stats[i].add(_seq_reduce(per_head, seq_agg))
            head_sq[i] += x.double().square().sum((0, 1))
        return hook

    def on_neurons(i):
        def hook(module, args):
            x = args[0].detach().float()
            x = x.view(batch_now[0], -1, x.shape[-1])
            column = torch.linalg.vector_norm(weight_oi(module).detach().float(), dim=0)
            neuron_stats[i].add(_seq_reduce(x.abs() * column, seq_agg))
            neuron_sq[i] += x.double().square().sum((0, 1))
        return hook

    weights = [m.weight for m in outs + downs]
    norm_params = [p for n in [*(n for ns in norms for n in ns), final]
                   for p in (n.weight, getattr(n, "bias", None)) if p is not None]
    params = weights + norm_params
    grads = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    was = [p.requires_grad for p in params]
    handles = []
    total = sum(int(b.shape[0]) * (int(b.shape[1]) - 1) for b in blocks.split(batch_size))
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(len(layers)):
            handles.append(outs[i].register_forward_pre_hook(own_thread(on_heads(i))))
            handles.append(downs[i].register_forward_pre_hook(own_thread(on_neurons(i))))
        n_batches = math.ceil(len(blocks) / batch_size)
        for b, batch in enumerate(blocks.split(batch_size)):
            if should_stop is not None and should_stop():
                raise Cancelled("importance estimation cancelled")
            batch_now[0] = len(batch)
            ids = batch.to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                # The gradient of the mean loss over every calibration token, batch by batch.
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                       reduction="sum") / total
                for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                    grads[p] += g.float()
            if progress is not None:
                progress((b + 1) / n_batches, f"gradient metrics: batch {b + 1}/{n_batches}")
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)

    def per_head(t: torch.Tensor) -> torch.Tensor:  # (out, heads x head_dim) -> (heads,)
        return t.sum(0).view(shape.heads, shape.head_dim).sum(-1)

    with torch.no_grad():
        taylor_h = [per_head(_oriented(o, (grads[o.weight] * o.weight).abs().float())) for o in outs]
        taylor_n = [_oriented(m, (grads[m.weight] * m.weight).abs().float()).sum(0) for m in downs]
        wanda_h = [per_head(weight_oi(o).abs().float() * sq.sqrt().float())
                   for o, sq in zip(outs, head_sq, strict=True)]
        wanda_n = [(weight_oi(m).abs().float() * sq.sqrt().float()).sum(0)
                   for m, sq in zip(downs, neuron_sq, strict=True)]
        per_layer = torch.stack([sum(_norm_taylor(n, grads) for n in ns) for ns in norms]).cpu()
        channels = per_layer.sum(0) + _norm_taylor(final, grads).cpu()

    def stack(ts):
        return torch.stack([t.float().cpu() for t in ts])

    return {"heads": {"activation_out": stack([s.result(batch_agg) for s in head_stats]),
                      "taylor": stack(taylor_h), "wanda": stack(wanda_h)},
            "neurons": {"activation_out": stack([s.result(batch_agg) for s in neuron_stats]),
                        "taylor": stack(taylor_n), "wanda": stack(wanda_n)},
            "channels": {"taylor": channels},
            "channels_per_layer": {"taylor": per_layer}}
