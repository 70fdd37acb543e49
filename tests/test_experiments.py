import json

import pytest

from compact import experiments, runs
from compact.errors import UserError
from compact.shapes import Shape, shape_error
from compact.train import relay
from tests.helpers import run_cli

SMOLLM2 = Shape(layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                hidden_divisible_by_heads=True)


@pytest.mark.parametrize("arm,axes", [(a, x) for a, x in experiments.AXIS_ARMS.items() if a != "attention"])
def test_every_arm_reaches_the_same_budget(arm, axes):
    budget = int(SMOLLM2.params * 0.8)
    targets = experiments.solve_targets(SMOLLM2, axes, budget)
    assert set(targets) == set(axes)
    shape = SMOLLM2.with_targets(**targets)
    assert abs(shape.params - budget) / budget < 0.02, (arm, targets)
    for axis in ("layers", "hidden", "ffn", "heads"):
        if axis not in axes:
            assert getattr(shape, axis) == getattr(SMOLLM2, axis)
    assert shape_error(shape) is None


def test_attention_alone_cannot_cut_a_fifth_of_smollm2():
    # All attention weights are 26.5M of 134.5M parameters: removing 20% through heads is impossible.
    with pytest.raises(UserError, match="cannot reach"):
        experiments.solve_targets(SMOLLM2, ("heads",), int(SMOLLM2.params * 0.8))
    targets = experiments.solve_targets(SMOLLM2, ("heads",), int(SMOLLM2.params * 0.93))
    assert targets["heads"] in (3, 6)


def test_unreachable_budget_is_a_user_error():
    with pytest.raises(UserError, match="cannot reach"):
        experiments.solve_targets(SMOLLM2, ("heads",), int(SMOLLM2.params * 0.999))


@pytest.mark.slow
def test_experiments_end_to_end_on_a_tiny_model(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACT_RUNS_DB", str(tmp_path / "runs.sqlite"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                  for i in range(600)))
    # Embeddings dominate a tiny model: one layer is about half a percent of it.
    cfg = experiments.ExperimentConfig(model=str(tiny_checkpoint("qwen2")), out=str(tmp_path / "axis"),
                                       data=str(corpus), keep=0.995, tokens=64, seq_len=16, batch=2,
                                       samples=4, eval_tokens=64)
    arms = {"depth": ("layers",), "mlp": ("ffn",)}
    bar = []  # (fraction, message) as a progress bar receives them: one bar over every arm
    result = experiments.axis_ablation(cfg, arms=arms, on_event=relay(None, lambda f, m: bar.append((f, m))))
    fractions = [f for f, _ in bar]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == 1.0
    assert [m for f, m in bar if m.endswith(")")] == ["arm 1 of 3 (depth)", "arm 2 of 3 (mlp)",
                                                      "arm 3 of 3 (random init)"]
    assert all(m.startswith("arm ") for _, m in bar)
    assert any(m.startswith("arm 2 of 3 (mlp): step ") and 1 / 3 < f <= 2 / 3 for f, m in bar)
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"original", "depth", "mlp", "random init (width shape)"}
    assert rows["depth"]["layers"] < 4 and rows["mlp"]["ffn"] < 128 and rows["mlp"]["layers"] == 4
    assert all(r["loss_after"] is not None and r["loss_before"] > 0
               for k, r in rows.items() if k != "original")
    assert (tmp_path / "axis" / "results.md").read_text().count("\n|") >= 5
    recorded = runs.RunStore().list()
    assert len(recorded) == 3 and {r["status"] for r in recorded} == {"succeeded"}
    # each arm: the experiment's config (re-running it remakes the arm), a root parent, its size
    assert all(r["config"]["command"] == "experiment" and r["config"]["config"]["keep"] == 0.995
               and r["parent"] is None and r["params"] == r["metrics"]["params"] > 0 for r in recorded)

    cfg.out = str(tmp_path / "kd")
    kd = experiments.kd_vs_ce(cfg)
    assert [r["arm"] for r in kd["rows"]] == ["logit distillation (KL)", "cross-entropy only"]
    assert json.loads((tmp_path / "kd" / "results.json").read_text())["rows"][0]["tokens"] > 0


@pytest.mark.cli
def test_experiment_cli_rejects_bad_budgets(tiny_checkpoint, tmp_path):
    proc = run_cli("experiment", "axis-ablation", "--model", str(tiny_checkpoint("llama")),
                   "--out", str(tmp_path / "x"), "--keep", "1.5")
    assert proc.returncode == 2 and "--keep" in proc.stderr
