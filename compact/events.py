"""A job's machine-readable event stream: one JSON object per line, written by the CLI.

`python -m compact <command> ...` with COMPACT_EVENTS=FILE appends to FILE, besides its usual
output (progress lines on stderr, the result as stdout's last line):

    {"type": "start", "pid": 1234, "command": "distill"}
    {"type": "progress", "fraction": 0.25, "message": "step 4/16 ..."}
    {"type": "event", "event": {"kind": "step", "step": 4, "loss": 3.1, ...}}   what on_event got
    {"type": "done", "result": {...}}                  the result, as stdout's JSON line
    {"type": "cancelled", "result": {...} or null}     stopped when asked (training: checkpointed)
    {"type": "error", "error": "UserError", "message": "..."}

Exactly one of the last three ends a stream that the process finished; a stream without one
belongs to a process that was killed. The app runs its long jobs this way (ui/lanes.py) and
follows the file with EventReader.

Other variables a process started for the app reads: COMPACT_RUN_ID (the app records the run
itself, so the job records none of its own), COMPACT_PARENT_PID (stop at the next safe point,
as on SIGTERM, when that process is gone), COMPACT_SESSION (compact.runs: the session that
the runs it records belong to) and COMPACT_THREADS_FILE (its share of the cores, followed at
every safe point: compact.hardware).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

EVENTS_ENV = "COMPACT_EVENTS"
RUN_ID_ENV = "COMPACT_RUN_ID"
PARENT_ENV = "COMPACT_PARENT_PID"
ENDS = ("done", "cancelled", "error")


class EventWriter:
    """Appends one flushed JSON line per call; safe to call from several threads."""

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, type: str, **fields) -> None:
        line = json.dumps({"type": type, **fields}, default=str)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def progress(self, fraction: float, message: str | None = None) -> None:
        self.write("progress", fraction=float(fraction), message=message or "")

    def event(self, payload: dict) -> None:
        self.write("event", event=payload)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def writer_from_env() -> EventWriter | None:
    path = os.environ.get(EVENTS_ENV)
    return EventWriter(path) if path else None


class EventReader:
    """Follows a file that another process appends to: read() gives the complete new lines."""

    def __init__(self, path: str | os.PathLike):
        Path(path).touch()
        self._file = open(path, encoding="utf-8")
        self._partial = ""

    def read(self) -> list[dict]:
        chunk = self._file.read()
        if not chunk:
            return []
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # a line still being written
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # not ours (or cut by a kill): skipped
        return out

    def close(self) -> None:
        self._file.close()


def last_end(path: str | os.PathLike) -> dict | None:
    """The line that ended a finished stream (done, cancelled or error), or None."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("type") in ENDS:
            return row
    return None
