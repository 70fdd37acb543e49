"""Long jobs in worker processes: `python -m compact <command> ...`, followed by the server.

Distillation, AST and calibrated one-shot sparsify, and experiments run as child processes of
the server with the config the tab built (compact.jobs.argv), at most COMPACT_WORKERS at once:
their events share the `workers` concurrency group (ui/common.LONG), apart from the interactive
ones (load, generate, importance, prune, compare), which never wait behind a long job. The
server follows each worker through its event file (compact.events) in the job's thread
(ui/jobs.run), so the progress bar and the live plots get what an in-process job gave them.
Workers and the server's computing threads share the cores by how many run now (ui/state.CORES,
compact.hardware.CoreShares): a worker reads its share from a file the server rewrites.
Cancel sends SIGTERM: the job stops at its next safe point (a training run saves a checkpoint)
and ends with its result. The server records the run with the worker's pid; a worker that dies
is recorded as failed with the reason, the tab shows it as an error, and the server serves on.
A tab that needs the model a worker wrote loads it from disk afterwards (ui/state.CACHE).

Each job leaves beside the session's outputs `job-<run>.json` (its command line, to resume it),
`job-<run>.events.jsonl` (its event stream) and `job-<run>.log` (its stdout and stderr); while
it runs, `job-<run>.threads` (its share of the cores).

Restart: a worker whose server is gone stops at its next safe point, as on SIGTERM (it watches
its parent). The next server finds the run crashed (compact.runs marks a run whose process is
gone) and, when the event stream ends with the job's checkpointed stop, records it as
interrupted. `resumable` lists a session's runs that can continue from a checkpoint and
`resume_config` gives the same config with resume on: the exact continuation.

COMPACT_WORKERS=0 runs long jobs in the server process, as before (ZeroGPU's default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr

from compact import runs, slices
from compact.errors import Cancelled, UserError
from compact.events import ENDS, EVENTS_ENV, PARENT_ENV, RUN_ID_ENV, EventReader, last_end
from compact.hardware import KEEP_FREED_MEMORY, THREADS_ENV, on_zero_gpu
from compact.jobs import argv, command_line, command_of, parse_command_line
from ui import jobs
from ui import state as st

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.1  # how often the server looks for new events and for the worker's exit
RESUMABLE_STATUSES = ("interrupted", "crashed", "cancelled", "failed")


def enabled() -> bool:
    return st.SETTINGS.workers > 0


# -- long jobs in the server process (no workers; ZeroGPU) ------------------------------------

try:  # ZeroGPU attaches a GPU only inside spaces.GPU calls; outside ZeroGPU the decorator does nothing
    from spaces import GPU as _zero_gpu
except ImportError:
    def _zero_gpu(duration=None):
        return lambda fn: fn


@_zero_gpu(duration=lambda run, cfg: slices.duration(cfg))
def _gpu_slice(run, cfg):
    """One slice of a training job, on ZeroGPU's GPU (module level: ZeroGPU registers it at start)."""
    return slices.one_slice(run, cfg, slices.duration(cfg) - slices.LOAD_S)


@_zero_gpu(duration=lambda run, cfg: slices.max_slice_s())
def _gpu_call(run, cfg):
    """A job that cannot resume (one-shot, experiments): one GPU call of the longest duration."""
    events: list[dict] = []
    return run(cfg, on_event=events.append), events


def run_here(run, cfg, job: jobs.Job, resumable: bool = True, preload=None) -> dict:
    """A long job in the server process. On ZeroGPU: a training job as GPU slices that each fit
    the Space's limit, resuming exactly between them (compact.slices); any other as one GPU
    call; the models load inside (a GPU exists only there), the user's cancel takes effect
    between slices. Elsewhere: one call with the models preload() gives (the cached ones)."""
    if not on_zero_gpu():
        with job.computing():
            return run(cfg, on_event=job.event, should_stop=job.should_stop, **(preload() if preload else {}))
    if resumable:
        return slices.run_sliced(functools.partial(_gpu_slice, run), cfg, job.should_stop, job.event)
    result, events = _gpu_call(run, cfg)
    for event in events:
        job.event(event)
    return result


def files(sid: str, run_id: int) -> dict[str, Path]:
    folder = st.session_dir(sid)
    return {"job": folder / f"job-{run_id}.json", "events": folder / f"job-{run_id}.events.jsonl",
            "log": folder / f"job-{run_id}.log", "threads": folder / f"job-{run_id}.threads"}


