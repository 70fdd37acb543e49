"""Long work as cancellable jobs.

Gradio cannot stop a plain function once it runs, so a job runs the library call in a worker
thread and hands it `job.should_stop`, backed by a per-session stop flag that the library
checks between batches/steps. The event handler is a generator that relays the worker's
progress and events as they come (for gr.Progress and live plots). The Cancel button sets the
session's flags; closing the page closes the generator, which sets them too. Every job is
recorded in the runs store (compact.runs) with its session. Long jobs run the library call in a
worker process instead (ui/lanes.py): their `work` starts it, relays its event stream to the
Job and turns the stop flag into SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import queue
import re
import threading
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from compact import runs
from compact.errors import Cancelled, UserError
from ui import state as st

_FLAGS: dict[str, dict[int, threading.Event]] = defaultdict(dict)
_FLAGS_LOCK = threading.Lock()


class OutOfMemory(RuntimeError):
    """A job ran out of memory (GPU, or CPU where an allocation was refused)."""

    @classmethod
    def of(cls, kind: str, text: str) -> OutOfMemory:
        """The error in the user's words, from the message of the failed allocation."""
        last = text.strip().splitlines()[-1][:300] if text.strip() else "no memory left"
        return cls(f"out of memory in {kind} ({last}); lower the batch, the sequence length or the "
                   "number of samples")


class WorkerError(RuntimeError):
    """A job's worker process failed or died (ui/lanes.py): the message says how, in the user's words."""


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, (OutOfMemory, WorkerError)):  # already said in the user's words
        return False
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError with this text.
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def release_memory() -> None:
    """Give back what a failed job held, so the next job (and other sessions) can run."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Job:
    """What a worker gets: progress and event reporting, the stop check, its run record."""

    def __init__(self, inbox: queue.Queue, flag: threading.Event):
        self._inbox, self._flag = inbox, flag
        self.record: runs.Run | None = None
        self._computing = False

    def progress(self, fraction: float, message: str = "") -> None:
        self._inbox.put(("progress", (max(0.0, min(1.0, float(fraction))), str(message))))

    def event(self, payload: dict) -> None:
        self._inbox.put(("event", dict(payload)))

    def should_stop(self) -> bool:
        if self._computing:  # a safe point: where the job's thread can take a new share of the cores
            st.CORES.take()
        return self._flag.is_set()

    @contextlib.contextmanager
    def computing(self):
        """The job computes in its own thread inside (rather than relaying a worker process's
        events): it holds a share of the cores (ui/state.CORES), taken again at each should_stop."""
        with st.CORES.computing():
            self._computing = True
            try:
                yield
            finally:
                self._computing = False


def computing(work: Callable[[Job], Any]) -> Callable[[Job], Any]:
    """work(job), computing in the job's thread (Job.computing)."""
    @functools.wraps(work)
    def run(job: Job) -> Any:
        with job.computing():
            return work(job)

    return run


def session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def cancel(request: gr.Request = None) -> str:
    """Set the stop flag of every job of this session."""
    sid = session_id(request)
    with _FLAGS_LOCK:
        flags = list(_FLAGS.get(sid, {}).values())
    for flag in flags:
        flag.set()
    return f"Stopping {len(flags)} job(s)…" if flags else "No job is running."


def run(work: Callable[[Job], Any], sid: str, kind: str, base_model: str | None = None,
        inputs: dict | None = None, artifact: str | None = None, config=None) -> Iterator[tuple[str, Any]]:
    """Run work(job) in a thread; yield what it reports.

    config: the job's config dataclass, recorded with the run (its lineage: compact.runs.track).

    Yields ("progress", (fraction, message)), ("event", dict), then ("done", result) or
    ("cancelled", what the job had: Cancelled.result, or None). A UserError in the worker
    becomes gr.Error.
    """
    flag = threading.Event()
    inbox: queue.Queue = queue.Queue()
    job = Job(inbox, flag)
    with _FLAGS_LOCK:
        _FLAGS[sid][id(flag)] = flag

    def target() -> None:
        try:
            with runs.track(kind, base_model, inputs, artifact, session=sid, config=config) as record:
                job.record = record
                oom = None
                try:
                    result = work(job)
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    oom = str(e) or type(e).__name__
                if oom is not None:  # outside the except block: the failed frames are gone now
                    release_memory()
                    raise OutOfMemory.of(kind, oom)
            inbox.put(("done", result))
        except Cancelled as stop:  # the library's one way of saying it stopped when asked
            inbox.put(("cancelled", stop.result))
        except BaseException as e:  # handed to the generator, which re-raises it
            inbox.put(("error", e))

    thread = threading.Thread(target=target, name=f"job-{kind}-{sid[:8]}", daemon=True)
    thread.start()
    try:
        while True:
            what, payload = inbox.get()
            if what == "error":
                if flag.is_set():
                    yield "cancelled", None
                    return
                if isinstance(payload, UserError):
                    raise gr.Error(str(payload)) from None
                if isinstance(payload, gr.Error):
                    raise payload
                if isinstance(payload, (OutOfMemory, WorkerError)):  # recorded as failed; the server goes on
                    raise gr.Error(str(payload)) from None
                traceback.print_exception(payload)
                raise gr.Error(f"internal error: {type(payload).__name__}: {payload}") from None
            if what in ("done", "cancelled"):
                yield what, payload
                return
            yield what, payload
    finally:
        flag.set()  # the page went away or we are done: let the worker stop
        with _FLAGS_LOCK:
            _FLAGS[sid].pop(id(flag), None)
            if not _FLAGS[sid]:
                _FLAGS.pop(sid, None)


def run_to_end(work: Callable[[Job], Any], sid: str, kind: str, progress: gr.Progress | None = None,
               **record) -> Any:
    """Run a job to the end, relaying progress to gr.Progress; returns its result.

    For handlers that show nothing live besides the progress bar. Raises Cancelled.
    """
    for what, payload in run(work, sid, kind, **record):
        if what == "progress" and progress is not None:
            progress(payload[0], desc=payload[1])
        elif what == "done":
            return payload
        elif what == "cancelled":
            raise Cancelled()
    raise Cancelled()


# Option name (as a flag, without the dashes) -> its field's label on screen. The library's
# messages name command-line flags (`--tokens must be positive`); the app shows the fields.
FIELDS: dict[str, str] = {}


def fields(**components) -> None:
    """Register widgets as the fields of options, by option name (the first label registered wins)."""
    for option, component in components.items():
        FIELDS.setdefault(option.replace("_", "-"), component.label)


def on_screen(message: str) -> str:
    """A library message in the words of the app's fields: `--tokens` becomes "Training tokens"."""
    def label(m: re.Match) -> str:
        return f"“{FIELDS[m.group(1)]}”" if m.group(1) in FIELDS else m.group(0)

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", label, message)


def user_errors(fn: Callable) -> Callable:
    """Show UserError (and Cancelled) as a gr.Error for quick handlers; the server goes on."""

    def translate(e: Exception) -> gr.Error:
        if isinstance(e, Cancelled):
            return gr.Error("cancelled")
        return gr.Error(on_screen(str(e)))

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (UserError, Cancelled) as e:
                raise translate(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, Cancelled) as e:
            raise translate(e) from None

    return wrapper
