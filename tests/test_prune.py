"""Trimming to a Shape: exact where nothing real is removed, standard checkpoints, bad targets."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from compact import arch as arch_mod
from compact import importance, models, prune
from compact.arch import weight_oi
from compact.errors import UserError
from tests.helpers import (
    FAMILIES,
    MHA_ONLY,
    calib,
    calib_text,
    kill_channels,
    make_identity,
    run_cli,
    zero_rows,
)

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fake_scores(model, seed: int = 0) -> importance.Scores:
    """Random positive scores of the model's shape, for tests that plant the ranking."""
    s = arch_mod.for_model(model).shape(model.config)
    g = torch.Generator().manual_seed(seed)

    def r(*size):
        return torch.rand(*size, generator=g) + 1

    per_layer = r(s.layers, s.hidden)
    return importance.Scores(r(s.layers, s.heads), r(s.layers, s.ffn), per_layer.sum(0) + r(s.hidden),
                             per_layer, {"bi": r(s.layers), "ppl": r(s.layers)},
                             {"family": arch_mod.for_model(model).family})


class KeptChannelsNorm(nn.Module):
    """A hidden-size norm whose statistics use only the kept channels; dropped channels read 0.

    This is what channel pruning computes: the original model with these norms (and the
    dropped channels of the embeddings zeroed, for OLMo 2's blocks that read the residual
    stream raw) must give the pruned model's logits for any channel choice (and fails for
    any wrongly sliced matrix). The norm is a copy of the original with its weights sliced, so
    every family's variant (LayerNorm, RMSNorm, Gemma's 1 + weight) computes its own way."""

    def __init__(self, norm: nn.Module, kept: torch.Tensor):
        super().__init__()
        self.kept = kept
        self.norm = copy.deepcopy(norm)
        for name, p in list(self.norm.named_parameters(recurse=False)):
            setattr(self.norm, name, nn.Parameter(p.detach()[kept].clone()))
        if isinstance(norm, nn.LayerNorm):
            self.norm.normalized_shape = (len(kept),)

    def forward(self, x):
        out = torch.zeros_like(x)
        out[..., self.kept] = self.norm(x[..., self.kept])
        return out


def norm_eps(norm: nn.Module) -> str:
    return "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"


def with_kept_channel_norms(model, kept: list[int]):
    ref = copy.deepcopy(model)
    a = arch_mod.for_model(ref)
    readers = {id(n) for b in a.blocks(ref) for n in a.block_norms(b)} - \
        {id(n) for b in a.blocks(ref) for n in a.post_norms(b)}
    readers.add(id(a.final_norm(ref)))
    targets = {id(n) for b in a.blocks(ref) for n in a.block_norms(b)} | {id(a.final_norm(ref))}
    embed = a.embed(ref)
    source_hidden = embed.weight.shape[1]
    kept_t = torch.tensor(kept)
    with torch.no_grad():
        embed.weight[:, sorted(set(range(source_hidden)) - set(kept))] = 0
    scale = (len(kept) / source_hidden) ** 0.5
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                new = KeptChannelsNorm(child, kept_t)
                if hasattr(embed, "embed_scale") and id(child) in readers:
                    # Gemma: the pruned residual stream is `scale` times this one (embedding scale
                    # sqrt(hidden), post-norms scaled to match); a norm reading a stream scaled by
                    # `scale` computes exactly what it computes here with eps / scale^2.
                    setattr(new.norm, norm_eps(child), getattr(child, norm_eps(child)) / scale ** 2)
                setattr(parent, name, new)
    return ref


def olmo2_silence_queries(model, reference, dead_heads: list[int], heads: int) -> None:
    """OLMo 2's q_norm runs over every head's queries: zero the dead heads' queries in model, and
    give reference (a copy of it) the q_norm of the kept heads alone (weight x sqrt(H'/H), eps x
    H'/H, as for the residual channels of test_dead_channels_of_rmsnorm_models)."""
    a = arch_mod.for_model(model)
    kept = (heads - len(dead_heads)) / heads
    d = a.shape(model.config).head_dim
    for block, ref_block in zip(a.blocks(model), a.blocks(reference), strict=True):
        for h in dead_heads:
            zero_rows(block.self_attn.q_proj, slice(h * d, (h + 1) * d))
            zero_rows(ref_block.self_attn.q_proj, slice(h * d, (h + 1) * d))
        with torch.no_grad():
            ref_block.self_attn.q_norm.weight.mul_(kept ** 0.5)
        ref_block.self_attn.q_norm.variance_epsilon *= kept


