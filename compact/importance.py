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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compact import arch_generic
from compact.arch import own_thread
from compact.errors import Cancelled, UserError
from compact.options import LoadOptions, option

AGGREGATIONS = ("mean", "l2", "var")
SCORE_FIELDS = ("heads", "neurons", "channels", "channels_per_layer")
META_KEY = "compact_scores"

# Depth metrics, keyed by name: Scores.layers holds one (layers,) tensor per metric computed.
# name -> (label, how it is computed)
DEPTH_METRICS = {
    "bi": ("Block Importance", "1 - mean cos(block input, block output), from the main pass"),
    "angular": ("angular distance", "mean arccos(cos(block input, block output)) / pi, from the main pass"),
    "ppl": ("perplexity", "calibration-loss increase when the layer alone is skipped (--depth-ppl)"),
}


@dataclass
class Scores:
    heads: torch.Tensor  # (layers, heads) query-head importance
    neurons: torch.Tensor  # (layers, ffn) MLP neuron importance
    channels: torch.Tensor  # (hidden,) summed over every residual norm, final norm included
    channels_per_layer: torch.Tensor  # (layers, hidden): the norms of each block (Gemma: four)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # DEPTH_METRICS name -> (layers,)
    meta: dict = field(default_factory=dict)
    # Width metrics beside the activation score (compact.metrics): field name -> metric -> tensor
    # shaped like that field, e.g. metrics["heads"]["taylor"]; saved as metric.heads.taylor.
    metrics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Ablation truth of sampled units (compact.validation): axis -> {"units": flat indices,
    # "loss": loss increase}; saved as truth.<axis>.units / truth.<axis>.loss.
    truth: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def layers_bi(self) -> torch.Tensor | None:
        return self.layers.get("bi")

    @property
    def layers_ppl(self) -> torch.Tensor | None:
        return self.layers.get("ppl")

    @layers_ppl.setter
    def layers_ppl(self, value: torch.Tensor | None) -> None:
        if value is None:
            self.layers.pop("ppl", None)
        else:
            self.layers["ppl"] = value

    def depth(self, metric: str) -> torch.Tensor:
        if metric not in DEPTH_METRICS:
            raise UserError(f"unknown depth metric '{metric}': use {' or '.join(DEPTH_METRICS)}")
        if metric not in self.layers:
            label, how = DEPTH_METRICS[metric]
            raise UserError(f"these scores have no {label} layer importance ({how}); "
                            f"use --depth-metric {' or '.join(self.layers)}")
        return self.layers[metric]

    @property
    def channels_final(self) -> torch.Tensor:
        """The final norm's share of `channels` (the rest is channels_per_layer summed)."""
        return self.channels - self.channels_per_layer.sum(0)

    def width(self, axis: str, metric: str = "activation") -> torch.Tensor:
        """One axis's scores by a metric (compact.metrics.WIDTH_METRICS)."""
        from compact.metrics import WIDTH_METRICS

        if metric not in WIDTH_METRICS[axis]:
            raise UserError(f"unknown {axis} metric '{metric}': use {', '.join(WIDTH_METRICS[axis])}")
        if metric == "activation":
            return getattr(self, axis)
        if metric not in self.metrics.get(axis, {}):
            raise UserError(f"these scores have no {metric} {axis} scores: run importance with "
                            "--extra-metrics (or --validate)")
        return self.metrics[axis][metric]

    def using(self, heads: str = "activation", neurons: str = "activation",
              channels: str = "activation") -> Scores:
        """These scores with each width axis ranked by the metric named (activation: unchanged)."""
        per_layer = (self.channels_per_layer if channels == "activation"
                     else self.metrics.get("channels_per_layer", {}).get(channels))
        return Scores(heads=self.width("heads", heads), neurons=self.width("neurons", neurons),
                      channels=self.width("channels", channels), channels_per_layer=per_layer,
                      layers=dict(self.layers), meta={**self.meta, "ranked_by": dict(
                          heads=heads, neurons=neurons, channels=channels)},
                      metrics=self.metrics, truth=self.truth)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor, as in the file: depth metrics as layers_<name>."""
        return {**{k: getattr(self, k) for k in SCORE_FIELDS},
                **{f"layers_{k}": v for k, v in self.layers.items()},
                **{f"metric.{axis}.{k}": v for axis, m in self.metrics.items() for k, v in m.items()},
                **{f"truth.{axis}.{k}": v for axis, t in self.truth.items() for k, v in t.items()}}

    def save(self, path) -> Path:
        """One .safetensors file: the score tensors, settings as JSON in the header metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                   for k, v in self.tensors().items()}
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(self.meta, default=str)})
        return path

    @classmethod
    def load(cls, path) -> Scores:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"importance file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged header
            raise UserError(f"{path} is not a readable importance file ({type(e).__name__})") from None
        missing = [k for k in (*SCORE_FIELDS, "layers_bi") if k not in tensors]
        if meta is None or missing:
            raise UserError(f"{path} is not an importance file written by compact")
        nested = {"metric": {}, "truth": {}}
        for k, v in tensors.items():
            kind, _, rest = k.partition(".")
            if kind in nested and "." in rest:
                axis, name = rest.split(".", 1)
                nested[kind].setdefault(axis, {})[name] = v
        scores = cls(**{k: tensors[k] for k in SCORE_FIELDS}, meta=meta,
                     layers={k.removeprefix("layers_"): v for k, v in tensors.items()
                             if k.startswith("layers_") and k.removeprefix("layers_") in DEPTH_METRICS},
                     metrics=nested["metric"], truth=nested["truth"])
        scores.check()
        return scores

    def check(self) -> None:
        """Shapes agree with each other (a hand-edited or truncated file fails here)."""
        layers, heads = self.heads.shape
        ok = (self.neurons.dim() == 2 and self.neurons.shape[0] == layers
              and self.channels_per_layer.shape == (layers, self.channels.numel())
              and all(t.shape == (layers,) for t in self.layers.values()))
        if not ok:
            raise UserError("importance file holds tensors of inconsistent shapes")

    def to(self, device) -> Scores:
        return Scores(**{k: getattr(self, k).to(device) for k in SCORE_FIELDS},
                      layers={k: v.to(device) for k, v in self.layers.items()}, meta=dict(self.meta),
                      metrics={a: {k: v.to(device) for k, v in m.items()} for a, m in self.metrics.items()},
                      truth=self.truth)


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
    arch = arch_generic.minitron_adapter(model)
    shape = arch.shape(model.config)
    if shape.unprunable:
        raise UserError(shape.unprunable)
    layers = list(arch.blocks(model))
    device = next(model.parameters()).device
    model.eval()

    heads = [_BatchStat() for _ in layers]
    neurons = [_BatchStat() for _ in layers]
    norm_stats = [[_BatchStat() for _ in arch.block_norms(b)] for b in layers]
    final_stat = _BatchStat()
    cos_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)
    angle_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)
    cos_count = [0]

    def on_heads(stat):
        def hook(module, args):
            x = args[0]
            per_head = torch.linalg.vector_norm(
                x.float().view(*x.shape[:-1], shape.heads, shape.head_dim), dim=-1)
            stat.add(_seq_reduce(per_head, seq_agg))
        return hook

    batch_now = [0]  # blocks in the running forward pass

    def per_block(x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, n); OPT flattens batch and sequence into rows around its MLP."""
        return x.view(batch_now[0], -1, x.shape[-1]) if x.dim() == 2 else x

    def on_input(stat):
        return lambda module, args: stat.add(_seq_reduce(per_block(args[0]), seq_agg))

    def on_output(stat):
        return lambda module, args, output: stat.add(_seq_reduce(per_block(_hidden_out(output)), seq_agg))

    def on_block(index):
        def hook(module, args, kwargs, output):
            x_in, x_out = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            cos_sum[index] += cos.double().sum()
            angle_sum[index] += torch.arccos(cos.double().clamp(-1, 1)).sum() / math.pi
            if index == 0:
                cos_count[0] += cos.numel()
        return hook

    handles = []
    try:
        for i, block in enumerate(layers):
            handles.append(arch.attn_out(block).register_forward_pre_hook(own_thread(on_heads(heads[i]))))
            handles.append(arch.mlp_out(block).register_forward_pre_hook(own_thread(on_input(neurons[i]))))
            for norm, stat in zip(arch.block_norms(block), norm_stats[i], strict=True):
                handles.append(norm.register_forward_hook(own_thread(on_output(stat))))
            handles.append(block.register_forward_hook(own_thread(on_block(i)), with_kwargs=True))
        handles.append(arch.final_norm(model).register_forward_hook(own_thread(on_output(final_stat))))

        passes = 1 + (len(layers) if depth_ppl else 0)
        n_batches = math.ceil(len(blocks) / batch_size)
        for b, start in enumerate(range(0, len(blocks), batch_size)):
            if should_stop is not None and should_stop():
                raise Cancelled("importance estimation cancelled")
            batch = blocks[start: start + batch_size]
            batch_now[0] = len(batch)
            model(input_ids=batch.to(device), use_cache=False)
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
        layers={"bi": (1 - cos_sum / cos_count[0]).float().cpu(),
                "angular": (angle_sum / cos_count[0]).float().cpu()},
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
        scores.layers["ppl"] = layer_loss_increase(
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

    arch = arch_generic.minitron_adapter(model)
    layers = list(arch.blocks(model))
    base = loss_on(model, blocks, batch_size)
    out = torch.zeros(len(layers))
    for i, block in enumerate(layers):
        if should_stop is not None and should_stop():
            raise Cancelled("importance estimation cancelled")
        # Skipping = returning the block's input as its output, so every other layer keeps
        # its index (layer_types, KV cache slots) exactly as in the full model.
        handle = block.register_forward_hook(own_thread(_skip_block), with_kwargs=True)
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


# -- the job ------------------------------------------------------------------------------------

Progress = Callable[[float, str], None]
StopCheck = Callable[[], bool]


@dataclass(kw_only=True)
class CalibrationOptions:
    """The calibration blocks an importance pass reads (shared by importance, prune, search)."""

    data: str = option("builtin", "calibration text (SRC)")
    samples: int = option(128, "calibration blocks")
    seq_len: int = option(512, "tokens per calibration block")
    batch: int = option(8, "blocks per forward pass")
    batch_agg: str = option("l2", "reduce each score over the batch", choices=AGGREGATIONS)
    seq_agg: str = option("mean", "reduce each score over the sequence", choices=AGGREGATIONS)

    def calibration_blocks(self, loaded, progress: Progress | None = None) -> torch.Tensor:
        from compact import data

        if self.samples <= 0:
            raise UserError("--samples must be positive")
        return data.blocks(self.data, loaded.tokenizer, "calibration", self.samples, self.seq_len,
                           model=loaded.model, progress=progress)

    def estimate(self, loaded, depth_ppl: bool = False, progress: Progress | None = None,
                 should_stop: StopCheck | None = None, extra: bool = False, blocks=None) -> Scores:
        """Scores on the calibration blocks; extra adds compact.metrics' (one backward pass)."""
        from compact import metrics

        blocks = self.calibration_blocks(loaded, progress) if blocks is None else blocks
        if progress is not None:
            progress(0.0, f"importance on {len(blocks)} blocks of {self.seq_len} tokens from {self.data}")
        share = 0.5 if extra else 1.0
        scores = estimate(loaded.model, blocks, self.batch_agg, self.seq_agg, self.batch, depth_ppl,
                          progress=_part(progress, 0, share), should_stop=should_stop)
        if extra:
            scores.metrics = metrics.extra(loaded.model, blocks, self.batch_agg, self.seq_agg, self.batch,
                                           _part(progress, share, 1 - share), should_stop)
        scores.meta.update(model=loaded.ref, data=self.data, extra_metrics=bool(extra))
        return scores


