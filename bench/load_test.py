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

    .venv/bin/python -m bench.load_test --generate-vs-idle [--rounds 10] [--out bench/results/lanes.json]

Generate's latency while one distillation runs in its worker process (ui/lanes.py) against the
same calls on an idle server: `--rounds` sequential /generate calls (8 new tokens) idle, then a
distillation of the default model into itself starts and, once its worker has written its first
training step, the same calls again; the distillation is then cancelled. Writes the median and
p90 of both, their ratio (the goal: within 3x), the distillation's speed and the device.
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


def generate_vs_idle(rounds: int, distill_tokens: int) -> dict:
    """Median /generate latency idle and while a distillation trains in a worker process."""
    import os

    from gradio_client import Client

    from compact import runs

    def generate(client: Client, n: int) -> list[float]:
        out = []
        for i in range(n):
            start = time.perf_counter()
            text, speed = client.predict("default", f"Round {i}: the capital of France is", 8, 0, 0, False,
                                         api_name="/generate")
            out.append(time.perf_counter() - start)
        return out

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as url:
        db = Path(tmp) / "runs.sqlite"
        client = Client(url, verbose=False)
        client.predict("default", api_name="/load")
        generate(client, 2)  # warm: the model and the generation path
        idle = generate(client, rounds)
        trainer = Client(url, verbose=False)
        started = time.perf_counter()
        job = trainer.submit("default", "default", "builtin", distill_tokens, 64, 2, 1e-4, 1.0, 1.0, 0.0, 0.0,
                             False, 256, api_name="/distill")
        metrics = None
        while metrics is None or not metrics.read_text().strip():
            if job.done():
                raise RuntimeError(f"the distillation ended before it trained: {job.result()}")
            rows = runs.RunStore(db).list(kind="distill", status="running")
            metrics = Path(rows[0]["artifact"]) / "metrics.jsonl" if rows else None
            if metrics is not None and not metrics.exists():
                metrics = None
            time.sleep(0.5)
        first_step_s = time.perf_counter() - started
        worker_pid = runs.RunStore(db).list(kind="distill", status="running")[0]["pid"]
        busy = generate(client, rounds)
        steps_during = len(metrics.read_text().splitlines())
        still_training = not job.done()
        trainer.predict(api_name="/cancel")
        loss, message, result = job.result(timeout=900)
    return {
        "device": device_name(),
        "load_average_before": [round(x, 2) for x in load_before],
        "calls": {"generate": "8 new tokens, greedy, default model, one call at a time",
                  "distill": f"default -> default, seq 64, batch 2, in a worker process (pid {worker_pid} "
                             "beside the server), cancelled after the measurement"},
        "rounds": rounds,
        "generate_idle_s": {"p50": round(percentile(idle, 0.5), 3), "p90": round(percentile(idle, 0.9), 3)},
        "generate_during_distill_s": {"p50": round(percentile(busy, 0.5), 3),
                                      "p90": round(percentile(busy, 0.9), 3)},
        "summary": {"generate p50 idle (s)": round(percentile(idle, 0.5), 3),
                    "generate p50 during distill (s)": round(percentile(busy, 0.5), 3),
                    "ratio p50 during / idle": round(percentile(busy, 0.5) / percentile(idle, 0.5), 2),
                    "distill tokens/s meanwhile": round(result.get("tokens_per_s") or 0.0, 1)},
        "distill": {"first_step_after_s": round(first_step_s, 1), "still_training_after": still_training,
                    "steps_written_during_measurement": steps_during, "status": result.get("status"),
                    "steps": result.get("steps")},
        "latencies_s": {"idle": [round(x, 3) for x in idle], "during_distill": [round(x, 3) for x in busy]},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generate-vs-idle", action="store_true",
                        help="generate's latency while a distillation runs in a worker vs idle")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--distill-tokens", type=int, default=64 * 2 * 12)
    parser.add_argument("--out", default=None, help="default bench/results/load.json (lanes.json)")
    args = parser.parse_args()
    if args.generate_vs_idle:
        # cancelled once measured: enough steps to outlast the calls
        result = generate_vs_idle(args.rounds, max(args.distill_tokens, 64 * 2 * 200))
        write_json(args.out or ROOT / "bench" / "results" / "lanes.json", result)
        print(json.dumps(result))
        return
    result = run(args.users, args.rounds, args.max_seconds, args.distill_tokens)
    write_json(args.out or ROOT / "bench" / "results" / "load.json", result)
    print(json.dumps(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
