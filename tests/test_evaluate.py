"""compact.evaluate: the speed measurement (structure, not timings: those live in bench/)."""

import pytest
import torch

from compact import evaluate
from tests.helpers import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_speed_measures_prefill_and_decode_apart_and_leaves_the_model_as_it_was(family, make_model):
    model = make_model(family).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate.speed(model, prompt_tokens=16, decode_tokens=4, budget_s=0)
    assert result["prompt_tokens"] == 16 and result["decode_tokens"] == 4
    assert result["prefill_samples"] == 3 and result["decode_samples"] == 4  # the minimum with no budget
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert model.training  # restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_speed_prompt_fits_the_context(make_model):
    model = make_model("gpt2")  # 256 positions in the tiny config
    result = evaluate.speed(model, prompt_tokens=10_000, decode_tokens=8, budget_s=0)
    assert result["prompt_tokens"] + result["decode_tokens"] < evaluate.context_length(model)