def worker_config(cfg):
    """cfg as the worker gets it: the server's own permission to load remote code or pickles."""
    names = {f.name for f in dataclasses.fields(cfg)}
    allowed = {"trust_remote_code": st.SETTINGS.allow_remote_code, "allow_pickle": st.SETTINGS.allow_pickle}
    changes = {k: True for k, on in allowed.items() if on and k in names}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run_worker(cfg, job: jobs.Job, sid: str) -> dict:
    """Run cfg's job in a worker process and relay its progress and events to `job`.

    For a `work` of ui/jobs.run, which has recorded the run (job.record). Returns the job's
    result; raises Cancelled (with the result: a training run's checkpoint), UserError,
    jobs.OutOfMemory, or jobs.WorkerError when the worker failed or was killed.
    """
    command, cfg = command_of(cfg), worker_config(cfg)
    run_id = job.record.id
    paths = files(sid, run_id)
    paths["job"].write_text(json.dumps({"run": run_id, "session": sid, "command": command,
                                        "line": command_line(cfg), "started": time.time()}, indent=2))
    paths["events"].unlink(missing_ok=True)
    reader = EventReader(paths["events"])
    with open(paths["log"], "ab") as log, _core_share(run_id, paths["threads"]) as threads:
        # Its own process group: a Ctrl-C in the server's terminal is not a second stop signal
        # for it. The server's session, not a new one: where the kernel groups processes by
        # session for CPU time (autogroups, on by default in many kernels), a worker with a session
        # of its own took an equal share whatever its nice (2-thread work in the server: 0.97 s
        # alone, 2.8-3.5 s beside such a worker, 1.2-1.3 s beside one in its session).
        proc = subprocess.Popen([sys.executable, "-m", "compact", *argv(cfg)], cwd=os.getcwd(),
                                env=worker_env(sid, run_id, paths["events"], threads),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                process_group=0)
        _lower_priority(proc.pid)
        job.record.store.set_pid(run_id, proc.pid)
        try:
            end = _follow(proc, reader, job)
        finally:
            reader.close()
            if proc.poll() is None:  # the relay itself failed: do not leave the worker behind
                proc.terminate()
                proc.wait()
    return _outcome(command, proc, end, paths["log"])


@contextlib.contextmanager
def _core_share(run_id: int, path: Path):
    """The worker's share of the cores while it runs: yields its threads file (None when the
    server was started with OMP_NUM_THREADS, which every worker then keeps)."""
    if st.CORES.fixed:
        yield None
        return
    st.CORES.join(run_id, path)
    try:
        yield path
    finally:
        st.CORES.leave(run_id)
        path.unlink(missing_ok=True)


