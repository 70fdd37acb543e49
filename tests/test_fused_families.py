"""What the shared suites cannot see of Phi-3, GPT-NeoX and OPT: fused layouts sliced exactly
like their unfused equivalents, the head residual inside fused q/k/v, configs that are refused."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from compact import arch as arch_mod
from compact import importance, prune
from compact.errors import UserError
from tests.helpers import calib, tiny_config


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _scores(model, seed=0):
    s = arch_mod.for_model(model).shape(model.config)
    g = torch.Generator().manual_seed(seed)
    per_layer = torch.rand(s.layers, s.hidden, generator=g) + 1
    return importance.Scores(torch.rand(s.layers, s.heads, generator=g) + 1,
                             torch.rand(s.layers, s.ffn, generator=g) + 1,
                             per_layer.sum(0) + 1, per_layer, {"bi": torch.rand(s.layers, generator=g)},
                             {"family": arch_mod.for_model(model).family})


def _as_llama(phi3):
    """The same function as a Llama: qkv_proj split into q, k, v and gate_up_proj into gate, up."""
    c = phi3.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      intermediate_size=c.intermediate_size, head_dim=c.hidden_size // c.num_attention_heads,
                      rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=False)
    q, kv = c.hidden_size, c.num_key_value_heads * cfg.head_dim
    sd = {}
    for key, t in phi3.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            base = key.removesuffix("qkv_proj.weight")
            for name, part in zip(("q", "k", "v"), t.split([q, kv, kv]), strict=True):
                sd[f"{base}{name}_proj.weight"] = part
        elif key.endswith("gate_up_proj.weight"):
            base = key.removesuffix("gate_up_proj.weight")
            sd[f"{base}gate_proj.weight"], sd[f"{base}up_proj.weight"] = t.chunk(2)
        else:
            sd[key] = t
    llama = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    llama.load_state_dict(sd, strict=True)
    return llama.eval()


def test_phi3_prunes_exactly_like_the_same_llama(make_model, tokenizer):
    """The fused "qkv" (with GQA) and "gate_up" axes, head residual included, select what the
    separate q/k/v and gate/up matrices of the equivalent Llama select."""
    phi3 = make_model("phi3")  # 4 heads in 2 KV groups
    llama = _as_llama(phi3)
    ids = calib(len(tokenizer), n=2)
    torch.testing.assert_close(_logits(llama, ids), _logits(phi3, ids), atol=1e-5, rtol=0)
    scores = _scores(phi3)
    targets = dict(layers=3, hidden=48, ffn=96, heads=2, head_residual="query")
    pruned_phi3 = prune.trim(phi3, scores, **targets)
    pruned_llama = prune.trim(llama, scores, **targets)
    assert pruned_phi3.config.model_type == "phi3"
    out = _logits(pruned_phi3, ids)
    torch.testing.assert_close(out, _logits(pruned_llama, ids), atol=1e-5, rtol=0)
    unfolded = prune.trim(phi3, scores, **{**targets, "head_residual": "off"})
    assert (out - _logits(unfolded, ids)).abs().max() > 1e-3  # the residual did act


def test_gpt_neox_head_residual_acts_on_the_query_of_each_interleaved_head(make_model):
    model = make_model("gpt_neox")  # 4 heads of 16, each [q | k | v] in turn
    scores = _scores(model)
    scores.heads[:] = torch.tensor([4.0, 3.0, 1.0, 2.0])  # keep 0, 1; pairs (0, 2) and (1, 3)
    plain = prune.trim(model, scores, heads=2)
    folded, plan = prune.trim_with_plan(model, scores, heads=2, head_residual="query")
    ch = torch.tensor(plan.channels)  # hidden follows heads (32 of 64 channels)
    d, qkv = 16, model.gpt_neox.layers[0].attention.query_key_value
    w, b = qkv.weight[:, ch], qkv.bias
    fw = folded.gpt_neox.layers[0].attention.query_key_value.weight
    fb = folded.gpt_neox.layers[0].attention.query_key_value.bias
    pw = plain.gpt_neox.layers[0].attention.query_key_value.weight

    def part(head, start, stop):  # rows start..stop of the head's [q | k | v]
        return slice(head * 3 * d + start, head * 3 * d + stop)

    for new, (i, j) in enumerate([(0, 2), (1, 3)]):
        q_new, q_i, q_j = part(new, 0, d), part(i, 0, d), part(j, 0, d)
        torch.testing.assert_close(fw[q_new], 2 * w[q_i] - w[q_j])
        torch.testing.assert_close(fb[q_new], 2 * b[q_i] - b[q_j])
        assert torch.equal(pw[q_new], w[q_i])
        assert torch.equal(fw[part(new, d, 3 * d)], w[part(i, d, 3 * d)])  # keys and values kept


def test_phi3_long_context_rope_keeps_hidden_per_head(tokenizer, tmp_path):
    cfg = tiny_config("phi3", len(tokenizer))
    cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                           "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    cfg.original_max_position_embeddings = 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    shape = arch_mod.for_model(model).shape(model.config)
    assert shape.head_dim_from_hidden
    # Two heads of a 64-wide model would need a head size of 32: refused before any work.
    for targets in (dict(heads=2), dict(hidden=60)):
        with pytest.raises(UserError, match="hidden // heads must stay 16"):
            prune.resolve_targets(shape, **targets)
    pruned = prune.trim(model, _scores(model), heads=2, hidden=32)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calib(len(tokenizer), n=1)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change,message", [
    (dict(word_embed_proj_dim=32), "projected"),
    (dict(do_layer_norm_before=False), "normalizes after each block"),
    (dict(layer_norm_elementwise_affine=False), "no weights"),
])
def test_opt_layouts_without_pruning_rules_are_refused(change, message):
    cfg = OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=128, pad_token_id=1, **change)
    shape = arch_mod.for_config(cfg).shape(cfg)  # the model card still reads the shape
    with pytest.raises(UserError, match=message):
        prune.resolve_targets(shape)  # before any slow pass
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UserError, match="opt-125m"):
        importance.estimate(model, calib(100, n=1))
    assert model(input_ids=calib(100, n=1)).logits.shape == (1, 24, 100)  # it runs, unpruned


def test_gpt_neox_sequential_residual_prunes_like_parallel(make_model, tokenizer, tmp_path):
    """use_parallel_residual=False (some NeoX checkpoints): the same slices, a plain reload."""
    model = copy.deepcopy(make_model("gpt_neox"))
    model.config.use_parallel_residual = False
    for block in model.gpt_neox.layers:
        block.use_parallel_residual = False
    pruned = prune.trim(model, _scores(model), layers=3, heads=3, ffn=96)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.use_parallel_residual is False and reloaded.config.hidden_size == 48
    ids = calib(len(tokenizer), n=1)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5, rtol=0)