@pytest.mark.parametrize("family", FAMILIES)
def test_same_shape_leaves_logits_unchanged(family, make_model, tokenizer):
    model = make_model(family)
    ids = calib(len(tokenizer), n=2)
    s = arch_mod.for_model(model).shape(model.config)
    for targets in ({}, dict(layers=s.layers, hidden=s.hidden, ffn=s.ffn, heads=s.heads)):
        pruned = prune.trim(model, fake_scores(model), **targets)
        assert torch.equal(logits(pruned, ids), logits(model, ids))
    assert pruned is not model


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_heads_and_neurons_prune_exactly(family, make_model, tokenizer):
    model = make_model(family)
    a = arch_mod.for_model(model)
    s = a.shape(model.config)
    scores = fake_scores(model)
    # GQA (2 groups of 2): one dead query head per group. GPT-2 (MHA): one dead head.
    dead_heads = [1] if s.kv_heads == s.heads else [1, 2]
    dead_neurons = [3, 40, 41, 100]
    for i, block in enumerate(a.blocks(model)):
        for h in dead_heads:  # the head's columns of the output projection
            with torch.no_grad():
                weight_oi(a.attn_out(block))[:, h * s.head_dim:(h + 1) * s.head_dim] = 0
            scores.heads[i, h] = 0
        with torch.no_grad():
            weight_oi(a.mlp_out(block))[:, dead_neurons] = 0
        scores.neurons[i, dead_neurons] = 0
    ids = calib(len(tokenizer), n=2)
    heads = s.heads - len(dead_heads)
    reference = model
    if s.qk_norm_full:  # OLMo 2 (test_olmo2_pruning_heads_changes_the_q_norm_rms shows why)
        reference = copy.deepcopy(model)
        olmo2_silence_queries(model, reference, dead_heads, s.heads)
    pruned, plan = prune.trim_with_plan(model, scores, heads=heads, ffn=s.ffn - len(dead_neurons))
    assert all(sorted(set(range(s.heads)) - set(k)) == dead_heads for k in plan.heads)
    if a.hidden_tied_to_heads:  # hidden = heads x head_dim: channels go too
        assert plan.shape.hidden == heads * s.head_dim
        reference = with_kept_channel_norms(model, plan.channels)
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_pruning_equals_norms_over_kept_channels(family, make_model, tokenizer):
    model = make_model(family)
    tied_to_heads = arch_mod.for_model(model).hidden_tied_to_heads
    s = arch_mod.for_model(model).shape(model.config)
    hidden = 48
    heads = hidden // s.head_dim if tied_to_heads else None
    pruned, plan = prune.trim_with_plan(model, fake_scores(model, seed=3), hidden=hidden, heads=heads)
    assert len(plan.channels) == hidden and plan.channels != list(range(hidden))
    ids = calib(len(tokenizer), n=2)
    reference = with_kept_channel_norms(model, plan.channels)
    if tied_to_heads:  # a head went with the channels: silence it in the reference
        ra = arch_mod.for_model(reference)
        for block, kept in zip(ra.blocks(reference), plan.heads, strict=True):
            for h in set(range(s.heads)) - set(kept):
                with torch.no_grad():
                    weight_oi(ra.attn_out(block))[:, h * s.head_dim:(h + 1) * s.head_dim] = 0
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)
    # A wrong choice of channels is caught by the same comparison.
    wrong = with_kept_channel_norms(model, sorted(set(range(s.hidden)) - {plan.channels[0]})[:hidden])
    assert (logits(pruned, ids) - logits(wrong, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3"])
def test_dead_channels_of_rmsnorm_models(family, make_model, tokenizer):
    """Channels that are zero everywhere in the residual stream (embedding column and every
    writer zero) carry nothing, yet RMSNorm divides by the hidden size: after pruning, mean(x^2)
    runs over h' channels instead of h. Exactly: the pruned model equals the original with every
    residual norm's weight scaled by sqrt(h'/h) and its eps by h'/h."""
    model = make_model(family)
    dead = [0, 7, 30, 63]  # 60 channels stay: a multiple of the 4 heads, as Llama requires
    scores = fake_scores(model)
    kill_channels(model, scores, dead)
    h, h2 = 64, 64 - len(dead)
    pruned, plan = prune.trim_with_plan(model, scores, hidden=h2)
    assert sorted(set(range(h)) - set(plan.channels)) == dead
    reference = copy.deepcopy(model)
    ra = arch_mod.for_model(reference)
    with torch.no_grad():
        for norm in [n for b in ra.blocks(reference) for n in ra.block_norms(b)] + [ra.final_norm(reference)]:
            norm.weight.mul_((h2 / h) ** 0.5)
            norm.variance_epsilon *= h2 / h
    ids = calib(len(tokenizer), n=2)
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)
    assert (logits(pruned, ids) - logits(model, ids)).abs().max() > 1e-4  # the 1/h effect is real


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_block_dropped_by_bi_and_by_list(family, make_model, tokenizer):
    model = make_model(family)
    make_identity(model, 2)
    ids = calib(len(tokenizer), n=2)
    scores = importance.estimate(model, ids, batch_size=2)
    by_bi, plan = prune.trim_with_plan(model, scores, layers=3)
    assert plan.dropped_layers == [2]
    torch.testing.assert_close(logits(by_bi, ids), logits(model, ids), atol=ATOL, rtol=0)
    by_list = prune.trim(model, None, drop_layers=[2])
    torch.testing.assert_close(logits(by_list, ids), logits(model, ids), atol=ATOL, rtol=0)
    # Layers are renumbered, so the KV cache of generate() still works.
    out = by_list.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_reloads_with_same_logits_and_params(family, make_model, tokenizer, tmp_path):
    model = make_model(family)
    ids = calib(len(tokenizer), n=3)
    scores = importance.estimate(model, ids, batch_size=3)
    targets = dict(layers=3, ffn=96, heads=2, hidden=32) if family in MHA_ONLY else \
        dict(layers=3, ffn=96, heads=2, hidden=40)
    loaded = models.Loaded(model, tokenizer, arch_mod.for_model(model), "tiny")
    summary = prune.prune_and_save(loaded, scores, tmp_path / "out", **targets)
    expected = arch_mod.for_model(model).shape(model.config).with_targets(**targets)
    assert summary["params"] == expected.params
    assert {k: summary["shape"][k] for k in targets} == targets
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert sum(p.numel() for p in reloaded.parameters()) == expected.params
    assert arch_mod.for_model(reloaded).shape(reloaded.config) == expected
    in_memory = prune.trim(model, scores, **targets)
    torch.testing.assert_close(logits(reloaded, ids), logits(in_memory, ids), atol=ATOL, rtol=0)
    meta = json.loads((tmp_path / "out" / "compact.json").read_text())
    assert meta["source"] == "tiny" and meta["shape"] == expected.to_dict()
    assert meta["targets"] == targets and meta["importance"]["batch_agg"] == "l2"
    if expected.tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_gqa_keeps_every_group(make_model):
    model = make_model("llama")  # 4 heads in 2 KV groups: {0, 1}, {2, 3}
    scores = fake_scores(model)
    scores.heads[:] = torch.tensor([10.0, 9.0, 1.0, 2.0])
    plan = prune.plan(scores, arch_mod.for_model(model).shape(model.config), heads=2)
    assert plan.heads == [[0, 3]] * 4 and plan.kv_heads == [[0, 1]] * 4
    assert plan.shape.kv_heads == 2 and plan.shape.heads == 2


def test_qwen2_sliding_layers_stay_consistent(make_model, tokenizer, tmp_path):
    model = make_model("qwen2")
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    model.config.max_window_layers = 2
    model.config.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned = prune.trim(model, None, drop_layers=[0])
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.layer_types == pruned.config.layer_types
    ids = calib(len(tokenizer), n=1)
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["query", "output"])
def test_head_residual_changes_exactly_the_chosen_rows(make_model, mode):
    """Kept head i becomes head_i + (head_i - head_j) in its query rows (query) or its
    output-projection columns (output), in every layer; every other weight is the plain prune's."""
    model = make_model("llama")  # 4 query heads of 16 dims in 2 KV groups
    scores = fake_scores(model)
    scores.heads[:] = torch.tensor([4.0, 3.0, 1.0, 2.0])  # group 0 keeps 0 (drops 1), group 1 keeps 3
    plain = prune.trim(model, scores, heads=2).state_dict()
    folded = prune.trim(model, scores, heads=2, head_residual=mode).state_dict()
    source, d, changed = model.state_dict(), 16, set()
    for layer in range(4):
        if mode == "query":
            key = f"model.layers.{layer}.self_attn.q_proj.weight"
            w, new = source[key], folded[key]
            assert torch.equal(new[:d], 2 * w[:d] - w[d:2 * d])  # head 0 <- 2 head 0 - head 1
            assert torch.equal(new[d:], 2 * w[3 * d:] - w[2 * d:3 * d])  # head 3 <- 2 head 3 - head 2
        else:
            key = f"model.layers.{layer}.self_attn.o_proj.weight"
            w, new = source[key], folded[key]
            assert torch.equal(new[:, :d], 2 * w[:, :d] - w[:, d:2 * d])
            assert torch.equal(new[:, d:], 2 * w[:, 3 * d:] - w[:, 2 * d:3 * d])
        changed.add(key)
    assert folded.keys() == plain.keys()
    for key in plain.keys() - changed:
        assert torch.equal(folded[key], plain[key]), key
    with pytest.raises(UserError, match="unknown head residual"):
        prune.trim(model, scores, heads=2, head_residual="both")


