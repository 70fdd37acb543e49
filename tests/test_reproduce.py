"""Lineage and reproduction: chains of recorded runs remade from their root model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compact import jobs, reproduce, runs
from compact.distill import DistillConfig
from compact.errors import Cancelled, UserError
from compact.importance import ImportanceConfig
from compact.prune import PruneConfig
from compact.sparsify import SparsifyConfig
from tests.helpers import calib_text, run_cli


def _record(store, cfg, status="succeeded", **counts):
    """A run of cfg as the CLI records it, without doing the work."""
    name = jobs.command_of(cfg)
    try:
        with runs.track(name, runs.input_ref(cfg), artifact=cfg.out, config=cfg, store=store) as run:
            run.counts(counts)
            if status == "cancelled":
                raise Cancelled("stopped")
    except Cancelled:
        pass
    return run.id


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """importance -> prune (with those scores) -> distill, cancelled then resumed -> sparsify,
    recorded with relative paths from tmp_path; plus an unrelated later prune."""
    monkeypatch.chdir(tmp_path)
    store = runs.RunStore(tmp_path / "runs.sqlite")
    (tmp_path / "corpus.txt").write_text("text")
    ids = {}
    ids["importance"] = _record(store, ImportanceConfig(model="default", out="scores.safetensors",
                                                        data="corpus.txt", samples=4))
    ids["prune"] = _record(store, PruneConfig(model="default", out="pruned", importance="scores.safetensors",
                                              ffn=1024), params=100)
    distill = DistillConfig(teacher="default", student="pruned", out="distilled", tokens=512, seq_len=32)
    ids["cancelled"] = _record(store, distill, "cancelled")
    ids["distill"] = _record(store, DistillConfig(**{**vars(distill), "resume": True}), params=100)
    ids["sparsify"] = _record(store, SparsifyConfig(model="distilled", out="sparse", method="magnitude"),
                              params=100, nonzero_params=60)
    ids["other"] = _record(store, PruneConfig(model="default", out="pruned", layers=20))  # same folder, later
    return store, ids, tmp_path


def test_chain_follows_parents_and_scores_files(recorded):
    store, ids, _ = recorded
    rows = {r["id"]: r for r in store.list()}
    assert rows[ids["prune"]]["parent"] is None and rows[ids["importance"]]["parent"] is None
    assert rows[ids["distill"]]["parent"] == ids["prune"]
    assert rows[ids["sparsify"]]["parent"] == ids["distill"]  # the resumed run, not the cancelled one
    steps = reproduce.chain(store, ids["sparsify"])
    assert [s.run["id"] for s in steps] == [ids["importance"], ids["prune"], ids["distill"], ids["sparsify"]]
    assert steps[1].needs == {"importance": ids["importance"]}
    assert steps[2].needs == {"student": ids["prune"]}
    # the cancelled record is remade by the run that finished its artifact
    assert [s.run["id"] for s in reproduce.chain(store, ids["cancelled"])][-1] == ids["distill"]


def test_plan_rewrites_outputs_and_references(recorded):
    store, ids, tmp_path = recorded
    steps = reproduce.plan(store, ids["sparsify"], "new")
    importance, pruned, distilled, sparse = (s.config for s in steps)
    assert importance.out == "new/steps/1-importance.safetensors"
    assert importance.data == str(tmp_path / "corpus.txt")  # relative to where the run was started
    assert (pruned.model, pruned.importance, pruned.out) == ("default", importance.out, "new/steps/2-prune")
    assert (distilled.teacher, distilled.student) == ("default", pruned.out)
    assert distilled.out == "new/steps/3-distill"
    assert distilled.resume is False and distilled.tokens == 512
    assert (sparse.model, sparse.out, sparse.method) == (distilled.out, "new/sparse", "magnitude")
    assert [s.artifact for s in steps] == [importance.out, pruned.out, distilled.out, sparse.out]
    lines = reproduce.script(store, ids["sparsify"], "new")
    assert [jobs.parse_command_line(line) for line in lines] == [s.config for s in steps]
    assert lines[1].startswith("python -m compact prune ")
    assert "--importance new/steps/1-importance.safetensors" in lines[1]
    assert "--out new/steps/2-prune" in lines[1]


def test_what_cannot_be_reproduced(recorded):
    store, ids, tmp_path = recorded
    with pytest.raises(UserError, match="no run with id 999"):
        reproduce.chain(store, 999)
    failed = _record(store, PruneConfig(model="default", out="never", layers=2), "cancelled")
    with pytest.raises(UserError, match="did not succeed"):
        reproduce.chain(store, failed)
    with runs.track("eval", "default", store=store) as run:  # recorded without a config
        pass
    with pytest.raises(UserError, match="no recorded config"):
        reproduce.chain(store, run.id)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not an empty folder"):
        reproduce.run(store, ids["prune"], tmp_path / "full")


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.cli
def test_cli_reproduce_of_an_unknown_run_exits_2(tmp_path):
    proc = run_cli("reproduce", "7", "--out", str(tmp_path / "x"),
                   env={"COMPACT_RUNS_DB": str(tmp_path / "runs.sqlite"), "COMPACT_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: no run with id 7"]


@pytest.mark.cli
@pytest.mark.slow
def test_cli_importance_prune_distill_reproduced_bit_for_bit(tmp_path, tiny_checkpoint):
    env = {"COMPACT_RUNS_DB": str(tmp_path / "runs.sqlite"), "COMPACT_HOME": str(tmp_path / "home")}
    model, text = str(tiny_checkpoint("llama")), str(calib_text(tmp_path))
    calib = ("--data", text, "--samples", "4", "--seq-len", "32", "--device", "cpu")
    train = ("--data", text, "--tokens", "256", "--seq-len", "32", "--batch", "2", "--eval-tokens", "64",
             "--device", "cpu", "--checkpoint-every", "0")
    commands = [
        ("importance", "--model", model, "--out", str(tmp_path / "scores.safetensors"), *calib),
        ("prune", "--model", model, "--importance", str(tmp_path / "scores.safetensors"), "--ffn", "96",
         "--heads", "2", "--out", str(tmp_path / "pruned"), "--device", "cpu"),
        ("distill", "--teacher", model, "--student", str(tmp_path / "pruned"),
         "--out", str(tmp_path / "distilled"), *train),
        ("sparsify", "--model", str(tmp_path / "distilled"), "--out", str(tmp_path / "sparse"), "--method",
         "magnitude", "--data", text, "--seq-len", "32", "--eval-tokens", "64", "--device", "cpu"),
    ]
    for args in commands:
        proc = run_cli(*args, env=env)
        assert proc.returncode == 0, proc.stderr
    rows = {r["kind"]: r for r in _last_json(run_cli("runs", "--json", env=env))["runs"]}
    importance, pruned, distilled, sparse = (rows[k] for k in ("importance", "prune", "distill", "sparsify"))
    assert importance["parent"] is None and pruned["parent"] is None  # both start from the root model
    assert distilled["parent"] == pruned["id"] and sparse["parent"] == distilled["id"]
    assert pruned["params"] == distilled["params"] == sparse["params"] < _param_count(model)
    assert 0 < sparse["nonzero_params"] < sparse["params"]
    assert distilled["config"]["command"] == "distill" and distilled["config"]["config"]["tokens"] == 256

    out = tmp_path / "remade"
    proc = run_cli("reproduce", str(distilled["id"]), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    result = _last_json(proc)
    assert [s["command"] for s in result["steps"]] == ["importance", "prune", "distill"]
    assert result["artifact"] == str(out / "distilled")
    original = load_file(str(tmp_path / "distilled" / "model.safetensors"))
    remade = load_file(str(out / "distilled" / "model.safetensors"))
    assert original.keys() == remade.keys() and all(torch.equal(original[k], remade[k]) for k in original)
    meta = json.loads((out / "distilled" / "compact.json").read_text())
    assert meta["student"] == str(out / "steps" / "2-prune")
    # the remade steps are runs too, with their own lineage
    again = {r["id"]: r for r in _last_json(run_cli("runs", "--json", env=env))["runs"]}
    remade_distill = next(r for r in again.values() if r["artifact"] == str(out / "distilled"))
    assert again[remade_distill["parent"]]["artifact"] == str(out / "steps" / "2-prune")


def _param_count(folder: str) -> int:
    return sum(t.numel() for t in load_file(str(Path(folder) / "model.safetensors")).values())
