"""The architectures pyggml runs, one row each, keyed by general.architecture.

A row says what differs from plain LLaMA: how RoPE pairs dimensions (adjacent pairs, as GGUF llama
files are stored for, or NeoX halves), which extra tensors a block has (Q/K/V biases, per-head Q/K
RMSNorms), and which optional global tensors the file may carry (rope_freqs). The forward pass
(llama.py) reads these flags; nothing else is special-cased by architecture name.

NeoX RoPE rotates dimension i with i + rope_dim/2 of each head. The model turns that into the
adjacent-pair rotation every backend implements by permuting, at load, the rows of attn_q / attn_k
(and their biases and Q/K norm weights) within each head: new row 2i is old row i, new row 2i + 1
is old row i + rope_dim/2. Attention only ever takes dot products of a query head with a key head,
permuted alike, so its result is unchanged; V and the output projection are untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf.constants import TensorNames

__all__ = ["Arch", "ARCHITECTURES", "BLOCK_EXTRAS", "neox_order"]


@dataclass(frozen=True)
class Arch:
    name: str
    rope_neox: bool = False  # RoPE over NeoX halves (stored q/k rows not permuted for adjacent pairs)
    qkv_bias: bool = False  # blk.N.attn_{q,k,v}.bias
    qk_norm: bool = False  # blk.N.attn_{q,k}_norm.weight: RMSNorm of each head of q and k before RoPE
    rope_freqs: bool = False  # may carry rope_freqs.weight (Llama 3.1+ frequency factors)

    def block_tensors(self) -> tuple[str, ...]:
        """The names (with {i}) of every tensor of a block."""
        extra = ()
        if self.qkv_bias:
            extra += (TensorNames.ATTN_Q_BIAS, TensorNames.ATTN_K_BIAS, TensorNames.ATTN_V_BIAS)
        if self.qk_norm:
            extra += (TensorNames.ATTN_Q_NORM, TensorNames.ATTN_K_NORM)
        return TensorNames.BLOCK + extra

    @property
    def block_extras(self) -> frozenset[str]:
        """The ops a block has beyond LLaMA's (a backend's fused decode step runs a block only when it
        runs each of them: its `decode_step_extras`)."""
        return frozenset(f for f in BLOCK_EXTRAS if getattr(self, f))


BLOCK_EXTRAS = ("qkv_bias", "qk_norm")


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", rope_freqs=True),  # Llama 1/2/3.x, TinyLlama, SmolLM, Mistral 7B, DeepSeek-R1-Distill-Llama
    Arch("qwen2", rope_neox=True, qkv_bias=True),  # Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen
    Arch("qwen3", rope_neox=True, qk_norm=True),
)}


def neox_order(n_heads: int, head_dim: int, rope_dim: int) -> np.ndarray:
    """Row order that makes a NeoX-rotated projection (n_heads * head_dim rows) rotate adjacent pairs."""
    half = rope_dim // 2
    per_head = np.concatenate([np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1),
                               np.arange(rope_dim, head_dim)])
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)
