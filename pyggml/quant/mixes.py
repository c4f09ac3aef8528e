"""llama.cpp's K-quant mixes (Q4_K_M, Q3_K_S, ...): which weight type each tensor of a file gets.

A mix is a base type plus upgrades for the tensors that suffer most from quantization (attn_v,
ffn_down, attn_output, the output projection), some only in chosen layers. Which tensors get which
type follows llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for dense llama models: no
experts, no importance matrix, no --pure, no --output-tensor-type / --token-embedding-type. There
the attn_v and ffn_down layer counters advance once per layer in layer order, so for a dense model
they are the layer index used here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..gguf.constants import TYPE_TRAITS, GGMLType, LlamaFileType, TensorNames

T = GGMLType

# A layer predicate: (layer index, number of layers, n_heads // n_kv_heads) -> upgrade this layer?
LayerRule = Callable[[int, int, int], bool]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third
    layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


ALL: LayerRule = lambda i, n, gqa: True  # noqa: E731
MORE_BITS: LayerRule = lambda i, n, gqa: use_more_bits(i, n)  # noqa: E731
GQA4: LayerRule = lambda i, n, gqa: gqa >= 4  # noqa: E731 (4+ query heads share each kv head)


def first(k: int) -> LayerRule:
    """The first k layers."""
    return lambda i, n, gqa: i < k


def first_fraction(d: int) -> LayerRule:
    """The first n // d layers."""
    return lambda i, n, gqa: i < n // d


# Upgrades of one tensor role: (rule, type) pairs, the first rule that holds wins; none: the base type.
Upgrades = tuple[tuple[LayerRule, GGMLType], ...]


@dataclass(frozen=True)
class Mix:
    """One llama.cpp ftype: its base type and per-role upgrades (roles: attn_v, ffn_down, attn_output)."""

    name: str
    file_type: LlamaFileType
    base: GGMLType
    upgrades: dict[str, Upgrades] = field(default_factory=dict)


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("q2_k", LlamaFileType.MOSTLY_Q2_K, T.Q2_K, {
        "attn_v": ((GQA4, T.Q4_K), (ALL, T.Q3_K)),
        "ffn_down": ((ALL, T.Q3_K),),
        "attn_output": ((ALL, T.Q3_K),)}),
    Mix("q3_k_s", LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
    Mix("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K, {
        "attn_v": ((first(2), T.Q5_K), (ALL, T.Q4_K)),
        "ffn_down": ((first_fraction(16), T.Q5_K), (ALL, T.Q4_K)),
        "attn_output": ((ALL, T.Q4_K),)}),
    Mix("q3_k_l", LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K, {
        "attn_v": ((ALL, T.Q5_K),),
        "ffn_down": ((ALL, T.Q5_K),),
        "attn_output": ((ALL, T.Q5_K),)}),
    Mix("q4_k_s", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K, {
        "attn_v": ((first(4), T.Q5_K),),
        "ffn_down": ((first_fraction(8), T.Q5_K),)}),
    Mix("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K, {
        "attn_v": ((MORE_BITS, T.Q6_K),),
        "ffn_down": ((MORE_BITS, T.Q6_K),)}),
    Mix("q5_k_s", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
    Mix("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K, {
        "attn_v": ((MORE_BITS, T.Q6_K),),
        "ffn_down": ((MORE_BITS, T.Q6_K),)}),
)}

OUTPUT_TYPE = T.Q6_K  # output.weight (and a tied token_embd) in every mix
OUTPUT_ODD_ROWS_TYPE = T.Q8_0  # ... when its rows are not whole blocks of the mix's base type
BIG_GQA_TYPE = T.Q5_K  # attn_v of a 70B llama (80 layers, GQA) where the mix asks for Q3_K or Q4_K
NORM_TYPE = T.F32  # 1-D tensors (norms) are not quantized

# A 256-weight type asked for a row that is not whole super-blocks: the 32-weight type used instead
# (and F16 when the row is not whole 32-weight blocks either).
FALLBACK: dict[GGMLType, GGMLType] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}
LAST_RESORT = T.F16

_ROLE_NAMES = {"attn_v": TensorNames.ATTN_V, "ffn_down": TensorNames.FFN_DOWN, "attn_output": TensorNames.ATTN_OUTPUT}
_LAYER = re.compile(r"blk\.(\d+)\.")


def get_mix(mix: str) -> Mix:
    """The mix named `mix` (llama.cpp's ftype name, any case: "Q4_K_M", "q4_k_m")."""
    try:
        return MIXES[mix.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown quantization mix {mix!r}; valid mixes: {', '.join(MIXES)}") from None


def _fits(t: GGMLType, n_cols: int) -> bool:
    return n_cols % TYPE_TRAITS[t].block_size == 0


def _with_fallback(t: GGMLType, n_cols: int) -> GGMLType:
    if _fits(t, n_cols):
        return t
    t = FALLBACK.get(t, t)
    return t if _fits(t, n_cols) else LAST_RESORT


def mix_type(mix: str, name: str, shape: tuple[int, ...], n_layers: int, n_gqa: int, *, tied: bool = False) -> GGMLType:
    """The type llama.cpp's `llama-quantize <mix>` gives tensor `name` (numpy-order `shape`) of a dense
    llama model with `n_layers` layers and n_gqa = n_heads // n_kv_heads. `tied`: the file has no
    output.weight, so token_embd is quantized as the output projection."""
    m = get_mix(mix)
    if len(shape) < 2:
        return NORM_TYPE
    n_cols = shape[-1]
    if name == TensorNames.OUTPUT or (tied and name == TensorNames.TOKEN_EMBD):
        t = OUTPUT_TYPE if _fits(m.base, n_cols) else OUTPUT_ODD_ROWS_TYPE
        return _with_fallback(t, n_cols)
    t = m.base
    layer = _LAYER.match(name)
    if layer is not None:
        i = int(layer.group(1))
        for role, template in _ROLE_NAMES.items():
            if name == template.format(i=i):
                t = next((u for rule, u in m.upgrades.get(role, ()) if rule(i, n_layers, n_gqa)), m.base)
                if role == "attn_v" and n_layers == 80 and n_gqa > 1 and t in (T.Q3_K, T.Q4_K):
                    t = BIG_GQA_TYPE
                break
    return _with_fallback(t, n_cols)
