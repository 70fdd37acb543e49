"""Minitron importance from forward passes only (arXiv 2407.14679, section 2).

Hooks read activations on calibration blocks:
- heads: the input of the attention output projection, seen as heads x head_dim; per token
  the L2 norm of each head's output (the paper's ||Attn(X W_Q,i, X W_K,i, X W_V,i)||_2);
- neurons: the input of the MLP down projection (act(gate) * up; GPT-2: gelu(c_fc));
- channels: the output of every residual norm (both norms of each block and the final norm);
- layers: Block Importance BI = 1 - mean cos(block input, block output), and optionally the
  loss increase when one layer at a time is skipped.

Each per-token signal is reduced over the sequence (mean of |x|, L2 norm, or variance) and then
over the batch (mean, L2 norm, or variance); the paper's best is batch L2, sequence mean.
Scores are saved to one .safetensors file: tensors plus the settings as JSON in its metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compact import arch as arch_mod
from compact.errors import UserError

AGGREGATIONS = ("mean", "l2", "var")
TENSOR_FIELDS = ("heads", "neurons", "channels", "channels_per_layer", "layers_bi", "layers_ppl")
META_KEY = "compact_scores"


class Cancelled(Exception):
    """Raised when should_stop() asked the importance pass to end early."""


@dataclass
class Scores:
    heads: torch.Tensor  # (layers, heads) query-head importance
    neurons: torch.Tensor  # (layers, ffn) MLP neuron importance
    channels: torch.Tensor  # (hidden,) summed over every residual norm, final norm included
    channels_per_layer: torch.Tensor  # (layers, hidden): the two norms of each block
    layers_bi: torch.Tensor  # (layers,) Block Importance
    layers_ppl: torch.Tensor | None  # (layers,) loss increase when the layer is skipped
    meta: dict = field(default_factory=dict)

    @property
    def channels_final(self) -> torch.Tensor:
        """The final norm's share of `channels` (the rest is channels_per_layer summed)."""
        return self.channels - self.channels_per_layer.sum(0)

    def save(self, path) -> Path:
        """One .safetensors file: the score tensors, settings as JSON in the header metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().float().cpu().contiguous()
                   for name in TENSOR_FIELDS if getattr(self, name) is not None}
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(self.meta, default=str)})
        return path

    @classmethod
    def load(cls, path) -> "Scores":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"importance file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged header
            raise UserError(f"{path} is not a readable importance file ({type(e).__name__})") from None
        missing = [k for k in TENSOR_FIELDS[:-1] if k not in tensors]
        if meta is None or missing:
            raise UserError(f"{path} is not an importance file written by compact")
        scores = cls(**{k: tensors.get(k) for k in TENSOR_FIELDS}, meta=meta)
        scores.check()
        return scores

    def check(self) -> None:
        """Shapes agree with each other (a hand-edited or truncated file fails here)."""
        layers, heads = self.heads.shape
        ok = (self.neurons.dim() == 2 and self.neurons.shape[0] == layers
              and self.channels_per_layer.shape == (layers, self.channels.numel())
              and self.layers_bi.shape == (layers,)
              and (self.layers_ppl is None or self.layers_ppl.shape == (layers,)))
        if not ok:
            raise UserError("importance file holds tensors of inconsistent shapes")

    def to(self, device) -> "Scores":
        moved = {k: (None if getattr(self, k) is None else getattr(self, k).to(device))
                 for k in TENSOR_FIELDS}
        return Scores(**moved, meta=dict(self.meta))


def _seq_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, n) -> (batch, n)."""
    x = x.float()
    if how == "mean":
        return x.abs().mean(1)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    return x.var(1, unbiased=False)


class _BatchStat:
    """Running sum and sum of squares over samples, finished into mean, L2 or variance."""

    def __init__(self):
        self.sum = self.sumsq = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: (batch, n)
        x = x.double()
        s, q = x.sum(0), x.square().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.n += x.shape[0]

    def result(self, how: str) -> torch.Tensor:
        if how == "mean":
            out = self.sum / self.n
        elif how == "l2":
            out = self.sumsq.sqrt()
        else:
            out = (self.sumsq / self.n - (self.sum / self.n).square()).clamp_min(0)
        return out.float().cpu()


