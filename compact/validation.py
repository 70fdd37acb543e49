"""Importance metrics checked against the truth: the loss increase when one unit alone is removed.

The ablation truth of a unit is the mean next-token loss on calibration blocks with that unit
removed, minus the full model's, where removing is:
- head: zero its slice of the attention output projection's input (what pruning the head does
  to this layer's output; K and V shared by a GQA group stay);
- neuron: zero its entry of the MLP down projection's input;
- channel: zero it in the output of every residual norm (the final norm included), so nothing
  reads it; the norms' statistics still count it (pruning also rescales the norm by sqrt(h'/h));
- layer: skip the block (its output is its input), as compact.importance's depth "ppl" does.
A unit whose removal changes nothing has a truth of exactly 0: the ablated pass repeats the
full pass's arithmetic.

Each metric is then scored by its Spearman rank correlation with the truth over the units
checked: every head and layer, and a seeded random sample of neurons and channels (one pass per
unit is too slow for all of them). The blocks before the ablated one are not recomputed: their
outputs from the full pass are replayed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

from compact import arch as arch_mod
from compact.arch import own_thread
from compact.errors import Cancelled, UserError
from compact.importance import Scores, _skip_block
from compact.metrics import WIDTH_METRICS

AXES = ("heads", "neurons", "channels", "layers")


def parse_axes(text: str | None) -> list[str]:
    """'heads,layers' -> ['heads', 'layers']; None or '' -> []."""
    axes = [a.strip() for a in (text or "").split(",") if a.strip()]
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise UserError(f"unknown axis '{bad[0]}' to validate: use any of {', '.join(AXES)}")
    return list(dict.fromkeys(axes))


def ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their mean rank."""
    x = x.double().flatten()
    order = x.argsort(stable=True)
    ordinal = torch.empty_like(x)
    ordinal[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, group = torch.unique(x, return_inverse=True)
    mean = torch.zeros(int(group.max()) + 1, dtype=x.dtype).index_add_(0, group, ordinal)
    count = torch.zeros_like(mean).index_add_(0, group, torch.ones_like(ordinal))
    return (mean / count)[group]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's of the (tie-averaged) ranks; NaN when either is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def units(axis: str, scores: Scores, sample: int, seed: int = 0) -> torch.Tensor:
    """Flat indices of the units checked: all heads and layers, a seeded sample of the others."""
    total = {"heads": scores.heads.numel(), "neurons": scores.neurons.numel(),
             "channels": scores.channels.numel(), "layers": scores.heads.shape[0]}[axis]
    if axis in ("heads", "layers") or sample <= 0 or sample >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:sample].sort().values


