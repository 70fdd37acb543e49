"""Trim a model to a smaller Shape with Minitron importance Scores (arXiv 2407.14679, sec. 2.3).

The result is an ordinary checkpoint of the same family: every layer keeps the same number of
heads, neurons and channels, so the config only changes its sizes. Rules:
- channels: the `hidden` channels with the highest score (summed over the kept layers' norms
  and the final norm) are kept in every matrix that reads or writes the residual stream, every
  norm, the embeddings (GPT-2, OPT: positions too) and the LM head (tied stays tied);
- fused matrices (GPT-2's and Phi-3's q|k|v, Phi-3's gate|up, GPT-NeoX's per-head q,k,v) are
  sliced part by part, each part by its own axis (the adapter's block_axes names the layout);
- heads: GQA keeps every KV group and the best `heads / kv_heads` query heads inside each group;
  multi-head attention (kv_heads == heads) keeps the best heads with their own K and V;
- GPT-2, GPT-NeoX and OPT compute head_dim = hidden / heads, so head_dim stays fixed and
  hidden = heads x head_dim: a heads target implies the hidden size and the other way round (both given must
  agree); the residual channels and the heads are still chosen by their own scores;
- depth: drop the layers with the lowest Block Importance (or loss increase), or a given list;
- the adapter may adjust the sliced weights (Gemma's post-norms follow its embedding scale) or
  save another family of the same function (a Llama whose hidden is not a multiple of its heads
  is saved as Mistral: compact.arch.Llama).
Kept indices stay in their original order. The source model is left unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from compact import arch as arch_mod
from compact import arch_generic, scoreboard
from compact.errors import UserError
from compact.importance import DEPTH_METRICS, CalibrationOptions, Progress, Scores, StopCheck
from compact.metrics import WIDTH_METRICS
from compact.options import LoadOptions, option
from compact.scoreboard import ScoreOptions
from compact.shapes import Shape, shape_error


@dataclass
class Plan:
    """What a pruning target keeps: original indices, ascending, per axis."""

    source: Shape
    shape: Shape  # the target
    layers: list[int]  # kept layers
    channels: list[int]  # kept residual channels
    heads: list[list[int]]  # kept query heads, one list per kept layer
    kv_heads: list[list[int]]  # kept key/value heads, one list per kept layer
    neurons: list[list[int]]  # kept MLP neurons, one list per kept layer

    @property
    def dropped_layers(self) -> list[int]:
        kept = set(self.layers)
        return [i for i in range(self.source.layers) if i not in kept]

    def to_dict(self) -> dict:
        return {"source": self.source.to_dict(), "shape": self.shape.to_dict(),
                **{k: v for k, v in asdict(self).items() if k not in ("source", "shape")},
                "dropped_layers": self.dropped_layers}


def _positive(name: str, value, limit: int) -> int | None:
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got '{value}'") from None
    if value <= 0:
        raise UserError(f"{name} must be positive, got {value}")
    if value > limit:
        raise UserError(f"{name} {value} is larger than the source's {limit}")
    return value


def parse_layer_list(text: str | list | None) -> list[int] | None:
    """'3,5' or [3, 5] -> [3, 5]; None or '' -> None."""
    if text is None or text == "" or text == []:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise UserError(f"a list must be comma-separated whole numbers, got '{text}'") from None


def resolve_targets(shape: Shape, layers=None, hidden=None, ffn=None, heads=None,
                    drop_layers=None, hidden_tied_to_heads: bool = False) -> tuple[Shape, list[int] | None]:
    """Validate the targets against the source shape: the target Shape and the drop list."""
    layers = _positive("layers", layers, shape.layers)
    hidden = _positive("hidden", hidden, shape.hidden)
    ffn = _positive("ffn", ffn, shape.ffn)
    heads = _positive("heads", heads, shape.heads)
    if hidden_tied_to_heads:
        if heads is not None and hidden is not None and hidden != heads * shape.head_dim:
            raise UserError(f"this model ties hidden to heads x head_dim ({shape.head_dim}): "
                            f"{heads} heads need hidden {heads * shape.head_dim}, not {hidden}")
        if hidden is not None and heads is None:
            if hidden % shape.head_dim:
                raise UserError(f"this model ties hidden to heads x head_dim: hidden must be a multiple "
                                f"of {shape.head_dim}, got {hidden}")
            heads = hidden // shape.head_dim
        elif heads is not None:
            hidden = heads * shape.head_dim
    if heads is not None and shape.kv_heads != shape.heads and heads % shape.kv_heads:
        raise UserError(f"heads must be a multiple of the {shape.kv_heads} KV heads "
                        f"(KV groups are kept), got {heads}")
    drop = parse_layer_list(drop_layers)
    if drop is not None:
        bad = [i for i in drop if not 0 <= i < shape.layers]
        if bad:
            raise UserError(f"unknown layer index {bad[0]}: the model has layers 0-{shape.layers - 1}")
        if len(set(drop)) != len(drop):
            raise UserError("the list of layers to drop repeats an index")
        if len(drop) >= shape.layers:
            raise UserError("cannot drop every layer")
        if layers is not None and layers != shape.layers - len(drop):
            raise UserError(f"dropping {len(drop)} of {shape.layers} layers leaves "
                            f"{shape.layers - len(drop)}, not {layers}")
        layers = shape.layers - len(drop)
    target = shape.with_targets(layers=layers, hidden=hidden, ffn=ffn, heads=heads)
    problem = shape_error(target)
    if problem:
        raise UserError(problem)
    return target, drop


def _top(scores: torch.Tensor, k: int, offset: int = 0) -> list[int]:
    """Indices of the k highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return sorted(int(i) + offset for i in order)


