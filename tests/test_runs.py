import json
import sqlite3
import subprocess
import sys

import pytest

from compact import prune, runs
from compact.errors import Cancelled, UserError
from tests.helpers import ROOT, run_cli


def test_store_records_and_survives_reopen(tmp_path):
    db = tmp_path / "runs.sqlite"
    store = runs.RunStore(db)
    with runs.track("prune", "default", {"ffn": 512}, artifact="/x", store=store) as run:
        run.metrics = {"ppl": 12.5}
        run.shape = {"layers": 30}
        run.params = 100
    with pytest.raises(RuntimeError):
        with runs.track("distill", "default", store=store):
            raise RuntimeError("out of memory")
    with pytest.raises(Cancelled), runs.track("distill", "other", store=store):
        raise Cancelled("stopped", {"steps": 2})
    reopened = runs.RunStore(db)
    rows = {r["id"]: r for r in reopened.list()}
    assert ([r["status"] for r in sorted(rows.values(), key=lambda r: r["id"])]
            == ["succeeded", "failed", "cancelled"])
    first = reopened.get(min(rows))
    assert first["metrics"] == {"ppl": 12.5} and first["shape"] == {"layers": 30} and first["params"] == 100
    assert (first["inputs"] == {"ffn": 512} and first["artifact"] == "/x"
            and first["finished"] >= first["started"])
    assert "out of memory" in rows[min(rows) + 1]["error"]
    assert [r["base_model"] for r in reopened.list(base_model="other")] == ["other"]


def test_user_error_leaves_store_unchanged(tmp_path):
    store = runs.RunStore(tmp_path / "r.sqlite")
    with pytest.raises(UserError):
        with runs.track("prune", "default", store=store):
            raise UserError("bad target")
    assert store.list() == []


def test_killed_process_is_recorded_as_crashed(tmp_path):
    db = tmp_path / "runs.sqlite"
    code = ("import os, sys; from compact import runs; s = runs.RunStore(sys.argv[1]); "
            "s.start('distill', 'default', {}); os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", code, str(db)], cwd=ROOT)
    assert proc.returncode == 9
    rows = runs.RunStore(db).list()
    assert len(rows) == 1 and rows[0]["status"] == "crashed"


@pytest.mark.cli
@pytest.mark.slow
def test_cli_jobs_are_recorded(tmp_path, tiny_checkpoint):
    env = {"COMPACT_RUNS_DB": str(tmp_path / "cli.sqlite")}
    ckpt = str(tiny_checkpoint("llama"))
    ok = run_cli("eval", "--model", ckpt, "--tokens", "256", "--seq-len", "32", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("eval", "--model", ckpt, "--data", str(tmp_path / "missing.txt"), env=env)
    assert bad.returncode == 2
    listed = run_cli("runs", "--json", env=env)
    rows = json.loads(listed.stdout.strip().splitlines()[-1])["runs"]
    assert len(rows) == 1
    assert rows[0]["kind"] == "eval" and rows[0]["status"] == "succeeded" and rows[0]["base_model"] == ckpt
    assert rows[0]["metrics"]["tokens"] == 256


def test_pareto_front():
    points = [(100, 10.0), (80, 12.0), (80, 11.0), (120, 9.0), (90, 15.0), (130, 9.5)]
    assert runs.pareto_front(points) == [2, 0, 3]
    assert runs.pareto_front([]) == []


def test_loss_curve_reads_metrics_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "tokens": 64, "loss": 3.5}\n'
                                            '{"step": 1, "tokens": 128, "loss": 3.1}\n{"step": 2, "tok')
    assert runs.loss_curve({"artifact": str(tmp_path)}) == ([64, 128], [3.5, 3.1])
    assert runs.loss_curve({"artifact": str(tmp_path / "missing")}) == ([], [])
    assert runs.loss_curve({"artifact": None}) == ([], [])


def test_tree_puts_each_run_under_its_parent():
    rows = [{"id": 1, "parent": None}, {"id": 2, "parent": 1}, {"id": 3, "parent": None},
            {"id": 4, "parent": 2}, {"id": 5, "parent": 1}, {"id": 6, "parent": 99}]  # 99: not shown
    assert [(d, r["id"]) for d, r in runs.tree(rows)] == [(0, 1), (1, 2), (2, 4), (1, 5), (0, 3), (0, 6)]