def metric_values(axis: str, scores: Scores, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric these scores hold for the units, by name."""
    if axis == "layers":
        return {k: v[index] for k, v in scores.layers.items() if k != "ppl"}  # ppl is the truth itself
    out = {}
    for name in WIDTH_METRICS[axis]:
        if name == "activation" or name in scores.metrics.get(axis, {}):
            out[name] = scores.width(axis, name).flatten()[index]
    return out


# -- the truth ------------------------------------------------------------------------------------

def _zero_slice(start: int, stop: int):
    def hook(module, args):
        x = args[0].clone()
        x[..., start:stop] = 0
        return (x, *args[1:])
    return hook


def _zero_output(channel: int):
    def hook(module, args, output):
        out = output.clone()
        out[..., channel] = 0
        return out
    return hook


def _ablation(arch, model, axis: str, flat: int) -> tuple[int, Callable[[ExitStack], None]]:
    """(first block the ablation changes, a function installing its hooks on an ExitStack)."""
    shape = arch.shape(model.config)
    blocks = arch.blocks(model)

    def hooks(*pairs):
        def install(stack: ExitStack) -> None:
            for register, hook in pairs:
                stack.callback(register(own_thread(hook)).remove)
        return install

    if axis == "heads":
        layer, head = divmod(flat, shape.heads)
        d = shape.head_dim
        return layer, hooks((arch.attn_out(blocks[layer]).register_forward_pre_hook,
                             _zero_slice(head * d, (head + 1) * d)))
    if axis == "neurons":
        layer, neuron = divmod(flat, shape.ffn)
        return layer, hooks((arch.mlp_out(blocks[layer]).register_forward_pre_hook,
                             _zero_slice(neuron, neuron + 1)))
    if axis == "channels":
        norms = [n for b in blocks for n in arch.block_norms(b)] + [arch.final_norm(model)]
        return 0, hooks(*[(n.register_forward_hook, _zero_output(flat)) for n in norms])
    return flat, hooks((lambda h: blocks[flat].register_forward_hook(h, with_kwargs=True), _skip_block))


@contextmanager
def _replaying(blocks, outputs: list, upto: int):
    """Blocks before `upto` return their recorded outputs instead of computing (in this thread)."""
    owner = threading.get_ident()
    for i in range(upto):
        compute = blocks[i].forward

        def replay(*args, _i=i, _compute=compute, **kwargs):
            return outputs[_i] if threading.get_ident() == owner else _compute(*args, **kwargs)

        blocks[i].forward = replay
    try:
        yield
    finally:
        for i in range(upto):
            del blocks[i].forward  # back to the class's forward


def _loss_sum(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                           reduction="sum").double().item()


@torch.no_grad()
def truth(model, blocks: torch.Tensor, axis: str, index: torch.Tensor, batch_size: int = 8,
          progress: Callable[[float, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Loss increase (nats per token) on the blocks when each unit of `index` alone is removed."""
    arch = arch_mod.for_model(model)
    layers = arch.blocks(model)
    device = next(model.parameters()).device
    model.eval()
    ablations = [_ablation(arch, model, axis, int(u)) for u in index]
    base_sum, sums = 0.0, torch.zeros(len(ablations), dtype=torch.float64)
    batches = list(blocks.split(batch_size))
    for b, batch in enumerate(batches):
        ids = batch.to(device)
        outputs: list = [None] * len(layers)

        def record(i, into=outputs):
            def hook(module, args, output):
                into[i] = output
            return hook

        with ExitStack() as stack:
            for i, block in enumerate(layers):
                stack.callback(block.register_forward_hook(own_thread(record(i))).remove)
            base_sum += _loss_sum(model, ids)
        for n, (start, install) in enumerate(ablations):
            if should_stop is not None and should_stop():
                raise Cancelled("validation cancelled")
            with ExitStack() as stack, _replaying(layers, outputs, start):
                install(stack)
                sums[n] += _loss_sum(model, ids)
            if progress is not None and (n + 1) % 8 == 0:
                progress((b + (n + 1) / len(ablations)) / len(batches),
                         f"{axis} truth: batch {b + 1}/{len(batches)}, unit {n + 1}/{len(ablations)}")
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    return ((sums - base_sum) / tokens).float()


def validate(model, blocks: torch.Tensor, scores: Scores, axes: list[str], sample: int = 64,
             seed: int = 0, batch_size: int = 8, progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Per axis: the Spearman correlation of each metric with the ablation truth, and the number
    of units and blocks used. The truths are stored in scores.truth, the summary in its meta."""
    if blocks.dim() != 2 or len(blocks) == 0:
        raise UserError("validation needs at least one calibration block")
    summary = {}
    for k, axis in enumerate(axes):
        index = units(axis, scores, sample, seed)

        def report(fraction, message, _k=k):
            if progress is not None:
                progress((_k + fraction) / len(axes), message)

        loss = truth(model, blocks, axis, index, batch_size, report, should_stop)
        scores.truth[axis] = {"units": index, "loss": loss}
        summary[axis] = {"units": len(index), "blocks": int(len(blocks)), "seq_len": int(blocks.shape[1]),
                         "spearman": {name: spearman(values, loss)
                                      for name, values in metric_values(axis, scores, index).items()}}
    scores.meta["validation"] = summary
    return summary
