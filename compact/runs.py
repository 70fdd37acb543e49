"""SQLite store of every job: what ran, on what, with which result.

One file (COMPACT_RUNS_DB, default <COMPACT_HOME>/runs.sqlite) that survives restarts. A job
still marked running whose process is gone is recorded as crashed the next time the store
opens, so nothing is silently lost. The app runs long jobs in worker processes (ui/lanes.py):
it records those runs itself with the worker's pid, and marks one whose worker stopped when the
server went away (a checkpoint saved, to resume) as interrupted.

Lineage: each run records the run that made its input model (`parent`, NULL for a root model
such as 'default' or a Hub id) and its job's config (`config`: command name and fields, enough
to rebuild it with compact.jobs), so compact.reproduce can re-run a whole chain. The schema is
versioned with PRAGMA user_version: a store written by older code is upgraded in place, in
order, by MIGRATIONS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from compact.errors import Cancelled, UserError
from compact.paths import home

STATUSES = ("running", "succeeded", "failed", "cancelled", "crashed", "interrupted")
SESSION_ENV = "COMPACT_SESSION"  # the session of runs recorded by a process the app started
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    base_model TEXT,
    inputs TEXT NOT NULL DEFAULT '{}',
    shape TEXT,
    params INTEGER,
    metrics TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    error TEXT,
    artifact TEXT,
    session TEXT,
    host TEXT,
    pid INTEGER,
    started REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS runs_base ON runs(base_model);
"""
# Version n of the schema is SCHEMA plus MIGRATIONS[:n]; each entry is applied once, in order.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: lineage
        "ALTER TABLE runs ADD COLUMN parent INTEGER",  # the run that made this run's input model
        "ALTER TABLE runs ADD COLUMN nonzero_params INTEGER",  # sparse models: parameters not zero
        "ALTER TABLE runs ADD COLUMN config TEXT",  # {"command", "config", "cwd"} as JSON
        "CREATE INDEX IF NOT EXISTS runs_artifact ON runs(artifact)",
    ),
    (  # 2: the scoreboard's cache (compact.scoreboard), one row per model version, setting and place
        "CREATE TABLE IF NOT EXISTS evaluations (model TEXT NOT NULL, version TEXT NOT NULL,"
        " setting TEXT NOT NULL, place TEXT NOT NULL, loss REAL NOT NULL, ppl REAL NOT NULL,"
        " tokens INTEGER NOT NULL, seconds REAL, created REAL NOT NULL,"
        " PRIMARY KEY (model, version, setting, place))",
    ),
    (  # 3: the workshop challenge (compact.leaderboard): what the host set, and the submissions
        "CREATE TABLE IF NOT EXISTS challenges (id INTEGER PRIMARY KEY AUTOINCREMENT, budget TEXT,"
        " tokens TEXT, data TEXT NOT NULL, created REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS submissions (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " nickname TEXT NOT NULL, session TEXT, model TEXT NOT NULL, version TEXT NOT NULL, run INTEGER,"
        " params INTEGER NOT NULL, tokens INTEGER, setting TEXT NOT NULL, ppl REAL NOT NULL,"
        " loss REAL NOT NULL, created REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS submissions_setting ON submissions(setting)",
    ),
)
VERSION = len(MIGRATIONS)
JSON_FIELDS = ("inputs", "shape", "metrics", "config")
# Config fields that name another job's artifact (a model folder or a scores file).
REF_FIELDS = ("model", "student", "teacher", "importance")