def test_a_process_started_for_a_session_records_under_it(tmp_path, monkeypatch):
    store = runs.RunStore(tmp_path / "r.sqlite")
    monkeypatch.setenv(runs.SESSION_ENV, "abc")
    with runs.track("experiment:sparse", "default", store=store):
        pass
    with runs.track("prune", "default", session="given", store=store):
        pass
    store.start("distill", "default")
    rows = store.list()
    assert [r["session"] for r in rows] == [None, "given", "abc"]
    store.set_pid(rows[0]["id"], 4321)
    assert store.get(rows[0]["id"])["pid"] == 4321


# The store as git HEAD wrote it before lineage (schema 0): the exact CREATE statements.
SCHEMA_0 = """
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


def _schema_0_store(path):
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_0)
    rows = [("prune", "default", '{"ffn": 512}', '{"layers": 30}', 100, '{"ppl": 12.5}', "succeeded", None,
             "/x/pruned", "s1", "h", 1, 10.0, 11.0),
            ("distill", "default", "{}", None, None, "{}", "failed", "RuntimeError: oom", "/x/d", None, "h",
             2, 12.0, 13.0)]
    db.executemany("INSERT INTO runs (kind, base_model, inputs, shape, params, metrics, status, error,"
                   " artifact, session, host, pid, started, finished)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    before = [tuple(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]
    db.close()
    return before


def test_store_of_schema_0_upgrades_with_nothing_lost(tmp_path):
    db = tmp_path / "runs.sqlite"
    before = _schema_0_store(db)
    store = runs.RunStore(db)
    store = runs.RunStore(db)  # a second open finds it up to date
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == runs.VERSION >= 1
    columns = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
    assert columns[:15] == ["id", "kind", "base_model", "inputs", "shape", "params", "metrics", "status",
                            "error", "artifact", "session", "host", "pid", "started", "finished"]
    assert {"parent", "nonzero_params", "config"} <= set(columns)
    after = [tuple(r)[:15] for r in con.execute("SELECT * FROM runs ORDER BY id")]
    assert after == before  # every old value, untouched
    old = store.get(1)
    assert old["metrics"] == {"ppl": 12.5} and old["params"] == 100 and old["parent"] is None
    assert old["config"] is None and old["nonzero_params"] is None
    # new runs go on after the old ids, and find their parent among the old runs
    cfg = prune.PruneConfig(model="/x/pruned", out=str(tmp_path / "again"), ffn=256)
    with runs.track("prune", cfg.model, artifact=cfg.out, config=cfg, store=store) as run:
        run.params, run.nonzero_params = 90, 45
    new = store.get(3)
    assert new["parent"] == 1 and new["config"]["command"] == "prune"
    assert (new["params"], new["nonzero_params"]) == (90, 45)


def test_store_of_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "runs.sqlite"
    runs.RunStore(db)
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {runs.VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="newer compact"):
        runs.RunStore(db)


def test_parent_is_the_finished_run_that_wrote_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = runs.RunStore(tmp_path / "runs.sqlite")

    def prune_run(model, out, status="succeeded"):
        cfg = prune.PruneConfig(model=model, out=out, layers=2)
        try:
            with runs.track("prune", model, artifact=out, config=cfg, store=store) as run:
                if status == "cancelled":
                    raise Cancelled("stopped")
                if status == "failed":
                    raise RuntimeError("broke")
        except (Cancelled, RuntimeError):
            pass
        return run.id

    root = prune_run("default", "a")
    assert store.get(root)["parent"] is None and store.get(root)["artifact"] == str(tmp_path / "a")
    failed = prune_run("a", "b", "failed")
    assert store.get(failed)["parent"] == root  # relative refs are the same folder as the artifact
    child = prune_run(str(tmp_path / "b"), "c")
    assert store.get(child)["parent"] is None  # b's only run failed: b is no artifact of a run
    cancelled = prune_run("a", "d", "cancelled")
    resumed = prune_run("a", "d")
    assert store.producer("d") == resumed and store.producer("d", before=resumed) is None
    assert store.get(prune_run("./d/", "e"))["parent"] == resumed
    record = store.get(cancelled)["config"]
    assert record["cwd"] == str(tmp_path)
    assert prune.PruneConfig(**record["config"]) == prune.PruneConfig(model="a", out="d", layers=2)
    assert store.producer("default") is None and store.producer("HuggingFaceTB/SmolLM2-135M") is None
