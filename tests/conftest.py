"""Tiny random-weight models of every family, built in the test, plus the real tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig,
                          MistralConfig, Qwen2Config, Qwen3Config)

from compact import models

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(family: str, vocab: int, layers: int = 4, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, ffn: int = 128, head_dim: int = 16):
    common = dict(vocab_size=vocab, tie_word_embeddings=family in ("llama", "gpt2", "qwen3"))
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
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


def tiny_model(family: str, vocab: int, seed: int = 0, **shape):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **shape), dtype=torch.float32)
    randomize_norms(model)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer, from the cached default checkpoint."""
    tok = AutoTokenizer.from_pretrained(models._default_folder())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def make_model(tokenizer):
    def make(family: str, seed: int = 0, **shape):
        return tiny_model(family, len(tokenizer), seed, **shape)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, make_model, tokenizer):
    """A saved tiny checkpoint per family: folder path."""
    cache = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            models.save(make_model(family), tokenizer, out, {"source": "test"})
            cache[family] = out
        return cache[family]

    return make


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python -m compact ... as a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "compact", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
