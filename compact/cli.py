"""python -m compact <command>: each prints one JSON object as its last line of stdout.

A user error exits with status 2 and one line on stderr, never a traceback. Progress goes to
stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from compact.errors import UserError

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register a command: the decorated function adds arguments and returns the runner."""

    def register(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return register


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every user error
        raise UserError(f"{self.prog}: {message}")


def _model_args(p, name="--model", required=True):
    p.add_argument(name, required=required, help="Hub id, local folder, .gguf file or 'default'")


def _device_args(p):
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: automatic)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")


def _load(args, ref=None):
    from compact import models

    return models.load(ref or args.model, device=args.device, dtype=args.dtype,
                       trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@command("info", "shape and size of a model")
def _info(p):
    _model_args(p)
    _device_args(p)
    return lambda a: _load(a).info()


@command("eval", "validation loss and perplexity")
def _eval(p):
    _model_args(p)
    _device_args(p)
    p.add_argument("--data", default="builtin")
    p.add_argument("--tokens", type=int, default=8192, help="validation tokens to score")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)

    def run(a):
        from compact import data, evaluate

        loaded = _load(a)
        blocks = data.blocks(a.data, loaded.tokenizer, "validation",
                             data.n_blocks_for(a.tokens, a.seq_len), a.seq_len, model=loaded.model)
        result = evaluate.perplexity(loaded.model, blocks, a.batch)
        return {"model": a.model, "data": a.data, "seq_len": a.seq_len, **result}

    return run


@command("generate", "continue a prompt")
def _generate(p):
    _model_args(p)
    _device_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")

    def run(a):
        from compact import evaluate

        loaded = _load(a)
        return {"model": a.model, **evaluate.generate(
            loaded.model, loaded.tokenizer, a.prompt, a.max_new_tokens, a.temperature, a.top_p,
            a.seed, a.chat)}

    return run


@command("experiment", "reproduce a paper finding: axis-ablation, kd-vs-ce, sparse-methods")
def _experiment(p):
    from compact.experiments import EXPERIMENTS, ExperimentConfig

    p.add_argument("name", choices=sorted(EXPERIMENTS))
    _model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="builtin")
    p.add_argument("--keep", type=float, default=ExperimentConfig.keep, help="fraction of parameters kept")
    p.add_argument("--tokens", type=int, default=ExperimentConfig.tokens, help="training tokens per arm")
    p.add_argument("--seq-len", type=int, default=ExperimentConfig.seq_len)
    p.add_argument("--batch", type=int, default=ExperimentConfig.batch)
    p.add_argument("--lr", type=float, default=ExperimentConfig.lr)
    p.add_argument("--samples", type=int, default=ExperimentConfig.samples)
    p.add_argument("--eval-tokens", type=int, default=ExperimentConfig.eval_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)

    def run(a):
        if not 0.05 <= a.keep < 1.0:
            raise UserError("--keep must be between 0.05 and 1 (the fraction of parameters kept)")
        if a.tokens <= 0:
            raise UserError("--tokens must be positive")
        cfg = ExperimentConfig(model=a.model, out=a.out, data=a.data, keep=a.keep, tokens=a.tokens,
                               seq_len=a.seq_len, batch=a.batch, lr=a.lr, samples=a.samples,
                               eval_tokens=a.eval_tokens, seed=a.seed, device=a.device)
        def events(e: dict) -> None:
            if e.get("kind") == "step" and e["step"] % 10 == 0:
                progress(f"arm step {e['step'] + 1}/{e.get('steps')} loss {e.get('loss') or 0:.4f}")

        return EXPERIMENTS[a.name](cfg, on_event=events)

    return run


# Commands that do real work are recorded in the runs store (compact.runs).
JOB_COMMANDS = {"eval", "importance", "prune", "search", "distill", "sparsify"}


