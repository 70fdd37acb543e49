"""What the shared suites cannot see of Gemma 2/3, OLMo 2 and SmolLM3: Gemma's embedding scale
and post-norms, OLMo 2's q/k norms over the whole projection, per-layer lists that follow the
kept layers. The shared contract (tests/test_prune.py, test_importance.py) runs them too."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from compact import arch as arch_mod
from compact import prune
from tests.helpers import calib, kill_channels

ATOL = 1e-5
GEMMAS = ["gemma2", "gemma3"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def scores_for(model, seed=0):
    from tests.test_prune import fake_scores

    return fake_scores(model, seed)


def scale_norm(norm, factor: float, eps_factor: float = 1.0) -> None:
    """Gemma's norm multiplies by (1 + weight): make that factor times larger."""
    with torch.no_grad():
        norm.weight.copy_((1 + norm.weight) * factor - 1)
    norm.eps *= eps_factor


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_ignores_a_uniform_scale_of_the_residual_stream(family, make_model, tokenizer):
    """Scaling the embedding and every block's contribution (its post-norms) by the same factor c
    scales the whole residual stream by c: the pre-norms and the final norm ignore it up to eps,
    and exactly with their eps times c^2. The embedding scale alone is not ignored."""
    model = make_model(family)
    a = arch_mod.for_model(model)
    ids = calib(len(tokenizer), n=2)
    c = 0.7
    scaled = copy.deepcopy(model)
    a.embed(scaled).embed_scale.mul_(c)
    for block in a.blocks(scaled):
        for norm in a.post_norms(block):
            scale_norm(norm, c)
    torch.testing.assert_close(logits(scaled, ids), logits(model, ids), atol=1e-4, rtol=0)
    for norm in [n for b in a.blocks(scaled) for n in (b.input_layernorm, b.pre_feedforward_layernorm)] + \
            [a.final_norm(scaled)]:
        norm.eps *= c ** 2
    torch.testing.assert_close(logits(scaled, ids), logits(model, ids), atol=ATOL, rtol=0)
    embed_only = copy.deepcopy(model)
    a.embed(embed_only).embed_scale.mul_(c)
    assert (logits(embed_only, ids) - logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_channel_pruning_rescales_the_post_norms(family, make_model, tokenizer):
    """Hidden 64 -> 48: the embedding scale becomes sqrt(48) (from the config), so each post-norm's
    (1 + w) is multiplied by a = sqrt(48/64); the tied embeddings stay the kept columns.
    Without that rescaling the pruned model leaves the kept-channel model (shown in
    test_prune.test_channel_pruning_equals_norms_over_kept_channels, which it passes)."""
    from tests.test_prune import with_kept_channel_norms

    model = make_model(family)
    pruned, plan = prune.trim_with_plan(model, scores_for(model, seed=3), hidden=48)
    kept = torch.tensor(plan.channels)
    a = 0.75 ** 0.5
    assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept])
    for old, new in zip(model.model.layers, pruned.model.layers, strict=True):
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            expect = (1 + getattr(old, name).weight[kept]) * a
            torch.testing.assert_close(1 + getattr(new, name).weight, expect)
        for name in ("input_layernorm", "pre_feedforward_layernorm"):
            assert torch.equal(getattr(new, name).weight, getattr(old, name).weight[kept])
    ids = calib(len(tokenizer), n=2)
    reference = with_kept_channel_norms(model, plan.channels)
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)
    unscaled = copy.deepcopy(pruned)
    for block in unscaled.model.layers:
        for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm):
            scale_norm(norm, 1 / a)
    assert (logits(unscaled, ids) - logits(reference, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_dead_channels(family, make_model, tokenizer):
    """Channels zero everywhere (embedding column, attention and MLP outputs): every norm's mean
    over h' channels instead of h (as test_prune.test_dead_channels_of_rmsnorm_models) and the
    post-norm rescaling together give exactly: the original with the embedding scale x a, the
    pre-norms and final norm x a, the post-norms x a^2 with eps x a^2 (a = sqrt(h'/h))."""
    model = make_model(family)
    dead = [0, 7, 30, 63]  # 60 channels stay: a multiple of the 4 heads, as Gemma's config requires
    scores = scores_for(model)
    kill_channels(model, scores, dead)
    pruned, plan = prune.trim_with_plan(model, scores, hidden=60)
    assert sorted(set(range(64)) - set(plan.channels)) == dead
    a = (60 / 64) ** 0.5
    reference = copy.deepcopy(model)
    reference.model.embed_tokens.embed_scale.mul_(a)
    for block in reference.model.layers:
        scale_norm(block.input_layernorm, a)
        scale_norm(block.pre_feedforward_layernorm, a)
        scale_norm(block.post_attention_layernorm, a * a, a * a)
        scale_norm(block.post_feedforward_layernorm, a * a, a * a)
    scale_norm(reference.model.norm, a)
    ids = calib(len(tokenizer), n=2)
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,dropped,expected", [
    ("gemma2", [1], ["sliding_attention", "sliding_attention", "full_attention"]),
    ("gemma3", [0, 3], ["full_attention", "sliding_attention"]),
])
def test_gemma_layer_types_follow_the_kept_layers(family, dropped, expected, make_model, tokenizer, tmp_path):
    model = make_model(family)  # sliding window 8, layers sliding / full in turn
    pruned = prune.trim(model, None, drop_layers=dropped)
    assert pruned.config.layer_types == expected
    assert pruned.config.head_dim == 16
    assert pruned.config.query_pre_attn_scalar == model.config.query_pre_attn_scalar
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.layer_types == expected
    ids = calib(len(tokenizer), n=1)
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=ATOL, rtol=0)