def _check_scores(scores: Scores, shape: Shape) -> None:
    expect = (shape.layers, shape.heads, shape.ffn, shape.hidden)
    got = (scores.heads.shape[0], scores.heads.shape[1], scores.neurons.shape[1],
           scores.channels.numel())
    if expect != got:
        raise UserError(f"the importance scores are for another shape (layers, heads, ffn, hidden) "
                        f"= {got}; this model has {expect}")


def plan(scores: Scores | None, shape: Shape, layers=None, hidden=None, ffn=None, heads=None,
         depth_metric: str = "bi", drop_layers=None, family: str | None = None) -> Plan:
    """Which layers, channels, heads and neurons a target keeps. Cheap: no model needed.

    family (default: the one recorded in scores) decides GPT-2's hidden/heads coupling.
    """
    family = family or (scores.meta.get("family") if scores is not None else None)
    tied = arch_mod.FAMILIES[family].hidden_tied_to_heads if family in arch_mod.FAMILIES else False
    target, drop = resolve_targets(shape, layers, hidden, ffn, heads, drop_layers, tied)
    if depth_metric not in DEPTH_METRICS:
        raise UserError(f"unknown depth metric '{depth_metric}': use {' or '.join(DEPTH_METRICS)}")
    needs_scores = (target.hidden < shape.hidden or target.ffn < shape.ffn
                    or target.heads < shape.heads or (target.layers < shape.layers and drop is None))
    if needs_scores:
        if scores is None:
            raise UserError("this target needs importance scores (an importance file or data)")
        _check_scores(scores, shape)

    if drop is not None:
        kept_layers = [i for i in range(shape.layers) if i not in set(drop)]
    elif target.layers < shape.layers:
        kept_layers = _top(scores.depth(depth_metric), target.layers)
    else:
        kept_layers = list(range(shape.layers))

    if target.hidden < shape.hidden:
        channel_scores = scores.channels_per_layer[kept_layers].sum(0) + scores.channels_final
        channels = _top(channel_scores, target.hidden)
    else:
        channels = list(range(shape.hidden))

    heads_kept, kv_kept, neurons = [], [], []
    for layer in kept_layers:
        neurons.append(_top(scores.neurons[layer], target.ffn) if target.ffn < shape.ffn
                       else list(range(shape.ffn)))
        if target.heads == shape.heads:
            heads_kept.append(list(range(shape.heads)))
            kv_kept.append(list(range(shape.kv_heads)))
        elif shape.kv_heads == shape.heads:  # multi-head: each head brings its own K and V
            kept = _top(scores.heads[layer], target.heads)
            heads_kept.append(kept)
            kv_kept.append(kept)
        else:  # GQA: the same number of query heads kept inside every KV group
            group = shape.heads // shape.kv_heads
            per_group = target.heads // shape.kv_heads
            row = scores.heads[layer]
            heads_kept.append([h for g in range(shape.kv_heads)
                               for h in _top(row[g * group:(g + 1) * group], per_group, g * group)])
            kv_kept.append(list(range(shape.kv_heads)))
    return Plan(shape, target, kept_layers, channels, heads_kept, kv_kept, neurons)


