"""numba CPU kernels. Public functions check shapes and types; the @njit kernels trust them.

Weights stay in their stored GGUF block layout (views into the mmap): every matrix product
dequantizes on the fly, one block at a time, and never materialises a float copy of a weight
matrix. Rows are split across threads with prange. The per-block dot products of the quantized
types are explicit SIMD (kernels/simd.py) over int8-quantized activations; fp16 scales are
decoded through a 65536-entry float32 table (numba has no float16 arithmetic on the CPU).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import numba
from numba import njit, prange

from ..gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from ..tensor import KERNEL_TYPE_CODES, QWeight
from .simd import HAS_F16_VECTOR, dot_f16, tile_kernel

# fp16 bit pattern -> float32 value.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

_Q4_0 = TYPE_TRAITS[GGMLType.Q4_0].type_size
_Q5_0 = TYPE_TRAITS[GGMLType.Q5_0].type_size
_Q8_0 = TYPE_TRAITS[GGMLType.Q8_0].type_size
_Q6_K = TYPE_TRAITS[GGMLType.Q6_K].type_size
_HALF = QK // 2

_CODES = KERNEL_TYPE_CODES  # for the generic row decoder
SUPPORTED_TYPES = frozenset(_CODES)


@njit(inline="always")
def _f16(row, o, table):
    return table[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@njit(inline="always")
def _i8(byte):
    v = np.int32(byte)
    return v - 256 if v > 127 else v


# ------------------------------------------------------------------------------ row decoders
@njit(inline="always")
def _decode_q4_0(row, out, table):
    for b in range(out.size // QK):
        o = b * _Q4_0
        d = _f16(row, o, table)
        for j in range(_HALF):
            q = row[o + 2 + j]
            out[b * QK + j] = d * np.float32(np.int32(q & 15) - 8)
            out[b * QK + j + _HALF] = d * np.float32(np.int32(q >> 4) - 8)


@njit(inline="always")
def _decode_q5_0(row, out, table):
    for b in range(out.size // QK):
        o = b * _Q5_0
        d = _f16(row, o, table)
        qh = np.uint32(row[o + 2]) | (np.uint32(row[o + 3]) << 8) | (np.uint32(row[o + 4]) << 16) | (np.uint32(row[o + 5]) << 24)
        for j in range(_HALF):
            q = row[o + 6 + j]
            lo = np.int32(q & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + _HALF)) & 1) << 4)
            out[b * QK + j] = d * np.float32(lo - 16)
            out[b * QK + j + _HALF] = d * np.float32(hi - 16)


@njit(inline="always")
def _decode_q8_0(row, out, table):
    for b in range(out.size // QK):
        o = b * _Q8_0
        d = _f16(row, o, table)
        for j in range(QK):
            out[b * QK + j] = d * np.float32(_i8(row[o + 2 + j]))


@njit(inline="always")
def _decode_q6_k(row, out, table):
    for b in range(out.size // QK_K):
        o = b * _Q6_K
        d = _f16(row, o + 208, table)  # ql[128] qh[64] scales[16] d
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            sc = o + 192 + 8 * half
            y = b * QK_K + 128 * half
            for l in range(32):
                h = np.int32(row[qh + l])
                q1 = (np.int32(row[ql + l] & 15) | ((h & 3) << 4)) - 32
                q2 = (np.int32(row[ql + l + 32] & 15) | (((h >> 2) & 3) << 4)) - 32
                q3 = (np.int32(row[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = (np.int32(row[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                i = sc + l // 16
                out[y + l] = d * np.float32(_i8(row[i]) * q1)
                out[y + l + 32] = d * np.float32(_i8(row[i + 2]) * q2)
                out[y + l + 64] = d * np.float32(_i8(row[i + 4]) * q3)
                out[y + l + 96] = d * np.float32(_i8(row[i + 6]) * q4)


@njit(inline="always")
def _decode_row(code, row, out, table):
    """Decode one stored row into float32 `out`. `row` is its bytes (uint8) for every type."""
    if code == 0:
        out[:] = row.view(np.float32)
    elif code == 1:
        bits = row.view(np.uint16)
        for j in range(out.size):
            out[j] = table[bits[j]]
    elif code == 2:
        bits = row.view(np.uint16)
        u = out.view(np.uint32)
        for j in range(out.size):
            u[j] = np.uint32(bits[j]) << 16
    elif code == 3:
        _decode_q4_0(row, out, table)
    elif code == 4:
        _decode_q5_0(row, out, table)
    elif code == 5:
        _decode_q8_0(row, out, table)
    else:
        _decode_q6_k(row, out, table)


@njit(parallel=True, cache=True)
def _decode_rows(code, raw, rows, out, table):
    for i in prange(rows.size):
        _decode_row(code, raw[rows[i]], out[i], table)


# ------------------------------------------------------------- activations as int8 blocks
@njit(inline="always")
def _quantize_row(x, xq, xd, xc):
    """One row x (cols,) -> int8 blocks of 32 like ggml's Q8_0: d = amax / 127, q = round(x / d),
    half away from zero; xd[b] = d, xc[b] = d * (sum of the block's q), which takes the Q4_0 / Q5_0
    codes' bias off a one-token product."""
    for b in range(x.size // QK):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b * QK + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        total = 0
        for j in range(QK):
            v = x[b * QK + j] * inv
            q = np.int32(np.floor(abs(v) + np.float32(0.5)))
            q = -q if v < 0 else q
            xq[b * QK + j] = q
            total += q
        xd[b] = d
        xc[b] = d * np.float32(total)


@njit(parallel=True, cache=True)
def _quantize_activations(x, xq, xd, xc):
    for t in prange(x.shape[0]):
        _quantize_row(x[t], xq[t], xd[t], xc[t])


# ---------------------------------------------------- fused matrix x (batch of) vectors
# out[t, r] = dot(W[r], x[t]). One token (decode): each thread streams its rows one at a time (measured
# here, reading several rows side by side streams slower from memory). A batch (prompt): TILE_ROWS x
# TILE_TOKENS tiles, so a weight block is decoded once per TILE_TOKENS tokens and an activation block
# loaded once per TILE_ROWS rows; the activations are swept in column panels of about PANEL_BYTES, which
# stay in L2 while every row of the thread's share passes over them. Edge tiles use smaller kernels.
TILE_ROWS, TILE_TOKENS = 4, 4
PANEL_BYTES = 1 << 17
ROWS_PER_TASK = 64
# tiles of every int8 type (they branch on the type code once per call): full, rows x 1 token, one
_FULL_TILE, _ROWS_TILE, _ONE_TILE = tile_kernel(TILE_ROWS, TILE_TOKENS), tile_kernel(TILE_ROWS, 1), tile_kernel(1, 1)


@njit(cache=True)
def _int8_rows(code, w, r0, r1, xq, xd, xc, b0, b1, out, table):
    """out[:, r0:r1] (+)= W[r0:r1, blocks b0:b1] . x[:, blocks b0:b1] (3 Q4_0, 4 Q5_0, 5 Q8_0)."""
    n_tok = xq.shape[0]
    r = r0
    if n_tok > 1:
        while r + TILE_ROWS <= r1:
            t = 0
            while t + TILE_TOKENS <= n_tok:
                _FULL_TILE(code, w, r, xq, xd, xc, t, b0, b1, out, table)
                t += TILE_TOKENS
            while t < n_tok:
                _ROWS_TILE(code, w, r, xq, xd, xc, t, b0, b1, out, table)
                t += 1
            r += TILE_ROWS
    while r < r1:
        for t in range(n_tok):
            _ONE_TILE(code, w, r, xq, xd, xc, t, b0, b1, out, table)
        r += 1


@njit(parallel=True, cache=True)
def _matmul_int8(code, w, xq, xd, xc, out, table, n_tasks):
    rows, n_tok, nb = w.shape[0], xq.shape[0], xd.shape[1]
    if n_tok == 1:
        for i in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            _int8_rows(code, w, i * ROWS_PER_TASK, min(rows, (i + 1) * ROWS_PER_TASK), xq, xd, xc, 0, nb, out, table)
    else:
        panel = max(8, min(nb, PANEL_BYTES // (QK * n_tok)))
        for task in prange(n_tasks):  # one contiguous row range per thread, the panels in order
            r0 = rows * task // n_tasks
            r1 = rows * (task + 1) // n_tasks
            for b0 in range(0, nb, panel):
                _int8_rows(code, w, r0, r1, xq, xd, xc, b0, min(nb, b0 + panel), out, table)


@njit(parallel=True, cache=True)
def _matmul_f16(w, x, out):
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = dot_f16(w[r], x[t])


@njit(parallel=True, cache=True, fastmath=True)
def _matmul_decoded(code, w, x, out, table):
    """Any type (F32, F16 without vector half support, BF16, Q6_K): decode each row into a small
    buffer once, then dot it with every token."""
    for r in prange(w.shape[0]):
        buf = np.empty(x.shape[1], np.float32)
        _decode_row(code, w[r], buf, table)
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            xt = x[t]
            for j in range(buf.size):
                acc += buf[j] * xt[j]
            out[t, r] = acc


INT8_ACTIVATION_TYPES = frozenset((GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0))


# ----------------------------------------------------------------------------- other ops
@njit(parallel=True, cache=True, fastmath=True)
def _rmsnorm(x, w, eps, out):
    for t in prange(x.shape[0]):
        ss = np.float32(0.0)
        for j in range(x.shape[1]):
            ss += x[t, j] * x[t, j]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[1]) + np.float32(eps))
        for j in range(x.shape[1]):
            out[t, j] = x[t, j] * scale * w[j]


@njit(parallel=True, cache=True)
def _rope(x, positions, inv_freq):
    """x: (n_tok, n_heads, head_dim), rotated in place on adjacent pairs (2i, 2i+1)."""
    n_tok, n_heads = x.shape[0], x.shape[1]
    for t in prange(n_tok):
        for i in range(inv_freq.size):
            theta = np.float64(positions[t]) * inv_freq[i]
            c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
            for h in range(n_heads):
                a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = a * c - b * s
                x[t, h, 2 * i + 1] = a * s + b * c


@njit(parallel=True, cache=True, fastmath=True)
def _attention(q, k, v, start_pos, out):
    """Causal GQA attention. q: (n_tok, n_head, hd); k, v: (n_kv, ctx, hd); out like q."""
    n_tok, n_head, hd = q.shape
    group = n_head // k.shape[0]
    scale = np.float32(1.0 / np.sqrt(hd))
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        kv = h // group
        n = start_pos + t + 1
        scores = np.empty(n, np.float32)
        m = np.float32(-np.inf)
        for p in range(n):
            s = np.float32(0.0)
            for j in range(hd):
                s += q[t, h, j] * k[kv, p, j]
            s *= scale
            scores[p] = s
            m = max(m, s)
        total = np.float32(0.0)
        for p in range(n):
            e = np.exp(scores[p] - m)
            scores[p] = e
            total += e
        for j in range(hd):
            out[t, h, j] = 0.0
        for p in range(n):
            wgt = scores[p] / total
            for j in range(hd):
                out[t, h, j] += wgt * v[kv, p, j]


@njit(parallel=True, cache=True, fastmath=True)
def _silu_mul(g, u, out):
    for i in prange(g.size):
        x = g.flat[i]
        out.flat[i] = x / (np.float32(1.0) + np.exp(-x)) * u.flat[i]


# --------------------------------------------------------------------------- public API
def _code(w: QWeight) -> int:
    try:
        return _CODES[w.ggml_type]
    except KeyError:
        raise NotImplementedError(f"{w.name}: no CPU kernel for {w.ggml_type.name}") from None


def _bytes2d(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.uint8) if raw.dtype != np.uint8 else raw


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n_tok, cols) -> (xq int8 (n_tok, cols), xd f32 (n_tok, cols/32), xc f32 (n_tok, cols/32)):
    codes, scales, scale * code sums."""
    n_tok, cols = x.shape
    xq = np.empty((n_tok, cols), np.int8)
    xd = np.empty((n_tok, cols // QK), np.float32)
    xc = np.empty((n_tok, cols // QK), np.float32)
    _quantize_activations(x, xq, xd, xc)
    return xq, xd, xc


def matmul(w: QWeight, x: np.ndarray, out: np.ndarray, quantized: tuple | None = None) -> np.ndarray:
    """out (n_tok, rows) = x (n_tok, cols) @ W.T, dequantizing W on the fly, for one token or a batch.

    Q4_0/Q5_0/Q8_0 weights multiply int8-quantized activations (blocks of 32, as llama.cpp does):
    integer dot products per block, scaled in float. Other types multiply float activations.
    `quantized` is quantize_activations(x) when the caller already has it.
    """
    assert x.ndim == 2 and x.shape[1] == w.cols and out.shape == (x.shape[0], w.rows) and x.dtype == np.float32
    x = np.ascontiguousarray(x)
    t = w.ggml_type
    if t in INT8_ACTIVATION_TYPES:
        xq, xd, xc = quantized if quantized is not None else quantize_activations(x)
        _matmul_int8(_CODES[t], w.raw, xq, xd, xc, out, F16_TABLE, numba.get_num_threads())
    elif t is GGMLType.F32 and x.shape[0] > 1:
        np.matmul(x, w.raw.T, out=out)
    elif t is GGMLType.F16 and HAS_F16_VECTOR:
        _matmul_f16(_bytes2d(w.raw), x, out)
    else:
        _matmul_decoded(_code(w), _bytes2d(w.raw), x, out, F16_TABLE)
    return out


def matmuls(weights: Sequence[QWeight], x: np.ndarray, outs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Products of one input with several weights (q, k and v; gate and up): the int8 activations
    are made once for all of them."""
    x = np.ascontiguousarray(x)
    quantized = quantize_activations(x) if any(w.ggml_type in INT8_ACTIVATION_TYPES for w in weights) else None
    return [matmul(w, x, out, quantized) for w, out in zip(weights, outs)]


def matvec(w: QWeight, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (rows,) = W @ x (cols,): the batch of one."""
    assert x.shape == (w.cols,) and out.shape == (w.rows,)
    matmul(w, x.reshape(1, -1), out.reshape(1, -1))
    return out


def dequantize_rows(w: QWeight, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Gather rows of a weight as float32, e.g. token embeddings: out (len(rows), cols)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= w.rows):
        raise IndexError(f"{w.name}: row index out of range [0, {w.rows})")
    _decode_rows(_code(w), _bytes2d(w.raw), rows, out, F16_TABLE)
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    _rmsnorm(x, w, eps, out)
    return out


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs in place. x: (n_tok, n_heads, head_dim)."""
    _rope(x, positions, inv_freq)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, out: np.ndarray) -> np.ndarray:
    _attention(q, k, v, start_pos, out)
    return out


def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> np.ndarray:
    _silu_mul(g, u, out)
    return out
