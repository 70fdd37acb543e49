"""Adapters for Phi-3, GPT-NeoX (Pythia) and OPT: fused projections, parallel residual,
learned positions. Importing compact.arch registers them in FAMILIES.

The fused layouts have their own pruning axes (see compact.prune): "qkv" (q|k|v stacked),
"gate_up" (gate|up stacked) and "qkv_per_head" (q, k, v interleaved head by head).
"""

from __future__ import annotations

import copy

from torch import nn

from compact.arch import FAMILIES, Arch
from compact.errors import UserError
from compact.shapes import Shape


class Phi3(Arch):
    """Phi-3 / Phi-4-mini: Llama with q|k|v fused in qkv_proj and gate|up fused in gate_up_proj."""

    family = "phi3"
    model_types = ("phi3",)

    def linears(self, block) -> dict[str, nn.Module]:
        a, m = block.self_attn, block.mlp
        return {"self_attn.qkv_proj": a.qkv_proj, "self_attn.o_proj": a.o_proj,
                "mlp.gate_up_proj": m.gate_up_proj, "mlp.down_proj": m.down_proj}

    def block_axes(self) -> dict[str, tuple]:
        return {"input_layernorm.weight": ("ch",), "post_attention_layernorm.weight": ("ch",),
                "self_attn.qkv_proj.weight": ("qkv", "ch"), "self_attn.o_proj.weight": ("ch", "q"),
                "mlp.gate_up_proj.weight": ("gate_up", "ch"), "mlp.down_proj.weight": ("ch", "ffn")}

    def _traits(self, config) -> dict:
        # Long-context RoPE checks its factor lists against hidden // heads (not head_dim).
        rope = getattr(config, "rope_parameters", None) or {}
        return {"head_dim_from_hidden": rope.get("rope_type") == "longrope"}