def _run_tracked(args) -> dict:
    from compact import runs

    inputs = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    base = getattr(args, "model", None) or getattr(args, "teacher", None)
    with runs.track(args.command, base, inputs, artifact=getattr(args, "out", None)) as run:
        result = args._runners[args.command](args)
        if isinstance(result, dict):
            run.metrics = result
            shape = result.get("shape")
            run.shape = shape if isinstance(shape, dict) else None
            run.params = result.get("params") if isinstance(result.get("params"), int) else None
            run.cancelled = result.get("status") == "cancelled"
    return result


@command("sparsify", "N:M (2:4) sparsity: one-shot magnitude, Wanda, SparseGPT, or AST training")
def _sparsify(p):
    _model_args(p)
    _device_args(p)
    p.add_argument("--out", required=True, help="folder for the sparse checkpoint")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "ast"])
    p.add_argument("--pattern", default="2:4", help="N:M, N kept in every M input columns")
    p.add_argument("--data", default="builtin", help="calibration / training / validation text")
    p.add_argument("--samples", type=int, default=128, help="calibration blocks (wanda, sparsegpt)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens for perplexity")
    p.add_argument("--tokens", type=int, default=65536, help="AST training tokens")
    p.add_argument("--teacher", default=None, help="AST teacher (default: the dense --model)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--slorb-k", type=int, default=0, help="AST: SLoRB block size (0 = off)")
    p.add_argument("--mask-interval", type=int, default=10, help="AST: steps between mask updates")
    p.add_argument("--mask-margin", type=float, default=0.0,
                   help="AST: a pruned weight must exceed a kept one by this fraction to take its place "
                        "(0 = plain magnitude, the paper)")
    p.add_argument("--decay-alpha", type=float, default=None, help="AST: decay slope per step")
    p.add_argument("--decay-t0", type=int, default=None, help="AST: step where the decay stops growing")
    p.add_argument("--resume", action="store_true", help="AST: continue from the last checkpoint")

    def run(a):
        from compact import data, evaluate, models, sparsity

        n, m = sparsity.parse_pattern(a.pattern)
        loaded = _load(a)
        sparsity.check_widths(loaded.model, m)
        val = data.blocks(a.data, loaded.tokenizer, "validation",
                          data.n_blocks_for(a.eval_tokens, a.seq_len), a.seq_len, model=loaded.model)
        progress(f"validation perplexity of {a.model} on {val.numel()} tokens")
        before = evaluate.perplexity(loaded.model, val, a.batch)
        result = {"model": a.model, "method": a.method, "pattern": f"{n}:{m}", "out": a.out}
        if a.method == "ast":
            from compact import sparse_training

            # eval_tokens=0: the saved model is scored below, as for one-shot
            cfg = sparse_training.AstConfig(
                model=a.model, out=a.out, teacher=a.teacher, data=a.data, n=n, m=m, tokens=a.tokens,
                seq_len=a.seq_len, batch=a.batch, lr=a.lr, mask_interval=a.mask_interval,
                mask_margin=a.mask_margin, decay_alpha=a.decay_alpha, decay_t0=a.decay_t0,
                slorb_k=a.slorb_k, resume=a.resume, device=a.device, dtype=a.dtype, eval_tokens=0)
            same = not a.teacher or a.teacher == a.model  # the dense model teaches: reuse it
            trained = sparse_training.run_ast(
                cfg, on_event=lambda e: progress(json.dumps(e, default=str)), teacher=loaded if same else None)
            result["training"] = trained
            if trained.get("status") == "cancelled":
                return {**result, "status": "cancelled"}
            sparse = _load(a, a.out).model
        else:
            calib = None
            if a.method != "magnitude":
                calib = data.blocks(a.data, loaded.tokenizer, "calibration", a.samples, a.seq_len,
                                    model=loaded.model)
            stats = sparsity.one_shot(loaded.model, a.method, n, m, calib,
                                      progress=lambda f, desc="": progress(f"{desc} ({f:.0%})"))
            sparse = loaded.model
            models.save(sparse, loaded.tokenizer, a.out, {
                "source": a.model, "sparsify": {"method": a.method, "pattern": f"{n}:{m}",
                                                "data": a.data, "samples": a.samples}})
            result["layers_pruned"] = len(stats["layers"])
        after = evaluate.perplexity(sparse, val, a.batch)
        return {**result, "status": "done", **sparsity.sparsity_summary(sparse, n, m),
                "ppl_before": before["ppl"], "ppl_after": after["ppl"], "loss_before": before["loss"],
                "loss_after": after["loss"], "eval_tokens": before["tokens"]}

    return run


