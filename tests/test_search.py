"""Architecture search: candidates within the budget, ranked by calibration loss."""

import json

import pytest

from compact import arch as arch_mod
from compact import importance, search
from compact.errors import UserError
from compact.shapes import Shape
from tests.helpers import calib, calib_text, run_cli

SMOL = Shape(30, 576, 1536, 9, 3, 64, 49152)


def test_candidates_lie_within_the_budget_and_on_the_grid():
    target = int(0.7 * SMOL.params)
    found = search.candidates(SMOL, target, 0.05)
    assert found and len(found) == len(set(found))
    for s in found:
        assert abs(s.params - target) <= 0.05 * target
        assert s.heads % 3 == 0 and s.kv_heads == 3 and s.head_dim == 64
        assert s.hidden % 64 == 0 and s.ffn % 64 == 0 and 15 <= s.layers <= 30
    gaps = [abs(s.params - target) for s in found]
    assert gaps == sorted(gaps)
    # Every grid point in the budget is found: brute force over the same grid agrees.
    brute = {SMOL.with_targets(layers=d, hidden=h, ffn=f, heads=n)
             for d in range(15, 31) for h in range(320, 577, 64) for f in range(768, 1537, 64)
             for n in (6, 9)}
    assert set(found) == {s for s in brute if abs(s.params - target) <= 0.05 * target}


def test_given_axis_values_and_gpt2_coupling():
    found = search.candidates(SMOL, int(0.8 * SMOL.params), 0.1, layers=[24, 30], heads=[9])
    assert {s.layers for s in found} <= {24, 30} and {s.heads for s in found} == {9}
    gpt2 = Shape(12, 768, 3072, 12, 12, 64, 50257, gated_mlp=False, positions=1024)
    tied = search.candidates(gpt2, int(0.7 * gpt2.params), 0.05, hidden_tied_to_heads=True)
    assert tied and all(s.hidden == s.heads * 64 and s.kv_heads == s.heads for s in tied)


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_params=0), "positive"),
    (dict(target_params=10**8, tolerance=1.5), "tolerance"),
    (dict(target_params=10**8, heads=[4]), "heads value 4"),
])
def test_bad_search_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        search.candidates(SMOL, **kwargs)


def test_spread_and_parse_params():
    shapes = search.candidates(SMOL, int(0.7 * SMOL.params))
    picked = search.spread(shapes, 5)
    assert len(picked) == 5 and set(picked) <= set(shapes)
    assert search.parse_params("90M", 1) == 90_000_000
    assert search.parse_params("0.5", 1000) == 500
    assert search.parse_params("1.5B", 1) == 1_500_000_000
    with pytest.raises(UserError):
        search.parse_params("lots", 1)


def test_rank_prunes_each_shape_and_sorts_by_loss(make_model, tokenizer):
    model = make_model("llama")
    blocks = calib(len(tokenizer), n=2)
    scores = importance.estimate(model, blocks, batch_size=2)
    src = arch_mod.for_model(model).shape(model.config)
    shapes = [src.with_targets(ffn=64), src.with_targets(layers=2), src]
    rows = search.rank(model, scores, shapes, blocks)
    assert [r["loss"] for r in rows] == sorted(r["loss"] for r in rows)
    by_shape = {(r["layers"], r["ffn"]): r for r in rows}
    for s in shapes:
        assert by_shape[(s.layers, s.ffn)]["params"] == s.params
    from compact.evaluate import loss_on
    assert by_shape[(4, 128)]["loss"] == pytest.approx(loss_on(model, blocks))


@pytest.mark.cli
def test_cli_search(tiny_checkpoint, tmp_path):
    proc = run_cli("search", "--model", str(tiny_checkpoint("llama")), "--params", "0.8",
                   "--data", str(calib_text(tmp_path)),
                   "--tolerance", "0.1", "--hidden-step", "16", "--ffn-step", "32", "--top", "3",
                   "--samples", "2", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= len(out["ranked"]) <= 3 and out["candidates_in_budget"] >= len(out["ranked"])
    losses = [r["loss"] for r in out["ranked"]]
    assert losses == sorted(losses)
    assert all(abs(r["params"] - out["budget"]) <= 0.1 * out["budget"] for r in out["ranked"])


def test_rank_after_short_distillation(make_model, tokenizer, tmp_path):
    from compact import models

    model = make_model("llama")
    teacher = models.Loaded(model, tokenizer, arch_mod.for_model(model), "tiny")
    blocks = calib(len(tokenizer), n=2)
    scores = importance.estimate(model, blocks, batch_size=2)
    shapes = [arch_mod.for_model(model).shape(model.config).with_targets(ffn=64)]
    adapt = search.distill_adapter(teacher, str(calib_text(tmp_path)), tokens=64, seq_len=16, batch=2,
                                   lr=1e-2)
    plain = search.rank(model, scores, shapes, blocks)[0]
    adapted = search.rank(model, scores, shapes, blocks, adapt=adapt)[0]
    # The candidate was trained before scoring (its loss moved) and the teacher was left alone.
    assert adapted["loss"] != plain["loss"] and adapted["params"] == plain["params"]
    assert search.rank(model, scores, shapes, blocks)[0]["loss"] == plain["loss"]
