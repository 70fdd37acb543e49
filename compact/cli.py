"""python -m compact <command>: each prints one JSON object as its last line of stdout.

The commands and their flags come from compact.jobs (one config class per job, each option a
field). A user error exits with status 2 and one line on stderr, never a traceback. Progress
goes to stderr so stdout stays machine-readable. The first Ctrl-C (or SIGTERM) asks the job to
stop (a training run checkpoints first and prints its result); a second one aborts.
COMPACT_EVENTS=FILE also writes the job's progress, events and end there as JSON lines, for a
program that follows the job (compact.events; the app's worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from compact.errors import Cancelled, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every user error
        raise UserError(f"{self.prog}: {message}")


def progress(fraction: float, message: str | None = None) -> None:
    if message:
        print(f"{message} ({fraction:.0%})", file=sys.stderr, flush=True)


def _add_runs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="only the JSON line, no table")
    parser.add_argument("--kind", default=None)
    parser.add_argument("--base", default=None, help="only runs of this base model")
    parser.add_argument("--status", default=None)
    parser.add_argument("--limit", type=int, default=50)


def _runs(a) -> dict:
    from compact import runs

    rows = runs.RunStore().list(a.kind, a.base, a.status, limit=a.limit)
    if not a.json:
        print(f"{'id':>5}  {'started':<16}  {'kind':<10} {'status':<10} {'parent':>6} {'params':>12}  "
              f"{'base':<30} artifact")
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
            print(f"{r['id']:>5}  {started}  {r['kind']:<10} {r['status']:<10} {r['parent'] or '-':>6} "
                  f"{r['params'] or '-':>12}  {r['base_model'] or '-':<30} {r['artifact'] or ''}")
    return {"runs": rows}


def _add_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="id of a recorded run (python -m compact runs)")
    parser.add_argument("--out", required=True,
                        help="new folder: the final artifact in it, the steps before it in OUT/steps")
    parser.add_argument("--script", action="store_true", help="only print the commands, run nothing")


def _reproduce(a) -> dict:
    from compact import reproduce, runs

    store = runs.RunStore()
    if a.script:
        lines = reproduce.script(store, a.run, a.out)
        print("\n".join(lines))
        return {"run": a.run, "commands": lines}
    return reproduce.run(store, a.run, a.out, progress=progress, runner=run_job)


def _add_leaderboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default=None,
                        help="parameters: 90M, 1.5B or a fraction of the default model such as 0.7 "
                             "(default: the challenge's, COMPACT_CHALLENGE_BUDGET)")
    parser.add_argument("--json", action="store_true", help="only the JSON line, no table")


def _leaderboard(a) -> dict:
    from compact import leaderboard

    board = leaderboard.stored_models(a.budget, progress=progress)
    if not a.json:
        print(f"ranked by perplexity on {board['setting']}")
        print(f"{'rank':>4}  {'ppl':>10} {'params':>12} {'run':>5}  {'name':<24} artifact")
        for r in board["rows"]:
            print(f"{r['rank']:>4}  {r['ppl']:>10.2f} {r['params']:>12,} {r['run']:>5}  {r['name']:<24} "
                  f"{r['artifact']}")
    return board


def build_parser() -> argparse.ArgumentParser:
    from compact.jobs import JOBS
    from compact.options import add_arguments

    parser = _Parser(prog="compact", description="Prune, sparsify and distill causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for job in JOBS.values():
        add_arguments(sub.add_parser(job.name, help=job.help), job.config)
    _add_runs(sub.add_parser("runs", help="list recorded jobs"))
    _add_reproduce(sub.add_parser("reproduce", help="remake a recorded run's artifact from its root model"))
    _add_leaderboard(sub.add_parser("leaderboard", help="the runs store's models within a parameter budget, "
                                    "ranked by held-out perplexity (the workshop challenge's ranking)"))
    return parser


def _is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch` / torchrun: they neither print nor record."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _stop_on_signal(parent: int | None = None):
    """Yield should_stop(): true after the first SIGINT/SIGTERM; the second one aborts.

    With a parent pid (COMPACT_PARENT_PID, set by the app for its worker processes), the job
    also stops at the next safe point once that process is gone, as on SIGTERM.
    """
    stop: list[int | str] = []
    done = threading.Event()

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("stopping at the next safe point (training runs save a checkpoint; --resume continues)",
              file=sys.stderr, flush=True)

    def watch_parent():
        while not (stop or done.wait(0.5)):
            if os.getppid() != parent:
                stop.append("parent")
                print(f"the process that started this job ({parent}) has ended: stopping at the next "
                      "safe point", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if parent:
        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    try:
        yield lambda: bool(stop)
    finally:
        done.set()
        for s, handler in old.items():
            signal.signal(s, handler)


def _following_thread_share(should_stop):
    """should_stop() that first takes the share of the cores the app's server last wrote for this
    worker (COMPACT_THREADS_FILE, compact.hardware): asked at every safe point, in the job's own
    thread, the one whose torch threads count."""
    from compact.hardware import THREADS_ENV, take_thread_share

    path = os.environ.get(THREADS_ENV)
    if not path:
        return should_stop

    def ask() -> bool:
        share = take_thread_share(path)
        if share:
            print(f"CPU threads: {share} (shared with what else the app computes now)", file=sys.stderr,
                  flush=True)
        return should_stop()

    return ask


def _record(run, result) -> None:
    if isinstance(result, dict):
        run.metrics = result
        shape = result.get("shape")
        run.shape = shape if isinstance(shape, dict) else None
        run.counts(result)


def _both(*sinks):
    def report(fraction: float, message: str | None = None) -> None:
        for sink in sinks:
            sink(fraction, message)

    return report


def _end(sink, type: str, **fields) -> None:
    if sink is not None:
        sink.write(type, **fields)
        sink.close()


def run_job(name: str, cfg) -> dict:
    """Run one job as the command line does: progress on stderr, recorded in the runs store.

    With COMPACT_EVENTS set, the job's progress, events and end also go to that file as JSON
    lines (compact.events); with COMPACT_RUN_ID set, the process that started this one records
    the run, so none is recorded here.
    """
    from compact import events, runs
    from compact.jobs import JOBS

    job = JOBS[name]
    main = _is_main_process()
    report = progress if main else None
    sink = events.writer_from_env() if main else None
    extra = {}
    if sink is not None:
        sink.write("start", pid=os.getpid(), command=name)
        report = _both(progress, sink.progress)
        if job.events:
            extra["on_event"] = sink.event
    parent = int(os.environ.get(events.PARENT_ENV) or 0) or None
    recorded = job.recorded and main and not os.environ.get(events.RUN_ID_ENV)
    try:
        with _stop_on_signal(parent) as should_stop:
            should_stop = _following_thread_share(should_stop)
            if not recorded:
                result = job.run(cfg, progress=report, should_stop=should_stop, **extra)
            else:
                inputs = {k: v for k, v in vars(cfg).items()}
                base = getattr(cfg, "model", None) or getattr(cfg, "teacher", None)
                with runs.track(name, base, inputs, artifact=getattr(cfg, "out", None) or None, config=cfg,
                                command=name) as run:
                    result = job.run(cfg, progress=report, should_stop=should_stop, **extra)
                    _record(run, result)
    except Cancelled as e:
        _end(sink, "cancelled", result=e.result)
        raise
    except BaseException as e:
        _end(sink, "error", error=type(e).__name__, message=str(e))
        raise
    _end(sink, "done", result=result)
    return result


def main(argv: list[str] | None = None) -> int:
    # Keep stderr to our own lines: no download/conversion bars or library warnings. Set before
    # the jobs import transformers, which reads them once.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from compact.jobs import JOBS
    from compact.options import from_args

    try:
        args = build_parser().parse_args(argv)
        if args.command == "runs":
            result = _runs(args)
        elif args.command == "reproduce":
            result = _reproduce(args)
        elif args.command == "leaderboard":
            result = _leaderboard(args)
        else:
            result = run_job(args.command, from_args(JOBS[args.command].config, args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled as e:  # asked to stop: what the job had is still the JSON line
        print(f"stopped: {e}", file=sys.stderr)
        result = e.result or {"status": "cancelled"}
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if _is_main_process():
        print(json.dumps(result, default=str))
    return 0