def _calibration_args(p, samples: int):
    p.add_argument("--data", default="builtin", help="calibration text (SRC)")
    p.add_argument("--samples", type=int, default=samples, help="calibration blocks")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-agg", default="l2", choices=["mean", "l2", "var"])
    p.add_argument("--seq-agg", default="mean", choices=["mean", "l2", "var"])


def _calibration_blocks(a, loaded):
    from compact import data

    if a.samples <= 0:
        raise UserError("--samples must be positive")
    return data.blocks(a.data, loaded.tokenizer, "calibration", a.samples, a.seq_len,
                       model=loaded.model)


def _estimate(a, loaded, depth_ppl: bool):
    from compact import importance

    blocks = _calibration_blocks(a, loaded)
    progress(f"importance on {len(blocks)} blocks of {a.seq_len} tokens from {a.data}")
    scores = importance.estimate(loaded.model, blocks, a.batch_agg, a.seq_agg, a.batch, depth_ppl,
                                 progress=lambda f, msg: progress(f"{msg} ({f:.0%})"))
    scores.meta.update(model=a.model, data=a.data)
    return scores


@command("importance", "Minitron importance of heads, neurons, channels and layers")
def _importance(p):
    _model_args(p)
    _device_args(p)
    _calibration_args(p, samples=128)
    p.add_argument("--depth-ppl", action="store_true",
                   help="also the loss increase when each layer is skipped (one pass per layer)")
    p.add_argument("--out", required=True, help="scores file (.safetensors)")

    def run(a):
        loaded = _load(a)
        scores = _estimate(a, loaded, a.depth_ppl)
        path = scores.save(a.out)
        order = scores.layers_bi.argsort().tolist()
        return {"model": a.model, "out": str(path), **{k: scores.meta[k] for k in (
                    "family", "samples", "seq_len", "batch_agg", "seq_agg", "depth_ppl")},
                "least_important_layers_bi": order[:5]}

    return run


def _target_args(p):
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--depth-metric", default="bi", choices=["bi", "ppl"])
    p.add_argument("--importance", default=None, help="scores file from 'importance' (else --data)")


def _scores_for(a, loaded, needed: bool):
    from compact import importance

    if a.importance:
        return importance.Scores.load(a.importance)
    return _estimate(a, loaded, a.depth_metric == "ppl") if needed else None


@command("prune", "Minitron width/depth pruning to a standard checkpoint")
def _prune(p):
    _model_args(p)
    _device_args(p)
    _target_args(p)
    _calibration_args(p, samples=64)
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    p.add_argument("--drop-layers", default=None, help="explicit layers to drop, e.g. 3,5")
    p.add_argument("--head-residual", action="store_true",
                   help="fold pruned heads into kept ones (paper's head residual; off by default)")

    def run(a):
        from compact import prune

        loaded = _load(a)
        targets = dict(layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads,
                       drop_layers=prune.parse_layer_list(a.drop_layers))
        # Validate the targets before any slow pass: scores are only needed past this point.
        target, drop = prune.resolve_targets(loaded.shape, a.layers, a.hidden, a.ffn, a.heads,
                                             targets["drop_layers"], loaded.arch.hidden_tied_to_heads)
        src = loaded.shape
        needed = (a.head_residual or (target.layers < src.layers and drop is None)
                  or (target.hidden, target.ffn, target.heads) != (src.hidden, src.ffn, src.heads))
        scores = _scores_for(a, loaded, needed)
        summary = prune.prune_and_save(loaded, scores, a.out, head_residual=a.head_residual,
                                       depth_metric=a.depth_metric, **targets)
        return {"model": a.model, **summary}

    return run


