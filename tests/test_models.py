import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

from compact import arch, models
from compact.errors import UserError
from tests.helpers import FAMILIES, LEARNED_POSITIONS, MHA_ONLY


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_with_shape(family, tiny_checkpoint, make_model):
    loaded = models.load(str(tiny_checkpoint(family)))
    assert loaded.arch.family == family
    s = loaded.shape
    assert (s.layers, s.hidden, s.ffn, s.heads) == (4, 64, 128, 4)
    assert s.kv_heads == (4 if family in MHA_ONLY else 2)
    assert s.params == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.info()["params"] == s.params
    assert json.loads((tiny_checkpoint(family) / "compact.json").read_text())["source"] == "test"
    ids = torch.randint(0, 1000, (2, 12))
    assert torch.equal(loaded.model(ids).logits, make_model(family)(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_every_block_part(family, make_model):
    model = make_model(family)
    a = arch.for_model(model)
    block = a.blocks(model)[0]
    lin = a.linears(block)
    assert a.attn_out(block) in lin.values() and a.mlp_out(block) in lin.values()
    s = a.shape(model.config)
    assert arch.weight_oi(a.attn_out(block)).shape == (s.hidden, s.heads * s.head_dim)
    assert arch.weight_oi(a.mlp_out(block)).shape == (s.hidden, s.ffn)
    assert all(n.weight.shape == (s.hidden,) for n in a.block_norms(block))
    assert a.embed(model).weight.shape == (s.vocab, s.hidden)
    assert (a.pos_embed(model) is not None) == (family in LEARNED_POSITIONS)


@pytest.mark.slow
def test_default_model_shape_and_answer():
    loaded = models.load("default")
    info = loaded.info()
    assert ((info["layers"], info["hidden"], info["heads"], info["kv_heads"], info["ffn"])
            == (30, 576, 9, 3, 1536))
    assert info["params"] == 134_515_008 == loaded.shape.params
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    from compact import evaluate

    out = evaluate.generate(loaded.model, loaded.tokenizer, "The capital of France is", 8)
    assert "Paris" in out["text"]


@pytest.mark.slow
def test_default_cache_reloads_in_plain_transformers():
    folder = models._default_folder()
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ours = models.load("default").model
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    assert torch.equal(plain(ids).logits, ours(ids).logits)


def test_dtype_override(tiny_checkpoint):
    loaded = models.load(str(tiny_checkpoint("llama")), dtype="bfloat16")
    assert loaded.info()["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="unknown dtype"):
        models.load(str(tiny_checkpoint("llama")), dtype="int3")


def test_user_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="not a folder, a .gguf file or a Hub id"):
        models.load("no such thing!")
    with pytest.raises(UserError, match="GGUF file not found"):
        models.load(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.load(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="cannot read GGUF"):
        models.load(str(bad))
    # A folder with only pickle weights is refused unless allowed.
    src = tiny_checkpoint("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((src / name).read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights"):
        models.load(str(pickled))
    assert models.load(str(pickled), allow_pickle=True).shape.layers == 4


def test_unsupported_architecture(tmp_path):
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported architecture 'bert'"):
        models.load(str(tmp_path))


def test_remote_code_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "custom-thing", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="remote code|cannot read the config"):
        models.load(str(tmp_path))
