"""Adapters for Gemma 2, Gemma 3 (text) and OLMo 2: families that normalize what each block
writes into the residual stream (post-norms). Importing compact.arch registers them in FAMILIES.

Gemma 2 / 3: four RMSNorms per block (input, post-attention, pre-feedforward, post-feedforward),
multiplying by (1 + weight); the embeddings are scaled by sqrt(hidden_size) from the config and
tied to the LM head; head_dim is independent of the hidden size; sliding and global layers
(layer_types); Gemma 2 soft-caps attention and final logits, Gemma 3 has q/k norms over head_dim.
OLMo 2: no norm before attention or MLP (they read the residual stream raw), an RMSNorm after
each, and q/k norms over the whole projection (heads x head_dim wide), sliced with the heads.
"""

from __future__ import annotations

from torch import nn

from compact.arch import FAMILIES, Arch
from compact.shapes import Shape

POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


class Gemma2(Arch):
    family = "gemma2"
    model_types = ("gemma2",)
    norm_weight_offset = 1.0

    def block_norms(self, block) -> list[nn.Module]:
        return [block.input_layernorm, block.post_attention_layernorm,
                block.pre_feedforward_layernorm, block.post_feedforward_layernorm]

    def post_norms(self, block) -> list[nn.Module]:
        return [getattr(block, name) for name in POST_NORMS]

    def block_axes(self) -> dict[str, tuple]:
        axes = super().block_axes()
        axes["pre_feedforward_layernorm.weight"] = axes["post_feedforward_layernorm.weight"] = ("ch",)
        return axes

    def adjust_pruned(self, state, source: Shape, target: Shape) -> None:
        """Pruning channels changes the embedding scale sqrt(hidden) by a = sqrt(h'/h). Every
        post-norm's multiplier (1 + w) is scaled by a as well, so the whole residual stream is
        a times the kept-channel model's: the pre-norms and the final norm ignore that up to eps,
        and the embeddings (tied to the LM head) stay as they were."""
        if target.hidden == source.hidden:
            return
        a = (target.hidden / source.hidden) ** 0.5
        for key, w in state.items():
            if key.endswith(tuple(f"{name}.weight" for name in POST_NORMS)):
                state[key] = ((1 + w.float()) * a - 1).to(w.dtype)

    def _traits(self, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        # GemmaConfig refuses a hidden size that is not a multiple of the head count.
        return {"qkv_bias": bias, "o_bias": bias, "norms_per_block": 4, "hidden_divisible_by_heads": True,
                "qk_norm": self.family == "gemma3"}


class Gemma3(Gemma2):
    """Gemma 3's text model (Gemma3ForCausalLM): Gemma 2 with q/k norms over head_dim and
    per-layer-type rotary bases, without soft-capping by default."""

    family = "gemma3"
    model_types = ("gemma3_text",)


class Olmo2(Arch):
    family = "olmo2"
    model_types = ("olmo2",)

    def block_norms(self, block) -> list[nn.Module]:
        return [getattr(block, name) for name in POST_NORMS]

    def post_norms(self, block) -> list[nn.Module]:
        return self.block_norms(block)

    def block_axes(self) -> dict[str, tuple]:
        axes = {k: v for k, v in super().block_axes().items() if not k.startswith("input_layernorm")}
        axes["post_feedforward_layernorm.weight"] = ("ch",)
        # q_norm and k_norm span the whole projections: they go with the heads.
        axes["self_attn.q_norm.weight"], axes["self_attn.k_norm.weight"] = ("q_norm",), ("kv",)
        return axes

    def _traits(self, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm_full": True}


for _cls in (Gemma2, Gemma3, Olmo2):
    for _t in _cls.model_types:
        FAMILIES[_t] = _cls()