def worker_env(sid: str, run_id: int, events: Path, threads: Path | None = None) -> dict[str, str]:
    """The server's environment, plus where the worker writes its events, and its threads file
    (compact.hardware.CoreShares): it starts with the share written there and follows it. Its
    allocator keeps freed memory (compact.hardware.KEEP_FREED_MEMORY) unless GLIBC_TUNABLES is set."""
    env = {"GLIBC_TUNABLES": KEEP_FREED_MEMORY, **os.environ, EVENTS_ENV: str(events),
           RUN_ID_ENV: str(run_id), PARENT_ENV: str(os.getpid()), runs.SESSION_ENV: sid,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if threads is not None:
        env.update({"OMP_NUM_THREADS": threads.read_text(), THREADS_ENV: str(threads)})
    return env


def _lower_priority(pid: int) -> None:
    """Interactive calls in the server get the CPU before the worker (threads it starts inherit this)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) +
                                                 st.SETTINGS.worker_nice))
    except OSError:
        pass


def _follow(proc: subprocess.Popen, reader: EventReader, job: jobs.Job) -> dict | None:
    """Relay events until the worker exits; the stop flag becomes one SIGTERM. Returns the end line."""
    end, stopping = None, False
    while True:
        exited = proc.poll() is not None  # before reading: then every line it wrote is read
        for row in reader.read():
            kind = row.get("type")
            if kind == "progress":
                job.progress(row.get("fraction") or 0.0, row.get("message") or "")
            elif kind == "event":
                job.event(row.get("event") or {})
            elif kind in ENDS:
                end = row
        if exited:
            return end
        if not stopping and job.should_stop():
            proc.send_signal(signal.SIGTERM)  # one only: a second one would abort the checkpoint
            stopping = True
        time.sleep(POLL_S)


def _outcome(command: str, proc: subprocess.Popen, end: dict | None, log: Path) -> dict:
    if end is None:
        raise jobs.WorkerError(_death(command, proc, log))
    if end["type"] == "done":
        return end.get("result")
    if end["type"] == "cancelled":
        raise Cancelled("stopped", end.get("result"))
    name, message = end.get("error") or "Error", end.get("message") or ""
    if name == "UserError":
        raise UserError(message)
    if name == "KeyboardInterrupt":  # a second stop signal aborted it
        raise Cancelled("aborted")
    if name == "OutOfMemoryError" or "can't allocate memory" in message:
        raise jobs.OutOfMemory.of(command, message)
    first = message.strip().splitlines()[0][:300] if message.strip() else ""
    raise jobs.WorkerError(f"{command} failed in its worker process: {name}: {first} (log: {log})")


def _death(command: str, proc: subprocess.Popen, log: Path) -> str:
    rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        why = " (most often the system running out of memory)" if -rc == signal.SIGKILL else ""
        return (f"the {command} worker (process {proc.pid}) was killed by {name}{why}; "
                "the run is recorded as failed")
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] \
        if log.exists() else []
    last = f": {lines[-1][:300]}" if lines else ""
    return f"the {command} worker (process {proc.pid}) ended with status {rc} and no result{last}"


# -- restart and resume ------------------------------------------------------------------------

def _job(sid: str, run_id: int) -> dict | None:
    path = files(sid, run_id)["job"]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reconcile(rows: list[dict], store: runs.RunStore | None = None) -> list[dict]:
    """Crashed runs whose worker stopped at a safe point after its server went away become
    interrupted (in the store too), with where they stopped; the rows are updated in place."""
    for r in rows:
        if r["status"] != "crashed" or not r.get("session") or _job(r["session"], r["id"]) is None:
            continue
        end = last_end(files(r["session"], r["id"])["events"])
        if end is None or end["type"] != "cancelled":
            continue
        result = end.get("result") or {}
        step = result.get("steps", (result.get("training") or {}).get("steps"))
        error = "the server stopped while it ran" + (f"; it stopped at step {step} and saved a checkpoint"
                                                      if step is not None else "")
        store = store or runs.RunStore()
        store.finish(r["id"], "interrupted", result, error=error)
        r.update(status="interrupted", error=error, metrics=result)
    return rows


def resumable(sid: str, command: str) -> list[tuple[str, int]]:
    """(label, run id) of this session's runs of `command` that stopped before their end and can
    continue from their checkpoint, newest first (one per output folder)."""
    store = runs.RunStore()
    found, outs = [], set()
    for r in reconcile(store.list(session=sid, limit=200), store):
        job = _job(sid, r["id"]) if r["status"] in RESUMABLE_STATUSES else None
        if job is None or job.get("command") != command:
            continue
        cfg = parse_command_line(job["line"])
        progress = Path(getattr(cfg, "out", "") or "").expanduser() / "checkpoint" / "progress.json"
        if not hasattr(cfg, "resume") or cfg.out in outs or not progress.is_file():
            continue
        outs.add(cfg.out)
        if store.writing(cfg.out) is not None:
            continue  # resumed already, and still running
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        found.append((f"#{r['id']} {command} {r['status']} at step {step}: {Path(cfg.out).name}", r["id"]))
    return found


def resume_config(sid: str, command: str, run_id=None):
    """The config of a resumable run of this session (the newest when run_id is empty), with
    resume on: the same settings, so training continues exactly where the checkpoint is."""
    found = resumable(sid, command)
    if not found:
        raise UserError(f"this session has no interrupted or cancelled {command} run with a checkpoint")
    if run_id in (None, ""):
        run_id = found[0][1]
    try:
        run_id = int(run_id)
    except (TypeError, ValueError):
        raise UserError(f"'{run_id}' is not a run id") from None
    if run_id not in [i for _, i in found]:
        raise UserError(f"run {run_id} is not an interrupted or cancelled {command} run of this "
                        "session with a checkpoint")
    cfg = parse_command_line(_job(sid, run_id)["line"])
    return dataclasses.replace(cfg, resume=True)


# -- the tabs' resume controls -----------------------------------------------------------------

def resume_controls(command: str, what: str):
    """A dropdown of this session's resumable runs of `command` and its button, in the caller's
    layout; returns (dropdown, button, refresh), refresh(request) filling the dropdown."""
    with gr.Row():
        pick = gr.Dropdown([], value=None, allow_custom_value=True, scale=4,
                           label=f"Interrupted or cancelled {what} to resume (from its checkpoint, "
                                 "with its own settings)")
        button = gr.Button("Resume run", scale=1)

    def refresh(request: gr.Request):
        found = resumable(jobs.session_id(request), command)
        return gr.Dropdown(choices=found, value=found[0][1] if found else None)

    return pick, button, refresh


def resume_handler(command: str, follow):
    """A tab's Resume button handler: the picked run (the newest when none is) continues from its
    checkpoint with its own settings, followed by follow(cfg, state, sid, progress) as the tab
    follows a new run."""
    @jobs.user_errors
    def resume_run(run_id, state: dict | None, request: gr.Request, progress=gr.Progress()):
        sid = jobs.session_id(request)
        yield from follow(resume_config(sid, command, run_id), st.session(state), sid, progress)

    return resume_run
