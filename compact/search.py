"""Minitron's lightweight architecture search (arXiv 2407.14679, section 2.4).

Every Shape on a grid whose parameter count lies within +-tolerance of a budget is a candidate;
each candidate is pruned with the same importance scores and ranked by its loss on calibration
blocks. The paper retrains each candidate briefly (~400 steps) before ranking; `rank` takes an
optional `adapt(model) -> model` callable for that (for example a short distillation), and
without it ranks one-shot, as NVIDIA's reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from compact.errors import Cancelled, UserError
from compact.importance import Progress, Scores, StopCheck
from compact.options import LoadOptions, option
from compact.prune import TargetOptions, parse_layer_list
from compact.shapes import Shape, shape_error, valid_values

SHAPE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim")


def _grid(full: int, step: int, min_fraction: float) -> list[int]:
    """Multiples of step from min_fraction * full up to full, and full itself."""
    step = max(1, int(step))
    low = max(1, math.ceil(full * min_fraction))
    values = {v for v in range(step, full + 1, step) if v >= low}
    values.add(full)
    return sorted(values)


def candidates(shape: Shape, target_params: int, tolerance: float = 0.05,
               layers: list[int] | None = None, hidden: list[int] | None = None,
               ffn: list[int] | None = None, heads: list[int] | None = None,
               layer_step: int = 1, hidden_step: int = 64, ffn_step: int = 64,
               min_fraction: float = 0.5, hidden_tied_to_heads: bool = False) -> list[Shape]:
    """Shapes within +-tolerance of target_params, closest first.

    Each axis takes the given values, or a grid of multiples of its step between min_fraction
    of the source and the source (heads: every valid count in that range). GPT-2
    (hidden_tied_to_heads) has hidden = heads x head_dim, so its hidden follows heads.
    """
    if target_params <= 0:
        raise UserError("the parameter budget must be positive")
    if not 0 < tolerance < 1:
        raise UserError("tolerance must be between 0 and 1 (0.05 is 5%)")
    if not 0 < min_fraction <= 1:
        raise UserError("min_fraction must be in (0, 1]")
    valid = valid_values(shape)
    axes = {
        "layers": layers or _grid(shape.layers, layer_step, min_fraction),
        "hidden": hidden or _grid(shape.hidden, hidden_step, min_fraction),
        "ffn": ffn or _grid(shape.ffn, ffn_step, min_fraction),
        "heads": heads or [h for h in valid["heads"] if h >= shape.heads * min_fraction] or [shape.heads],
    }
    for name, values in axes.items():
        allowed = set(valid[name])
        bad = [v for v in values if v not in allowed]
        if bad:
            raise UserError(f"{name} value {bad[0]} is not possible for this model")
    found = set()
    for n_layers in axes["layers"]:
        for n_heads in axes["heads"]:
            hidden_values = [n_heads * shape.head_dim] if hidden_tied_to_heads else axes["hidden"]
            for n_hidden in hidden_values:
                for n_ffn in axes["ffn"]:
                    s = shape.with_targets(layers=n_layers, hidden=n_hidden, ffn=n_ffn, heads=n_heads)
                    if shape_error(s) is None and abs(s.params - target_params) <= tolerance * target_params:
                        found.add(s)
    return sorted(found, key=lambda s: (abs(s.params - target_params), -s.layers, -s.hidden,
                                        -s.heads, -s.ffn))


def spread(shapes: list[Shape], limit: int) -> list[Shape]:
    """At most `limit` shapes spread evenly over the list ordered by (layers, hidden, heads, ffn)."""
    if limit <= 0 or len(shapes) <= limit:
        return list(shapes)
    ordered = sorted(shapes, key=lambda s: (s.layers, s.hidden, s.heads, s.ffn))
    picks = sorted({round(i * (len(ordered) - 1) / max(1, limit - 1)) for i in range(limit)})
    return [ordered[i] for i in picks]


def rank(model, scores: Scores, shapes: list[Shape], blocks, batch_size: int = 8,
         depth_metric: str = "bi", adapt: Callable | None = None,
         progress: Callable[[float, str], None] | None = None,
         should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Prune to each shape, score by calibration loss; best (lowest loss) first."""
    from compact.evaluate import perplexity
    from compact.prune import param_count, trim

    rows = []
    for n, shape in enumerate(shapes):
        if should_stop is not None and should_stop():
            raise Cancelled("search cancelled")
        pruned = trim(model, scores, layers=shape.layers, hidden=shape.hidden, ffn=shape.ffn,
                      heads=shape.heads, depth_metric=depth_metric)
        if adapt is not None:
            pruned = adapt(pruned)
        result = perplexity(pruned, blocks, batch_size)
        rows.append({**{k: getattr(shape, k) for k in SHAPE_FIELDS}, "params": param_count(pruned),
                     "loss": result["loss"], "ppl": result["ppl"]})
        del pruned
        if progress is not None:
            progress((n + 1) / len(shapes), f"search: candidate {n + 1}/{len(shapes)}")
    return sorted(rows, key=lambda r: r["loss"])


