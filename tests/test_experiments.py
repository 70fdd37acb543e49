import json

import pytest

from compact import experiments, runs
from compact.errors import UserError
from compact.shapes import Shape, shape_error
from tests.conftest import run_cli

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
