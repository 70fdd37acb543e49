"""Families compact has no adapter for: Falcon (fused query_key_value, parallel attention, blocks
under transformer.h) and StableLM (separate q/k/v, gated MLP, LayerNorms with bias, partial
rotary, blocks under model.layers). Everything but Minitron works on them; Minitron refuses early
with one clear line; a non-Llama GGUF loads exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FalconConfig, GraniteConfig, StableLmConfig

from compact import arch_generic, distill, evaluate, importance, models, prune, search, sparsify, sparsity
from compact.errors import UserError
from tests.helpers import calib_text, randomize_norms, run_cli

FAMILIES = ("falcon", "stablelm")


def _config(family: str, vocab: int):
    if family == "falcon":  # the classic layout: one LayerNorm, attention and MLP in parallel
        return FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=256, tie_word_embeddings=True)
    return StableLmConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                          tie_word_embeddings=False)


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_norms(model)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny checkpoint per family: (folder, the model saved)."""
    made = {}

    def make(family: str):
        if family not in made:
            out = tmp_path_factory.mktemp(f"any-{family}")
            model = _model(_config(family, len(tokenizer)))
            models.save(model, tokenizer, out, {"source": "test"})
            made[family] = (out, model)
        return made[family]

    return make


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return str(calib_text(tmp_path_factory.mktemp("any-text")))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_generates_and_evaluates(family, checkpoint, tokenizer):
    folder, source = checkpoint(family)
    loaded = models.load(str(folder), device="cpu")
    assert not loaded.arch.minitron and loaded.arch.family == family
    ids = _ids(len(tokenizer))
    assert torch.equal(_logits(loaded.model, ids), _logits(source, ids))
    info = loaded.info()
    assert info["family"] == family and info["adapter"] is False
    assert info["params"] == sum(p.numel() for p in source.parameters()) == loaded.params
    assert info["supports"]["minitron"].startswith(f"no (no adapter for {family}; supported: ")
    assert "llama" in info["supports"]["minitron"]
    out = evaluate.generate(loaded.model, loaded.tokenizer, "The capital of France is", 6)
    assert out["new_tokens"] == 6
    # perplexity: exp of the mean next-token cross-entropy of plain transformers
    ppl = evaluate.perplexity(loaded.model, ids, batch_size=2)
    logits = _logits(source, ids)
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert abs(ppl["ppl"] - float(ce.exp())) < 1e-3 * ppl["ppl"]


def test_generic_blocks_and_targets_are_every_linear_in_the_blocks(checkpoint, tokenizer):
    """The blocks are found from the model; the LM head and the embeddings are never targets."""
    for family, prefix in (("falcon", "transformer.h."), ("stablelm", "model.layers.")):
        model = checkpoint(family)[1]
        blocks = arch_generic.adapter(model.config).blocks(model)
        assert len(blocks) == 3
        expected = {name for name, mod in model.named_modules()
                    if isinstance(mod, nn.Linear) and name.startswith(prefix)}
        targets = set(sparsity.target_linears(model))
        assert targets == expected and len(targets) == (4 if family == "falcon" else 7) * 3
        assert "lm_head" not in targets


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(sparsity.ONE_SHOT))
def test_one_shot_two_four_reloads_in_plain_transformers(family, method, checkpoint, tokenizer, text,
                                                         tmp_path):
    folder, source = checkpoint(family)
    cfg = sparsify.SparsifyConfig(model=str(folder), out=str(tmp_path / "sparse"), method=method, data=text,
                                  samples=4, seq_len=32, eval_tokens=64, device="cpu")
    result = sparsify.run(cfg)
    assert result["pattern_ok"] and result["layers_pruned"] == len(sparsity.target_linears(source))
    plain = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32).eval()
    for name, mod in sparsity.target_linears(plain).items():  # exactly 2 of every 4 stay
        groups = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
    assert torch.equal(plain.get_input_embeddings().weight, source.get_input_embeddings().weight)
    assert torch.equal(plain.get_output_embeddings().weight, source.get_output_embeddings().weight)
    ids = _ids(len(tokenizer))
    assert torch.equal(_logits(plain, ids), _logits(models.load(cfg.out, device="cpu").model, ids))
    assert not torch.equal(_logits(plain, ids), _logits(source, ids))