def _check_aggregation(batch_agg: str, seq_agg: str) -> None:
    for name, value in (("batch", batch_agg), ("sequence", seq_agg)):
        if value not in AGGREGATIONS:
            raise UserError(f"unknown {name} aggregation '{value}': use {', '.join(AGGREGATIONS)}")


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def estimate(model, blocks: torch.Tensor, batch_agg: str = "l2", seq_agg: str = "mean",
             batch_size: int = 8, depth_ppl: bool = False,
             progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Scores:
    """Importance of every head, neuron, channel and layer from forward passes on blocks."""
    _check_aggregation(batch_agg, seq_agg)
    if blocks.dim() != 2 or len(blocks) == 0:
        raise UserError("importance needs at least one calibration block")
    batch_size = max(1, int(batch_size))
    arch = arch_mod.for_model(model)
    shape = arch.shape(model.config)
    layers = list(arch.blocks(model))
    device = next(model.parameters()).device
    model.eval()

    heads = [_BatchStat() for _ in layers]
    neurons = [_BatchStat() for _ in layers]
    norm_stats = [[_BatchStat() for _ in arch.block_norms(b)] for b in layers]
    final_stat = _BatchStat()
    cos_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)
    cos_count = [0]

    def on_heads(stat):
        def hook(module, args):
            x = args[0]
            per_head = torch.linalg.vector_norm(
                x.float().view(*x.shape[:-1], shape.heads, shape.head_dim), dim=-1)
            stat.add(_seq_reduce(per_head, seq_agg))
        return hook

    def on_input(stat):
        return lambda module, args: stat.add(_seq_reduce(args[0], seq_agg))

    def on_output(stat):
        return lambda module, args, output: stat.add(_seq_reduce(_hidden_out(output), seq_agg))

    def on_block(index):
        def hook(module, args, kwargs, output):
            x_in, x_out = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            cos_sum[index] += cos.double().sum()
            if index == 0:
                cos_count[0] += cos.numel()
        return hook

    handles = []
    try:
        for i, block in enumerate(layers):
            handles.append(arch.attn_out(block).register_forward_pre_hook(on_heads(heads[i])))
            handles.append(arch.mlp_out(block).register_forward_pre_hook(on_input(neurons[i])))
            for norm, stat in zip(arch.block_norms(block), norm_stats[i]):
                handles.append(norm.register_forward_hook(on_output(stat)))
            handles.append(block.register_forward_hook(on_block(i), with_kwargs=True))
        handles.append(arch.final_norm(model).register_forward_hook(on_output(final_stat)))

        passes = 1 + (len(layers) if depth_ppl else 0)
        n_batches = math.ceil(len(blocks) / batch_size)
        for b, start in enumerate(range(0, len(blocks), batch_size)):
            if should_stop is not None and should_stop():
                raise Cancelled("importance estimation cancelled")
            model(input_ids=blocks[start: start + batch_size].to(device), use_cache=False)
            if progress is not None:
                progress((b + 1) / n_batches / passes, f"importance: batch {b + 1}/{n_batches}")
    finally:
        for h in handles:
            h.remove()

    per_layer = torch.stack([sum(s.result(batch_agg) for s in stats) for stats in norm_stats])
    scores = Scores(
        heads=torch.stack([s.result(batch_agg) for s in heads]),
        neurons=torch.stack([s.result(batch_agg) for s in neurons]),
        channels=per_layer.sum(0) + final_stat.result(batch_agg),
        channels_per_layer=per_layer,
        layers_bi=(1 - cos_sum / cos_count[0]).float().cpu(),
        layers_ppl=None,
        meta={
            "model": getattr(model.config, "_name_or_path", "") or "",
            "family": arch.family,
            "shape": shape.to_dict(),
            "samples": int(len(blocks)),
            "seq_len": int(blocks.shape[1]),
            "batch_agg": batch_agg,
            "seq_agg": seq_agg,
            "depth_ppl": bool(depth_ppl),
        },
    )
    if depth_ppl:
        scores.layers_ppl = layer_loss_increase(
            model, blocks, batch_size, progress=progress, should_stop=should_stop,
            done=1 / passes)
    return scores


@torch.no_grad()
def layer_loss_increase(model, blocks: torch.Tensor, batch_size: int = 8,
                        progress: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        done: float = 0.0) -> torch.Tensor:
    """(layers,) calibration loss with layer i skipped minus the full model's loss."""
    from compact.evaluate import loss_on

    arch = arch_mod.for_model(model)
    layers = list(arch.blocks(model))
    base = loss_on(model, blocks, batch_size)
    out = torch.zeros(len(layers))
    for i, block in enumerate(layers):
        if should_stop is not None and should_stop():
            raise Cancelled("importance estimation cancelled")
        # Skipping = returning the block's input as its output, so every other layer keeps
        # its index (layer_types, KV cache slots) exactly as in the full model.
        handle = block.register_forward_hook(_skip_block, with_kwargs=True)
        try:
            out[i] = loss_on(model, blocks, batch_size) - base
        finally:
            handle.remove()
        if progress is not None:
            progress(done + (1 - done) * (i + 1) / len(layers), f"depth: layer {i + 1}/{len(layers)} skipped")
    return out


def _skip_block(module, args, kwargs, output):
    x = _hidden_in(args, kwargs)
    if isinstance(output, tuple):
        return (x, *output[1:])
    return x
