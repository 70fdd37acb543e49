"""One adapter per model family: where each part of a causal LM lives, and its Shape.

Everything that knows module names sits here, so importance, pruning and sparsity code
works on any supported family. Adding a family is one small subclass registered in FAMILIES.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compact.errors import UserError
from compact.shapes import Shape


def weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out_features, in_features), a view for Conv1D."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


class Arch:
    """Adapter for one family. Subclasses name modules; methods take the loaded model."""

    family = ""
    model_types: tuple[str, ...] = ()
    # GPT-2 style attention derives head_dim = hidden / heads, tying the two axes.
    hidden_tied_to_heads = False

    def base(self, model):
        return model.model

    def blocks(self, model) -> nn.ModuleList:
        return self.base(model).layers

    def embed(self, model) -> nn.Embedding:
        return self.base(model).embed_tokens

    def pos_embed(self, model) -> nn.Embedding | None:
        return None

    def final_norm(self, model) -> nn.Module:
        return self.base(model).norm

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    def attn(self, block) -> nn.Module:
        return block.self_attn

    def mlp(self, block) -> nn.Module:
        return block.mlp

    def attn_out(self, block) -> nn.Module:
        """The projection whose input is the heads' outputs (heads x head_dim)."""
        return block.self_attn.o_proj

    def mlp_out(self, block) -> nn.Module:
        """The projection whose input is the MLP neurons' activations."""
        return block.mlp.down_proj

    def block_norms(self, block) -> list[nn.Module]:
        """Norms that read the residual stream (their weights span the hidden size)."""
        return [block.input_layernorm, block.post_attention_layernorm]

    def linears(self, block) -> dict[str, nn.Module]:
        """Every weight matrix inside a transformer block, by qualified name."""
        a, m = block.self_attn, block.mlp
        return {
            "self_attn.q_proj": a.q_proj,
            "self_attn.k_proj": a.k_proj,
            "self_attn.v_proj": a.v_proj,
            "self_attn.o_proj": a.o_proj,
            "mlp.gate_proj": m.gate_proj,
            "mlp.up_proj": m.up_proj,
            "mlp.down_proj": m.down_proj,
        }

    def shape(self, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Shape(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            **self._traits(config),
        )

    def _traits(self, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False))}


class Llama(Arch):
    family = "llama"
    model_types = ("llama",)


class Mistral(Arch):
    family = "mistral"
    model_types = ("mistral",)

    def _traits(self, config) -> dict:
        return {}


class Qwen2(Arch):
    """Qwen2: biases on q, k and v only."""

    family = "qwen2"
    model_types = ("qwen2",)

    def _traits(self, config) -> dict:
        return {"qkv_bias": True}


class Qwen3(Arch):
    """Qwen3: per-head RMSNorm on queries and keys (q_norm, k_norm over head_dim)."""

    family = "qwen3"
    model_types = ("qwen3",)

    def _traits(self, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True}


class GPT2(Arch):
    """GPT-2: fused q/k/v in one Conv1D (weights stored in x out), learned positions."""

    family = "gpt2"
    model_types = ("gpt2",)
    hidden_tied_to_heads = True

    def base(self, model):
        return model.transformer

    def blocks(self, model) -> nn.ModuleList:
        return model.transformer.h

    def embed(self, model) -> nn.Embedding:
        return model.transformer.wte

    def pos_embed(self, model) -> nn.Embedding:
        return model.transformer.wpe

    def final_norm(self, model) -> nn.Module:
        return model.transformer.ln_f

    def attn(self, block) -> nn.Module:
        return block.attn

    def attn_out(self, block) -> nn.Module:
        return block.attn.c_proj

    def mlp_out(self, block) -> nn.Module:
        return block.mlp.c_proj

    def block_norms(self, block) -> list[nn.Module]:
        return [block.ln_1, block.ln_2]

    def linears(self, block) -> dict[str, nn.Module]:
        return {
            "attn.c_attn": block.attn.c_attn,
            "attn.c_proj": block.attn.c_proj,
            "mlp.c_fc": block.mlp.c_fc,
            "mlp.c_proj": block.mlp.c_proj,
        }

    def shape(self, config) -> Shape:
        return Shape(
            layers=config.n_layer,
            hidden=config.n_embd,
            ffn=config.n_inner or 4 * config.n_embd,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            gated_mlp=False,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            norm_bias=True,
            positions=config.n_positions,
        )


FAMILIES: dict[str, Arch] = {}
for _cls in (Llama, Mistral, Qwen2, Qwen3, GPT2):
    for _t in _cls.model_types:
        FAMILIES[_t] = _cls()


def for_config(config) -> Arch:
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture '{model_type or type(config).__name__}': "
            f"compact supports {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def for_model(model) -> Arch:
    return for_config(model.config)