@command("search", "rank pruned shapes within a parameter budget by calibration loss")
def _search(p):
    _model_args(p)
    _device_args(p)
    p.add_argument("--params", required=True, help="budget: 90M, 1.5B, 90000000 or 0.7 (fraction)")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--top", type=int, default=8, help="candidates to prune and score (spread evenly)")
    p.add_argument("--layers", default=None, help="layer counts to try, e.g. 24,26,28")
    p.add_argument("--hidden", default=None, help="hidden sizes to try")
    p.add_argument("--ffn", default=None, help="FFN sizes to try")
    p.add_argument("--heads", default=None, help="head counts to try")
    p.add_argument("--hidden-step", type=int, default=64)
    p.add_argument("--ffn-step", type=int, default=64)
    p.add_argument("--min-fraction", type=float, default=0.5, help="smallest size per axis")
    p.add_argument("--depth-metric", default="bi", choices=["bi", "ppl"])
    p.add_argument("--importance", default=None, help="scores file from 'importance' (else --data)")
    p.add_argument("--adapt-tokens", type=int, default=0,
                   help="distill each candidate this many tokens before ranking (the paper's short retraining)")
    _calibration_args(p, samples=32)

    def run(a):
        from compact import prune, search

        loaded = _load(a)
        grid = {k: prune.parse_layer_list(getattr(a, k)) for k in ("layers", "hidden", "ffn", "heads")}
        budget = search.parse_params(a.params, loaded.shape.params)
        found = search.candidates(loaded.shape, budget, a.tolerance, **grid,
                                  hidden_step=a.hidden_step, ffn_step=a.ffn_step,
                                  min_fraction=a.min_fraction,
                                  hidden_tied_to_heads=loaded.arch.hidden_tied_to_heads)
        if not found:
            raise UserError(f"no shape on this grid lies within {a.tolerance:.0%} of {budget} "
                            "parameters; widen --tolerance or the grid")
        chosen = search.spread(found, a.top)
        progress(f"{len(found)} shapes within {a.tolerance:.0%} of {budget:,} parameters; "
                 f"scoring {len(chosen)}")
        scores = _scores_for(a, loaded, True)
        blocks = _calibration_blocks(a, loaded)
        adapt = None
        if a.adapt_tokens:
            if a.adapt_tokens < 0:
                raise UserError("--adapt-tokens must be positive")
            adapt = search.distill_adapter(loaded, a.data or "builtin", a.adapt_tokens, a.seq_len, a.batch)
        rows = search.rank(loaded.model, scores, chosen, blocks, a.batch, a.depth_metric, adapt=adapt,
                           progress=lambda f, msg: progress(f"{msg} ({f:.0%})"))
        progress(f"{'layers':>6} {'hidden':>6} {'ffn':>6} {'heads':>5} {'params':>12} {'loss':>8} {'ppl':>9}")
        for r in rows:
            progress(f"{r['layers']:>6} {r['hidden']:>6} {r['ffn']:>6} {r['heads']:>5} "
                     f"{r['params']:>12,} {r['loss']:>8.4f} {r['ppl']:>9.2f}")
        return {"model": a.model, "budget": budget, "tolerance": a.tolerance, "adapt_tokens": a.adapt_tokens,
                "candidates_in_budget": len(found), "ranked": rows}

    return run


