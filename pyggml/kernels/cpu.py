"""numba CPU kernels. Public functions check shapes and types; the @njit kernels trust them.

Weights stay in their stored GGUF block layout (views into the mmap): every matrix-vector
product dequantizes on the fly, one block at a time, and never materialises a float copy of a
weight matrix. Rows are split across threads with prange. fp16 scales are decoded through a
65536-entry float32 table (numba has no float16 arithmetic on the CPU).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from ..tensor import QWeight

# fp16 bit pattern -> float32 value.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

_Q4_0 = TYPE_TRAITS[GGMLType.Q4_0].type_size
_Q5_0 = TYPE_TRAITS[GGMLType.Q5_0].type_size
_Q8_0 = TYPE_TRAITS[GGMLType.Q8_0].type_size
_Q6_K = TYPE_TRAITS[GGMLType.Q6_K].type_size
_HALF = QK // 2

# Type codes for the generic row decoder (numba dispatches on ints, not enums).
_CODES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.BF16: 2, GGMLType.Q4_0: 3,
          GGMLType.Q5_0: 4, GGMLType.Q8_0: 5, GGMLType.Q6_K: 6}
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


# ------------------------------------------------------------------- fused matrix x vector
@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q4_0(w, x, out, table):
    nb = x.size // QK
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * _Q4_0
            xo = b * QK
            s = np.float32(0.0)
            for j in range(_HALF):
                q = row[o + 2 + j]
                s += np.float32(np.int32(q & 15) - 8) * x[xo + j] + np.float32(np.int32(q >> 4) - 8) * x[xo + j + _HALF]
            acc += _f16(row, o, table) * s
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q5_0(w, x, out, table):
    nb = x.size // QK
    for r in prange(w.shape[0]):
        row = w[r]
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * _Q5_0
            xo = b * QK
            qh = np.uint32(row[o + 2]) | (np.uint32(row[o + 3]) << 8) | (np.uint32(row[o + 4]) << 16) | (np.uint32(row[o + 5]) << 24)
            s = np.float32(0.0)
            for j in range(_HALF):
                q = row[o + 6 + j]
                lo = np.int32(q & 15) | np.int32(((qh >> j) & 1) << 4)
                hi = np.int32(q >> 4) | np.int32(((qh >> (j + _HALF)) & 1) << 4)
                s += np.float32(lo - 16) * x[xo + j] + np.float32(hi - 16) * x[xo + j + _HALF]
            acc += _f16(row, o, table) * s
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_q8_0(w, wi8, x, out, table):
    nb = x.size // QK
    for r in prange(w.shape[0]):
        row = w[r]
        rowi = wi8[r]
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * _Q8_0
            xo = b * QK
            s = np.float32(0.0)
            for j in range(QK):
                s += np.float32(rowi[o + 2 + j]) * x[xo + j]
            acc += _f16(row, o, table) * s
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_f32(w, x, out):
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        row = w[r]
        for j in range(x.size):
            acc += row[j] * x[j]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _matvec_decoded(code, w, x, out, table):
    """Any type: decode each row into a small buffer, then dot (F16, BF16, Q6_K)."""
    for r in prange(w.shape[0]):
        buf = np.empty(x.size, np.float32)
        _decode_row(code, w[r], buf, table)
        acc = np.float32(0.0)
        for j in range(x.size):
            acc += buf[j] * x[j]
        out[r] = acc


@njit(parallel=True, cache=True)
def _decode_tile(code, raw, r0, out, table):
    for i in prange(out.shape[0]):
        _decode_row(code, raw[r0 + i], out[i], table)


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


def matvec(w: QWeight, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (rows,) = W @ x (cols,), dequantizing W block by block."""
    assert x.shape == (w.cols,) and out.shape == (w.rows,) and x.dtype == np.float32
    t = w.ggml_type
    if t is GGMLType.Q4_0:
        _matvec_q4_0(w.raw, x, out, F16_TABLE)
    elif t is GGMLType.Q5_0:
        _matvec_q5_0(w.raw, x, out, F16_TABLE)
    elif t is GGMLType.Q8_0:
        _matvec_q8_0(w.raw, w.raw.view(np.int8), x, out, F16_TABLE)
    elif t is GGMLType.F32:
        _matvec_f32(w.raw, x, out)
    else:
        _matvec_decoded(_code(w), _bytes2d(w.raw), x, out, F16_TABLE)
    return out


TILE_ROWS = 256  # rows decoded per tile in the batched path


def matmul(w: QWeight, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (n_tok, rows) = x (n_tok, cols) @ W.T for a batch of tokens.

    Each tile of rows is decoded once into a small float32 buffer and multiplied with the whole
    batch through BLAS, so the weights are read once per batch, not once per token.
    """
    assert x.ndim == 2 and x.shape[1] == w.cols and out.shape == (x.shape[0], w.rows)
    if x.shape[0] == 1:
        matvec(w, x[0], out[0])
        return out
    if w.ggml_type is GGMLType.F32:
        np.matmul(x, w.raw.T, out=out)
        return out
    code, raw = _code(w), _bytes2d(w.raw)
    tile = np.empty((min(TILE_ROWS, w.rows), w.cols), np.float32)
    for r0 in range(0, w.rows, TILE_ROWS):
        n = min(TILE_ROWS, w.rows - r0)
        _decode_tile(code, raw, r0, tile[:n], F16_TABLE)
        out[:, r0 : r0 + n] = x @ tile[:n].T
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
