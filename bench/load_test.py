"""Load: simulated users generating and running importance while a distillation job runs.

    .venv/bin/python -m bench.load_test [--users 4] [--rounds 3] [--out bench/results/load.json]

Starts the real app (ui/server.py, loopback only) on a temporary data folder. One
client starts a distillation of the default model into itself (small, but long enough to
overlap the users); then each of `--users` gradio_client users runs `--rounds` rounds of
/generate (8 new tokens) and /importance (2 samples x 32 tokens), each user stopping by itself
after its rounds or `--max-seconds`, whichever comes first. Heavy events share the server's
GPU concurrency slot (COMPACT_GPU_CONCURRENCY, default 1), so latencies include queueing
behind the distillation and each other. Writes latency percentiles (p50/p90/max) per endpoint,
the error count and the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import device_name, write_json
from ui.server import ROOT, serve


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(users: int, rounds: int, max_seconds: float, distill_tokens: int) -> dict:
    from gradio_client import Client

    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def timed(client: Client, api: str, *args):
        start = time.perf_counter()
        try:
            out = client.predict(*args, api_name=api)
        except Exception as e:  # counted, reported, and the user goes on
            with lock:
                errors.append(f"{api}: {type(e).__name__}: {str(e)[:200]}")
            return None
        with lock:
            latencies.setdefault(api, []).append(time.perf_counter() - start)
        return out

    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as url:
        trainer = Client(url, verbose=False)
        timed(trainer, "/load", "default")
        started = time.perf_counter()
        distill_job = trainer.submit("default", "default", "builtin", distill_tokens, 64, 2, 1e-4, 1.0, 1.0,
                                     0.0, 0.0, False, 256, api_name="/distill")
        time.sleep(2)  # let the distillation take the slot first

        def user(n: int) -> None:
            client = Client(url, verbose=False)
            deadline = time.perf_counter() + max_seconds
            for r in range(rounds):
                if time.perf_counter() > deadline:
                    break
                timed(client, "/generate", "default", f"User {n} asks, round {r}: the capital of France is",
                      8, 0, 0, False)
                timed(client, "/importance", "builtin", 2, 32, "l2", "mean", False)

        threads = [threading.Thread(target=user, args=(n,), name=f"user-{n}") for n in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max_seconds + 600)
        hung = sum(t.is_alive() for t in threads)
        try:
            *_, result = distill_job.result(timeout=max_seconds + 600)
            distill = {"status": result.get("status"), "steps": result.get("steps"),
                       "seconds": round(time.perf_counter() - started, 2)}
            if result.get("status") != "done":
                errors.append(f"/distill ended {result.get('status')}")
        except Exception as e:
            errors.append(f"/distill: {type(e).__name__}: {str(e)[:200]}")
            distill = {"status": "error"}
        after = timed(trainer, "/load", "default")  # the server still serves
    return {
        "device": device_name(),
        "users": users, "rounds": rounds, "max_seconds": max_seconds,
        "calls": {"generate": "8 new tokens, greedy, default model",
                  "importance": "2 samples x 32 tokens, builtin", "distill": f"{distill_tokens} tokens, "
                  "seq 64, batch 2, default -> default"},
        "latency_s": {api.strip("/"): {"n": len(v), "p50": round(percentile(v, 0.5), 3),
                                        "p90": round(percentile(v, 0.9), 3), "max": round(max(v), 3)}
                      for api, v in sorted(latencies.items())},
        "errors": len(errors) + hung + (after is None),
        "error_messages": errors[:20],
        "distill": distill,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--distill-tokens", type=int, default=64 * 2 * 12)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = parser.parse_args()
    result = run(args.users, args.rounds, args.max_seconds, args.distill_tokens)
    write_json(args.out, result)
    print(json.dumps(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
