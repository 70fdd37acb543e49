"""compact.divergence: where a compressed model parts from its original."""

import copy

import pytest
import torch
import torch.nn.functional as F

from compact.divergence import divergence, shade
from compact.errors import UserError
from tests.helpers import tiny_model

PROMPT = torch.tensor([5, 17, 42, 99])


def greedy(model, new: int = 24) -> torch.Tensor:
    return model.generate(input_ids=PROMPT[None], max_new_tokens=new, do_sample=False, pad_token_id=0)[0]


def perturbed(model, scale: float):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_a_model_does_not_part_from_itself():
    model = tiny_model("llama", 512)
    result = divergence(model, copy.deepcopy(model), greedy(model), len(PROMPT))
    assert result["kl"] == [0.0] * 24 and result["rank"] == [0] * 24
    assert result["first_difference"] is None and result["top1_agreement"] == 1.0


def test_first_difference_is_where_the_greedy_outputs_part():
    original = tiny_model("llama", 512)
    text = greedy(original)
    # A small perturbation that keeps the first tokens and changes a later one.
    compressed = perturbed(original, 0.003)
    own = greedy(compressed)
    parted = int((text[len(PROMPT):] != own[len(PROMPT):]).nonzero()[0])
    result = divergence(original, compressed, text, len(PROMPT))
    assert 0 < parted < 24 and result["first_difference"] == parted
    assert result["rank"][:parted] == [0] * parted and result["rank"][parted] > 0


def test_kl_and_rank_are_those_of_the_two_distributions():
    original, compressed = tiny_model("llama", 512), perturbed(tiny_model("llama", 512), 0.05)
    text = greedy(original, 6)
    result = divergence(original, compressed, text, len(PROMPT))
    with torch.no_grad():
        p = F.log_softmax(original(input_ids=text[None]).logits[0], -1)
        q = F.log_softmax(compressed(input_ids=text[None]).logits[0], -1)
    at = len(PROMPT) + 2  # the token at continuation index 2, predicted from position at - 1
    kl = float((p[at - 1].exp() * (p[at - 1] - q[at - 1])).sum())
    assert result["kl"][2] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert result["rank"][2] == int((q[at - 1] > q[at - 1, text[at]]).sum())
    assert result["mean_kl"] == pytest.approx(sum(result["kl"]) / 6)


def test_different_vocabularies_are_refused():
    with pytest.raises(UserError, match="different vocabularies"):
        divergence(tiny_model("llama", 512), tiny_model("llama", 600), list(range(8)), 4)
    with pytest.raises(UserError, match="continuation"):
        divergence(tiny_model("llama", 512), tiny_model("llama", 512), [1, 2, 3], 3)


def test_shade_maps_kl_into_the_unit_interval():
    assert shade(0.0) == 0.0 and shade(float(torch.log(torch.tensor(2.0)))) == pytest.approx(0.5)
    assert 0.99 < shade(10.0) < 1.0
