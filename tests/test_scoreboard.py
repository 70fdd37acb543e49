"""The canonical evaluation: one setting, computed once per model version, cached in the store."""

from __future__ import annotations

import os
import sqlite3

import pytest

from compact import data, evaluate, models, prune, runs, scoreboard
from compact.errors import UserError
from compact.runs import RunStore


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A store of its own and a small canonical setting."""
    monkeypatch.setenv("COMPACT_RUNS_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("COMPACT_EVAL_TOKENS", "256")
    monkeypatch.setenv("COMPACT_EVAL_SEQ_LEN", "32")
    return RunStore()


def _perplexity_now(folder, setting: scoreboard.Setting) -> dict:
    loaded = models.load(str(folder))
    n = data.n_blocks_for(setting.tokens, setting.seq_len)
    blocks = data.blocks(setting.data, loaded.tokenizer, "validation", n, setting.seq_len, model=loaded.model)
    return evaluate.perplexity(loaded.model, blocks)


def test_canonical_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMPACT_EVAL_TOKENS", "1024")
    monkeypatch.setenv("COMPACT_EVAL_SEQ_LEN", "64")
    monkeypatch.setenv("COMPACT_EVAL_DATA", "builtin")
    setting = scoreboard.canonical()
    assert setting == scoreboard.Setting("builtin", 1024, 64)
    assert setting.label == "builtin validation, 1,024 tokens in blocks of 64"
    monkeypatch.setenv("COMPACT_EVAL_SEQ_LEN", "1")
    with pytest.raises(UserError, match="COMPACT_EVAL_SEQ_LEN"):
        scoreboard.canonical()


def test_a_model_is_scored_once_and_the_number_is_the_plain_perplexity(workspace, tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    first = scoreboard.score(str(folder))
    again = scoreboard.score(str(folder))
    assert first["cached"] is False and again["cached"] is True
    assert again["ppl"] == first["ppl"] and again["loss"] == first["loss"]
    assert first["canonical"] and first["setting"] == scoreboard.canonical().label
    assert first["place"] == "cpu:float32" and first["tokens"] == 256
    assert first["ppl"] == _perplexity_now(folder, scoreboard.canonical())["ppl"]
    assert scoreboard.cached(str(folder))["ppl"] == first["ppl"]
    # another setting is another number, labelled as not the canonical one
    other = scoreboard.score(str(folder), setting=scoreboard.Setting("builtin", 128, 16))
    assert other["cached"] is False and not other["canonical"] and other["ppl"] != first["ppl"]
    rows = workspace.evaluations(scoreboard.canonical().key)
    assert [r["model"] for r in rows] == [str(folder.resolve())]


def test_a_rewritten_folder_is_scored_again(workspace, make_model, tokenizer, tmp_path):
    folder = tmp_path / "m"
    models.save(make_model("qwen2", seed=1), tokenizer, folder, {})
    first = scoreboard.score(str(folder))
    os.utime(folder / "model.safetensors", ns=(1, 1))  # same size, another version
    models.save(make_model("qwen2", seed=2), tokenizer, folder, {})
    second = scoreboard.score(str(folder))
    assert second["cached"] is False and second["ppl"] != first["ppl"]
    assert scoreboard.identity(str(folder))[0] == str(folder.resolve())
    assert scoreboard.identity("default") == ("default", "")


def test_a_model_in_memory_is_scored_without_a_cache_entry(workspace, tiny_checkpoint):
    loaded = models.load(str(tiny_checkpoint("gpt2")))
    r = scoreboard.score(None, loaded)
    assert r["cached"] is False and r["ppl"] > 1
    assert workspace.evaluations(scoreboard.canonical().key) == []


def test_prune_with_score_reports_both_models_on_the_canonical_setting(workspace, tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("llama"))
    cfg = prune.PruneConfig(model=src, out=str(tmp_path / "p"), ffn=64, samples=2, seq_len=16, score=True)
    result = prune.run(cfg)
    canonical = result["canonical"]
    assert canonical["setting"] == scoreboard.canonical().label
    assert canonical["ppl_before"] == _perplexity_now(src, scoreboard.canonical())["ppl"]
    assert canonical["ppl_after"] == _perplexity_now(cfg.out, scoreboard.canonical())["ppl"]
    assert canonical["ppl_after"] != canonical["ppl_before"]
    # the original's score is now the workspace's: the next job reads it
    again = prune.run(prune.PruneConfig(model=src, out=str(tmp_path / "q"), ffn=96, samples=2, seq_len=16,
                                        score=True))
    assert again["canonical"]["before"]["cached"] is True
    assert again["canonical"]["ppl_before"] == canonical["ppl_before"]


def test_store_of_schema_1_gains_the_cache_with_nothing_lost(tmp_path):
    db = tmp_path / "runs.sqlite"
    con = sqlite3.connect(db)
    for statement in filter(str.strip, runs.SCHEMA.split(";")):
        con.execute(statement)
    for statement in runs.MIGRATIONS[0]:
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO runs (kind, status, started, params, parent) VALUES ('prune', 'succeeded', 1.0,"
                " 90, NULL)")
    con.commit()
    con.close()
    store = RunStore(db)
    assert store.get(1)["params"] == 90 and store.get(1)["kind"] == "prune"
    store.record_evaluation("m", "v", "s", "cpu:float32", 2.0, 7.4, 256)
    assert store.evaluation("m", "v", "s", "cpu:float32")["ppl"] == 7.4
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == runs.VERSION >= 2