def _source(family="llama"):
    from compact.shapes import Shape
    if family == "gpt2":
        return Shape(4, 64, 128, 4, 4, 16, 1000, positions=256, gated_mlp=False)
    return Shape(4, 64, 128, 4, 2, 16, 1000)


@pytest.mark.parametrize("targets,message", [
    (dict(ffn=256), "larger than the source"),
    (dict(heads=3), "multiple of the 2 KV heads"),
    (dict(hidden=0), "must be positive"),
    (dict(layers=-1), "must be positive"),
    (dict(drop_layers=[4]), "unknown layer index 4"),
    (dict(drop_layers=[1, 1]), "repeats"),
    (dict(drop_layers=[1], layers=2), "leaves 3, not 2"),
    (dict(layers=2, depth_metric="ppl"), "perplexity"),
    (dict(layers=2, depth_metric="cos"), "unknown depth metric"),
])
def test_bad_targets_are_user_errors(targets, message):
    model_free = importance.Scores(torch.ones(4, 4), torch.ones(4, 128), torch.ones(64),
                                   torch.ones(4, 64), {"bi": torch.ones(4)}, {"family": "llama"})
    with pytest.raises(UserError, match=message):
        prune.plan(model_free, _source(), **targets)


def test_gpt2_hidden_follows_heads():
    s = _source("gpt2")
    assert prune.resolve_targets(s, heads=3, hidden_tied_to_heads=True)[0].hidden == 48
    assert prune.resolve_targets(s, hidden=32, hidden_tied_to_heads=True)[0].heads == 2
    for bad, message in ((dict(hidden=40), "multiple of 16"), (dict(heads=3, hidden=32), "need hidden 48")):
        with pytest.raises(UserError, match=message):
            prune.resolve_targets(s, hidden_tied_to_heads=True, **bad)