def test_ast_trains_a_few_steps(checkpoint, text, tmp_path):
    folder, _ = checkpoint("falcon")
    cfg = sparsify.SparsifyConfig(model=str(folder), out=str(tmp_path / "ast"), method="ast", data=text,
                                  tokens=4 * 2 * 32, seq_len=32, batch=2, lr=1e-3, warmup_steps=1,
                                  mask_interval=2, slorb_k=0, checkpoint_every=0, eval_tokens=64,
                                  device="cpu")
    result = sparsify.run(cfg)
    assert result["training"]["steps"] == 4 and result["pattern_ok"]
    assert result["ppl_after"] == result["ppl_after"]  # a number, not NaN


def _kl(teacher, student, ids) -> float:
    t, s = _logits(teacher, ids).log_softmax(-1), _logits(student, ids).log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distills_a_few_steps_with_the_state_loss(checkpoint, text, tmp_path):
    """Falcon: no norm after attention (parallel branches), so the paired states are the blocks'
    inputs, found without an adapter."""
    folder, source = checkpoint("falcon")
    teacher = models.load(str(folder), device="cpu")
    student = models.Loaded(copy.deepcopy(source), teacher.tokenizer, teacher.arch, "student")
    with torch.no_grad():  # a student that differs from its teacher
        for p in student.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = _ids(teacher.shape.vocab)
    kl_before = _kl(teacher.model, student.model, ids)
    cfg = distill.DistillConfig(teacher=str(folder), student="student", data=text, out=str(tmp_path / "d"),
                                tokens=3 * 2 * 32, seq_len=32, batch=2, lr=1e-2, warmup_steps=1,
                                hidden_weight=1.0, eval_tokens=0, checkpoint_every=0)
    result = distill.run(cfg, teacher=teacher, student=student)
    assert result["status"] == "done" and result["steps"] == 3
    assert result["hidden"] > 0  # the block-input states were paired and compared
    assert _kl(teacher.model, student.model, ids) < kl_before  # the student moved toward its teacher
    reloaded = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded, ids), _logits(student.model, ids))


def test_distillation_refuses_logits_changed_after_the_head(tokenizer, tmp_path):
    """Granite divides its logits after the LM head: the fused losses would train a wrong target."""
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, logits_scaling=4.0)
    loaded = models.Loaded(_model(config), tokenizer, arch_generic.adapter(config), "granite")
    with pytest.raises(UserError, match="changes its logits after the LM head"):
        distill.check_head(loaded)
    config.logits_scaling = 1.0
    distill.check_head(models.Loaded(_model(config), tokenizer, arch_generic.adapter(config), "granite"))


