"""One adapter per model family: where each part of a causal LM lives, and its Shape.

Everything that knows module names sits here, so importance, pruning and sparsity code
works on any supported family. Adding a family is one small subclass registered in FAMILIES.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import torch
from torch import nn
from transformers import MistralConfig
from transformers.pytorch_utils import Conv1D

from compact.errors import UserError
from compact.shapes import Shape


def own_thread(hook):
    """hook, acting only in the thread that made it: the app's threads share one cached model, and
    a generate running beside an importance run must neither be counted nor have layers skipped."""
    owner = threading.get_ident()

    def guarded(*args, **kwargs):
        return hook(*args, **kwargs) if threading.get_ident() == owner else None

    return guarded


def weight_oi(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out_features, in_features), a view for Conv1D."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


class Arch:
    """Adapter for one family. Subclasses name modules; methods take the loaded model."""

    family = ""
    model_types: tuple[str, ...] = ()
    # GPT-2 style attention derives head_dim = hidden / heads, tying the two axes.
    hidden_tied_to_heads = False
    # Whether Minitron importance, pruning and search know this family (compact.arch_generic: no).
    minitron = True

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
        """Every norm of a block over the hidden size (the first reads the block's input, where
        the family has such a norm); importance reads their outputs for channel scores."""
        return [block.input_layernorm, block.post_attention_layernorm]

    def state_hook(self, block, sink):
        """Hook handing sink(tensor) the block's intermediate state for distillation: the output
        of its input norm, in the thread that registered it."""
        def hook(_module, _args, out):
            sink(out[0] if isinstance(out, tuple) else out)

        return self.block_norms(block)[0].register_forward_hook(own_thread(hook))

    def post_norms(self, block) -> list[nn.Module]:
        """Those of block_norms applied to what the block writes into the residual stream."""
        return []

    # Norms multiply by (offset + weight): Gemma stores its weights centered on 0 (offset 1).
    norm_weight_offset = 0.0

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

    # Pruning: how each parameter is sliced. Per dimension, the axis it spans: "ch" (residual
    # channels), "q" (query-head dims, head-major), "kv" (key/value-head dims), "ffn" (MLP
    # neurons), "qkv" (GPT-2's fused q|k|v, each part sliced by heads), or None (kept whole).
    layers_prefix = "model.layers."

    def model_axes(self) -> dict[str, tuple]:
        return {"model.embed_tokens.weight": (None, "ch"), "model.norm.weight": ("ch",),
                "lm_head.weight": (None, "ch"), "lm_head.bias": (None,)}

    def block_axes(self) -> dict[str, tuple]:
        axes = {"input_layernorm.weight": ("ch",), "post_attention_layernorm.weight": ("ch",),
                "self_attn.q_proj.weight": ("q", "ch"), "self_attn.q_proj.bias": ("q",),
                "self_attn.o_proj.weight": ("ch", "q"), "self_attn.o_proj.bias": ("ch",),
                "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),
                "mlp.gate_proj.weight": ("ffn", "ch"), "mlp.gate_proj.bias": ("ffn",),
                "mlp.up_proj.weight": ("ffn", "ch"), "mlp.up_proj.bias": ("ffn",),
                "mlp.down_proj.weight": ("ch", "ffn"), "mlp.down_proj.bias": ("ch",)}
        for kv in ("k_proj", "v_proj"):
            axes[f"self_attn.{kv}.weight"] = ("kv", "ch")
            axes[f"self_attn.{kv}.bias"] = ("kv",)
        return axes

    def pruned_config(self, config, shape: Shape, kept_layers: list[int]):
        """A copy of config for the pruned shape; per-layer lists follow the kept layers."""
        config = copy.deepcopy(config)
        config.num_hidden_layers = shape.layers
        config.hidden_size = shape.hidden
        config.intermediate_size = shape.ffn
        config.num_attention_heads = shape.heads
        config.num_key_value_heads = shape.kv_heads
        config.head_dim = shape.head_dim  # explicit: hidden / heads no longer gives it
        for per_layer in ("layer_types", "no_rope_layers"):  # no_rope_layers: SmolLM3
            if isinstance(getattr(config, per_layer, None), list):
                setattr(config, per_layer, [getattr(config, per_layer)[i] for i in kept_layers])
        if isinstance(getattr(config, "max_window_layers", None), int):
            # Layers from this index on use the sliding window: count the kept layers below it.
            config.max_window_layers = sum(i < config.max_window_layers for i in kept_layers)
        return config

    def adjust_pruned(self, state: dict[str, torch.Tensor], source: Shape, target: Shape) -> None:
        """Change the pruned state dict in place where slicing alone would change the function."""

    def pruned_note(self, target: Shape) -> str | None:
        """Why the pruned checkpoint is saved as another family (None when it is not)."""
        return None

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
    """Llama. transformers' LlamaConfig refuses a hidden size that is not a multiple of the head
    count; MistralConfig has no such check and MistralForCausalLM computes the same function
    with the same weight names, so such shapes are saved as Mistral (without biases, which
    Mistral lacks: a Llama with biases keeps the refusal)."""

    family = "llama"
    model_types = ("llama",)

    def _traits(self, config) -> dict:
        traits = super()._traits(config)
        return {**traits, "hidden_divisible_by_heads": traits["qkv_bias"] or traits["mlp_bias"]}

    def pruned_config(self, config, shape: Shape, kept_layers: list[int]):
        config = super().pruned_config(config, shape, kept_layers)
        return as_mistral(config) if self.pruned_note(shape) else config

    def pruned_note(self, target: Shape) -> str | None:
        if target.hidden % target.heads == 0:
            return None
        return (f"saved as Mistral: transformers' LlamaConfig refuses hidden {target.hidden} with "
                f"{target.heads} heads (not a multiple); MistralForCausalLM computes the same function")


def as_mistral(llama_config):
    """The MistralConfig of the same function as a bias-free Llama config (no sliding window)."""
    names = {f.name for f in dataclasses.fields(MistralConfig)}
    values = {k: v for k, v in llama_config.to_dict().items() if k in names}
    return MistralConfig(**{**values, "sliding_window": None})


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


class SmolLM3(Arch):
    """SmolLM3: Llama with rotary positions left out in some layers (no_rope_layers, one 0/1
    per layer, follows the kept layers)."""

    family = "smollm3"
    model_types = ("smollm3",)


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

    layers_prefix = "transformer.h."

    def model_axes(self) -> dict[str, tuple]:
        return {"transformer.wte.weight": (None, "ch"), "transformer.wpe.weight": (None, "ch"),
                "transformer.ln_f.weight": ("ch",), "transformer.ln_f.bias": ("ch",),
                "lm_head.weight": (None, "ch"), "lm_head.bias": (None,)}

    def block_axes(self) -> dict[str, tuple]:
        # Conv1D weights are stored (in, out), so the axes read the other way round.
        return {"ln_1.weight": ("ch",), "ln_1.bias": ("ch",), "ln_2.weight": ("ch",),
                "ln_2.bias": ("ch",),
                "attn.c_attn.weight": ("ch", "qkv"), "attn.c_attn.bias": ("qkv",),
                "attn.c_proj.weight": ("q", "ch"), "attn.c_proj.bias": ("ch",),
                "mlp.c_fc.weight": ("ch", "ffn"), "mlp.c_fc.bias": ("ffn",),
                "mlp.c_proj.weight": ("ffn", "ch"), "mlp.c_proj.bias": ("ch",)}

    def pruned_config(self, config, shape: Shape, kept_layers: list[int]):
        if shape.hidden != shape.heads * shape.head_dim:
            raise UserError("GPT-2 needs hidden = heads x head_dim")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) and \
                list(kept_layers) != list(range(len(kept_layers))):
            raise UserError("this GPT-2 scales attention by layer index, so dropping layers "
                            "would change the kept layers; prune width only")
        config = copy.deepcopy(config)
        config.n_layer, config.n_embd, config.n_head = shape.layers, shape.hidden, shape.heads
        config.n_inner = shape.ffn
        return config

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
for _cls in (Llama, Mistral, Qwen2, Qwen3, SmolLM3, GPT2):
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


# Phi-3, GPT-NeoX and OPT (fused layouts) and Gemma 2/3 and OLMo 2 (norms on each block's
# output) live in their own modules, which register them in FAMILIES.
from compact import arch_fused, arch_postnorm  # noqa: E402, F401