def test_scores_of_another_model_are_refused(make_model):
    scores = fake_scores(make_model("llama", ffn=96))
    with pytest.raises(UserError, match="another shape"):
        prune.plan(scores, _source(), ffn=64)
    with pytest.raises(UserError, match="needs importance scores"):
        prune.plan(None, _source(), ffn=64)


@pytest.mark.cli
@pytest.mark.slow
def test_cli_importance_then_prune(tiny_checkpoint, tmp_path):
    ckpt = str(tiny_checkpoint("qwen2"))
    scores_file = tmp_path / "scores.safetensors"
    proc = run_cli("importance", "--model", ckpt, "--data", str(calib_text(tmp_path)), "--samples", "4",
                   "--seq-len", "32", "--depth-ppl", "--out", str(scores_file))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["samples"] == 4 and out["depth_ppl"] is True
    assert importance.Scores.load(scores_file).layers_ppl.shape == (4,)
    proc = run_cli("prune", "--model", ckpt, "--importance", str(scores_file), "--out",
                   str(tmp_path / "p"), "--layers", "3", "--depth-metric", "ppl", "--ffn", "64",
                   "--heads", "2", "--hidden", "48")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == {"layers": 3, "hidden": 48, "ffn": 64, "heads": 2, "kv_heads": 2, "head_dim": 16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert sum(p.numel() for p in reloaded.parameters()) == out["params"]


@pytest.mark.parametrize("args,message", [
    (["--heads", "3"], "multiple of the 2 KV heads"),
    (["--ffn", "999"], "larger than the source"),
    (["--hidden", "0"], "must be positive"),
    (["--layers", "-2"], "must be positive"),
    (["--drop-layers", "2,9"], "unknown layer index 9"),
])
def test_cli_bad_targets_exit_2(args, message, tiny_checkpoint, tmp_path, capsys):
    # In-process through cli.main (the same code path as the subprocess, minus ~10 s of imports
    # per case); test_cli_importance_then_prune covers the real subprocess.
    from compact import cli

    code = cli.main(["prune", "--model", str(tiny_checkpoint("llama")), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_default_model_pruned_reloads_and_generates(tmp_path):
    loaded = models.load("default")
    from compact import data
    blocks = data.blocks(str(calib_text(tmp_path)), loaded.tokenizer, "calibration", 4, 64)
    scores = importance.estimate(loaded.model, blocks, batch_size=4)
    summary = prune.prune_and_save(loaded, scores, tmp_path / "small", heads=6, ffn=1024)
    expected = loaded.shape.with_targets(heads=6, ffn=1024)
    assert summary["params"] == expected.params < summary["source_params"]
    reloaded = models.load(str(tmp_path / "small"))
    assert reloaded.shape == expected and reloaded.info()["params"] == expected.params
    assert reloaded.model.config.head_dim == 64 and reloaded.model.config.num_key_value_heads == 3
    from compact import evaluate
    out = evaluate.generate(reloaded.model, reloaded.tokenizer, "The capital of France is", 5)
    assert out["new_tokens"] == 5


def test_multi_head_attention_prunes_kv_with_heads(make_model, tokenizer):
    # Mistral, as 3 heads over hidden 64 is a shape transformers' LlamaConfig would refuse.
    model = make_model("mistral", kv_heads=4)  # kv_heads == heads: every head owns its K and V
    scores = fake_scores(model)
    block = model.model.layers[1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:48] = 0  # head 2 writes nothing
    scores.heads[:, 2] = 0
    pruned = prune.trim(model, scores, heads=3)
    assert pruned.config.num_key_value_heads == 3 and pruned.config.num_attention_heads == 3
    assert torch.equal(pruned.model.layers[1].self_attn.k_proj.weight,
                       torch.cat([block.self_attn.k_proj.weight[:32], block.self_attn.k_proj.weight[48:]]))
    ids = calib(len(tokenizer), n=2)
    torch.testing.assert_close(logits(pruned, ids), logits(model, ids), atol=ATOL, rtol=0)


def test_llama_hidden_not_a_multiple_of_heads_is_saved_as_mistral(make_model, tokenizer, tmp_path):
    """transformers' LlamaConfig refuses hidden % heads != 0 (even with head_dim given);
    MistralForCausalLM computes a bias-free Llama's function with the same weight names and no
    such check, so prune saves those shapes as Mistral, with a note in compact.json."""
    from compact.search import candidates
    from compact.shapes import shape_error

    model = make_model("llama")  # tied embeddings, 4 heads in 2 KV groups
    ids = calib(len(tokenizer), n=2)
    same = AutoModelForCausalLM.from_config(arch_mod.as_mistral(model.config), dtype=torch.float32)
    same.load_state_dict(model.state_dict())
    assert type(same).__name__ == "MistralForCausalLM" and same.config.sliding_window is None
    assert torch.equal(logits(same.eval(), ids), logits(model, ids))

    a = arch_mod.for_model(model)
    shape = a.shape(model.config)
    targets = dict(hidden=54, ffn=96)  # 54 is not a multiple of 4 heads
    scores = fake_scores(model, seed=3)
    loaded = models.Loaded(model, tokenizer, a, "tiny")
    summary = prune.prune_and_save(loaded, scores, tmp_path / "out", **targets)
    assert summary["saved_as"] == "mistral" and "LlamaConfig refuses hidden 54" in summary["note"]
    meta = json.loads((tmp_path / "out" / "compact.json").read_text())
    assert meta["note"] == summary["note"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert reloaded.config.model_type == "mistral" and reloaded.config.hidden_size == 54
    expected = shape.with_targets(**targets)
    assert arch_mod.for_model(reloaded).shape(reloaded.config) == expected
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params"] == expected.params
    plan = prune.plan(scores, shape, **targets, family="llama")
    reference = with_kept_channel_norms(model, plan.channels)  # the Llama itself, channels kept
    with torch.no_grad():
        for block, kept in zip(reference.model.layers, plan.neurons, strict=True):
            block.mlp.down_proj.weight[:, sorted(set(range(128)) - set(kept))] = 0
    torch.testing.assert_close(logits(reloaded, ids), logits(reference, ids), atol=ATOL, rtol=0)
    # A multiple of the heads stays a Llama, and search proposes the other shapes too.
    assert prune.trim(model, scores, hidden=48).config.model_type == "llama"
    assert any(s.hidden % s.heads for s in candidates(shape, int(shape.params * 0.8), 0.2, hidden_step=2))
    # Mistral has no biases: a Llama with them keeps the refusal.
    biased = copy.deepcopy(model.config)
    biased.attention_bias = True
    with pytest.raises(UserError, match="multiple of heads"):
        prune.resolve_targets(a.shape(biased), hidden=54)
    qwen = arch_mod.for_model(make_model("qwen2")).shape(make_model("qwen2").config)
    assert shape_error(qwen.with_targets(hidden=54)) is None  # Qwen2's config allows it


def test_pruned_checkpoint_keeps_the_source_dtype(make_model, tokenizer, tmp_path):
    """A bfloat16 source loads in float32 on the CPU, and its pruned copy is saved in bfloat16:
    compared in that dtype, the reloaded checkpoint gives the pruned model's logits exactly."""
    src = models.save(make_model("llama"), tokenizer, tmp_path / "src", {}, dtype=torch.bfloat16)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = models.load(str(src), device="cpu")
    assert loaded.source_dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.float32
    scores = fake_scores(loaded.model)
    targets = dict(layers=3, ffn=96, heads=2)
    prune.prune_and_save(loaded, scores, tmp_path / "out", **targets)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    in_memory = prune.trim(loaded.model, scores, **targets).to(torch.bfloat16)
    reloaded = models.load(str(tmp_path / "out"), device="cpu", dtype="bfloat16")
    assert reloaded.source_dtype == torch.bfloat16
    ids = calib(len(tokenizer), n=2)
    assert torch.equal(logits(reloaded.model, ids), logits(in_memory, ids))


def test_search_grid_of_the_default_model_gains_the_shapes_saved_as_mistral():
    """SmolLM2-135M's shape (from its config; no weights): at the default steps (hidden 64, FFN 64,
    every layer count and head count down to half), the grid shapes that can be saved."""
    import dataclasses

    from transformers import LlamaConfig

    from compact.search import candidates

    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    shape = arch_mod.for_config(config).shape(config)
    assert shape.params == 134_515_008 and not shape.hidden_divisible_by_heads
    llama_only = dataclasses.replace(shape, hidden_divisible_by_heads=True)  # the rule before
    budget = int(shape.params * 0.7)
    found, before = candidates(shape, budget), candidates(llama_only, budget)
    assert (len(found), len(before)) == (153, 72)
    sizes = {(s.layers, s.hidden, s.ffn, s.heads) for s in found}
    assert {(s.layers, s.hidden, s.ffn, s.heads) for s in before} <= sizes
    assert sum(s.hidden % s.heads != 0 for s in found) == 153 - 72
    assert any(hidden == 512 and heads == 9 for _, hidden, _, heads in sizes)