def distill_adapter(teacher, data: str, tokens: int, seq_len: int = 128, batch: int = 4,
                    lr: float = 1e-4, seed: int = 0) -> Callable:
    """The paper's short retraining before ranking: each candidate distilled from the teacher
    (a compact.models.Loaded) for the same number of tokens, in a throwaway folder."""
    import tempfile

    from compact import distill, models

    def adapt(pruned):
        with tempfile.TemporaryDirectory(prefix="compact-search-") as out:
            student = models.Loaded(pruned, teacher.tokenizer, teacher.arch, "candidate")
            cfg = distill.DistillConfig(teacher=teacher.ref, student="candidate", data=data, out=out,
                                        tokens=tokens, seq_len=seq_len, batch=batch, lr=lr,
                                        eval_tokens=0, checkpoint_every=0, seed=seed)
            distill.run(cfg, teacher=teacher, student=student)
        return pruned

    return adapt


def parse_params(text: str, source_params: int, what: str = "parameter budget") -> int:
    """'90M', '1.5B', '90000000', or a fraction of the source such as '0.7'.

    what: the budget's name in the error (a token budget parses the same, without fractions).
    """
    t = str(text).strip().upper().replace("_", "")
    try:
        if t.endswith(("K", "M", "B")):
            value = float(t[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[t[-1]]
        else:
            value = float(t)
            if 0 < value < 1:
                value *= source_params
    except ValueError:
        raise UserError(f"{what} must look like 90M, 1.5B, 90000000 or 0.7, got '{text}'") from None
    if value <= 0:
        raise UserError(f"the {what} must be positive")
    return int(value)


# -- the job ------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class SearchConfig(TargetOptions, LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    params: str = option(help="budget: 90M, 1.5B, 90000000 or 0.7 (fraction)")
    tolerance: float = option(0.05, "accepted distance from the budget (0.05 = 5%%)")
    top: int = option(8, "candidates to prune and score (spread evenly)")
    layers: str | None = option(None, "layer counts to try, e.g. 24,26,28")
    hidden: str | None = option(None, "hidden sizes to try")
    ffn: str | None = option(None, "FFN sizes to try")
    heads: str | None = option(None, "head counts to try")
    hidden_step: int = option(64, "hidden grid step")
    ffn_step: int = option(64, "FFN grid step")
    min_fraction: float = option(0.5, "smallest size per axis")
    adapt_tokens: int = option(0, "distill each candidate this many tokens before ranking "
                                  "(the paper's short retraining)")
    samples: int = option(32, "calibration blocks")

    def check(self) -> None:
        if self.adapt_tokens < 0:
            raise UserError("--adapt-tokens must be positive")

    def grid(self) -> dict:
        return {k: parse_layer_list(getattr(self, k)) for k in ("layers", "hidden", "ffn", "heads")}


def run(cfg: SearchConfig, progress: Progress | None = None, should_stop: StopCheck | None = None,
        loaded=None, scores: Scores | None = None) -> dict:
    """The search job: shapes within the budget, pruned with the same scores and ranked."""

    cfg.check()
    loaded = loaded or cfg.load(cfg.model)
    loaded.require_minitron()
    budget = parse_params(cfg.params, loaded.shape.params)
    found = candidates(loaded.shape, budget, cfg.tolerance, **cfg.grid(), hidden_step=cfg.hidden_step,
                       ffn_step=cfg.ffn_step, min_fraction=cfg.min_fraction,
                       hidden_tied_to_heads=loaded.arch.hidden_tied_to_heads)
    if not found:
        raise UserError(f"no shape on this grid lies within {cfg.tolerance:.0%} of {budget} "
                        "parameters; widen --tolerance or the grid")
    chosen = spread(found, cfg.top)
    if progress is not None:
        progress(0.0, f"{len(found)} shapes within {cfg.tolerance:.0%} of {budget:,} parameters; "
                      f"scoring {len(chosen)}")
    scores = cfg.ranked(scores) if scores is not None else cfg.scores_for(loaded, True, progress, should_stop)
    blocks = cfg.calibration_blocks(loaded)
    adapt = None
    if cfg.adapt_tokens:
        adapt = distill_adapter(loaded, cfg.data or "builtin", cfg.adapt_tokens, cfg.seq_len, cfg.batch)
    rows = rank(loaded.model, scores, chosen, blocks, cfg.batch, cfg.depth_metric, adapt=adapt,
                progress=progress, should_stop=should_stop)
    return {"model": cfg.model, "budget": budget, "tolerance": cfg.tolerance,
            "adapt_tokens": cfg.adapt_tokens, "candidates_in_budget": len(found), "ranked": rows}
