"""Load: simulated users on loopback while distillations train in worker processes.

    .venv/bin/python -m bench.load_test [--users 20] [--distills 2] [--max-seconds 1200]
        [--ramp-seconds 60] [--out bench/results/load.json]

Starts the real app (ui/server.py, loopback only) on a temporary data folder. First the idle
baseline: 10 sequential /generate calls (8 new tokens) with nothing else running. Then
`--distills` distillations of the default model into itself start (each its own session, in a
worker process, ui/lanes.py) and, once each has trained a step, `--users` users arrive evenly
over `--ramp-seconds`, each a gradio_client Client with its own session: /load the default
model, /generate, /importance (8 samples x 128 tokens), /prune (with the importance scores its
session holds). A user stops at its first error and every user stops at `--max-seconds`; then
the distillations are cancelled. Latencies include queueing. Writes p50/p90/max per action, the
errors (the goal: none), generate's p90 under load against idle (the goal: within 3x) and the
device.

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


IDLE_ROUNDS = 10  # sequential /generate calls on the idle server: the baseline
GENERATE = (8, 0, 0, False)  # max new tokens, temperature (greedy), seed, chat template
IMPORTANCE = (None, "builtin", 8, 128, "l2", "mean", False)  # the session's model, 8 samples x 128 tokens
# layers, hidden, ffn, heads, depth metric (the canonical scores of both models come with it)
PRUNE = (24, 384, 1024, 6, "bi")
ACTIONS = ("load", "generate", "importance", "prune")


def generation_seconds(output) -> float:
    """The time /generate spent generating, from its speed line ("8 tokens, 10.5 tokens/s"):
    its latency less this is time spent waiting (queue, connection)."""
    tokens, rate = (float(part.split()[0]) for part in output[1].split(", "))
    return tokens / rate if rate else 0.0


def summarize(values: list[float]) -> dict:
    top = max(values) if values else float("nan")
    return {"n": len(values), "p50": round(percentile(values, 0.5), 3),
            "p90": round(percentile(values, 0.9), 3), "max": round(top, 3)}


def wait_training(db: Path, n: int, jobs: list, timeout: float) -> float:
    """Seconds until n distillations are running and each has written a training step."""
    from compact import runs

    start = time.perf_counter()
    while True:
        rows = runs.RunStore(db).list(kind="distill", status="running")
        metrics = [Path(r["artifact"]) / "metrics.jsonl" for r in rows]
        if len(rows) >= n and all(m.exists() and m.read_text().strip() for m in metrics):
            return time.perf_counter() - start
        if any(j.done() for j in jobs):
            raise RuntimeError(f"a distillation ended before the users started: {[j.status() for j in jobs]}")
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"the distillations did not start training within {timeout:.0f} s")
        time.sleep(1)


def run(users: int, distills: int, max_seconds: float, ramp_seconds: float, distill_tokens: int) -> dict:
    """The idle baseline, then `users` users (load, generate, importance, prune) beside `distills`
    distillations."""
    import os

    from gradio_client import Client

    latencies: dict[str, list[float]] = {a: [] for a in ACTIONS}
    errors: list[str] = []
    lock = threading.Lock()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as url:
        # The idle baseline, in the same run: one client, one call at a time, nothing else running.
        client = Client(url, verbose=False)
        client.predict("default", api_name="/load")
        for i in range(2 + IDLE_ROUNDS):  # the first two warm the model and the generation path
            start = time.perf_counter()
            out = client.predict("default", f"Idle round {i}: the capital of France is", *GENERATE,
                                 api_name="/generate")
            if i >= 2:
                latencies.setdefault("generate_idle", []).append(time.perf_counter() - start)
                latencies.setdefault("generate_idle_generating", []).append(generation_seconds(out))

        # Distillations (worker processes, ui/lanes.py), each in its own session, sized to outlast
        # the users: they are cancelled once the users are done, so they overlap the whole phase.
        trainers = [Client(url, verbose=False) for _ in range(distills)]
        distill_jobs = [t.submit("default", "default", "builtin", distill_tokens, 64, 2, 1e-4, 1.0, 1.0, 0.0,
                                 0.0, False, api_name="/distill") for t in trainers]
        first_step_s = wait_training(Path(tmp) / "runs.sqlite", distills, distill_jobs, timeout=600)

        phase_start = time.perf_counter()
        deadline = phase_start + max_seconds

        def timed(client: Client, user: int, action: str, *args):
            """One call, its latency (queueing included) recorded; its output, None on an error or
            at the deadline."""
            left = deadline - time.perf_counter()
            if left <= 0:
                with lock:
                    errors.append(f"user {user} /{action}: not started, past the deadline")
                return None
            start = time.perf_counter()
            job = client.submit(*args, api_name=f"/{action}")
            try:
                out = job.result(timeout=left)
            except Exception as e:  # counted, reported; the user stops (later steps need this one)
                job.cancel()
                with lock:
                    errors.append(f"user {user} /{action}: {type(e).__name__}: {str(e)[:200]}")
                return None
            with lock:
                latencies[action].append(time.perf_counter() - start)
                if action == "generate":
                    latencies.setdefault("generate_generating", []).append(generation_seconds(out))
            return out

        def user(n: int) -> None:
            time.sleep(n * ramp_seconds / max(users, 1))  # arrivals spread evenly over the ramp
            try:
                client = Client(url, verbose=False)  # its own session: state, scores, outputs
            except Exception as e:
                with lock:
                    errors.append(f"user {n} connect: {type(e).__name__}: {str(e)[:200]}")
                return
            (timed(client, n, "load", "default") is not None
             and timed(client, n, "generate", "default", f"User {n}: the capital of France is", *GENERATE)
             and timed(client, n, "importance", *IMPORTANCE) is not None
             and timed(client, n, "prune", *PRUNE))

        threads = [threading.Thread(target=user, args=(n,), name=f"user-{n}", daemon=True)
                   for n in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.perf_counter()) + 60)
        phase_s = time.perf_counter() - phase_start
        errors += [f"{t.name}: still running after the deadline" for t in threads if t.is_alive()]

        distill = []
        for trainer, job in zip(trainers, distill_jobs, strict=True):
            still_training = not job.done()
            trainer.predict(api_name="/cancel")
            try:
                *_, result = job.result(timeout=600)
                distill.append({"status": result.get("status"), "steps": result.get("steps"),
                                "still_training_when_users_finished": still_training})
                if not still_training:
                    errors.append(f"a distillation ended before the users: {result.get('status')}")
            except Exception as e:
                errors.append(f"/distill: {type(e).__name__}: {str(e)[:200]}")
                distill.append({"status": "error"})
        try:  # the server still serves
            client.predict("default", "After the load: the capital of France is", *GENERATE,
                           api_name="/generate")
        except Exception as e:
            errors.append(f"/generate after the load: {type(e).__name__}: {str(e)[:200]}")

    stats = {action: summarize(v) for action, v in latencies.items()}
    idle_p90, loaded_p90 = stats["generate_idle"]["p90"], stats["generate"]["p90"]
    summary = {"users, distillations": f"{users}, {distills}", "errors": len(errors)}
    summary |= {f"{a} p50 / p90 / max (s)": f"{stats[a]['p50']} / {stats[a]['p90']} / {stats[a]['max']}"
                for a in ACTIONS}
    summary |= {"generate p90 idle (s)": idle_p90, "generate p90 under load (s)": loaded_p90,
                "generate p90 loaded / idle (goal <= 3)": round(loaded_p90 / idle_p90, 2),
                "generate p90 generating only, idle / loaded (s)":
                    f"{stats['generate_idle_generating']['p90']} / {stats['generate_generating']['p90']}"}
    return {
        "device": device_name(),
        "machine": "this project's shared 2-core CPU; other agents' jobs ran beside the benchmark",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "users": users, "distills": distills, "max_seconds": max_seconds, "ramp_seconds": ramp_seconds,
        "calls": {"load": "default model (cached after the first)",
                  "generate": "8 new tokens, greedy, default model",
                  "importance": "8 samples x 128 tokens, builtin data",
                  "prune": "to 24 layers, hidden 384, ffn 1024, 6 heads; the canonical score of the pruned "
                           "model (4,096 tokens; the original's is cached after the first)",
                  "distill": f"default -> default, {distill_tokens} tokens, seq 64, batch 2, in worker "
                             "processes; cancelled once the users finished",
                  "generate_idle": f"{IDLE_ROUNDS} sequential calls before anything else ran",
                  "generate_generating, generate_idle_generating": "the time /generate spent generating "
                  "(its speed line): the latency less this is waiting"},
        "summary": summary,
        "latency_s": stats,
        "user_phase_s": round(phase_s, 1),
        "errors": len(errors),
        "error_messages": errors[:50],
        "distill": {"first_step_after_s": round(first_step_s, 1), "runs": distill},
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
                             False, api_name="/distill")
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
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--distills", type=int, default=2, help="distillations running beside the users")
    parser.add_argument("--max-seconds", type=float, default=1200, help="the users stop after this")
    parser.add_argument("--ramp-seconds", type=float, default=60, help="users arrive evenly over this")
    parser.add_argument("--rounds", type=int, default=10, help="--generate-vs-idle: calls idle and busy")
    parser.add_argument("--distill-tokens", type=int, default=None,
                        help="default: enough to outlast the users (they are cancelled after)")
    parser.add_argument("--out", default=None, help="default bench/results/load.json (lanes.json)")
    args = parser.parse_args()
    if args.generate_vs_idle:
        # cancelled once measured: enough steps to outlast the calls
        result = generate_vs_idle(args.rounds, max(args.distill_tokens or 0, 64 * 2 * 200))
        write_json(args.out or ROOT / "bench" / "results" / "lanes.json", result)
        print(json.dumps(result))
        return
    result = run(args.users, args.distills, args.max_seconds, args.ramp_seconds,
                 args.distill_tokens or 64 * 2 * 2000)
    write_json(args.out or ROOT / "bench" / "results" / "load.json", result)
    print(json.dumps(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
