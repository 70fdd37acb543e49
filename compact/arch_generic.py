"""Any causal LM without a family adapter: what needs no family knowledge, found from the model.

Loading, generation, evaluation, N:M sparsity, AST and distillation only need the transformer
blocks, the linear layers inside them, the base model and the LM head, which transformers'
own accessors (base_model, get_output_embeddings) and the module tree give for every family.
Minitron importance, pruning and search slice each parameter by its role, which only a family
adapter (compact.arch) knows: for a model without one they refuse with `require_minitron`.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from compact.arch import FAMILIES, Arch, own_thread
from compact.errors import UserError
from compact.shapes import Shape

# What works for every causal LM, in the words the model card and README use.
GENERIC_FEATURES = "2:4 sparsity, AST, distillation, generation, evaluation"


def adapter(config) -> Arch:
    """The family's adapter, or a Generic one for a family compact has no adapter for."""
    model_type = getattr(config, "model_type", "") or type(config).__name__
    return FAMILIES.get(model_type) or Generic(model_type)


def minitron_refusal(family: str) -> str:
    return (f"Minitron importance, pruning and search need a family adapter, and compact has none for "
            f"'{family}' (supported: {', '.join(sorted(FAMILIES))}); {GENERIC_FEATURES} work for it")


def require_minitron(arch: Arch) -> None:
    """Refuse a Minitron job (importance, prune, search) early for a model without an adapter."""
    if not arch.minitron:
        raise UserError(minitron_refusal(arch.family))


def minitron_adapter(model) -> Arch:
    """The model's family adapter for Minitron work; refused for a family without one."""
    arch = adapter(model.config)
    require_minitron(arch)
    return arch


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


class Generic(Arch):
    """The blocks are the outermost ModuleList with one entry per layer; their linears are every
    nn.Linear (or GPT-2 style Conv1D) under a block. Pruning rules: none."""

    minitron = False

    def __init__(self, family: str):
        self.family = family

    def base(self, model):
        base = model.base_model  # transformers' own accessor (its base_model_prefix)
        if base is model:
            raise UserError(f"cannot find the base model inside {type(model).__name__}")
        return base

    def blocks(self, model) -> nn.ModuleList:
        layers = _first(model.config.get_text_config(), ("num_hidden_layers", "n_layer", "num_layers"))
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                 and len({type(b) for b in m}) == 1]
        # modules() walks outer before inner, so a list of experts inside a block is never taken.
        fitting = [m for m in lists if len(m) == layers] or sorted(lists, key=len, reverse=True)
        if not fitting:
            raise UserError(f"cannot find the transformer blocks of this {self.family} model")
        return fitting[0]

    def embed(self, model) -> nn.Module:
        return model.get_input_embeddings()

    def lm_head(self, model) -> nn.Module:
        return model.get_output_embeddings()

    def linears(self, block) -> dict[str, nn.Module]:
        return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear | Conv1D)}

    def state_hook(self, block, sink):
        # Without an adapter the input norm is unknown: the state is the block's input instead.
        def hook(_module, args, kwargs):
            sink(args[0] if args else kwargs["hidden_states"])

        return block.register_forward_pre_hook(own_thread(hook), with_kwargs=True)

    def _refuse(self, *args, **kwargs):
        raise UserError(minitron_refusal(self.family))

    final_norm = attn = mlp = attn_out = mlp_out = block_norms = _refuse
    model_axes = block_axes = pruned_config = _refuse

    def shape(self, config) -> Shape:
        """The sizes the config names (for the model card); unprunable says why Minitron refuses."""
        c = config.get_text_config()
        hidden = _first(c, ("hidden_size", "n_embd", "d_model"), 0)
        heads = _first(c, ("num_attention_heads", "n_head", "num_heads"), 1)
        return Shape(
            layers=_first(c, ("num_hidden_layers", "n_layer", "num_layers"), 0),
            hidden=hidden,
            ffn=_first(c, ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim"), 4 * hidden),
            heads=heads,
            kv_heads=_first(c, ("num_key_value_heads", "num_kv_heads"), heads),
            head_dim=_first(c, ("head_dim",), hidden // heads),
            vocab=_first(c, ("vocab_size",), 0),
            tied=bool(getattr(c, "tie_word_embeddings", False)),
            unprunable=minitron_refusal(self.family),
        )