def _is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch` / torchrun: they neither print nor record."""
    return os.environ.get("RANK", "0") == "0"


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _distill_progress(event: dict) -> None:
    kind = event.get("kind")
    if kind == "step":
        parts = [f"step {event['step']}/{event['steps']}", f"tokens {event['tokens']:,}",
                 f"loss {event['loss']:.4f}"]
        parts += [f"{k} {event[k]:.4f}" for k in ("kd", "ce", "hidden") if event.get(k)]
        parts += [f"lr {event['lr']:.2e}", f"{event['tokens_per_s']:,.0f} tok/s",
                  f"eta {_duration(event.get('eta_s'))}"]
        progress("  ".join(parts))
    elif kind == "teacher_correction":
        progress(f"teacher correction {event['step']}/{event['steps']}  ce {event['ce']:.4f}")
    elif kind == "start":
        before = event.get("val_ppl_before")
        progress(f"{event['steps']} steps, {event['total_tokens']:,} tokens"
                 + (f"; validation ppl before {before:.2f}" if before else "")
                 + (f"; resuming at step {event['start_step']}" if event.get("start_step") else ""))


@command("distill", "knowledge distillation of a student toward a teacher (accelerate)")
def _distill(p):
    from compact.distill import DistillConfig as D

    p.add_argument("--teacher", required=True, help="teacher REF")
    p.add_argument("--student", required=True, help="student REF (e.g. a pruned checkpoint)")
    p.add_argument("--data", default=D.data, help="training/validation text (SRC)")
    p.add_argument("--out", required=True, help="folder for the trained student and checkpoints")
    p.add_argument("--tokens", type=int, default=D.tokens, help="training tokens")
    p.add_argument("--seq-len", type=int, default=D.seq_len)
    p.add_argument("--batch", type=int, default=D.batch, help="sequences per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=D.grad_accum)
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=D.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=D.weight_decay)
    p.add_argument("--clip", type=float, default=D.clip, help="max gradient norm (0: off)")
    p.add_argument("--temperature", type=float, default=D.temperature)
    p.add_argument("--kd-weight", type=float, default=D.kd_weight, help="KL(teacher||student) weight")
    p.add_argument("--ce-weight", type=float, default=D.ce_weight, help="cross-entropy weight")
    p.add_argument("--hidden-weight", type=float, default=D.hidden_weight,
                   help="intermediate-state loss weight (times the dynamic alpha)")
    p.add_argument("--teacher-correction-steps", type=int, default=D.teacher_correction_steps)
    p.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every)
    p.add_argument("--eval-tokens", type=int, default=D.eval_tokens)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _device_args(p)

    def run(a):
        import signal

        from compact import distill

        cfg = distill.DistillConfig(
            teacher=a.teacher, student=a.student, data=a.data, out=a.out, tokens=a.tokens,
            seq_len=a.seq_len, batch=a.batch, grad_accum=a.grad_accum, lr=a.lr,
            min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
            clip=a.clip, temperature=a.temperature, kd_weight=a.kd_weight, ce_weight=a.ce_weight,
            hidden_weight=a.hidden_weight, teacher_correction_steps=a.teacher_correction_steps,
            checkpoint_every=a.checkpoint_every, eval_tokens=a.eval_tokens, seed=a.seed,
            resume=a.resume, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
            allow_pickle=a.allow_pickle)
        # First Ctrl-C (or SIGTERM): checkpoint and stop after the current step; second: abort.
        stop = []

        def on_signal(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)
            progress("stopping after this step (a checkpoint is saved; --resume continues)")

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return distill.run(cfg, on_event=_distill_progress, should_stop=lambda: bool(stop))
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    return run


@command("runs", "list recorded jobs")
def _runs(p):
    p.add_argument("--json", action="store_true", help="only the JSON line, no table")
    p.add_argument("--kind", default=None)
    p.add_argument("--base", default=None, help="only runs of this base model")
    p.add_argument("--status", default=None)
    p.add_argument("--limit", type=int, default=50)

    def run(a):
        from compact import runs

        rows = runs.RunStore().list(a.kind, a.base, a.status, limit=a.limit)
        if not a.json:
            for r in rows:
                started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
                print(f"{r['id']:>5}  {started}  {r['kind']:<10} {r['status']:<10} "
                      f"{r['base_model'] or '-':<30} {r['artifact'] or ''}")
        return {"runs": rows}

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compact", description="Prune, sparsify and distill causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    runners = {}
    for name, (help_text, setup) in COMMANDS.items():
        runners[name] = setup(sub.add_parser(name, help=help_text))
    parser.set_defaults(_runners=runners)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Keep stderr to our own lines: no download/conversion bars or library warnings.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        if args.command in JOB_COMMANDS and _is_main_process():
            result = _run_tracked(args)
        else:
            result = args._runners[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if _is_main_process():
        print(json.dumps(result, default=str))
    return 0