class GPTNeoX(Arch):
    """GPT-NeoX / Pythia: q, k, v interleaved per head in query_key_value, LayerNorms with bias,
    parallel residual (both branches read the block input), partial rotary (a fraction of
    head_dim, which pruning keeps). head_dim = hidden / heads, as in GPT-2."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)
    hidden_tied_to_heads = True
    layers_prefix = "gpt_neox.layers."

    def base(self, model):
        return model.gpt_neox

    def embed(self, model) -> nn.Embedding:
        return model.gpt_neox.embed_in

    def final_norm(self, model) -> nn.Module:
        return model.gpt_neox.final_layer_norm

    def attn(self, block) -> nn.Module:
        return block.attention

    def attn_out(self, block) -> nn.Module:
        return block.attention.dense

    def mlp_out(self, block) -> nn.Module:
        return block.mlp.dense_4h_to_h

    def linears(self, block) -> dict[str, nn.Module]:
        a, m = block.attention, block.mlp
        return {"attention.query_key_value": a.query_key_value, "attention.dense": a.dense,
                "mlp.dense_h_to_4h": m.dense_h_to_4h, "mlp.dense_4h_to_h": m.dense_4h_to_h}

    def model_axes(self) -> dict[str, tuple]:
        return {"gpt_neox.embed_in.weight": (None, "ch"), "gpt_neox.final_layer_norm.weight": ("ch",),
                "gpt_neox.final_layer_norm.bias": ("ch",), "lm_head.weight": (None, "ch")}

    def block_axes(self) -> dict[str, tuple]:
        axes = {"attention.query_key_value.weight": ("qkv_per_head", "ch"),
                "attention.query_key_value.bias": ("qkv_per_head",),
                "attention.dense.weight": ("ch", "q"), "attention.dense.bias": ("ch",),
                "mlp.dense_h_to_4h.weight": ("ffn", "ch"), "mlp.dense_h_to_4h.bias": ("ffn",),
                "mlp.dense_4h_to_h.weight": ("ch", "ffn"), "mlp.dense_4h_to_h.bias": ("ch",)}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            axes[f"{norm}.weight"] = axes[f"{norm}.bias"] = ("ch",)
        return axes

    def pruned_config(self, config, shape: Shape, kept_layers: list[int]):
        if shape.hidden != shape.heads * shape.head_dim:
            raise UserError("GPT-NeoX needs hidden = heads x head_dim")
        config = copy.deepcopy(config)
        config.num_hidden_layers, config.hidden_size = shape.layers, shape.hidden
        config.num_attention_heads, config.intermediate_size = shape.heads, shape.ffn
        return config

    def shape(self, config) -> Shape:
        heads, bias = config.num_attention_heads, bool(config.attention_bias)
        return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size,
                     ffn=config.intermediate_size, heads=heads, kv_heads=heads,
                     head_dim=config.hidden_size // heads, vocab=config.vocab_size,
                     tied=bool(config.tie_word_embeddings), gated_mlp=False, qkv_bias=bias,
                     o_bias=bias, mlp_bias=True, norm_bias=True)


class OPT(Arch):
    """OPT: separate q/k/v with biases, fc1/fc2, LayerNorms, learned positions stored with an
    offset of 2 rows. Pre-norm checkpoints (do_layer_norm_before) with the final layer norm
    prune; OPT-350m's layout (post-norm, projected embeddings) is marked unprunable (its Shape
    then leaves out the projections)."""

    family = "opt"
    model_types = ("opt",)
    hidden_tied_to_heads = True
    layers_prefix = "model.decoder.layers."

    def base(self, model):
        return model.model.decoder

    def pos_embed(self, model) -> nn.Embedding:
        return model.model.decoder.embed_positions

    def final_norm(self, model) -> nn.Module:
        return model.model.decoder.final_layer_norm

    def attn_out(self, block) -> nn.Module:
        return block.self_attn.out_proj

    def mlp(self, block) -> nn.Module:
        return block  # fc1 and fc2 sit on the block itself

    def mlp_out(self, block) -> nn.Module:
        return block.fc2

    def block_norms(self, block) -> list[nn.Module]:
        return [block.self_attn_layer_norm, block.final_layer_norm]

    def linears(self, block) -> dict[str, nn.Module]:
        a = block.self_attn
        return {"self_attn.q_proj": a.q_proj, "self_attn.k_proj": a.k_proj,
                "self_attn.v_proj": a.v_proj, "self_attn.out_proj": a.out_proj,
                "fc1": block.fc1, "fc2": block.fc2}

    def model_axes(self) -> dict[str, tuple]:
        return {"model.decoder.embed_tokens.weight": (None, "ch"),
                "model.decoder.embed_positions.weight": (None, "ch"),
                "model.decoder.final_layer_norm.weight": ("ch",),
                "model.decoder.final_layer_norm.bias": ("ch",), "lm_head.weight": (None, "ch")}

    def block_axes(self) -> dict[str, tuple]:
        axes = {"self_attn.q_proj.weight": ("q", "ch"), "self_attn.q_proj.bias": ("q",),
                "self_attn.out_proj.weight": ("ch", "q"), "self_attn.out_proj.bias": ("ch",),
                "fc1.weight": ("ffn", "ch"), "fc1.bias": ("ffn",),
                "fc2.weight": ("ch", "ffn"), "fc2.bias": ("ch",)}
        for kv in ("k_proj", "v_proj"):
            axes[f"self_attn.{kv}.weight"] = ("kv", "ch")
            axes[f"self_attn.{kv}.bias"] = ("kv",)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            axes[f"{norm}.weight"] = axes[f"{norm}.bias"] = ("ch",)
        return axes

    def pruned_config(self, config, shape: Shape, kept_layers: list[int]):
        if shape.hidden != shape.heads * shape.head_dim:
            raise UserError("OPT needs hidden = heads x head_dim")
        config = copy.deepcopy(config)
        config.num_hidden_layers, config.hidden_size = shape.layers, shape.hidden
        config.num_attention_heads, config.ffn_dim = shape.heads, shape.ffn
        config.word_embed_proj_dim = shape.hidden  # else the config would ask for projections
        return config

    def shape(self, config) -> Shape:
        heads, bias = config.num_attention_heads, bool(config.enable_bias)
        return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, ffn=config.ffn_dim,
                     heads=heads, kv_heads=heads, head_dim=config.hidden_size // heads,
                     vocab=config.vocab_size, tied=bool(config.tie_word_embeddings),
                     gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm_bias=True,
                     positions=config.max_position_embeddings + 2,  # the 2 offset rows
                     unprunable=self._unprunable(config))

    @staticmethod
    def _unprunable(config) -> str:
        """Why the pruning rules above do not describe this OPT variant ("" if they do)."""
        why = []
        if (config.word_embed_proj_dim or config.hidden_size) != config.hidden_size:
            why.append(f"its embeddings ({config.word_embed_proj_dim}) are projected to the "
                       f"hidden size ({config.hidden_size})")
        if not config.do_layer_norm_before:
            why.append("it normalizes after each block (do_layer_norm_before is false)")
        if getattr(config, "_remove_final_layer_norm", False):
            why.append("it has no final layer norm")
        if not config.layer_norm_elementwise_affine:
            why.append("its layer norms have no weights")
        if not why:
            return ""
        return ("compact can prune pre-norm OPT models (such as facebook/opt-125m or -1.3b) only, "
                "not this one: " + "; ".join(why))


for _cls in (Phi3, GPTNeoX, OPT):
    for _t in _cls.model_types:
        FAMILIES[_t] = _cls()
