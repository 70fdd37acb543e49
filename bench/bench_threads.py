"""Distillations side by side on the CPU: torch's default threads against a share of the cores.

    .venv/bin/python -m bench.bench_threads [--jobs 2] [--tokens 1024] [--out bench/results/threads.json]

The app trains in worker processes, up to COMPACT_WORKERS at once (ui/lanes.py). This starts
`python -m compact distill` processes as those workers do (the default model into itself,
sequences of 128, batch 2, no validation): one alone, then --jobs at once, each time first with
torch's default threads (every core, each process) and then with OMP_NUM_THREADS set to
compact.hardware.cpu_threads(jobs), what the app gives each of its workers now. Writes each
process's tokens/s (its own measure, compact.train) and the total.
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
from compact.hardware import cores, cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def distills(n: int, threads: int | None, tokens: int, tmp: Path) -> dict:
    """n distillations at once; threads None: torch's default. Their tokens/s and the wall time."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["COMPACT_RUNS_DB"] = str(tmp / "runs.sqlite")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "compact", "distill", "--teacher", "default", "--student", "default",
         "--out", str(tmp / f"d{threads}-{n}-{i}"), "--tokens", str(tokens), "--seq-len", "128",
         "--batch", "2", "--eval-tokens", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True) for i in range(n)]
    speeds = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a distillation failed with exit status {proc.returncode}")
        speeds.append(round(json.loads(out.strip().splitlines()[-1])["tokens_per_s"], 1))
    return {"processes": n, "threads_each": threads or "default (every core)",
            "tokens_per_s_each": speeds, "tokens_per_s_total": round(sum(speeds), 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2, help="distillations at once (COMPACT_WORKERS)")
    parser.add_argument("--tokens", type=int, default=1024, help="training tokens of each")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "threads.json"))
    args = parser.parse_args()

    share = cpu_threads(args.jobs)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, threads in (("alone_default", 1, None), ("alone_share", 1, share),
                                 ("together_default", args.jobs, None), ("together_share", args.jobs, share)):
            runs[name] = distills(n, threads, args.tokens, Path(tmp))
            print(name, runs[name], flush=True)
    total = {name: run["tokens_per_s_total"] for name, run in runs.items()}
    result = {
        "device": device_name(), "cores": cores(), "jobs": args.jobs, "share": share,
        "calls": f"python -m compact distill --teacher default --student default --tokens {args.tokens} "
                 "--seq-len 128 --batch 2 --eval-tokens 0, fp32",
        "summary": {
            f"{args.jobs} at once, default threads: tokens/s in total": total["together_default"],
            f"{args.jobs} at once, {share} thread(s) each: tokens/s in total": total["together_share"],
            "alone, default threads: tokens/s": total["alone_default"],
            f"alone, {share} thread(s): tokens/s": total["alone_share"],
        },
        "runs": runs,
    }
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
