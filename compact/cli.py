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
        if args.command in JOB_COMMANDS:
            result = _run_tracked(args)
        else:
            result = args._runners[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, default=str))
    return 0