def test_gemma2_keeps_its_soft_capping(make_model, tokenizer):
    model = make_model("gemma2")
    pruned = prune.trim(model, scores_for(model), heads=2, ffn=96, hidden=48)
    assert pruned.config.final_logit_softcapping == 30.0 and pruned.config.attn_logit_softcapping == 50.0
    out = logits(pruned, calib(len(tokenizer), n=1))
    assert out.abs().max() < 30.0  # tanh-capped


def test_olmo2_q_norm_spans_the_kept_heads(make_model, tokenizer):
    """q_norm and k_norm are as wide as the projections: pruning heads slices them with the
    heads (GQA: every KV head stays, so k_norm stays whole)."""
    model = make_model("olmo2")  # 4 heads of 16 in 2 KV groups
    scores = scores_for(model)
    scores.heads[:] = torch.tensor([4.0, 3.0, 1.0, 2.0])  # keeps heads 0 and 3
    pruned = prune.trim(model, scores, heads=2)
    old, new = model.model.layers[0].self_attn, pruned.model.layers[0].self_attn
    assert torch.equal(new.q_norm.weight, torch.cat([old.q_norm.weight[:16], old.q_norm.weight[48:]]))
    assert torch.equal(new.k_norm.weight, old.k_norm.weight)
    folded = prune.trim(model, scores, heads=2, head_residual=True)  # folds queries, not their norm
    assert torch.equal(folded.model.layers[0].self_attn.q_norm.weight, new.q_norm.weight)
    assert not torch.equal(folded.model.layers[0].self_attn.q_proj.weight, new.q_proj.weight)
    kv = make_model("olmo2", kv_heads=4)  # multi-head: k_norm goes with its heads too
    scores = scores_for(kv)
    scores.heads[:] = torch.tensor([4.0, 1.0, 3.0, 2.0])  # keeps heads 0 and 2
    pruned = prune.trim(kv, scores, heads=2)
    old, new = kv.model.layers[0].self_attn, pruned.model.layers[0].self_attn
    assert torch.equal(new.k_norm.weight, torch.cat([old.k_norm.weight[:16], old.k_norm.weight[32:48]]))


def test_olmo2_pruning_heads_changes_the_q_norm_rms(make_model, tokenizer):
    """What is not exact: q_norm's mean runs over every head's queries, so removing a head whose
    output is silenced (o_proj columns zero) but whose queries are not still changes the other
    heads' queries. Exact (test_prune's shared suite): the same shape, and heads whose queries
    are zero too, against the original whose q_norm has weight x sqrt(H'/H), eps x H'/H."""
    from tests.test_prune import olmo2_silence_queries

    model = make_model("olmo2")
    scores = scores_for(model)
    dead = [1, 2]  # one per KV group
    d = 16
    for block in model.model.layers:
        with torch.no_grad():
            for h in dead:
                block.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    scores.heads[:, dead] = 0
    ids = calib(len(tokenizer), n=2)
    pruned = prune.trim(model, scores, heads=2)
    assert (logits(pruned, ids) - logits(model, ids)).abs().max() > 1e-4
    reference = copy.deepcopy(model)
    olmo2_silence_queries(model, reference, dead, 4)
    pruned = prune.trim(model, scores, heads=2)
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_smollm3_no_rope_layers_follow_the_kept_layers(make_model, tokenizer, tmp_path):
    model = make_model("smollm3")  # every 4th layer without rotary positions: [1, 1, 1, 0]
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    pruned = prune.trim(model, None, drop_layers=[0])
    assert pruned.config.no_rope_layers == [1, 1, 0]
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.no_rope_layers == [1, 1, 0]
    assert [layer.self_attn.use_rope for layer in reloaded.model.layers] == [1, 1, 0]
    ids = calib(len(tokenizer), n=1)
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_hidden_stays_a_multiple_of_heads(family, make_model):
    """GemmaConfig itself refuses other hidden sizes, so prune refuses them before any work."""
    from compact.errors import UserError

    model = make_model(family)
    shape = arch_mod.for_model(model).shape(model.config)
    with pytest.raises(UserError, match="must be a multiple of heads"):
        prune.resolve_targets(shape, hidden=62)
    assert prune.resolve_targets(shape, hidden=60)[0].hidden == 60
