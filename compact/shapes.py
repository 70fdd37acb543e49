"""Shape: the numbers that fix a model's size, and exact parameter/FLOP counts from them.

A Shape is what a person picks in the Prune tab, so everything here is cheap arithmetic:
no model is touched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True
    # Family traits that change the count; filled in by the adapter (compact.arch).
    gated_mlp: bool = True  # gate+up+down (Llama) or up+down (GPT-2)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm (weight+bias) vs RMSNorm (weight)
    qk_norm: bool = False  # Qwen3 per-head q/k RMSNorm
    qk_norm_full: bool = False  # OLMo 2: q/k RMSNorm over the whole projection (heads x head_dim)
    norms_per_block: int = 2  # Gemma: 4 (input, post-attention, pre- and post-feedforward)
    positions: int = 0  # learned position embeddings (GPT-2); 0 for rotary
    # transformers' configs for some families (Gemma; Llama with biases, which cannot be saved
    # as Mistral instead) refuse a hidden size that is not a multiple of the head count, even
    # with head_dim given, so their pruned shapes keep hidden % heads == 0.
    hidden_divisible_by_heads: bool = False
    # Phi-3's long-context RoPE checks its factor lists against hidden // heads, not head_dim.
    head_dim_from_hidden: bool = False
    # Why Minitron cannot trim this model at all (a layout the adapter has no rules for, such
    # as OPT-350m's projected embeddings); "" when it can. Every other command still works.
    unprunable: str = ""

    def with_targets(self, layers=None, hidden=None, ffn=None, heads=None) -> Shape:
        """The shape after pruning to the given targets (None keeps an axis)."""
        new = replace(
            self,
            layers=self.layers if layers is None else int(layers),
            hidden=self.hidden if hidden is None else int(hidden),
            ffn=self.ffn if ffn is None else int(ffn),
            heads=self.heads if heads is None else int(heads),
        )
        if new.heads != self.heads and self.kv_heads == self.heads:
            # Multi-head attention: every query head is its own KV group, so both shrink.
            new = replace(new, kv_heads=new.heads)
        return new

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def params(self) -> int:
        return count_params(self)


def shape_error(s: Shape) -> str | None:
    """Why a target shape cannot be saved as an ordinary checkpoint, or None if it can."""
    if s.unprunable:
        return s.unprunable
    if min(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) <= 0:
        return "every axis must be positive"
    if s.heads % s.kv_heads:
        return f"heads ({s.heads}) must be a multiple of the {s.kv_heads} KV heads"
    if s.hidden_divisible_by_heads and s.hidden % s.heads:
        return (f"hidden ({s.hidden}) must be a multiple of heads ({s.heads}): transformers' "
                "config for this family requires it")
    if s.head_dim_from_hidden and s.hidden // s.heads != s.head_dim:
        return (f"hidden // heads must stay {s.head_dim} (the head size): this model's long-context "
                f"RoPE is sized by it, so keep hidden between {s.heads * s.head_dim} and "
                f"{s.heads * (s.head_dim + 1) - 1} for {s.heads} heads")
    return None


def count_params(s: Shape) -> int:
    norm = s.hidden * (2 if s.norm_bias else 1)
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn = s.hidden * q_out + 2 * s.hidden * kv_out + q_out * s.hidden
    if s.qkv_bias:
        attn += q_out + 2 * kv_out
    if s.o_bias:
        attn += s.hidden
    if s.qk_norm:
        attn += 2 * s.head_dim
    if s.qk_norm_full:
        attn += q_out + kv_out
    mlp = (3 if s.gated_mlp else 2) * s.hidden * s.ffn
    if s.mlp_bias:
        mlp += (2 if s.gated_mlp else 1) * s.ffn + s.hidden
    per_layer = attn + mlp + s.norms_per_block * norm
    embed = s.vocab * s.hidden + s.positions * s.hidden
    head = 0 if s.tied else s.vocab * s.hidden
    return embed + s.layers * per_layer + norm + head


def flops_per_token(s: Shape, context: int = 1024) -> int:
    """Forward FLOPs per token (2 per multiply-add) at a given context length."""
    matmul = count_params(s) - s.vocab * s.hidden - s.positions * s.hidden
    if s.tied:
        matmul += s.vocab * s.hidden  # the tied LM head still multiplies
    attention = 2 * s.layers * s.heads * s.head_dim * context  # scores and weighted sum
    return 2 * matmul + 2 * attention


def memory_bytes(s: Shape, bytes_per_param: int = 2) -> int:
    return count_params(s) * bytes_per_param


def valid_values(s: Shape) -> dict:
    """The values each axis may take when pruning from shape s.

    heads must stay a multiple of kv_heads (KV groups are kept, query heads pruned within
    each group); for multi-head attention any count works since groups shrink with heads.
    """
    if s.kv_heads == s.heads:
        heads = list(range(1, s.heads + 1))
    else:
        heads = [h for h in range(s.kv_heads, s.heads + 1) if h % s.kv_heads == 0]
    return {
        "layers": list(range(1, s.layers + 1)),
        "hidden": list(range(1, s.hidden + 1)),
        "ffn": list(range(1, s.ffn + 1)),
        "heads": heads,
    }
