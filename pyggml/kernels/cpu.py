"""numba CPU kernels. Public functions check shapes and types; the @njit kernels trust them.

Every matrix product dequantizes on the fly, one block at a time, and never materialises a float
copy of a weight matrix. Float types are read in their stored GGUF layout (views into the mmap);
Q4_0 / Q5_0 / Q8_0 from a copy of the same blocks rearranged in groups of 8 rows (pack_int8), made
once at load. Rows are split across threads with prange. The per-block dot products of the
quantized types are explicit SIMD (kernels/simd.py) over int8-quantized activations; fp16 scales
are decoded through a 65536-entry float32 table where the CPU has no half-precision conversion.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import numba
from numba import njit, prange

from ..gguf.constants import QK, GGMLType
from ..quant.registry import kernel_code
from ..tensor import KERNEL_TYPE_CODES, QWeight
from .kpack import K_PACKED_TYPES, PAIRS, kpacked_emitters
from .kpacker import pack_k
from .decoders import F16_TABLE, decode_rows, try_decode_row
from .jitcache import per_type
from .vmath import exp_f32, quantize_block32
from .f16tile import matmul_bf16_tiled, matmul_f16_tiled
from .kvattn import attention_seqs, kv_write  # noqa: F401  (the backend's KV ops)
from .packed import PACK_ROWS, PACKED_LAYOUTS, packed_kernel
from .simd import HAS_AVX2, HAS_F16_VECTOR, INT8_PREFETCH, NO_PREFETCH, SMALL_BATCH_PREFETCH, int8_intrinsic, dot_f16, load_u32, row_kernel

_CODES = KERNEL_TYPE_CODES
SUPPORTED_TYPES = frozenset(_CODES)  # every computable type: decoders.py decodes each of them


# ------------------------------------------------------------- activations as int8 blocks
@njit(inline="always")
def _quantize_row(x, xq, xd, xc, xs):
    """One row x (cols,) -> int8 blocks of 32 like ggml's Q8_0: d = amax / 127, q = round(x / d),
    half away from zero; xd[b] = d, xc[b] = d * (sum of the block's q), which takes the Q4_0 / Q5_0
    codes' bias off a one-token product; xs[2b], xs[2b + 1]: the sums of q over each half of the block
    (elements 0-15, 16-31), the offsets and mins of the types with scales per 16 weights (Q6_K, Q3_K,
    Q2_K), as ggml's Q8_K keeps bsums. vmath.quantize_block32 does each block in vectors; the scalar
    form of the same arithmetic is reference.py's quantize_activations."""
    for b in range(x.size // QK):
        quantize_block32(x, b * QK, xq, b * QK, xd, xc, xs, b)


@njit(parallel=True, cache=True)
def _quantize_activations(x, xq, xd, xc, xs):
    for t in prange(x.shape[0]):
        _quantize_row(x[t], xq[t], xd[t], xc[t], xs[t])


# ---------------------------------------------------- fused matrix x (batch of) vectors
# out[t, r] = dot(W[r], x[t]).
# Q4_0 / Q5_0 / Q8_0 are multiplied from a copy packed in groups of 8 rows (pack_int8, layout in
# packed.py): one kernel call computes a group's 8 rows for PACKED_TOKENS tokens, decoding each
# superblock once for all of them. One token (decode): each thread streams the groups of its tasks
# of ROWS_PER_TASK rows. A batch (prompt): each thread takes one contiguous range of groups and
# sweeps the activations in column panels of about PANEL_BYTES, which stay in L2 while every group
# of its share passes over them. Rows past the last full group (rows % 8, small test models) go
# one at a time through the stored layout (simd.row_kernel).
PANEL_BYTES = 1 << 17
ROWS_PER_TASK = 64
GROUPS_PER_TASK = ROWS_PER_TASK // PACK_ROWS
# Tokens per kernel call in a batch, by type: Q8_0 keeps 16 vectors per superblock (|codes| and
# their signs), so a fourth token's accumulator spills. 5632 x 2048 products of 128 tokens here,
# 2 threads, G block-tokens/s for 3 / 4 tokens: Q4_0 4.3 / 4.2, Q5_0 3.5 / 3.7, Q8_0 2.6 / 2.3.
# kpack.py's types: the signed ones (|q| and the signs of the activations) hold more vectors.
PACKED_TOKENS = {GGMLType.Q4_0: 4, GGMLType.Q5_0: 4, GGMLType.Q8_0: 3,
                 GGMLType.Q4_1: 4, GGMLType.Q5_1: 4, GGMLType.Q4_K: 4, GGMLType.Q5_K: 4,
                 GGMLType.Q6_K: 3, GGMLType.Q3_K: 3, GGMLType.Q2_K: 3, GGMLType.IQ4_NL: 3, GGMLType.IQ4_XS: 3}
# Prompts: more tokens a call, each block's codes decoded once for more of them. Measured first where
# there are 32 vector registers (AVX-512, also for the 256-bit kernels); the same products (ms, median of 7) with
# PACKED_TOKENS' tiles / these, SPR 2 vCPUs: Q4_0 8.0 / 7.2, Q5_0 8.4 / 8.0 (8 tokens: 10.4, spills),
# Q8_0 10.1 / 8.6, Q4_1 5.8 / 5.3, Q5_1 7.1 / 5.3, Q4_K 6.8 / 5.9, Q5_K 7.5 / 6.8, Q6_K 10.3 / 8.4,
# Q3_K 15.0 / 8.1 (6 tokens: 8.4), Q2_K 9.1 / 8.1, IQ4_NL 7.9 / 5.8, IQ4_XS 11.3 / 5.8. Since the
# half-scale types take one half at a time (kpack._half_sums; 5632 x 2048 x 128 tokens, 2 threads):
# Q6_K 4 / 6 / 8 tokens 6.9 / 6.0 / 5.4 ms (2 / 3 tokens 9.3 / 7.8 with both halves at once), Q3_K 4 / 8:
# 6.7 / 5.8, Q2_K 8: 5.4 (4 / 6: 7.0 / 6.8 before its mins joined the halves' step).
# The AVX2 kernels (16 registers) gain from these tiles too, spills and all: this host held to AVX2
# (PYGGML_SIMD=avx2, numba's code for Zen 3: NUMBA_CPU_NAME=znver3), PACKED_TOKENS' tiles / these:
# Q4_0 8.3 / 7.6, Q5_0 9.8 / 9.0, Q8_0 13.8 / 12.7, Q4_K 9.1 / 7.9, Q5_K 11.1 / 10.2, Q4_1 7.6 / 7.5,
# Q5_1 10.0 / 8.3, IQ4_NL 14.7 / 12.3, IQ4_XS 17.2 / 13.2, Q6_K 19.0 / 12.5-14.4, Q3_K 18.3 / 14.2,
# Q2_K 13.0 / 12.8. The portable path keeps PACKED_TOKENS'.
# A prompt's last tokens (fewer than a tile) take PACKED_TOKENS' tiles, then single tokens.
PROMPT_TOKENS = {GGMLType.Q4_0: 8, GGMLType.Q5_0: 6, GGMLType.Q8_0: 8, GGMLType.Q4_1: 8, GGMLType.Q5_1: 8,
                 GGMLType.Q4_K: 8, GGMLType.Q5_K: 6, GGMLType.Q6_K: 8, GGMLType.Q3_K: 8, GGMLType.Q2_K: 8,
                 GGMLType.IQ4_NL: 8, GGMLType.IQ4_XS: 8} if HAS_AVX2 else PACKED_TOKENS
_ONE = {t: 1 for t in PACKED_TOKENS}
_PACKED_ONE = packed_kernel(_ONE, INT8_PREFETCH, kpacked_emitters(_ONE, INT8_PREFETCH))
_PACKED_TILE = packed_kernel(PROMPT_TOKENS, NO_PREFETCH, kpacked_emitters(PROMPT_TOKENS))
# Small batches (a server's decode step: one token of each of a few sequences) read each weight once for
# only a few tokens, so memory matters again: their tiles prefetch (simd.SMALL_BATCH_PREFETCH). TinyLlama
# q4_0, 2 threads (SPR): a step of 8 sequences 87 -> 64-69 ms, of 16 121 -> 145 t/s; at 128 tokens
# prefetching costs q4_0 ~5%, so prompts keep the plain tiles.
SMALL_BATCH = 16
_PACKED_SMALL = packed_kernel(PACKED_TOKENS, SMALL_BATCH_PREFETCH, kpacked_emitters(PACKED_TOKENS, SMALL_BATCH_PREFETCH))
# kpack.py's types on AVX-512 hosts: two row groups a call, 16 rows in 512-bit vectors (kpack.PAIRS;
# elsewhere these are never called, and are emitted at one group's width so no AVX-512 code is made)
_PAIR_ONE = int8_intrinsic("paired k-packed kernel", kpacked_emitters(_ONE, INT8_PREFETCH, width=2 if PAIRS else 1))
_PAIR_TILE = int8_intrinsic("paired k-packed kernel", kpacked_emitters(PROMPT_TOKENS, NO_PREFETCH, width=2 if PAIRS else 1))
_PAIR_SMALL = int8_intrinsic("paired k-packed kernel", kpacked_emitters(PACKED_TOKENS, SMALL_BATCH_PREFETCH, width=2 if PAIRS else 1))
_ROW = row_kernel(INT8_PREFETCH)


@njit(inline="always")
def _every_fourth_bit(v):
    """Bits 0, 4, 8, .. 28 of the uint32 v, gathered into bits 0 .. 7."""
    v &= np.uint32(0x11111111)
    v = (v | (v >> np.uint32(3))) & np.uint32(0x03030303)  # byte j: bits 0, 1
    v = (v | (v >> np.uint32(6))) & np.uint32(0x000F000F)  # half j: bits 0 .. 3
    return (v | (v >> np.uint32(12))) & np.uint32(0xFF)


@njit(parallel=True, cache=True)
def _pack(raw, row_bytes, bb, lead, qs, vectors, qh_at, out):
    """raw: the stored rows, flat uint8 -> out (rows // 8, row bytes * 8 / 4): uint32 words of
    packed.py's layout (every field of a superblock starts at a multiple of 4 bytes). bb: block
    bytes; lead: the codes' offset in a stored block; qs: theirs in a superblock, in words; vectors:
    32-byte code vectors per superblock; qh_at: where Q5_0's 5th bits go, in words (-1: no such field)."""
    sb = bb * PACK_ROWS // 4  # words per superblock
    for g in prange(out.shape[0]):
        dst = out[g]
        src0 = g * PACK_ROWS * row_bytes
        for b in range(row_bytes // bb):
            o = b * sb
            for r in range(0, PACK_ROWS, 2):  # two rows' fp16 scales to a word
                s = src0 + r * row_bytes + b * bb
                dst[o + r // 2] = (np.uint32(raw[s]) | (np.uint32(raw[s + 1]) << 8)
                                   | (np.uint32(raw[s + row_bytes]) << 16) | (np.uint32(raw[s + row_bytes + 1]) << 24))
            for r in range(PACK_ROWS):
                s = src0 + r * row_bytes + b * bb
                for m in range(vectors):
                    dst[o + qs + PACK_ROWS * m + r] = load_u32(raw, s + lead + 4 * m)
                if qh_at >= 0:  # word r, byte e, bit k = bit 4k + e of the stored u32
                    qh = load_u32(raw, s + 2)
                    word = np.uint32(0)
                    for e in range(4):
                        word |= _every_fourth_bit(qh >> np.uint32(e)) << np.uint32(8 * e)
                    dst[o + qh_at + r] = word


def pack_int8(w: QWeight) -> np.ndarray:
    """The first rows // 8 * 8 rows of a Q4_0 / Q5_0 / Q8_0 weight in the packed layout of
    kernels/packed.py: (rows // 8, 8 x row bytes) uint8. The rows past the last full group stay in
    w.raw only."""
    raw = _bytes2d(w.raw)
    out = np.empty((w.rows // PACK_ROWS, raw.shape[1] * PACK_ROWS // 4), np.uint32)
    lay = PACKED_LAYOUTS[w.ggml_type]
    _pack(raw.reshape(-1), raw.shape[1], lay.block_bytes, lay.stored_qs, lay.qs // 4, lay.vectors,
          lay.qh_at // 4 if lay.qh else -1, out)
    return out.view(np.uint8)


def pack(w: QWeight) -> np.ndarray:
    """The packed copy the products of an INT8_ACTIVATION_TYPES weight read (packed.py's or kpack.py's layout)."""
    if w.ggml_type in K_PACKED_TYPES:
        return pack_k(_bytes2d(w.raw), w.ggml_type, w.rows, w.cols)
    if w.ggml_type in PACKED_LAYOUTS:
        return pack_int8(w)
    raise ValueError(f"{w.name}: {w.ggml_type.name} weights have no packed layout (they multiply float activations)")


# The products are made per weight type (functools.cache'd factories; the type's kernel code a constant
# of the closure), so numba compiles only the types a model has: the first run of a q4_0 file compiles
# the q4_0 loops, not those of all twelve int8-activation types.
@functools.cache
def _packed_product(code: int):
    """The kernel `(pw, step, big, xq, xd, xc, xs, out, table, n_tasks, pairs)`: out[:, :8 * groups] = a packed
    weight pw (groups, superblocks) of the type `code` times int8-block activations; step, big: PACKED_TOKENS
    and PROMPT_TOKENS of the type; pairs: two groups a call where two are left (kpack.PAIRS)."""
    if code not in _PACKED_CODES:
        raise ValueError(f"_packed_product: kernel code {code} has no packed layout")

    @njit(parallel=True, cache=True)
    def kernel(pw, step, big, xq, xd, xc, xs, out, table, n_tasks, pairs):
        _packed_loops(code, pw, step, big, xq, xd, xc, xs, out, table, n_tasks, pairs)
    return per_type(kernel)


@njit(inline="always")
def _packed_loops(code, pw, step, big, xq, xd, xc, xs, out, table, n_tasks, pairs):
    groups, n_tok, nb = pw.shape[0], xq.shape[0], xd.shape[1]
    if n_tok == 1:
        for i in prange((groups + GROUPS_PER_TASK - 1) // GROUPS_PER_TASK):
            g, g1 = i * GROUPS_PER_TASK, min(groups, (i + 1) * GROUPS_PER_TASK)
            while g < g1:
                if pairs and g + 1 < g1:
                    _PAIR_ONE(code, pw, g, xq, xd, xc, 0, 0, nb, out, table, xs)
                    g += 2
                else:
                    _PACKED_ONE(code, pw, g, xq, xd, xc, 0, 0, nb, out, table, xs)
                    g += 1
    else:
        panel = max(8, min(nb, PANEL_BYTES // (QK * n_tok)))
        small = n_tok <= SMALL_BATCH
        for task in prange(n_tasks):
            g0 = groups * task // n_tasks
            g1 = groups * (task + 1) // n_tasks
            for b0 in range(0, nb, panel):
                b1 = min(nb, b0 + panel)
                g = g0
                while g < g1:
                    two = pairs and g + 1 < g1
                    t = 0
                    while not small and t + big <= n_tok:  # a prompt: PROMPT_TOKENS' tiles
                        if two:
                            _PAIR_TILE(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                        else:
                            _PACKED_TILE(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                        t += big
                    while t + step <= n_tok:  # a small batch, or a prompt's last tokens
                        if two:
                            _PAIR_SMALL(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                        else:
                            _PACKED_SMALL(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                        t += step
                    for t in range(t, n_tok):
                        if two:
                            _PAIR_ONE(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                        else:
                            _PACKED_ONE(code, pw, g, xq, xd, xc, t, b0, b1, out, table, xs)
                    g += 2 if two else 1


@functools.cache
def _rows_product(code: int):
    """The kernel `(w, r0, xq, xd, xc, xs, out, table)`: out[:, r0:] = the stored rows r0 .. of a weight of
    the int8-activation type `code` (Q4_0, Q5_0, Q8_0) times int8-block activations."""
    if code not in _ROW_CODES:
        raise ValueError(f"_rows_product: kernel code {code} has no stored-layout int8 kernel")

    @njit(parallel=True, cache=True)
    def kernel(w, r0, xq, xd, xc, xs, out, table):
        nb = xd.shape[1]
        for r in prange(r0, w.shape[0]):
            for t in range(xq.shape[0]):
                _ROW(code, w, r, xq, xd, xc, t, 0, nb, out, table, xs)
    return per_type(kernel)


@njit(parallel=True, cache=True)
def _matmul_f16(w, x, out):
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = dot_f16(w[r], x[t])


@functools.cache
def _decoded_product(code: int):
    """The kernel `(w, x, out, table)` for any type (F32 and F16 one token at a time where there is no
    vector half support, BF16 decode, the rows of k-packed types past their last group): decode each row
    of the type `code` into a small buffer once, then dot it with every token."""
    @njit(parallel=True, cache=True, fastmath=True)
    def kernel(w, x, out, table):
        for r in prange(w.shape[0]):
            buf = np.empty(x.shape[1], np.float32)
            try_decode_row(code, w[r], buf, table)  # the code was checked by the caller (_code)
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                xt = x[t]
                for j in range(buf.size):
                    acc += buf[j] * xt[j]
                out[t, r] = acc
    return per_type(kernel)


# Weights that multiply int8-block activations from a packed copy: packed.py's layouts and kpack.py's.
INT8_ACTIVATION_TYPES = frozenset((GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0)) | K_PACKED_TYPES
# Float weights whose products read the stored rows directly (a copy in anonymous memory: backends.py).
STREAMED_FLOAT_TYPES = frozenset((GGMLType.F16, GGMLType.BF16))
_PACKED_CODES = frozenset(_CODES[t] for t in INT8_ACTIVATION_TYPES)
_ROW_CODES = frozenset(_CODES[t] for t in PACKED_LAYOUTS)


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
def _silu_mul(g, u, out):
    """g, u, out: 1-D (2-D arrays' .flat costs a division an element)."""
    for i in prange(g.size):
        x = g[i]
        out[i] = x / (np.float32(1.0) + exp_f32(-x)) * u[i]


# --------------------------------------------------------------------------- public API
def _code(w: QWeight) -> int:
    return kernel_code(w.ggml_type, w.name)


def _bytes2d(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.uint8) if raw.dtype != np.uint8 else raw


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (n_tok, cols) -> (xq int8 (n_tok, cols), xd f32 (n_tok, cols/32), xc f32 (n_tok, cols/32),
    xs int32 (n_tok, cols/16)): codes, scales, scale * code sums, code sums of each 16."""
    n_tok, cols = x.shape
    xq = np.empty((n_tok, cols), np.int8)
    xd = np.empty((n_tok, cols // QK), np.float32)
    xc = np.empty((n_tok, cols // QK), np.float32)
    xs = np.empty((n_tok, cols // (QK // 2)), np.int32)
    _quantize_activations(x, xq, xd, xc, xs)
    return xq, xd, xc, xs


def matmul(w: QWeight, x: np.ndarray, out: np.ndarray, quantized: tuple | None = None) -> np.ndarray:
    """out (n_tok, rows) = x (n_tok, cols) @ W.T, dequantizing W on the fly, for one token or a batch.

    Q4_0/Q5_0/Q8_0 weights multiply int8-quantized activations (blocks of 32, as llama.cpp does):
    integer dot products per block, scaled in float, from w.packed (packed here when w has none).
    Other types multiply float activations.
    `quantized` is quantize_activations(x) when the caller already has it.
    """
    assert x.ndim == 2 and x.shape[1] == w.cols and out.shape == (x.shape[0], w.rows) and x.dtype == np.float32
    x = np.ascontiguousarray(x)
    t = w.ggml_type
    if t in INT8_ACTIVATION_TYPES:
        xq, xd, xc, xs = quantized if quantized is not None else quantize_activations(x)
        packed = w.packed if w.packed is not None else pack(w)
        if packed.shape[0]:
            _packed_product(_CODES[t])(packed, PACKED_TOKENS[t], PROMPT_TOKENS[t], xq, xd, xc, xs, out, F16_TABLE, numba.get_num_threads(),
                                       PAIRS and t in K_PACKED_TYPES)
        r0 = packed.shape[0] * PACK_ROWS  # rows past the last group of 8 (small test models) follow
        if r0 < w.rows and t in K_PACKED_TYPES:  # decoded, times the int8 activations as floats
            xf = (xq.reshape(len(xq), -1, QK) * xd[:, :, None]).reshape(len(xq), -1)
            _decoded_product(_CODES[t])(_bytes2d(w.raw)[r0:], xf, out[:, r0:], F16_TABLE)
        elif r0 < w.rows:
            _rows_product(_CODES[t])(w.raw, r0, xq, xd, xc, xs, out, F16_TABLE)
    elif t is GGMLType.F32 and x.shape[0] > 1:
        np.matmul(x, w.raw.T, out=out)
    elif t is GGMLType.F16 and HAS_F16_VECTOR and x.shape[0] > 1:  # a prompt: register tiles (f16tile.py)
        out[...] = 0
        matmul_f16_tiled(_bytes2d(w.raw), x, out, numba.get_num_threads())
    elif t is GGMLType.BF16 and x.shape[0] > 1:
        out[...] = 0
        matmul_bf16_tiled(_bytes2d(w.raw), x, out, numba.get_num_threads())
    elif t is GGMLType.F16 and HAS_F16_VECTOR:
        _matmul_f16(_bytes2d(w.raw), x, out)
    else:
        _decoded_product(_code(w))(_bytes2d(w.raw), x, out, F16_TABLE)
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
    decode_rows(_code(w), _bytes2d(w.raw), rows, out, F16_TABLE)
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    _rmsnorm(x, w, eps, out)
    return out


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs in place. x: (n_tok, n_heads, head_dim)."""
    _rope(x, positions, inv_freq)
    return x


def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> np.ndarray:
    assert g.shape == u.shape == out.shape and out.flags.c_contiguous
    _silu_mul(np.ascontiguousarray(g).reshape(-1), np.ascontiguousarray(u).reshape(-1), out.reshape(-1))
    return out
