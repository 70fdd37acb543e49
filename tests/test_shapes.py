"""Shape arithmetic (compact/shapes.py): parameter counts, targets, validity, the allowed values."""

from __future__ import annotations

import pytest

from compact import arch as arch_mod
from compact import shapes
from compact.shapes import Shape, shape_error
from tests.helpers import FAMILIES

GQA = Shape(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=1000)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_params_count_every_weight_of_the_real_model(family, kv_heads, make_model):
    model = make_model(family, kv_heads=kv_heads)
    s = arch_mod.for_model(model).shape(model.config)
    assert s.params == shapes.count_params(s) == sum(p.numel() for p in model.parameters())
    assert shapes.memory_bytes(s) == 2 * s.params and shapes.memory_bytes(s, 4) == 4 * s.params


def test_with_targets_keeps_unnamed_axes_and_kv_groups():
    assert GQA.with_targets() == GQA
    smaller = GQA.with_targets(layers=3, ffn=64, heads=2)
    assert (smaller.layers, smaller.hidden, smaller.ffn, smaller.heads) == (3, 64, 64, 2)
    assert smaller.kv_heads == 2  # grouped-query attention keeps its KV groups
    mha = Shape(4, 64, 128, 4, 4, 16, 1000, gated_mlp=False, positions=256)
    assert mha.with_targets(heads=3).kv_heads == 3  # multi-head: each head is its own group
    assert smaller.to_dict()["ffn"] == 64 and smaller.params < GQA.params


def test_shape_error_names_the_problem():
    assert shape_error(GQA) is None
    assert shape_error(GQA.with_targets(layers=0)) == "every axis must be positive"
    assert "multiple of the 2 KV heads" in shape_error(GQA.with_targets(heads=3))
    llama = Shape(4, 64, 128, 4, 2, 16, 1000, hidden_divisible_by_heads=True)
    assert "multiple of heads" in shape_error(llama.with_targets(hidden=62))
    assert shape_error(GQA.with_targets(hidden=62)) is None


def test_valid_heads_follow_the_kv_groups():
    assert shapes.valid_values(GQA)["heads"] == [2, 4]
    mha = Shape(4, 64, 128, 4, 4, 16, 1000)
    assert shapes.valid_values(mha)["heads"] == [1, 2, 3, 4]
    assert shapes.valid_values(GQA)["layers"] == [1, 2, 3, 4]


def test_flops_per_token_grow_with_context_by_the_attention_term():
    short, long = shapes.flops_per_token(GQA, 128), shapes.flops_per_token(GQA, 1024)
    assert long - short == 2 * 2 * GQA.layers * GQA.heads * GQA.head_dim * (1024 - 128)
    # every parameter counts as one multiply-add, the tied LM head included
    assert short == 2 * GQA.params + 2 * 2 * GQA.layers * GQA.heads * GQA.head_dim * 128