def default_path() -> Path:
    return Path(os.environ.get("COMPACT_RUNS_DB") or home() / "runs.sqlite")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()
        self.mark_crashed()

    def _migrate(self) -> None:
        """Create the table, then bring it to VERSION: one transaction, so two processes opening
        an old store at once upgrade it once."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == VERSION > 0:
                return  # up to date: no write lock taken
            db.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                db.execute("ROLLBACK")
                raise UserError(f"{self.path} was written by a newer compact (schema {version}, "
                                f"this one knows {VERSION})")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start(self, kind: str, base_model: str | None, inputs: dict | None = None,
              artifact: str | None = None, session: str | None = None, parent: int | None = None,
              config: dict | None = None) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO runs (kind, base_model, inputs, status, artifact, session, host, pid, started,"
                " parent, config) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (kind, base_model, json.dumps(inputs or {}, default=str), artifact, session,
                 socket.gethostname(), os.getpid(), time.time(), parent,
                 json.dumps(config, default=str) if config is not None else None))
            return int(cur.lastrowid)

    def finish(self, run_id: int, status: str, metrics: dict | None = None, shape: dict | None = None,
               params: int | None = None, error: str | None = None, artifact: str | None = None,
               nonzero_params: int | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status}")
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, metrics=?, shape=COALESCE(?, shape), params=COALESCE(?, params),"
                " error=?, artifact=COALESCE(?, artifact), finished=?,"
                " nonzero_params=COALESCE(?, nonzero_params) WHERE id=?",
                (status, json.dumps(metrics or {}, default=str),
                 json.dumps(shape) if shape is not None else None, params, error, artifact,
                 time.time(), nonzero_params, run_id))

    def producer(self, ref: str | None, before: int | None = None, cwd: str | None = None) -> int | None:
        """The id of the newest succeeded run (older than run `before`) whose artifact is ref.

        ref: a model reference or a scores file; a relative path is taken from cwd (default: this
        process's). None for 'default', a Hub id, or a path no recorded run wrote. A resumed run
        and the run it continued share their artifact: the finished one is the producer.
        """
        if not ref or ref == "default":
            return None
        target = _resolved(ref, cwd)
        sql = "SELECT id, artifact FROM runs WHERE status='succeeded' AND artifact IS NOT NULL"
        args: tuple = ()
        if before is not None:
            sql, args = sql + " AND id<?", (before,)
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY id DESC", args).fetchall()
        for r in rows:
            if r["artifact"] == str(target) or _resolved(r["artifact"]) == target:
                return int(r["id"])
        return None

    def evaluation(self, model: str, version: str, setting: str, place: str) -> dict | None:
        """A cached evaluation (compact.scoreboard), or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM evaluations WHERE model=? AND version=? AND setting=?"
                             " AND place=?", (model, version, setting, place)).fetchone()
        return dict(row) if row else None

    def evaluations(self, setting: str) -> list[dict]:
        """Every cached evaluation under one setting, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM evaluations WHERE setting=? ORDER BY created DESC",
                              (setting,)).fetchall()
        return [dict(r) for r in rows]

    def record_evaluation(self, model: str, version: str, setting: str, place: str, loss: float,
                          ppl: float, tokens: int, seconds: float | None = None) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (model, version, setting, place, loss, ppl, tokens, seconds, time.time()))

    def record_challenge(self, budget: str | None, tokens: str | None, data: str) -> None:
        """A host's challenge; the newest one is the current one."""
        with self._connect() as db:
            db.execute("INSERT INTO challenges (budget, tokens, data, created) VALUES (?, ?, ?, ?)",
                       (budget, tokens, data, time.time()))

    def challenge(self) -> dict | None:
        """The newest challenge a host set here, or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM challenges ORDER BY id DESC LIMIT 1").fetchone()
        return dict(row) if row else None

    def record_submission(self, nickname: str, session: str | None, model: str, version: str,
                          run: int | None, params: int, tokens: int | None, setting: str, ppl: float,
                          loss: float) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO submissions (nickname, session, model, version, run, params, tokens, setting,"
                " ppl, loss, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (nickname, session, model, version, run, params, tokens, setting, ppl, loss, time.time()))
            return int(cur.lastrowid)

    def submissions(self, setting: str | None = None) -> list[dict]:
        """Submissions (under one held-out setting, when given), oldest first."""
        sql, args = "SELECT * FROM submissions", ()
        if setting is not None:
            sql, args = sql + " WHERE setting=?", (setting,)
        with self._connect() as db:
            return [dict(r) for r in db.execute(sql + " ORDER BY id", args).fetchall()]

    def set_pid(self, run_id: int, pid: int) -> None:
        """The process that does the run's work (an app's worker), for crash detection."""
        with self._connect() as db:
            db.execute("UPDATE runs SET pid=? WHERE id=?", (pid, run_id))

    def delete(self, run_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))

    def writing(self, artifact: str) -> int | None:
        """The id of a running job (its process alive) whose output is this path, if any."""
        target = Path(artifact).expanduser().resolve()
        with self._connect() as db:
            rows = db.execute("SELECT id, pid, artifact FROM runs WHERE status='running'"
                              " AND artifact IS NOT NULL").fetchall()
        for r in rows:
            alive = r["pid"] is None or _alive(r["pid"])
            if alive and Path(r["artifact"]).expanduser().resolve() == target:
                return int(r["id"])
        return None

    def mark_crashed(self) -> int:
        """Runs of this host left 'running' by a process that no longer exists."""
        host = socket.gethostname()
        with self._connect() as db:
            rows = db.execute("SELECT id, pid FROM runs WHERE status='running' AND host=?",
                              (host,)).fetchall()
            dead = [r["id"] for r in rows if r["pid"] is None or not _alive(r["pid"])]
            db.executemany("UPDATE runs SET status='crashed', error='process ended without finishing',"
                           " finished=? WHERE id=?", [(time.time(), i) for i in dead])
        return len(dead)

    def get(self, run_id: int) -> dict:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run with id {run_id}")
        return _row(row)

    def list(self, kind: str | None = None, base_model: str | None = None, status: str | None = None,
             session: str | None = None, limit: int = 1000) -> list[dict]:
        where, args = [], []
        for column, value in (("kind", kind), ("base_model", base_model), ("status", status),
                              ("session", session)):
            if value:
                where.append(f"{column}=?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]


def _resolved(path: str, cwd: str | None = None) -> Path:
    p = Path(path).expanduser()
    return (Path(cwd) / p if cwd and not p.is_absolute() else p).resolve()


def config_record(cfg, command: str | None = None) -> dict:
    """What the config column holds: the command, every field of its config, the working folder
    (relative paths in the config are relative to it)."""
    if command is None:
        from compact.jobs import command_of

        command = command_of(cfg)
    return {"command": command, "config": dataclasses.asdict(cfg), "cwd": os.getcwd()}


def input_ref(cfg) -> str | None:
    """The model a job starts from: the student of a distillation, else its model."""
    return getattr(cfg, "student", None) or getattr(cfg, "model", None)


def _row(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in JSON_FIELDS:
        out[key] = json.loads(out[key]) if out[key] else None
    return out


class Run:
    """Handle of a running job inside `track`: set what the job produced."""

    def __init__(self, store: RunStore, run_id: int):
        self.store, self.id = store, run_id
        self.metrics: dict = {}
        self.shape: dict | None = None
        self.params: int | None = None
        self.nonzero_params: int | None = None
        self.artifact: str | None = None

    def counts(self, result: dict) -> None:
        """params and nonzero_params from a job's result, where it has them."""
        for key in ("params", "nonzero_params"):
            if isinstance(result.get(key), int):
                setattr(self, key, result[key])

    def _finish(self, status: str, metrics: dict, error: str | None = None) -> None:
        self.store.finish(self.id, status, metrics, self.shape, self.params, error, self.artifact,
                          self.nonzero_params)


