"""numba row decoders: one stored row of any computable weight type -> float32, bit for bit what
ggml's dequantize_row_* (and the `gguf` package's dequantize) gives.

They serve the embedding lookup and the fallback product of the types with no SIMD path. Each
decoder takes `row` (the row's bytes, uint8), `out` (float32, the row's element count) and `table`
(F16_TABLE, fp16 bits -> float32). Products are formed in float32 in ggml's order, e.g. Q4_K's
y = (d * sc) * q - (dmin * m), so results are exact, not merely close.

Layouts (per block, in storage order) are those of gguf/constants.py's TYPE_TRAITS comments. A
super-block of 256 weights is cut into sub-blocks that share one scale: 16 of 16 (Q2_K, Q3_K, Q6_K)
or 8 of 32 (Q4_K, Q5_K, IQ4_XS); each scale is decoded once per sub-block.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from ..gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from ..quant.kquants import IQ4NL_VALUES
from ..quant.registry import COMPUTABLE_TYPES, KERNEL_TYPE_CODES
from .dispatch import by_code
from .jitcache import per_type

__all__ = ["F16_TABLE", "check_code", "decode_row", "decode_rows", "dequantize_rows", "try_decode_row"]

# fp16 bit pattern -> float32 value.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

# IQ4_NL / IQ4_XS: a 4-bit code indexes IQ4NL_VALUES, the codec's non-linear table (ggml's kvalues_iq4nl).
_IQ4NL_F32 = IQ4NL_VALUES.astype(np.float32)
# Nibble -> float32 as Q4_1 / Q4_K (and, less 8, Q4_0) read it: Q4_0 decoded about twice as fast by
# this lookup as by converting the integer (numba 0.6x, one x86 thread).
_U4_F32 = np.arange(16, dtype=np.float32)
_Q4_0_F32 = _U4_F32 - np.float32(8)

# Kernel codes (numba freezes these module ints as constants).
_C_F32 = KERNEL_TYPE_CODES[GGMLType.F32]
_C_F16 = KERNEL_TYPE_CODES[GGMLType.F16]
_C_BF16 = KERNEL_TYPE_CODES[GGMLType.BF16]
_C_Q4_0 = KERNEL_TYPE_CODES[GGMLType.Q4_0]
_C_Q4_1 = KERNEL_TYPE_CODES[GGMLType.Q4_1]
_C_Q5_0 = KERNEL_TYPE_CODES[GGMLType.Q5_0]
_C_Q5_1 = KERNEL_TYPE_CODES[GGMLType.Q5_1]
_C_Q8_0 = KERNEL_TYPE_CODES[GGMLType.Q8_0]
_C_Q2_K = KERNEL_TYPE_CODES[GGMLType.Q2_K]
_C_Q3_K = KERNEL_TYPE_CODES[GGMLType.Q3_K]
_C_Q4_K = KERNEL_TYPE_CODES[GGMLType.Q4_K]
_C_Q5_K = KERNEL_TYPE_CODES[GGMLType.Q5_K]
_C_Q6_K = KERNEL_TYPE_CODES[GGMLType.Q6_K]
_C_IQ4_NL = KERNEL_TYPE_CODES[GGMLType.IQ4_NL]
_C_IQ4_XS = KERNEL_TYPE_CODES[GGMLType.IQ4_XS]
_N_CODES = len(KERNEL_TYPE_CODES)
if sorted(KERNEL_TYPE_CODES.values()) != list(range(_N_CODES)):
    raise RuntimeError("decoders: check_code assumes the registry's kernel codes are 0 .. n - 1")

# Block bytes.
_B_Q4_0 = TYPE_TRAITS[GGMLType.Q4_0].type_size  # d, qs[16]
_B_Q4_1 = TYPE_TRAITS[GGMLType.Q4_1].type_size  # d, m, qs[16]
_B_Q5_0 = TYPE_TRAITS[GGMLType.Q5_0].type_size  # d, qh[4], qs[16]
_B_Q5_1 = TYPE_TRAITS[GGMLType.Q5_1].type_size  # d, m, qh[4], qs[16]
_B_Q8_0 = TYPE_TRAITS[GGMLType.Q8_0].type_size  # d, qs[32]
_B_Q2_K = TYPE_TRAITS[GGMLType.Q2_K].type_size  # scales[16], qs[64], d, dmin
_B_Q3_K = TYPE_TRAITS[GGMLType.Q3_K].type_size  # hmask[32], qs[64], scales[12], d
_B_Q4_K = TYPE_TRAITS[GGMLType.Q4_K].type_size  # d, dmin, scales[12], qs[128]
_B_Q5_K = TYPE_TRAITS[GGMLType.Q5_K].type_size  # d, dmin, scales[12], qh[32], qs[128]
_B_Q6_K = TYPE_TRAITS[GGMLType.Q6_K].type_size  # ql[128], qh[64], scales[16], d
assert TYPE_TRAITS[GGMLType.IQ4_NL].type_size == _B_Q4_0  # d, qs[16]: one decoder for both
_B_IQ4_XS = TYPE_TRAITS[GGMLType.IQ4_XS].type_size  # d, scales_h (u16), scales_l[4], qs[128]

_HALF = QK // 2
_K_SCALES = 12  # packed 6-bit scales (and mins) of Q3_K / Q4_K / Q5_K
# Field offsets inside a super-block.
_Q2_K_QS, _Q2_K_D = QK_K // 16, QK_K // 16 + QK_K // 4
_Q3_K_QS, _Q3_K_SC = QK_K // 8, QK_K // 8 + QK_K // 4
_Q3_K_D = _Q3_K_SC + _K_SCALES
_KQ_SC = 4  # Q4_K / Q5_K: scales after d, dmin
_Q4_K_QS = _KQ_SC + _K_SCALES
_Q5_K_QH = _KQ_SC + _K_SCALES
_Q5_K_QS = _Q5_K_QH + QK_K // 8
_Q6_K_QH, _Q6_K_SC = QK_K // 2, QK_K // 2 + QK_K // 4
_Q6_K_D = _Q6_K_SC + QK_K // 16
_IQ4_XS_SL, _IQ4_XS_QS = 4, 4 + QK_K // 64


@njit(inline="always")
def _f16(row, o, table):
    return table[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@njit(inline="always")
def _i8(byte):
    return np.int32(np.int8(byte))  # numba casts by truncation: 200 -> -56


# ------------------------------------------------------------------- blocks of 32
@njit(inline="always")
def _decode_nibble_values(row, out, table, values):
    """Q4_0 and IQ4_NL (both fp16 d then 16 bytes of nibbles, 18 bytes per 32 weights): x = d * values[q],
    values being q - 8 (Q4_0) or the IQ4_NL table."""
    for b in range(out.size // QK):
        o, y = b * _B_Q4_0, b * QK
        d = _f16(row, o, table)
        for j in range(_HALF):
            q = row[o + 2 + j]
            out[y + j] = d * values[q & 15]
            out[y + j + _HALF] = d * values[q >> 4]


@njit(inline="always")
def _decode_q4_1(row, out, table):
    for b in range(out.size // QK):
        o, y = b * _B_Q4_1, b * QK
        d = _f16(row, o, table)
        m = _f16(row, o + 2, table)
        for j in range(_HALF):
            q = row[o + 4 + j]
            out[y + j] = d * _U4_F32[q & 15] + m
            out[y + j + _HALF] = d * _U4_F32[q >> 4] + m


@njit(inline="always")
def _load_u32(row, o):
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << 8) | (np.uint32(row[o + 2]) << 16)
            | (np.uint32(row[o + 3]) << 24))


@njit(inline="always")
def _decode_q5_0(row, out, table):
    for b in range(out.size // QK):
        o, y = b * _B_Q5_0, b * QK
        d = _f16(row, o, table)
        qh = _load_u32(row, o + 2)  # bit j: 5th bit of weight j
        for j in range(_HALF):
            q = np.int32(row[o + 6 + j])
            lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = (q >> 4) | np.int32(((qh >> (j + _HALF)) & 1) << 4)
            out[y + j] = d * np.float32(lo - 16)
            out[y + j + _HALF] = d * np.float32(hi - 16)


@njit(inline="always")
def _decode_q5_1(row, out, table):
    for b in range(out.size // QK):
        o, y = b * _B_Q5_1, b * QK
        d = _f16(row, o, table)
        m = _f16(row, o + 2, table)
        qh = _load_u32(row, o + 4)
        for j in range(_HALF):
            q = np.int32(row[o + 8 + j])
            lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = (q >> 4) | np.int32(((qh >> (j + _HALF)) & 1) << 4)
            out[y + j] = d * np.float32(lo) + m
            out[y + j + _HALF] = d * np.float32(hi) + m


@njit(inline="always")
def _decode_q8_0(row, out, table):
    for b in range(out.size // QK):
        o, y = b * _B_Q8_0, b * QK
        d = _f16(row, o, table)
        for j in range(QK):
            out[y + j] = d * np.float32(_i8(row[o + 2 + j]))


# ------------------------------------------------------------ super-blocks of 256
@njit(inline="always")
def _decode_q2_k(row, out, table):
    """Per 128-weight half: 32 bytes of qs read 4 times (shifts 0, 2, 4, 6), 32 weights each; every
    16 weights take the next scales byte: low nibble scale, high nibble min."""
    for b in range(out.size // QK_K):
        o = b * _B_Q2_K
        d = _f16(row, o + _Q2_K_D, table)
        dmin = _f16(row, o + _Q2_K_D + 2, table)
        for g in range(QK_K // 16):  # g = 8 * half + 2 * shift + (which 16 of the 32)
            half, shift, part = g >> 3, (g >> 1) & 3, g & 1
            s = np.int32(row[o + g])
            dl = d * np.float32(s & 15)
            ml = dmin * np.float32(s >> 4)
            qs = o + _Q2_K_QS + 32 * half + 16 * part
            y = b * QK_K + 16 * g
            for l in range(16):
                q = (np.int32(row[qs + l]) >> (2 * shift)) & 3
                out[y + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _q3_k_scale(row, sc, i):
    """Q3_K's 6-bit scale i (0..15), minus 32: low 4 bits in byte i % 8 (low nibble for i < 8, high
    nibble after), high 2 bits in byte 8 + i % 4 at bit 2 * (i // 4)."""
    lo = (np.int32(row[sc + (i & 7)]) >> (4 * (i >> 3))) & 15
    hi = (np.int32(row[sc + 8 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(inline="always")
def _decode_q3_k(row, out, table):
    """As Q2_K for the 2 low bits; the 3rd bit of weight 128 * half + 32 * shift + l is bit
    4 * half + shift of hmask[l]; a clear bit subtracts 4."""
    for b in range(out.size // QK_K):
        o = b * _B_Q3_K
        d = _f16(row, o + _Q3_K_D, table)
        for g in range(QK_K // 16):
            half, shift, part = g >> 3, (g >> 1) & 3, g & 1
            dl = d * np.float32(_q3_k_scale(row, o + _Q3_K_SC, g))
            qs = o + _Q3_K_QS + 32 * half + 16 * part
            hm = o + 16 * part
            bit = 4 * half + shift
            y = b * QK_K + 16 * g
            for l in range(16):
                q = (np.int32(row[qs + l]) >> (2 * shift)) & 3
                h = (np.int32(row[hm + l]) >> bit) & 1
                out[y + l] = dl * np.float32(q - ((h ^ 1) << 2))


@njit(inline="always")
def _k_scale_min(row, sc, j):
    """Q4_K / Q5_K's 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at sc."""
    if j < 4:
        return np.int32(row[sc + j]) & 63, np.int32(row[sc + j + 4]) & 63
    s, lo_s, lo_m = np.int32(row[sc + j + 4]), np.int32(row[sc + j - 4]), np.int32(row[sc + j])
    return (s & 15) | ((lo_s >> 6) << 4), (s >> 4) | ((lo_m >> 6) << 4)


@njit(inline="always")
def _decode_q4_k(row, out, table):
    """Sub-block j: the low (j even) or high (j odd) nibbles of qs[32 * (j // 2) ..][:32]."""
    for b in range(out.size // QK_K):
        o = b * _B_Q4_K
        d = _f16(row, o, table)
        dmin = _f16(row, o + 2, table)
        for j in range(QK_K // 32):
            sc, m = _k_scale_min(row, o + _KQ_SC, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            qs = o + _Q4_K_QS + 32 * (j >> 1)
            shift = 4 * (j & 1)
            y = b * QK_K + 32 * j
            for l in range(32):
                out[y + l] = dl * _U4_F32[(row[qs + l] >> shift) & 15] - ml


@njit(inline="always")
def _decode_q5_k(row, out, table):
    """As Q4_K; the 5th bit of weight l of sub-block j is bit j of qh[l]."""
    for b in range(out.size // QK_K):
        o = b * _B_Q5_K
        d = _f16(row, o, table)
        dmin = _f16(row, o + 2, table)
        for j in range(QK_K // 32):
            sc, m = _k_scale_min(row, o + _KQ_SC, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            qs = o + _Q5_K_QS + 32 * (j >> 1)
            qh = o + _Q5_K_QH
            shift = 4 * (j & 1)
            y = b * QK_K + 32 * j
            for l in range(32):
                q = ((np.int32(row[qs + l]) >> shift) & 15) | (((np.int32(row[qh + l]) >> j) & 1) << 4)
                out[y + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _decode_q6_k(row, out, table):
    """Weight 128 * half + 32 * k + l: low 4 bits from ql[64 * half + 32 * (k & 1) + l] (low nibble
    for k < 2), high 2 bits from qh[32 * half + l] at bit 2k; int8 scale per 16 weights."""
    for b in range(out.size // QK_K):
        o = b * _B_Q6_K
        d = _f16(row, o + _Q6_K_D, table)
        for g in range(QK_K // 16):  # g = 8 * half + 2 * k + (which 16 of the 32)
            half, k, part = g >> 3, (g >> 1) & 3, g & 1
            dl = d * np.float32(_i8(row[o + _Q6_K_SC + g]))
            ql = o + 64 * half + 32 * (k & 1) + 16 * part
            qh = o + _Q6_K_QH + 32 * half + 16 * part
            lshift, hshift = 4 * (k >> 1), 2 * k
            y = b * QK_K + 16 * g
            for l in range(16):
                q = ((np.int32(row[ql + l]) >> lshift) & 15) | (((np.int32(row[qh + l]) >> hshift) & 3) << 4)
                out[y + l] = dl * np.float32(q - 32)


@njit(inline="always")
def _decode_iq4_xs(row, out, table):
    """Sub-block j of 32: 6-bit scale (low 4 bits: nibble j % 2 of scales_l[j // 2], high 2 bits:
    bits 2j of the u16 scales_h) minus 32; codes as IQ4_NL's, 16 bytes per sub-block."""
    for b in range(out.size // QK_K):
        o = b * _B_IQ4_XS
        d = _f16(row, o, table)
        sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
        for j in range(QK_K // 32):
            lo = (np.int32(row[o + _IQ4_XS_SL + (j >> 1)]) >> (4 * (j & 1))) & 15
            hi = (sh >> (2 * j)) & 3
            dl = d * np.float32((lo | (hi << 4)) - 32)
            qs = o + _IQ4_XS_QS + 16 * j
            y = b * QK_K + 32 * j
            for l in range(16):
                q = row[qs + l]
                out[y + l] = dl * _IQ4NL_F32[q & 15]
                out[y + l + 16] = dl * _IQ4NL_F32[q >> 4]


# ------------------------------------------------------------------------ dispatch
@njit(inline="always")
def _decode_f32(row, out, table):
    v = row.view(np.float32)  # a loop: a slice assignment compiles numba's shape-mismatch message (~2 s)
    for j in range(out.size):
        out[j] = v[j]


@njit(inline="always")
def _decode_f16(row, out, table):
    bits = row.view(np.uint16)
    for j in range(out.size):
        out[j] = table[bits[j]]


@njit(inline="always")
def _decode_bf16(row, out, table):
    bits = row.view(np.uint16)
    u = out.view(np.uint32)
    for j in range(out.size):
        u[j] = np.uint32(bits[j]) << 16


@njit(inline="always")
def _decode_q4_0(row, out, table):
    _decode_nibble_values(row, out, table, _Q4_0_F32)


@njit(inline="always")
def _decode_iq4_nl(row, out, table):
    _decode_nibble_values(row, out, table, _IQ4NL_F32)


# One row per computable type: kernel code -> its row decoder (row, out, table).
ROW_DECODERS = {KERNEL_TYPE_CODES[t]: f for t, f in (
    (GGMLType.F32, _decode_f32), (GGMLType.F16, _decode_f16), (GGMLType.BF16, _decode_bf16),
    (GGMLType.Q4_0, _decode_q4_0), (GGMLType.Q4_1, _decode_q4_1), (GGMLType.Q5_0, _decode_q5_0),
    (GGMLType.Q5_1, _decode_q5_1), (GGMLType.Q8_0, _decode_q8_0), (GGMLType.Q2_K, _decode_q2_k),
    (GGMLType.Q3_K, _decode_q3_k), (GGMLType.Q4_K, _decode_q4_k), (GGMLType.Q5_K, _decode_q5_k),
    (GGMLType.Q6_K, _decode_q6_k), (GGMLType.IQ4_NL, _decode_iq4_nl), (GGMLType.IQ4_XS, _decode_iq4_xs))}
if set(ROW_DECODERS) != set(KERNEL_TYPE_CODES.values()):
    raise RuntimeError("decoders: ROW_DECODERS must have one row per computable type")


# Decode one stored row (its bytes, uint8) of the type with kernel code `code` into float32 `out`:
# try_decode_row(code, row, out, table) -> False (and nothing written) for an unknown code. For prange
# loops, where a raise would keep numba from parallelising: check the code once with check_code before
# the loop. Called from numba code; a constant code compiles that type's decoder alone (dispatch.py).
try_decode_row = by_code("try_decode_row", ROW_DECODERS)


@njit(inline="always")
def check_code(code):
    """ValueError unless `code` is a kernel code of the registry."""
    if code < 0 or code >= _N_CODES:
        raise ValueError("decode_row: unknown weight type code")


@njit(inline="always")
def decode_row(code, row, out, table):
    """Decode one stored row (its bytes, uint8) of the type with kernel code `code` into float32 `out`;
    ValueError for an unknown code."""
    if not try_decode_row(code, row, out, table):
        raise ValueError("decode_row: unknown weight type code")


def decode_rows(code: int, raw: np.ndarray, rows: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """out[i] = row rows[i] of raw (n_rows, row bytes) uint8, decoded; out (len(rows), cols) float32.
    ValueError for a code that is not the registry's."""
    if not 0 <= code < _N_CODES:
        raise ValueError("decode_rows: unknown weight type code")
    rows_decoder(int(code))(raw, rows, out, table)


@functools.cache
def rows_decoder(code: int):
    """decode_rows' kernel for one type: the code is a compile-time constant, so numba compiles that
    type's decoder alone (the first run of a model compiles the types it has, not all fifteen)."""
    @njit(parallel=True, cache=True)
    def kernel(raw, rows, out, table):
        for i in prange(rows.size):
            try_decode_row(code, raw[rows[i]], out[i], table)
    return per_type(kernel)


def dequantize_rows(t: GGMLType, raw: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The rows `rows` (default: all) of a weight stored as raw (n_rows, row bytes) uint8 of type t,
    as float32 (len(rows), cols). Checks what decode_rows trusts."""
    if t not in KERNEL_TYPE_CODES:
        names = ", ".join(x.name for x in COMPUTABLE_TYPES)
        raise ValueError(f"dequantize_rows: {GGMLType(t).name} is not computable; supported: {names}")
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"dequantize_rows: raw must be 2-D uint8, got {raw.ndim}-D {raw.dtype}")
    tr = TYPE_TRAITS[t]
    if raw.shape[1] % tr.type_size:
        raise ValueError(f"dequantize_rows: {raw.shape[1]} bytes per row is not a whole number of "
                         f"{t.name} blocks ({tr.type_size} bytes)")
    cols = raw.shape[1] // tr.type_size * tr.block_size
    idx = np.arange(raw.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= raw.shape[0])):
        raise IndexError(f"dequantize_rows: row indices must be 1-D within [0, {raw.shape[0]})")
    out = np.empty((idx.size, cols), np.float32)
    decode_rows(KERNEL_TYPE_CODES[t], np.ascontiguousarray(raw), idx, out, F16_TABLE)
    return out
