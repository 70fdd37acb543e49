"""What several test files share: tiny models, planted dead parts, calibration data, the CLI.

Fixtures built on these live in conftest.py; test files import the rest from here
(`from tests.helpers import ...`), never from conftest or from one another.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from compact import arch as arch_mod
from compact.arch import weight_oi

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gpt_neox", "opt", "gemma2", "gemma3",
            "olmo2", "smollm3"]
MHA_ONLY = ("gpt2", "gpt_neox", "opt")  # no KV groups: kv_heads is always heads
LEARNED_POSITIONS = ("gpt2", "opt")
ROOT = Path(__file__).resolve().parents[1]
SEQ = 24  # tokens per calibration block of calib()


# -- tiny random-weight models ---------------------------------------------------------------

def tiny_config(family: str, vocab: int, layers: int = 4, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, ffn: int = 128, head_dim: int = 16):
    common = dict(vocab_size=vocab, tie_word_embeddings=family in ("llama", "gpt2", "qwen3", "opt", "gemma2",
                                                                      "gemma3", "smollm3"))
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gpt_neox":  # parallel residual and partial rotary (1/4 of head_dim) by default
        return GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             intermediate_size=ffn, max_position_embeddings=256, **common)
    if family == "opt":  # init_std: at 0.02 the random biases swamp the tokens, most ReLUs never fire
        return OPTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         ffn_dim=ffn, max_position_embeddings=256, dropout=0.0, init_std=0.2, **common)
    if family == "phi3":  # head_dim = hidden / heads, as Phi3Config derives it
        return Phi3Config(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=ffn,
                          max_position_embeddings=256, **common)
    extra = {}
    if family in ("gemma2", "gemma3"):  # a window shorter than SEQ, so the layer types matter
        extra = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                     + ["sliding_attention"] * (layers % 2))
    if family in ("olmo2", "smollm3"):  # their default special tokens lie outside a small vocabulary
        extra = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "olmo2": Olmo2Config,
           "smollm3": SmolLM3Config}[family]
    return cls(**extra,num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=ffn, head_dim=head_dim,
               max_position_embeddings=256, **common)


def randomize_norms(model) -> None:
    """Give norms non-trivial weights so that a wrongly sliced norm changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.1, 0.1)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)


# App servers under test score models on 1,024 canonical tokens instead of 4,096: each score of
# the default model takes 12-47 s on a 2-core machine, and no test reads the setting's size.
FAST_SCORES = {"COMPACT_EVAL_TOKENS": "1024"}


def tiny_model(family: str, vocab: int, seed: int = 0, **shape):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **shape), dtype=torch.float32)
    randomize_norms(model)
    return model.eval()


def reference_text(chars: int = 60_000) -> str:
    """English prose that ships with every CPython: the Python reference's topics."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:chars]


def tiny_tokenizer(vocab: int = 512):
    """A byte-level BPE tokenizer trained here on reference_text(): for machines without the
    default model (its GGUF needs the gguf package), such as a bare GPU machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([reference_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


# -- planted dead parts (importance must rank them lowest; pruning them is exact) ------------

def zero_rows(module, rows=None) -> None:
    """Zero output rows (all when None) of a linear layer's weight and bias."""
    with torch.no_grad():
        w = weight_oi(module)
        sl = slice(None) if rows is None else rows
        w[sl] = 0
        if getattr(module, "bias", None) is not None:
            module.bias[sl] = 0


def kill_channels(model, scores, dead: list[int]) -> None:
    """Residual channels that nothing writes (embedding columns and every block's output rows
    zero), scored zero: pruning them leaves only the norms' changed mean over the hidden size."""
    from compact.arch import for_model

    a = for_model(model)
    with torch.no_grad():
        a.embed(model).weight[:, dead] = 0
        for block in a.blocks(model):
            zero_rows(a.attn_out(block), dead)
            zero_rows(a.mlp_out(block), dead)
    scores.channels_per_layer[:, dead] = 0
    scores.channels[dead] = 0


def kill_head(model, layer: int, head: int) -> None:
    """Zero the head's values, so its attention output (the o_proj input) is exactly zero.

    Only possible for a single head when it has its own V (kv_heads == heads)."""
    a = arch_mod.for_model(model)
    s = a.shape(model.config)
    assert s.kv_heads == s.heads
    block = a.blocks(model)[layer]
    d = s.head_dim
    # The layer holding the head's values, and where they start in its output.
    module, start = {
        "gpt2": lambda: (block.attn.c_attn, 2 * s.heads * d + head * d),  # q|k|v
        "phi3": lambda: (block.self_attn.qkv_proj, (s.heads + s.kv_heads) * d + head * d),
        "gpt_neox": lambda: (block.attention.query_key_value, head * 3 * d + 2 * d),  # per head
    }.get(a.family, lambda: (block.self_attn.v_proj, head * d))()
    zero_rows(module, slice(start, start + d))


def kill_neuron(model, layer: int, neuron: int) -> None:
    """Zero the neuron's up projection: act(gate) * 0 = 0; gelu(0) = relu(0) = 0 without a gate."""
    a = arch_mod.for_model(model)
    block = a.blocks(model)[layer]
    module, row = {
        "gpt2": lambda: (block.mlp.c_fc, neuron),
        "phi3": lambda: (block.mlp.gate_up_proj, a.shape(model.config).ffn + neuron),  # gate|up
        "gpt_neox": lambda: (block.mlp.dense_h_to_4h, neuron),
        "opt": lambda: (block.fc1, neuron),
    }.get(a.family, lambda: (block.mlp.up_proj, neuron))()
    zero_rows(module, [row])


def kill_channel_readout(model, channel: int) -> None:
    """Zero the channel in every residual norm (weight and bias): all norm outputs are 0 there."""
    a = arch_mod.for_model(model)
    norms = [n for b in a.blocks(model) for n in a.block_norms(b)] + [a.final_norm(model)]
    with torch.no_grad():
        for norm in norms:
            norm.weight[channel] = -a.norm_weight_offset  # Gemma multiplies by (1 + weight)
            if getattr(norm, "bias", None) is not None:
                norm.bias[channel] = 0


def make_identity(model, layer: int) -> None:
    """Zero both writers of the block into the residual stream: the block returns its input."""
    a = arch_mod.for_model(model)
    block = a.blocks(model)[layer]
    zero_rows(a.attn_out(block))
    zero_rows(a.mlp_out(block))


# -- data ------------------------------------------------------------------------------------

def calib(vocab: int, n: int = 6, seed: int = 1) -> torch.Tensor:
    """n random token blocks of SEQ tokens."""
    return torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def calib_text(folder: Path) -> Path:
    """A small calibration text (the builtin corpus takes ~15 s to tokenize on first use)."""
    path = folder / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, "
                                  f"and the model learns which of its parts matter most. " * 4
                                  for i in range(60)))
    return path


# -- the command line ------------------------------------------------------------------------

def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python -m compact ... as a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "compact", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def plot_array(value):
    """A Plotly JSON array as numpy: plain lists, or the typed binary form that Plotly writes for
    numpy arrays ({"dtype", "bdata", "shape"})."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(float)
        shape = [int(d) for d in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.array(value, dtype=float)
