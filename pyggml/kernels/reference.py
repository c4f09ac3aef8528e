"""Slow, obviously-correct numpy versions of every kernel; the fast ones are tested against these."""
from __future__ import annotations

import numpy as np

from ..gguf.constants import GGMLType
from ..quant import codecs


def dequantize_weight(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """Stored weight (rows, stored row) -> float32 (rows, cols)."""
    return codecs.dequantize(raw, ggml_type)


def matmul(raw: np.ndarray, ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """x (n_tok, cols) @ W.T -> (n_tok, rows); also takes a single vector (cols,)."""
    return (x.astype(np.float64) @ dequantize_weight(raw, ggml_type).astype(np.float64).T).astype(np.float32)


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """What the int8-activation kernels multiply: x rounded to int8 blocks of 32 (d = amax/127,
    round half away from zero), returned dequantized as float64 (n_tok, cols)."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    v = blocks * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def matmul_int8_activations(raw: np.ndarray, ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """The exact result the int8-activation kernels approximate only by float rounding."""
    return (quantize_activations(x) @ dequantize_weight(raw, ggml_type).astype(np.float64).T).astype(np.float32)


def int8_activation_error_bound(raw: np.ndarray, ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """|W x - W q(x)| <= sum_j |W_rj| * d_x(block of j) / 2: the rounding of x to int8 blocks."""
    d = np.abs(x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)).max(-1) / 127.0
    half_step = np.repeat(d / 2, 32, axis=-1)  # (n_tok, cols)
    return half_step.astype(np.float64) @ np.abs(dequantize_weight(raw, ggml_type).astype(np.float64)).T


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, rope_dim: int, freq_base: float) -> np.ndarray:
    """Rotate ADJACENT pairs (2i, 2i+1) of each head. x: (n_tok, n_heads, head_dim)."""
    out = x.astype(np.float64).copy()
    i = np.arange(rope_dim // 2)
    theta = positions[:, None].astype(np.float64) * freq_base ** (-2.0 * i / rope_dim)  # (n_tok, rope_dim/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = out[..., 0:rope_dim:2].copy(), out[..., 1:rope_dim:2].copy()
    out[..., 0:rope_dim:2] = a * cos - b * sin
    out[..., 1:rope_dim:2] = a * sin + b * cos
    return out.astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention for n_tok new tokens at positions start_pos.. .

    q: (n_tok, n_head, head_dim); k, v: (n_kv_head, >= start_pos + n_tok, head_dim) cache.
    Returns (n_tok, n_head, head_dim).
    """
    n_tok, n_head, head_dim = q.shape
    group = n_head // k.shape[0]
    out = np.empty(q.shape, dtype=np.float32)
    for t in range(n_tok):
        n = start_pos + t + 1
        for h in range(n_head):
            kh, vh = k[h // group, :n].astype(np.float64), v[h // group, :n].astype(np.float64)
            s = kh @ q[t, h].astype(np.float64) / np.sqrt(head_dim)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vh
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)