def _dims(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


# Where query head h's dims start along each axis that holds query heads, in head_dims.
QUERY_STRIDE = {"q": 1, "qkv": 1, "qkv_per_head": 3}


def _block_index(s: Shape, channels, heads: list[int], kv_heads: list[int],
                 neurons: list[int]) -> dict[str, torch.Tensor]:
    """The kept indices along each axis kind of a block's parameters (see Arch.block_axes)."""
    q, kv = _dims(heads, s.head_dim), _dims(kv_heads, s.head_dim)
    ffn = torch.tensor(neurons, dtype=torch.long)
    q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"ch": channels, "q": q, "kv": kv, "ffn": ffn,
            # OLMo 2's q_norm: sliced like q, but a scale per dim that the head residual leaves be.
            "q_norm": q,
            # Fused layouts: q|k|v stacked (GPT-2, Phi-3), gate|up stacked (Phi-3), and
            # q, k, v interleaved head by head (GPT-NeoX, multi-head only).
            "qkv": torch.cat([q, q_width + kv, q_width + kv_width + kv]),
            "gate_up": torch.cat([ffn, s.ffn + ffn]),
            "qkv_per_head": _dims(heads, 3 * s.head_dim)}


def _residual_pairs(scores: Scores, layer: int, p: Plan, position: int) -> list[tuple[int, int]]:
    """Head residual pairs (kept head i, pruned head j) inside each KV group (or all heads).

    With heads ranked best first, the weakest kept heads take i = K-(L-K)+1 .. K (1-based)
    paired with j = 2K-i+1: the weakest kept head meets the strongest pruned one.
    """
    s = p.source
    groups = ([list(range(s.heads))] if s.kv_heads == s.heads else
              [list(range(g * (s.heads // s.kv_heads), (g + 1) * (s.heads // s.kv_heads)))
               for g in range(s.kv_heads)])
    kept = set(p.heads[position])
    pairs = []
    for members in groups:
        ranked = sorted(members, key=lambda h: -float(scores.heads[layer, h]))
        k, total = sum(h in kept for h in members), len(members)
        for i in range(max(1, 2 * k - total + 1), k + 1):
            pairs.append((ranked[i - 1], ranked[2 * k - i]))
    return pairs


# Where the head residual goes: off; query (the paper's reading: each kept query head's query
# projection rows; K and V, shared by a GQA group, stay); output (the same formula on the head's
# output-projection columns instead).
HEAD_RESIDUAL = ("off", "query", "output")


def _residual_mode(value) -> str:
    """The mode of a head_residual argument (False/True from older callers: off/query)."""
    mode = {False: "off", True: "query", None: "off"}.get(value, value)
    if mode not in HEAD_RESIDUAL:
        raise UserError(f"unknown head residual '{value}': use {', '.join(HEAD_RESIDUAL)}")
    return mode


def _apply_head_residual(t: torch.Tensor, dim: int, pairs, head_dim: int, stride: int) -> torch.Tensor:
    """new head_i = head_i + (head_i - head_j) on the head's slice of t along dim; query head
    h's slice starts at h * stride."""
    t = t.clone()
    for i, j in pairs:
        a = t.narrow(dim, i * stride, head_dim)
        b = t.narrow(dim, j * stride, head_dim)
        a.copy_(2 * a - b)
    return t


def _output_prefix(arch, model) -> str:
    """The attention output projection's parameter-name prefix inside a block."""
    block = arch.blocks(model)[0]
    return next(name for name, m in block.named_modules() if m is arch.attn_out(block)) + "."


def apply(model, p: Plan, scores: Scores | None = None, head_residual: str = "off"):
    """A new model of the plan's shape holding the kept slices of model's weights."""
    arch = arch_generic.minitron_adapter(model)
    s = p.source
    head_residual = _residual_mode(head_residual)
    if head_residual != "off" and scores is None:
        raise UserError("the head residual needs head importance scores")
    output_prefix = _output_prefix(arch, model)
    model_axes, block_axes = arch.model_axes(), arch.block_axes()
    position = {layer: n for n, layer in enumerate(p.layers)}
    channels = torch.tensor(p.channels, dtype=torch.long)
    new_sd = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(arch.layers_prefix):
            layer_text, name = key[len(arch.layers_prefix):].split(".", 1)
            layer = int(layer_text)
            if layer not in position:
                continue
            n = position[layer]
            axes = block_axes.get(name)
            index = _block_index(s, channels, p.heads[n], p.kv_heads[n], p.neurons[n])
            key = f"{arch.layers_prefix}{n}.{name}"
            # The output projection's "q" axis is its input (head columns); every other
            # query-head axis is a query projection's output (head rows).
            side = "output" if name.startswith(output_prefix) else "query"
            if head_residual == side and p.shape.heads < s.heads and axes is not None:
                pairs = _residual_pairs(scores, layer, p, n)
                for dim, axis in enumerate(axes):
                    if axis in QUERY_STRIDE:
                        tensor = _apply_head_residual(tensor, dim, pairs, s.head_dim,
                                                      QUERY_STRIDE[axis] * s.head_dim)
        else:
            axes = model_axes.get(key)
            index = {"ch": channels}
        if axes is None:
            raise RuntimeError(f"no pruning rule for parameter '{key}' in the {arch.family} adapter")
        for dim, axis in enumerate(axes):
            if axis is not None:
                tensor = tensor.index_select(dim, index[axis].to(tensor.device))
        new_sd[key] = tensor.contiguous()

    arch.adjust_pruned(new_sd, s, p.shape)
    config = arch.pruned_config(model.config, p.shape, p.layers)
    param = next(model.parameters())
    # Skip random init: every weight is overwritten by the loaded slices right away.
    with no_init_weights(), torch.device(param.device):
        new = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    new.load_state_dict(new_sd, strict=True, assign=True)  # the slices become the parameters
    new.tie_weights()  # after assign, and because no_init_weights skipped init's own tying
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def trim(model, scores: Scores | None, layers=None, hidden=None, ffn=None, heads=None,
         depth_metric: str = "bi", drop_layers=None, head_residual: str = "off"):
    """The model pruned to the targets (None keeps an axis); a new model, the source unchanged."""
    return trim_with_plan(model, scores, layers, hidden, ffn, heads, depth_metric, drop_layers,
                          head_residual)[0]


def trim_with_plan(model, scores, layers=None, hidden=None, ffn=None, heads=None,
                   depth_metric="bi", drop_layers=None, head_residual="off"):
    arch = arch_generic.minitron_adapter(model)
    p = plan(scores, arch.shape(model.config), layers, hidden, ffn, heads, depth_metric,
             drop_layers, family=arch.family)
    return apply(model, p, scores, head_residual), p


def param_count(model) -> int:
    return sum(t.numel() for t in model.parameters())


def prune_and_save(loaded, scores: Scores | None, out, head_residual: str = "off",
                   depth_metric: str = "bi", **targets) -> dict:
    """Prune loaded.model to the targets and write a standard checkpoint with compact.json."""
    from compact import models

    start = time.perf_counter()
    model, p = trim_with_plan(loaded.model, scores, depth_metric=depth_metric,
                              head_residual=head_residual, **targets)
    seconds = time.perf_counter() - start
    params = param_count(model)
    meta = {
        "method": "minitron",
        "source": loaded.ref,
        "source_shape": p.source.to_dict(),
        "shape": p.shape.to_dict(),
        "targets": {k: v for k, v in targets.items() if v is not None},
        "depth_metric": depth_metric,
        "head_residual": _residual_mode(head_residual),
        "ranked_by": scores.meta.get("ranked_by") if scores is not None else None,
        "kept_layers": p.layers,
        "dropped_layers": p.dropped_layers,
        "importance": scores.meta if scores is not None else None,
        "params": params,
    }
    note = loaded.arch.pruned_note(p.shape)
    if note:
        meta["note"] = note
    models.save(model, loaded.tokenizer, out, meta, dtype=loaded.source_dtype)
    shape = p.shape
    return {
        "out": str(out),
        "family": loaded.arch.family,
        "shape": {k: getattr(shape, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads",
                                                  "head_dim")},
        "params": params,
        "source_params": param_count(loaded.model),
        "dropped_layers": p.dropped_layers,
        "trim_seconds": round(seconds, 3),
        **({"saved_as": model.config.model_type, "note": note} if note else {}),
    }


# -- the job ------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class TargetOptions(CalibrationOptions):
    """A pruning target and where its scores come from (shared by prune and search's ranking)."""

    depth_metric: str = option("bi", "which layers go: lowest Block Importance (bi) or loss increase (ppl)",
                               choices=DEPTH_METRICS)
    importance: str | None = option(None, "scores file from 'importance' (else computed from --data)")
    head_metric: str = option("activation", "rank heads by (compact.metrics; all but activation need "
                                            "importance --extra-metrics)", choices=WIDTH_METRICS["heads"])
    neuron_metric: str = option("activation", "rank MLP neurons by", choices=WIDTH_METRICS["neurons"])
    channel_metric: str = option("activation", "rank embedding channels by",
                                 choices=WIDTH_METRICS["channels"])

    def scores_for(self, loaded, needed: bool, progress=None, should_stop=None) -> Scores | None:
        if self.importance:
            return self.ranked(Scores.load(self.importance))
        if not needed:
            return None
        return self.ranked(self.estimate(loaded, self.depth_metric == "ppl", progress, should_stop,
                                         extra=self.needs_extra_metrics))

    @property
    def needs_extra_metrics(self) -> bool:
        return any(m != "activation" for m in (self.head_metric, self.neuron_metric, self.channel_metric))

    def ranked(self, scores: Scores | None) -> Scores | None:
        """scores ranked by the chosen metrics (unchanged for the activation score)."""
        if scores is None or not self.needs_extra_metrics:
            return scores
        return scores.using(self.head_metric, self.neuron_metric, self.channel_metric)


@dataclass(kw_only=True)
class PruneConfig(TargetOptions, ScoreOptions, LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    out: str = option(help="folder for the pruned checkpoint")
    layers: int | None = option(None, "layers to keep")
    hidden: int | None = option(None, "residual channels (hidden size) to keep")
    ffn: int | None = option(None, "MLP neurons per layer to keep")
    heads: int | None = option(None, "query heads per layer to keep")
    samples: int = option(64, "calibration blocks")
    drop_layers: str | None = option(None, "explicit layers to drop, e.g. 3,5")
    head_residual: str = option("off", "the paper's head residual, new head_i = 2 head_i - head_j for the "
                                       "weakest kept heads: in their query rows (query, the paper's reading) "
                                       "or their output-projection columns (output)", choices=HEAD_RESIDUAL)
    eval_tokens: int = option(0, "validation tokens of --data scored before and after (0: none)")

    def __post_init__(self):
        # Runs recorded before the modes existed hold False/True (compact.reproduce rebuilds them).
        self.head_residual = _residual_mode(self.head_residual)

    def targets(self) -> dict:
        return dict(layers=self.layers, hidden=self.hidden, ffn=self.ffn, heads=self.heads,
                    drop_layers=parse_layer_list(self.drop_layers))


def run(cfg: PruneConfig, progress: Progress | None = None, should_stop: StopCheck | None = None,
        loaded=None, scores: Scores | None = None, before: dict | None = None) -> dict:
    """The prune job: check the targets, get scores if the target needs them, trim and save;
    with cfg.eval_tokens, validation perplexity before (unless given) and after; with cfg.score,
    the canonical scores of both (compact.scoreboard)."""

    loaded = loaded or cfg.load(cfg.model)
    loaded.require_minitron()
    targets = cfg.targets()
    # Validate the targets before any slow pass: scores are only needed past this point.
    target, drop = resolve_targets(loaded.shape, cfg.layers, cfg.hidden, cfg.ffn, cfg.heads,
                                   targets["drop_layers"], loaded.arch.hidden_tied_to_heads)
    src = loaded.shape
    needed = (cfg.head_residual != "off" or (target.layers < src.layers and drop is None)
              or (target.hidden, target.ffn, target.heads) != (src.hidden, src.ffn, src.heads))
    if scores is None:
        scores = cfg.scores_for(loaded, needed, progress, should_stop)
    else:
        scores = cfg.ranked(scores)
    if progress is not None:
        progress(0.95, "trimming")
    summary = prune_and_save(loaded, scores, cfg.out, head_residual=cfg.head_residual,
                             depth_metric=cfg.depth_metric, **targets)
    result = {"model": cfg.model, **summary}
    if cfg.eval_tokens:
        result.update(_before_after(cfg, loaded, before, progress))
    if cfg.score:
        if progress is not None:
            progress(0.97, "canonical perplexity of the original and the pruned model")
        result["canonical"] = scoreboard.pair(scoreboard.score(cfg.model, loaded, load=cfg),
                                              scoreboard.score(cfg.out, load=cfg))
    return result


def _before_after(cfg: PruneConfig, loaded, before: dict | None, progress) -> dict:
    from compact import data, evaluate

    pruned = cfg.load(cfg.out, device=str(loaded.device)).model
    seq = min(cfg.seq_len, evaluate.context_length(pruned))
    val = data.blocks(cfg.data, loaded.tokenizer, "validation", data.n_blocks_for(cfg.eval_tokens, seq), seq,
                      model=loaded.model)
    if before is None:
        if progress is not None:
            progress(0.5, "validation perplexity of the original")
        before = evaluate.perplexity(loaded.model, val, cfg.batch)
    if progress is not None:
        progress(0.75, "validation perplexity of the pruned model")
    after = evaluate.perplexity(pruned, val, cfg.batch)
    return {"ppl_before": before["ppl"], "ppl_after": after["ppl"], "eval_tokens": after["tokens"],
            "before": before}
