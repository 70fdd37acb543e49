"""The workshop challenge: held-out text, budgets along the lineage, the ranking, the store's upgrade."""

from __future__ import annotations

import functools
import json
import sqlite3

import pytest
import torch

from compact import cli, data, distill, evaluate, leaderboard, models, prune, runs, sparsify
from compact.errors import UserError
from compact.jobs import command_of
from compact.leaderboard import Challenge
from compact.runs import RunStore


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A store of its own, a small evaluation setting, no challenge from the environment."""
    monkeypatch.setenv("COMPACT_RUNS_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("COMPACT_EVAL_TOKENS", "256")
    monkeypatch.setenv("COMPACT_EVAL_SEQ_LEN", "32")
    for name in ("BUDGET", "TOKENS", "DATA"):
        monkeypatch.delenv(f"COMPACT_CHALLENGE_{name}", raising=False)
    return RunStore()


def _heldout_ppl(folder) -> float:
    loaded = models.load(str(folder))
    blocks = data.blocks("builtin", loaded.tokenizer, data.HELDOUT, 256 // 32, 32)
    return evaluate.perplexity(loaded.model, blocks)["ppl"]


@functools.cache
def _params(folder) -> int:
    return models.load(str(folder)).shape.params


def test_heldout_is_text_that_no_other_split_holds(tokenizer, tmp_path):
    corpus, heldout = data.builtin_texts(), data.builtin_heldout_texts()
    assert len(heldout) > 500 and not set(heldout) & set(corpus)
    assert all(data.HELDOUT_MIN_CHARS <= len(d) < data.DOC_MIN_CHARS for d in heldout)
    stream, extra = data.token_stream("builtin", tokenizer), data.heldout_stream("builtin", tokenizer)
    assert len(extra) >= 50_000
    # no held-out block occurs anywhere in the stream that training, calibration and validation cut
    blocks = data.blocks("builtin", tokenizer, data.HELDOUT, None, 32)
    assert len(blocks) == len(extra) // 32  # never repeated: all of it, once
    windows = stream.unfold(0, 32, 1)
    for block in blocks[:4]:
        assert not (windows == block).all(dim=1).any()
    assert torch.equal(blocks, data.blocks("builtin", tokenizer, data.HELDOUT, 10**6, 32))
    path = tmp_path / "c.txt"
    path.write_text("alpha beta gamma " * 100)
    with pytest.raises(UserError, match="no held-out text"):
        data.blocks(str(path), tokenizer, data.HELDOUT, 4, 8)
    with pytest.raises(UserError, match="heldout"):
        data.split_region(stream, "test")


def test_store_of_schema_2_gains_the_challenge_tables_with_nothing_lost(tmp_path):
    db = tmp_path / "runs.sqlite"
    con = sqlite3.connect(db)
    for statement in filter(str.strip, runs.SCHEMA.split(";")):
        con.execute(statement)
    for statements in runs.MIGRATIONS[:2]:
        for statement in statements:
            con.execute(statement)
    con.execute("PRAGMA user_version = 2")
    con.execute("INSERT INTO runs (kind, status, started, params, artifact) VALUES ('prune', 'succeeded',"
                " 1.0, 90, '/x/pruned-1')")
    con.execute("INSERT INTO evaluations VALUES ('/x/pruned-1', 'v1', 'builtin|4096|256', 'cpu:float32',"
                " 2.0, 7.39, 4096, 1.5, 2.0)")
    con.commit()
    before = [tuple(r) for r in con.execute("SELECT * FROM runs")], \
        [tuple(r) for r in con.execute("SELECT * FROM evaluations")]
    con.close()
    store = RunStore(db)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == runs.VERSION == 3
    after = [tuple(r) for r in con.execute("SELECT * FROM runs")], \
        [tuple(r) for r in con.execute("SELECT * FROM evaluations")]
    assert after == before
    assert store.evaluation("/x/pruned-1", "v1", "builtin|4096|256", "cpu:float32")["ppl"] == 7.39
    assert store.challenge() is None and store.submissions() == []
    store.record_challenge("90M", None, "builtin")
    store.record_submission("ada", None, "/x/pruned-1", "v1", 1, 90, 0, "s", 7.0, 1.9)
    assert store.challenge()["budget"] == "90M"
    assert [(s["nickname"], s["run"], s["ppl"]) for s in store.submissions("s")] == [("ada", 1, 7.0)]


def test_submissions_are_ranked_by_heldout_perplexity(workspace, tiny_checkpoint):
    llama, qwen = tiny_checkpoint("llama"), tiny_checkpoint("qwen2")
    first = leaderboard.submit("ada", str(llama), workspace)
    second = leaderboard.submit("grace", str(qwen), workspace)
    assert first["ppl"] == _heldout_ppl(llama) and second["ppl"] == _heldout_ppl(qwen)
    assert first["ppl"] != second["ppl"]
    assert first["setting"] == "builtin heldout, 256 tokens in blocks of 32"
    board = leaderboard.board(workspace)
    assert [r["ppl"] for r in board] == sorted([first["ppl"], second["ppl"]])
    assert {r["nickname"] for r in board} == {"ada", "grace"} and [r["rank"] for r in board] == [1, 2]
    assert board[0]["params"] == _params(llama if board[0]["nickname"] == "ada" else qwen)
    # a second submission of the same model reads the cached score and keeps one row
    again = leaderboard.submit("ada", str(llama), workspace)
    assert again["ppl"] == first["ppl"] and len(leaderboard.board(workspace)) == 2


def test_over_the_parameter_budget_or_without_a_nickname_is_refused(workspace, tiny_checkpoint):
    llama = str(tiny_checkpoint("llama"))
    params = _params(llama)
    tight = Challenge(budget=str(params - 1))
    with pytest.raises(UserError, match=f"has {params:,} parameters, over the challenge's budget of "
                                        f"{params - 1:,}"):
        leaderboard.submit("ada", llama, workspace, tight)
    with pytest.raises(UserError, match="nickname"):
        leaderboard.submit("  ", llama, workspace)
    assert workspace.submissions() == [] and workspace.evaluations(tight.setting().key) == []
    assert leaderboard.submit("ada", llama, workspace, Challenge(budget=str(params)))["rank"] == 1
    # a host who tightens the budget later takes the model off the board
    leaderboard.host(str(params - 1), None, "builtin", workspace)
    assert leaderboard.board(workspace) == []


def _record(store, cfg, artifact, params=None):
    """A succeeded run of cfg in the store, as a job records it (its artifact already on disk)."""
    with runs.track(command_of(cfg), None, artifact=str(artifact), config=cfg, store=store) as run:
        run.params = params


def test_the_token_budget_counts_every_run_behind_a_model(workspace, tiny_checkpoint, make_model,
                                                          tokenizer, tmp_path):
    """prune -> distill (3000 tokens) -> AST (2000) -> C; B distilled into A again (100): D."""
    folders = {}
    for n, name in enumerate("ABCD"):
        folders[name] = tmp_path / name
        models.save(make_model("llama", seed=n), tokenizer, folders[name], {})
    a, b, c, d = (str(folders[k]) for k in "ABCD")
    _record(workspace, prune.PruneConfig(model="default", out=a, ffn=64), a)
    _record(workspace, distill.DistillConfig(teacher="default", student=a, out=b, tokens=3000), b)
    _record(workspace, sparsify.SparsifyConfig(model=b, out=c, method="ast", tokens=2000), c)
    _record(workspace, distill.DistillConfig(teacher=b, student=a, out=d, tokens=100), d)
    _record(workspace, sparsify.SparsifyConfig(model=b, out=str(tmp_path / "E"), method="wanda"),
            tmp_path / "E")
    produced = {k: workspace.producer(v) for k, v in (("a", a), ("c", c), ("d", d))}
    assert leaderboard.training_tokens(workspace, produced["a"]) == 0
    assert leaderboard.training_tokens(workspace, produced["c"]) == 5000
    assert leaderboard.training_tokens(workspace, produced["d"]) == 3100  # the teacher's training counts
    with pytest.raises(UserError, match="trained on 5,000 tokens along its lineage, over the challenge's "
                                        "budget of 4,999"):
        leaderboard.submit("ada", c, workspace, Challenge(tokens="4999"))
    ok = leaderboard.submit("ada", c, workspace, Challenge(tokens="5K"))
    assert (ok["tokens"], ok["run"]) == (5000, produced["c"])
    # a model no run recorded has a lineage of its own: none
    root = leaderboard.submit("ada", str(tiny_checkpoint("gpt2")), workspace, Challenge(tokens="1"))
    assert root["tokens"] == 0 and root["run"] is None


def test_budgets_parse_like_search_and_a_host_needs_the_password(workspace):
    assert leaderboard.parse_budget("90M") == 90_000_000 and leaderboard.parse_budget("1.5B") == 1_500_000_000
    assert leaderboard.parse_tokens("64K") == 64_000
    with pytest.raises(UserError, match="token budget must look like"):
        leaderboard.parse_tokens("lots")
    with pytest.raises(UserError, match="the token budget must be positive"):
        leaderboard.parse_tokens("0.5")
    with pytest.raises(UserError, match="builtin or hf"):
        leaderboard.host("90M", None, "notes.txt", workspace)
    assert workspace.challenge() is None
    assert leaderboard.host(" 90M ", "", "", workspace) == Challenge("90M", None, "builtin")
    assert leaderboard.current(workspace).max_params() == 90_000_000
    assert leaderboard.authorized("s3cret", "s3cret") and not leaderboard.authorized("s3cre", "s3cret")
    assert not leaderboard.authorized("", None) and not leaderboard.authorized(None, "")


def test_cli_lists_the_stored_models_within_the_budget(workspace, tiny_checkpoint, capsys):
    llama, gpt2 = str(tiny_checkpoint("llama")), str(tiny_checkpoint("gpt2"))
    small, large = sorted([llama, gpt2], key=_params)
    for folder in (llama, gpt2):
        _record(workspace, prune.PruneConfig(model="default", out=folder, ffn=64), folder, _params(folder))
    leaderboard.submit("ada", small, workspace)
    assert cli.main(["leaderboard", "--json", "--budget", str(_params(large))]) == 0
    board = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert board["setting"] == "builtin heldout, 256 tokens in blocks of 32"
    rows = board["rows"]
    assert [r["ppl"] for r in rows] == sorted(_heldout_ppl(f) for f in (llama, gpt2))
    by_artifact = {r["artifact"]: r for r in rows}
    assert by_artifact[small]["name"] == "ada" and by_artifact[large]["nickname"] is None
    assert by_artifact[large]["run"] == workspace.producer(large)
    assert by_artifact[large]["params"] == _params(large)
    assert cli.main(["leaderboard", "--json", "--budget", str(_params(small))]) == 0
    only = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["artifact"] for r in only] == [small]
    assert cli.main(["leaderboard", "--budget", "ninety"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: parameter budget must look like 90M, 1.5B, 90000000 or 0.7, got 'ninety'"]
