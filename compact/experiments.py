"""One-click experiments that test the papers' findings on the loaded model.

- axis_ablation: Table 1 of arXiv 2407.14679. Prune to the same parameter count along depth,
  MLP, attention, embedding channels and their combinations; distill each for the same token
  budget; compare loss before and after, and against the same shape from random initialization.
- kd_vs_ce: one pruned student retrained with logit distillation and with cross-entropy only.
- sparse_methods: 2:4 by magnitude, Wanda, SparseGPT (one-shot) and AST with and without SLoRB.

Every arm is a recorded run (compact.runs); each experiment writes results.json and
results.md under its output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compact import data, evaluate, models, runs, scoreboard
from compact.errors import Cancelled, UserError
from compact.options import LoadOptions, option
from compact.scoreboard import ScoreOptions
from compact.shapes import Shape, shape_error, valid_values

# Each arm names the axes it shrinks; combinations shrink their axes by one common factor.
AXIS_ARMS = {
    "depth": ("layers",),
    "mlp": ("ffn",),
    "attention": ("heads",),
    "embedding": ("hidden",),
    "mlp+attention": ("ffn", "heads"),
    "width (all)": ("ffn", "heads", "hidden"),
    "depth+width": ("layers", "ffn", "heads", "hidden"),
}


@dataclass(kw_only=True)
class ExperimentConfig(ScoreOptions):
    name: str = option("axis-ablation", "which finding to test", positional=True,
                       choices=("axis-ablation", "kd-vs-ce", "sparse-methods"))
    model: str = option("default", "Hub id, local folder, .gguf file or 'default'")
    out: str = option("experiments", "folder for the arms and results.json / results.md")
    data: str = option("builtin", "calibration / training / validation text (SRC)")
    keep: float = option(0.8, "fraction of parameters kept")
    tokens: int = option(16384, "training tokens per arm")
    seq_len: int = option(128, "tokens per block")
    batch: int = option(4, "sequences per batch")
    lr: float = option(2e-4, "learning rate")
    samples: int = option(32, "calibration blocks for importance")
    eval_tokens: int = option(4096, "validation tokens")
    seed: int = option(0, "seed")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: automatic)")
    # The app's session, so each arm shows among that visitor's runs; not part of the recipe.
    session: str | None = None
    NOT_REPRODUCED = ("session",)

    def check(self) -> None:
        if not 0.05 <= self.keep < 1.0:
            raise UserError("--keep must be between 0.05 and 1 (the fraction of parameters kept)")
        if self.tokens <= 0:
            raise UserError("--tokens must be positive")


def _nearest(values: list[int], x: float) -> int:
    return min(values, key=lambda v: (abs(v - x), -v))


def solve_targets(shape: Shape, axes: tuple[str, ...], target_params: int, tolerance: float = 0.05) -> dict:
    """Targets on the given axes, shrunk by one common factor, whose count is nearest the budget."""
    valid = valid_values(shape)

    def targets(f: float) -> dict:
        out = {a: _nearest(valid[a], getattr(shape, a) * f) for a in axes if a != "hidden"}
        if "hidden" in axes:  # hidden after heads: it may have to be a multiple of them
            heads = out.get("heads", shape.heads)
            ok = [h for h in valid["hidden"]
                  if shape_error(shape.with_targets(hidden=h, heads=heads)) is None]
            out["hidden"] = _nearest(ok, shape.hidden * f)
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):  # params grow with the factor: bisect, then pick the closest rounding
        mid = (lo + hi) / 2
        if shape.with_targets(**targets(mid)).params < target_params:
            lo = mid
        else:
            hi = mid
    best = min((targets(f) for f in (lo, hi)),
               key=lambda t: abs(shape.with_targets(**t).params - target_params))
    reached = shape.with_targets(**best).params
    unchanged = best == {a: getattr(shape, a) for a in axes}
    if unchanged or abs(reached - target_params) > tolerance * target_params:
        raise UserError(f"cannot reach {target_params:,} parameters along {'+'.join(axes)} "
                        f"(nearest: {reached:,})")
    return best


def _blocks(loaded, cfg: ExperimentConfig, split: str, tokens: int, on_event=None) -> torch.Tensor:
    from compact.train import data_progress

    progress = data_progress(on_event) if on_event is not None else None
    return data.blocks(cfg.data, loaded.tokenizer, split, data.n_blocks_for(tokens, cfg.seq_len),
                       cfg.seq_len, seed=cfg.seed, model=loaded.model, progress=progress)


def _distill(cfg: ExperimentConfig, teacher, student_model, out: Path, kd: float = 1.0, ce: float = 0.0,
             on_event=None, should_stop=None) -> dict:
    from compact import distill

    student = models.Loaded(student_model, teacher.tokenizer, teacher.arch, str(out),
                            source_dtype=teacher.source_dtype)
    dcfg = distill.DistillConfig(teacher=cfg.model, student=str(out), data=cfg.data, out=str(out),
                                 tokens=cfg.tokens, seq_len=cfg.seq_len, batch=cfg.batch, lr=cfg.lr,
                                 kd_weight=kd, ce_weight=ce, eval_tokens=cfg.eval_tokens, seed=cfg.seed,
                                 device=cfg.device)
    return distill.run(dcfg, on_event=on_event, should_stop=should_stop, teacher=teacher, student=student)


def _canonical(cfg: ExperimentConfig, ref: str | None, loaded=None) -> dict:
    """An arm's canonical perplexity for its row, with cfg.score: a saved arm scored (and cached)
    as saved, an unsaved one as it is in memory."""
    if not cfg.score:
        return {}
    return {"canonical_ppl": scoreboard.score(ref, loaded, load=LoadOptions(device=cfg.device))["ppl"]}


def _lineage(cfg: ExperimentConfig) -> dict:
    """What each arm's record carries: the experiment's config (re-running it remakes the arm)."""
    return {"config": cfg, "command": "experiment"}


def _stop_point(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("experiment stopped between arms")


def _arm(on_event, k: int, n: int, name: str) -> None:
    """Announce arm k of n, so that the progress bar and its message span the whole experiment."""
    if on_event is not None:
        on_event({"kind": "arm", "arm": k, "arms": n, "name": name})


def _write(out: Path, name: str, rows: list[dict], columns: list[str], extra: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if any("canonical_ppl" in r for r in rows):
        columns = [*columns, "canonical_ppl"]
        extra = {**extra, "canonical": scoreboard.canonical().label}
    result = {"experiment": name, **extra, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    (out / "results.md").write_text(f"# {name}\n\n" + "\n".join(lines) + "\n")
    return result


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def axis_ablation(cfg: ExperimentConfig, on_event=None, should_stop=None, arms=None) -> dict:
    from compact import importance, prune

    teacher = models.load(cfg.model, device=cfg.device)
    teacher.require_minitron()  # these arms prune
    base = teacher.shape
    budget = int(base.params * cfg.keep)
    calib = _blocks(teacher, cfg, "calibration", cfg.samples * cfg.seq_len, on_event)
    val = _blocks(teacher, cfg, "validation", cfg.eval_tokens)
    scores = importance.estimate(teacher.model, calib, batch_size=cfg.batch)
    out = Path(cfg.out)
    rows = [{"arm": "original", **_shape_cols(base), "loss_before": evaluate.loss_on(teacher.model, val),
             "loss_after": None, **_canonical(cfg, cfg.model, teacher)}]
    arms = arms or AXIS_ARMS
    n_arms = len(arms) + 1  # and the random-init arm
    for k, (arm, axes) in enumerate(arms.items(), 1):
        _stop_point(should_stop)
        _arm(on_event, k, n_arms, arm)
        try:
            targets = solve_targets(base, axes, budget)
        except UserError as e:  # e.g. attention alone is too small a share to cut that much
            rows.append({"arm": arm, "note": str(e)})
            continue
        arm_dir = out / arm.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
        with runs.track("experiment:axis", cfg.model, {"arm": arm, **targets, **asdict(cfg)},
                        artifact=str(arm_dir), session=cfg.session, **_lineage(cfg)) as run:
            student = prune.trim(copy.deepcopy(teacher.model), scores, **targets)
            shape = teacher.arch.shape(student.config)
            before = evaluate.loss_on(student, val)
            trained = _distill(cfg, teacher, student, arm_dir, on_event=on_event, should_stop=should_stop)
            after = evaluate.loss_on(student, val)
            row = {"arm": arm, **_shape_cols(shape), "loss_before": before, "loss_after": after,
                   "tokens": trained.get("tokens"), **_canonical(cfg, str(arm_dir))}
            run.metrics, run.shape, run.params = row, shape.to_dict(), shape.params
        rows.append(row)
    # The same shape as the all-width arm, from random initialization, same budget.
    _stop_point(should_stop)
    _arm(on_event, n_arms, n_arms, "random init")
    targets = solve_targets(base, AXIS_ARMS["width (all)"], budget)
    torch.manual_seed(cfg.seed)
    random_model = prune.trim(copy.deepcopy(teacher.model), scores, **targets)
    random_model.apply(random_model._init_weights)
    shape = teacher.arch.shape(random_model.config)
    arm_dir = out / "random_init"
    with runs.track("experiment:axis", cfg.model, {"arm": "random init", **targets},
                    artifact=str(arm_dir), session=cfg.session, **_lineage(cfg)) as run:
        before = evaluate.loss_on(random_model, val)
        trained = _distill(cfg, teacher, random_model, arm_dir, on_event=on_event, should_stop=should_stop)
        row = {"arm": "random init (width shape)", **_shape_cols(shape), "loss_before": before,
               "loss_after": evaluate.loss_on(random_model, val), "tokens": trained.get("tokens"),
               **_canonical(cfg, str(arm_dir))}
        run.metrics, run.shape, run.params = row, shape.to_dict(), shape.params
    rows.append(row)
    columns = ["arm", "layers", "hidden", "ffn", "heads", "params", "loss_before", "loss_after", "tokens",
               "note"]
    return _write(out, "Axis ablation (Minitron Table 1)", rows, columns,
                  {"model": cfg.model, "keep": cfg.keep, "tokens_per_arm": cfg.tokens,
                   "device": str(teacher.device)})


def _shape_cols(s: Shape) -> dict:
    return {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads, "params": s.params}


def kd_vs_ce(cfg: ExperimentConfig, on_event=None, should_stop=None) -> dict:
    from compact import importance, prune

    teacher = models.load(cfg.model, device=cfg.device)
    teacher.require_minitron()  # these arms prune
    base = teacher.shape
    targets = solve_targets(base, AXIS_ARMS["width (all)"], int(base.params * cfg.keep))
    calib = _blocks(teacher, cfg, "calibration", cfg.samples * cfg.seq_len, on_event)
    val = _blocks(teacher, cfg, "validation", cfg.eval_tokens)
    scores = importance.estimate(teacher.model, calib, batch_size=cfg.batch)
    pruned = prune.trim(copy.deepcopy(teacher.model), scores, **targets)
    before = evaluate.loss_on(pruned, val)
    rows = []
    recipes = (("logit distillation (KL)", 1.0, 0.0), ("cross-entropy only", 0.0, 1.0))
    for k, (arm, kd, ce) in enumerate(recipes, 1):
        _stop_point(should_stop)
        _arm(on_event, k, len(recipes), arm)
        arm_dir = Path(cfg.out) / ("kd" if kd else "ce")
        student = copy.deepcopy(pruned)
        with runs.track("experiment:kd-vs-ce", cfg.model, {"arm": arm, **targets},
                        artifact=str(arm_dir), session=cfg.session, **_lineage(cfg)) as run:
            trained = _distill(cfg, teacher, student, arm_dir, kd=kd, ce=ce, on_event=on_event,
                               should_stop=should_stop)
            shape = teacher.arch.shape(student.config)
            row = {"arm": arm, **_shape_cols(shape), "loss_before": before,
                   "loss_after": evaluate.loss_on(student, val), "tokens": trained.get("tokens"),
                   **_canonical(cfg, str(arm_dir))}
            run.metrics, run.shape, run.params = row, shape.to_dict(), shape.params
        rows.append(row)
    columns = ["arm", "params", "loss_before", "loss_after", "tokens"]
    return _write(Path(cfg.out), "Distillation vs plain retraining", rows, columns,
                  {"model": cfg.model, "targets": targets, "tokens_per_arm": cfg.tokens})


def sparse_methods(cfg: ExperimentConfig, on_event=None, should_stop=None, slorb_k: int = 16) -> dict:
    from compact import sparse_training, sparsity

    dense = models.load(cfg.model, device=cfg.device)
    calib = _blocks(dense, cfg, "calibration", cfg.samples * cfg.seq_len, on_event)
    val = _blocks(dense, cfg, "validation", cfg.eval_tokens)
    rows = [{"method": "dense", "loss": evaluate.loss_on(dense.model, val), "pattern_ok": None,
             **_canonical(cfg, cfg.model, dense)}]
    n_arms = len(sparsity.ONE_SHOT) + 2  # and AST with and without SLoRB
    for k, method in enumerate(sparsity.ONE_SHOT, 1):
        _stop_point(should_stop)
        _arm(on_event, k, n_arms, method)
        with runs.track("experiment:sparse", cfg.model, {"method": method}, session=cfg.session,
                        **_lineage(cfg)) as run:
            model = copy.deepcopy(dense.model)
            sparsity.one_shot(model, method, 2, 4, blocks=calib)
            row = {"method": method, "loss": evaluate.loss_on(model, val),
                   "pattern_ok": sparsity.check_pattern(model, 2, 4)["ok"], "tokens": 0,
                   **_canonical(cfg, None, dataclasses.replace(dense, model=model))}
            run.metrics = row
            run.counts(sparsity.param_counts(model))
        rows.append(row)
        del model
    for i, (label, k) in enumerate((("AST", 0), (f"AST + SLoRB (k={slorb_k})", slorb_k)), n_arms - 1):
        _stop_point(should_stop)
        _arm(on_event, i, n_arms, label)
        arm_dir = Path(cfg.out) / ("ast" if not k else "ast_slorb")
        with runs.track("experiment:sparse", cfg.model, {"method": label}, artifact=str(arm_dir),
                        session=cfg.session, **_lineage(cfg)) as run:
            acfg = sparse_training.AstConfig(
                model=cfg.model, data=cfg.data, out=str(arm_dir), tokens=cfg.tokens, seq_len=cfg.seq_len,
                batch=cfg.batch, lr=cfg.lr, eval_tokens=cfg.eval_tokens, seed=cfg.seed, slorb_k=k,
                device=cfg.device)
            result = sparse_training.run_ast(acfg, on_event=on_event, should_stop=should_stop,
                                             teacher=dense)
            trained = models.load(str(arm_dir), device=cfg.device)
            row = {"method": label, "loss": evaluate.loss_on(trained.model, val),
                   "pattern_ok": sparsity.check_pattern(trained.model, 2, 4)["ok"],
                   "tokens": result.get("tokens"), **_canonical(cfg, str(arm_dir))}
            run.metrics = row
            run.counts(sparsity.param_counts(trained.model))
        rows.append(row)
    return _write(Path(cfg.out), "2:4 methods", rows, ["method", "loss", "pattern_ok", "tokens"],
                  {"model": cfg.model, "tokens_per_trained_arm": cfg.tokens})


EXPERIMENTS = {"axis-ablation": axis_ablation, "kd-vs-ce": kd_vs_ce, "sparse-methods": sparse_methods}


def run(cfg: ExperimentConfig, progress=None, should_stop=None, on_event=None) -> dict:
    """The experiment job: run cfg.name's arms and write results.json / results.md."""
    cfg.check()
    if cfg.name not in EXPERIMENTS:
        raise UserError(f"unknown experiment '{cfg.name}': use {', '.join(EXPERIMENTS)}")
    from compact.train import relay

    return EXPERIMENTS[cfg.name](cfg, on_event=relay(on_event, progress), should_stop=should_stop)
