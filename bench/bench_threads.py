"""Distillations side by side on the CPU: torch's threads against how the app shares the cores.

    .venv/bin/python -m bench.bench_threads [--jobs 2] [--tokens 1024] [--out bench/results/threads.json]

The app trains in worker processes, up to COMPACT_WORKERS at once (ui/lanes.py). This starts
`python -m compact distill` processes as those workers do (the default model into itself,
sequences of 128, batch 2, no validation) and reads each one's tokens/s (its own measure,
compact.train):
- one alone, then --jobs at once, each time first with torch's default threads (every core,
  each process) and then with OMP_NUM_THREADS = compact.hardware.cpu_threads(jobs), a fixed share;
- staggered, as visitors arrive: a first run of 4 x --tokens, a second of --tokens starting
  --delay s later, so that the first trains alone, beside the second, then alone again; once
  with the fixed share, once following the share of what runs now, as the app does
  (compact.hardware.CoreShares: every core alone, a share while both run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import device_name, write_json
from compact.hardware import THREADS_ENV, CoreShares, cores, cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def start(out: Path, tokens: int, threads: int | None, share_file: Path | None = None) -> subprocess.Popen:
    """One distillation; threads None: torch's default; share_file: follows it, as a worker."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_ENV)}
    env["COMPACT_RUNS_DB"] = str(out.parent / "runs.sqlite")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if share_file is not None:
        env[THREADS_ENV] = str(share_file)
    return subprocess.Popen(
        [sys.executable, "-m", "compact", "distill", "--teacher", "default", "--student", "default",
         "--out", str(out), "--tokens", str(tokens), "--seq-len", "128", "--batch", "2",
         "--eval-tokens", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def speed(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a distillation failed with exit status {proc.returncode}")
    return round(json.loads(out.strip().splitlines()[-1])["tokens_per_s"], 1)


def together(n: int, threads: int | None, tokens: int, tmp: Path) -> dict:
    """n distillations at once. Their tokens/s and the wall time."""
    begin = time.perf_counter()
    procs = [start(tmp / f"d{threads}-{n}-{i}", tokens, threads) for i in range(n)]
    speeds = [speed(p) for p in procs]
    return {"processes": n, "threads_each": threads or "default (every core)",
            "tokens_per_s_each": speeds, "tokens_per_s_total": round(sum(speeds), 1),
            "wall_s": round(time.perf_counter() - begin, 1)}


def staggered(follow: bool, tokens: int, delay: float, tmp: Path) -> dict:
    """A first run of 4 x tokens; after `delay` s a second of `tokens`. Fixed share (of two) or
    following the share of what runs now (the first one alone: every core)."""
    shares, name = CoreShares(), "following" if follow else "fixed"

    def begin(key: str, n_tokens: int) -> subprocess.Popen:
        if not follow:
            return start(tmp / f"{name}-{key}", n_tokens, cpu_threads(2))
        path = tmp / f"{name}-{key}.threads"
        return start(tmp / f"{name}-{key}", n_tokens, shares.join(key, path), path)

    t0 = time.perf_counter()
    first = begin("first", 4 * tokens)
    time.sleep(delay)
    second = begin("second", tokens)
    second_speed = speed(second)
    second_s = time.perf_counter() - t0
    shares.leave("second")
    first_speed = speed(first)
    shares.leave("first")
    return {"threads": "the share of what runs now" if follow else f"{cpu_threads(2)} each, fixed",
            "first_tokens": 4 * tokens, "second_tokens": tokens, "second_starts_after_s": delay,
            "tokens_per_s_first": first_speed, "tokens_per_s_second": second_speed,
            "second_done_after_s": round(second_s, 1),
            "both_done_after_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2, help="distillations at once (COMPACT_WORKERS)")
    parser.add_argument("--tokens", type=int, default=1024, help="training tokens of each")
    parser.add_argument("--delay", type=float, default=40, help="staggered: seconds between the two starts")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "threads.json"))
    args = parser.parse_args()

    share = cpu_threads(args.jobs)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, threads in (("alone_default", 1, None), ("alone_share", 1, share),
                                 ("together_default", args.jobs, None), ("together_share", args.jobs, share)):
            runs[name] = together(n, threads, args.tokens, Path(tmp))
            print(name, runs[name], flush=True)
        for follow in (False, True):
            name = "staggered_following" if follow else "staggered_fixed"
            runs[name] = staggered(follow, args.tokens, args.delay, Path(tmp))
            print(name, runs[name], flush=True)
    total = {name: run.get("tokens_per_s_total") for name, run in runs.items()}
    fixed, following = runs["staggered_fixed"], runs["staggered_following"]
    result = {
        "device": device_name(), "cores": cores(), "jobs": args.jobs, "share": share,
        "calls": f"python -m compact distill --teacher default --student default --tokens {args.tokens} "
                 "--seq-len 128 --batch 2 --eval-tokens 0, fp32",
        "summary": {
            f"{args.jobs} at once, default threads: tokens/s in total": total["together_default"],
            f"{args.jobs} at once, {share} thread(s) each: tokens/s in total": total["together_share"],
            "alone, default threads: tokens/s": total["alone_default"],
            f"alone, {share} thread(s): tokens/s": total["alone_share"],
            "staggered, fixed share: first / second tokens/s": [fixed["tokens_per_s_first"],
                                                                fixed["tokens_per_s_second"]],
            "staggered, following the share: first / second tokens/s": [following["tokens_per_s_first"],
                                                                        following["tokens_per_s_second"]],
            "staggered, both done after (s), fixed / following": [fixed["both_done_after_s"],
                                                                   following["both_done_after_s"]],
        },
        "runs": runs,
    }
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