@contextmanager
def track(kind: str, base_model: str | None, inputs: dict | None = None, artifact: str | None = None,
          session: str | None = None, store: RunStore | None = None, config=None,
          command: str | None = None, parent: int | None = None):
    """Record a job: succeeded, failed (with the reason), cancelled or, if the process dies, crashed.

    config: the job's config dataclass (command: its name in compact.jobs, found when not given),
    recorded whole; its input model (input_ref) gives the parent, unless parent is given.
    The artifact is recorded as an absolute path. A UserError means the request itself was bad
    and no job really ran: its record is removed, so bad input leaves the store as it was.
    Without a session, a process started for one (an app's worker, COMPACT_SESSION) records
    under that session.
    """
    store = store or RunStore()
    session = session if session is not None else os.environ.get(SESSION_ENV) or None
    if artifact:
        artifact = os.path.abspath(os.path.expanduser(artifact))
        busy = store.writing(artifact)
        if busy is not None:
            raise UserError(f"run {busy} is still writing {artifact}; wait for it or pick another output")
    record = None
    if config is not None:
        record = config_record(config, command)
        if parent is None:
            parent = store.producer(input_ref(config))
    run = Run(store, store.start(kind, base_model, inputs, artifact, session, parent, record))
    try:
        yield run
    except UserError:
        store.delete(run.id)
        raise
    except Cancelled as stop:
        run._finish("cancelled", run.metrics or (stop.result if isinstance(stop.result, dict) else {}))
        raise
    except (KeyboardInterrupt, SystemExit):
        run._finish("cancelled", run.metrics, "interrupted")
        raise
    except BaseException as e:
        run._finish("failed", run.metrics, f"{type(e).__name__}: {e}"[:2000])
        raise
    else:
        run._finish("succeeded", run.metrics)


def tree(rows: list[dict]) -> list[tuple[int, dict]]:
    """The runs as a lineage tree, depth first: (depth, run); a run whose parent is not among
    the rows starts a root of its own. Children follow their parent, oldest first."""
    ids = {r["id"] for r in rows}
    children: dict[int | None, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        parent = r.get("parent") if r.get("parent") in ids else None
        children.setdefault(parent, []).append(r)
    out: list[tuple[int, dict]] = []

    def walk(parent, depth: int) -> None:
        for r in children.get(parent, []):
            out.append((depth, r))
            walk(r["id"], depth + 1)

    walk(None, 0)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def loss_curve(run: dict, field: str = "loss") -> tuple[list[float], list[float]]:
    """(tokens, field) per step from a training run's metrics.jsonl; empty if it has none."""
    artifact = run.get("artifact")
    path = Path(artifact) / "metrics.jsonl" if artifact else None
    if path is None or not path.is_file():
        return [], []
    xs, ys = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row.get(field), (int, float)) and isinstance(row.get("tokens"), (int, float)):
            xs.append(row["tokens"])
            ys.append(row[field])
    return xs, ys
