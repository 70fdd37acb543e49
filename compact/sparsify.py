"""The sparsify job: N:M sparsity one-shot (a method of compact.sparsity.ONE_SHOT) or by AST.

Validation perplexity of the dense model, then the sparse model made and saved, then its
perplexity on the same blocks. The CLI's `sparsify` command and the app's Sparsify tab both
build a SparsifyConfig and call `run`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from compact import data, evaluate, models, scoreboard, sparsity
from compact.errors import Cancelled, UserError
from compact.options import option
from compact.scoreboard import ScoreOptions
from compact.sparse_training import AstConfig, run_ast

METHODS = (*sparsity.ONE_SHOT, "ast")


@dataclass(kw_only=True)
class SparsifyConfig(ScoreOptions, AstConfig):
    """AST's options (compact.sparse_training.AstConfig) plus the method and calibration size."""

    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    out: str = option(help="folder for the sparse checkpoint")
    method: str = option(help="one-shot method or ast (training)", choices=METHODS)
    samples: int = option(128, "calibration blocks (methods that need calibration)")

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}': use {', '.join(METHODS)}")
        if self.method == "ast":
            super().check()
        else:
            sparsity.parse_pattern(self.pattern)
        if self.samples <= 0 or self.eval_tokens < 0:
            raise UserError("--samples must be positive and --eval-tokens not negative")


def run(cfg: SparsifyConfig, progress=None, should_stop=None, on_event=None,
        dense: models.Loaded | None = None, student: models.Loaded | None = None) -> dict:
    """Sparsify cfg.model and save it to cfg.out; returns perplexities before and after.

    dense: the loaded dense model, left unchanged; student: a copy of it to work on (one-shot
    prunes it, AST trains it). Without them the model is loaded from cfg.model and one-shot
    prunes that one copy in place. Raises Cancelled.
    """
    cfg.check()
    n, m = sparsity.parse_pattern(cfg.pattern)
    progress = progress or (lambda f, msg: None)
    if dense is None:
        dense = cfg.load(cfg.model)
        student = student or (dense if cfg.method != "ast" else None)
    sparsity.check_widths(dense.model, m)
    seq = min(cfg.seq_len, evaluate.context_length(dense.model))
    val, before = None, {}
    if cfg.eval_tokens:
        val = data.blocks(cfg.data, dense.tokenizer, "validation", data.n_blocks_for(cfg.eval_tokens, seq),
                          seq, model=dense.model)
        progress(0.02, f"validation perplexity of {cfg.model} on {val.numel()} tokens")
        before = evaluate.perplexity(dense.model, val, cfg.batch)
    if cfg.score:  # before the work: a one-shot method may prune the dense model in place
        progress(0.03, "canonical perplexity of the dense model")
        canonical_before = scoreboard.score(cfg.model, dense, load=cfg)
    result = {"model": cfg.model, "method": cfg.method, "pattern": f"{n}:{m}", "out": cfg.out}
    if cfg.method == "ast":
        # eval_tokens=0: the saved model is scored below, on the same blocks as one-shot
        ast_cfg = dataclasses.replace(cfg, eval_tokens=0, seq_len=seq)
        same = not cfg.teacher or cfg.teacher == cfg.model  # the dense model teaches: reuse it
        try:
            trained = run_ast(ast_cfg, on_event=on_event, should_stop=should_stop,
                              teacher=dense if same else None, student=student)
        except Cancelled as stop:
            raise Cancelled(str(stop), {**result, "status": "cancelled", "training": stop.result}) from None
        result["training"] = trained
        sparse = cfg.load(cfg.out).model
    else:
        spec = sparsity.ONE_SHOT[cfg.method]
        calib = None
        if spec.statistic is not None:
            calib = data.blocks(cfg.data, dense.tokenizer, "calibration", cfg.samples, seq, model=dense.model,
                                progress=progress)
        work = student or dataclasses.replace(dense, model=copy.deepcopy(dense.model))
        report = sparsity.one_shot(work.model, cfg.method, n, m, calib, batch_size=cfg.batch,
                                   progress=lambda f, msg: progress(0.05 + 0.8 * f, msg),
                                   should_stop=should_stop)
        models.save(work.model, dense.tokenizer, cfg.out, {
            "source": cfg.model, "sparsify": {"method": cfg.method, "pattern": f"{n}:{m}",
                                              "data": cfg.data, "samples": cfg.samples}},
            dtype=dense.source_dtype)
        models.round_to(work.model, dense.source_dtype)  # scored as saved
        sparse = work.model
        result["layers_pruned"] = len(report["layers"])
    result.update(status="done", **sparsity.sparsity_summary(sparse, n, m), **sparsity.param_counts(sparse))
    if val is not None:
        progress(0.9, "validation perplexity of the sparse model")
        after = evaluate.perplexity(sparse, val, cfg.batch)
        result.update(ppl_before=before["ppl"], ppl_after=after["ppl"], loss_before=before["loss"],
                      loss_after=after["loss"], eval_tokens=before["tokens"])
    if cfg.score:
        progress(0.95, "canonical perplexity of the sparse model")
        result["canonical"] = scoreboard.pair(canonical_before, scoreboard.score(cfg.out, load=cfg))
    return result