def test_minitron_refuses_before_any_pass(checkpoint, tmp_path):
    folder, _ = checkpoint("stablelm")
    loaded = models.load(str(folder), device="cpu")
    message = "compact has none for 'stablelm' (supported: gemma2, gemma3_text, gpt2, gpt_neox, llama"
    # data "nowhere" would fail if read: the refusal comes first
    jobs = [(importance.run, importance.ImportanceConfig(model="m", data="nowhere.txt",
                                                         out=str(tmp_path / "s"))),
            (prune.run, prune.PruneConfig(model="m", out=str(tmp_path / "p"), layers=2, data="nowhere.txt")),
            (search.run, search.SearchConfig(model="m", params="0.7", data="nowhere.txt"))]
    for run, cfg in jobs:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            run(cfg, loaded=loaded)
    with pytest.raises(UserError, match="need a family adapter"):
        importance.estimate(loaded.model, torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.cli
@pytest.mark.slow  # two subprocesses: ~20 s each on a loaded 2-core machine
def test_cli_refuses_importance_and_prune_in_one_line(checkpoint, tmp_path):
    folder, _ = checkpoint("falcon")
    for args in (["importance", "--model", str(folder), "--out", str(tmp_path / "s.safetensors")],
                 ["prune", "--model", str(folder), "--out", str(tmp_path / "p"), "--layers", "2"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("error: Minitron importance, pruning and search need a family adapter")
        assert "'falcon'" in lines[0] and "supported: gemma2, gemma3_text, gpt2" in lines[0]


def _write_gguf(model, tokenizer, path) -> None:
    """A StableLM GGUF as llama.cpp lays it out, in float32 (exact): the tensor names come from
    transformers' own GGUF name map, the tokenizer as a GPT-2 style BPE (tokens and merges)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    c = model.config
    writer = gguf.GGUFWriter(str(path), "stablelm")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_eps(c.layer_norm_eps)
    writer.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * c.hidden_size
                                        // c.num_attention_heads))
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = set(tokenizer.all_special_tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    bos = tokenizer.bos_token_id
    writer.add_bos_token_id(tokenizer.eos_token_id if bos is None else bos)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = {hf: name for name, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    for key, tensor in model.state_dict().items():
        writer.add_tensor(names[key], tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_bpe():
    """A byte-level BPE of the 256 byte symbols and two merges: GGUF's tokenizer conversion of
    SmolLM2's 49k merges alone takes most of a minute."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for token in ("th", "the", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("t", "h"), ("th", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_a_stablelm_gguf_loads_exactly_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACT_HOME", str(tmp_path / "home"))
    tokenizer = _byte_bpe()
    source = _model(_config("stablelm", len(tokenizer)))
    path = tmp_path / "tiny-stablelm.gguf"
    _write_gguf(source, tokenizer, path)
    loaded = models.load(str(path), device="cpu")
    assert loaded.arch.family == "stablelm" and loaded.ref == str(path)
    ids = _ids(len(tokenizer))
    assert torch.equal(_logits(loaded.model, ids), _logits(source, ids))
    text = "Hello world, the quick brown fox."
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert 257 in tokenizer(text)["input_ids"]  # "the": the merges were read
    cached = list((tmp_path / "home" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    again = models.load(str(path), device="cpu")  # from the cache: no second conversion
    assert list((tmp_path / "home" / "models").iterdir()) == cached
    assert torch.equal(_logits(again.model, ids), _logits(source, ids))


@pytest.mark.app
@pytest.mark.slow
def test_app_card_compare_and_refusals(tokenizer, tmp_path, text):
    """The real server: the card says what a Falcon supports, Compare runs it beside its 2:4 copy,
    Importance and Prune answer with the refusal as an error."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ui.server import serve

    folder = tmp_path / "data" / "falcon"  # inside the app's allowed folders
    models.save(_model(_config("falcon", len(tokenizer))), tokenizer, folder, {"source": "test"})
    sparse = tmp_path / "data" / "falcon-2-4"
    sparsify.run(sparsify.SparsifyConfig(model=str(folder), out=str(sparse), method="magnitude", data=text,
                                         eval_tokens=0, device="cpu"))
    with serve(tmp_path) as url:
        client = Client(url, verbose=False)
        card, info = client.predict(str(folder), api_name="/load")
        assert info["family"] == "falcon" and info["adapter"] is False
        assert ("Minitron pruning: no (no adapter for falcon; supported: gemma2, gemma3_text, gpt2, "
                "gpt_neox, llama") in card
        assert "2:4 sparsity, AST, distillation, generation, evaluation: yes" in card
        result = client.predict(str(folder), str(sparse), None, None, "The capital of France is", 4, 0, 1, 0,
                                False, False, api_name="/compare")  # no perplexity: its corpus is slow
        rows = result[9]["models"]
        assert [r["model"] for r in rows] == [str(folder), str(sparse)]
        assert all(r["new_tokens"] == 4 for r in rows)
        with pytest.raises(AppError, match="need a family adapter, and compact has none for 'falcon'"):
            client.predict(str(folder), "builtin", 2, 32, "l2", "mean", False, api_name="/importance")
        with pytest.raises(AppError, match="need a family adapter, and compact has none for 'falcon'"):
            client.predict(2, 64, 256, 4, "bi", api_name="/prune")
        assert client.predict(str(folder), "Hello", 2, 0, 0, False, api_name="/generate")[1]  # still serving