def _part(progress: Progress | None, start: float, share: float) -> Progress | None:
    """progress for one step that covers [start, start + share] of the job."""
    if progress is None:
        return None
    return lambda fraction, message=None: progress(start + share * fraction, message)


@dataclass(kw_only=True)
class ImportanceConfig(CalibrationOptions, LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    depth_ppl: bool = option(False, "also the loss increase when each layer is skipped (one pass per layer)")
    extra_metrics: bool = option(False, "also output-projection, first-order Taylor and Wanda-style scores "
                                        "per head and neuron, Taylor per channel (one backward pass)")
    validate: str | None = option(None, "check every metric against the ablation truth on these axes, e.g. "
                                        "heads,layers (of heads,neurons,channels,layers; one pass per unit; "
                                        "implies --extra-metrics)")
    validate_units: int = option(64, "neurons and channels sampled (seeded) for --validate")
    validate_blocks: int = option(0, "calibration blocks the ablation truth uses (0: all)")
    out: str = option(help="scores file (.safetensors)")


def run(cfg: ImportanceConfig, progress: Progress | None = None, should_stop: StopCheck | None = None,
        loaded=None) -> dict:
    """The importance job: estimate every score on the calibration blocks, save them to cfg.out."""

    from compact import validation

    axes = validation.parse_axes(cfg.validate)  # before any slow pass
    if cfg.validate_blocks < 0:
        raise UserError("--validate-blocks must be 0 (all) or positive")
    loaded = loaded or cfg.load(cfg.model)
    loaded.require_minitron()  # before reading any calibration text
    blocks = cfg.calibration_blocks(loaded, progress)
    share = 0.3 if axes else 1.0
    scores = cfg.estimate(loaded, cfg.depth_ppl, _part(progress, 0, share), should_stop,
                          extra=cfg.extra_metrics or bool(axes), blocks=blocks)
    result = {}
    if axes:
        result["validation"] = validation.validate(
            loaded.model, blocks[:cfg.validate_blocks or None], scores, axes, cfg.validate_units,
            batch_size=cfg.batch, progress=_part(progress, share, 1 - share), should_stop=should_stop)
    path = scores.save(cfg.out)
    order = scores.layers_bi.argsort().tolist()
    return {"model": cfg.model, "out": str(path), **{k: scores.meta[k] for k in (
            "family", "samples", "seq_len", "batch_agg", "seq_agg", "depth_ppl", "extra_metrics")},
            "least_important_layers_bi": order[:5], **result}
