"""The packer of kpack.py's layouts: a weight of a K_LAYOUTS type copied, at load, from its stored
rows into groups of 8 rows with each block's codes, scales and high bits where kpack.py's kernels read
them (see kpack.py's docstring and KLayout for the layout).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from ..tensor import KERNEL_TYPE_CODES
from .kpack import K_LAYOUTS
from .packed import PACK_ROWS

_T = GGMLType


# ------------------------------------------------------------------------------- the packer
_C = {t: KERNEL_TYPE_CODES[t] for t in K_LAYOUTS}
_Q4_1, _Q5_1, _Q4_K, _Q5_K, _Q6_K, _Q3_K, _Q2_K, _IQ4_NL, _IQ4_XS = (_C[t] for t in (
    _T.Q4_1, _T.Q5_1, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.Q3_K, _T.Q2_K, _T.IQ4_NL, _T.IQ4_XS))


@njit(inline="always")
def _u8(raw, i):
    return np.int64(raw[i])


@njit(inline="always")
def _k4_scale_min(raw, at, j):
    """Q4_K / Q5_K: scale and min j (< 8) of the 12 packed bytes at raw[at]."""
    if j < 4:
        return _u8(raw, at + j) & 63, _u8(raw, at + j + 4) & 63
    return ((_u8(raw, at + j + 4) & 15) | ((_u8(raw, at + j - 4) >> 6) << 4),
            (_u8(raw, at + j + 4) >> 4) | ((_u8(raw, at + j) >> 6) << 4))


@njit(inline="always")
def _q3_scale(raw, at, i):
    """Q3_K: 6-bit scale i (< 16) of the 12 packed bytes at raw[at], minus 32."""
    low = (_u8(raw, at + i) & 15) if i < 8 else (_u8(raw, at + i - 8) >> 4)
    return (low | (((_u8(raw, at + 8 + i % 4) >> (2 * (i // 4))) & 3) << 4)) - 32


@njit(inline="always")
def _block_codes(code, raw, s, bi, c):
    """Codes c[32] of block bi of the stored super-block at raw[s] (the low bits, and Q5's 5th bit,
    Q6_K's 2 high bits, Q3_K's 3rd bit above them; before any offset); returns the block's two meta
    bytes (a, b) where it has them, and False for a code with no packer (a raise here would keep the
    caller's prange serial)."""
    a = b = 0
    if code == _Q4_1 or code == _IQ4_NL:
        q = s + (4 if code == _Q4_1 else 2)
        for j in range(16):
            c[j], c[j + 16] = _u8(raw, q + j) & 15, _u8(raw, q + j) >> 4
    elif code == _Q5_1:
        qh = _u8(raw, s + 4) | (_u8(raw, s + 5) << 8) | (_u8(raw, s + 6) << 16) | (_u8(raw, s + 7) << 24)
        for j in range(16):
            c[j] = (_u8(raw, s + 8 + j) & 15) | (((qh >> j) & 1) << 4)
            c[j + 16] = (_u8(raw, s + 8 + j) >> 4) | (((qh >> (j + 16)) & 1) << 4)
    elif code == _Q4_K or code == _Q5_K:
        a, b = _k4_scale_min(raw, s + 4, bi)
        q = s + (16 if code == _Q4_K else 48) + 32 * (bi // 2)
        for j in range(32):
            v = _u8(raw, q + j)
            c[j] = (v >> 4) if bi % 2 else (v & 15)
            if code == _Q5_K:
                c[j] |= ((_u8(raw, s + 16 + j) >> bi) & 1) << 4
    elif code == _Q6_K:
        half, g = bi // 4, bi % 4
        for j in range(32):
            lo = _u8(raw, s + 64 * half + j + 32 * (g & 1))
            c[j] = ((lo & 15) if g < 2 else (lo >> 4)) | (((_u8(raw, s + 128 + 32 * half + j) >> (2 * g)) & 3) << 4)
        a, b = _u8(raw, s + 192 + 2 * bi), _u8(raw, s + 193 + 2 * bi)
    elif code == _Q3_K or code == _Q2_K:  # halves of 128, shifts of 2 bits for each 32 of a half
        half, g = bi // 4, bi % 4
        q = s + (32 if code == _Q3_K else 16) + 32 * half
        for j in range(32):
            c[j] = (_u8(raw, q + j) >> (2 * g)) & 3
            if code == _Q3_K:
                c[j] |= ((_u8(raw, s + j) >> (4 * half + g)) & 1) << 2
        if code == _Q3_K:
            a, b = _q3_scale(raw, s + 96, 2 * bi), _q3_scale(raw, s + 96, 2 * bi + 1)
        else:  # scale nibbles of both halves, then min nibbles
            s0, s1 = _u8(raw, s + 2 * bi), _u8(raw, s + 2 * bi + 1)
            a, b = (s0 & 15) | ((s1 & 15) << 4), (s0 >> 4) | ((s1 >> 4) << 4)
    elif code == _IQ4_XS:
        sh = _u8(raw, s + 2) | (_u8(raw, s + 3) << 8)
        a = (((_u8(raw, s + 4 + bi // 2) >> (4 * (bi % 2))) & 15) | (((sh >> (2 * bi)) & 3) << 4)) - 32
        for j in range(16):
            v = _u8(raw, s + 8 + 16 * bi + j)
            c[j], c[j + 16] = v & 15, v >> 4
    else:
        return a, b, False
    return a, b, True


@njit(inline="always")
def _put_codes(dst, at, r, c, low_bits, high_bits):
    """Row r's codes c[32] into a packed block whose high bits start at `at` (then the low bits)."""
    cb = at + 32 * high_bits
    if low_bits == 4:  # Q4_0's order: byte 4m + e of row r holds elements 4m + e and 4m + 16 + e
        for m in range(4):
            for e in range(4):
                dst[cb + 32 * m + 4 * r + e] = (c[4 * m + e] & 15) | ((c[4 * m + 16 + e] & 15) << 4)
    else:  # vector v, byte 4r + e, bits 2j: element 4(4v + j) + e
        for v in range(2):
            for e in range(4):
                byte = 0
                for j in range(4):
                    byte |= (c[4 * (4 * v + j) + e] & 3) << (2 * j)
                dst[cb + 32 * v + 4 * r + e] = byte
    for h in range(high_bits):  # bits of (code >> low_bits), 8 groups a byte (1 bit) or 4 (2 bits)
        for e in range(4):
            byte = 0
            for k in range(8 // high_bits):
                kk = 4 * h + k if high_bits == 2 else k
                byte |= ((c[4 * kk + e] >> low_bits) & ((1 << high_bits) - 1)) << (high_bits * k)
            dst[at + 32 * h + 4 * r + e] = byte


@njit(parallel=True, cache=True)
def _pack_k(code, raw, per_sb, stored_sb, header, meta, high_bits, low_bits, block, superblock, d_at, out, bad):
    """raw (rows, stored row bytes) -> out (rows // 8, group bytes): the layout of K_LAYOUTS[code];
    bad[g] = 1 where group g met a code with no packer."""
    n_sb = raw.shape[1] // stored_sb
    for g in prange(out.shape[0]):
        c = np.empty(32, np.int64)
        dst = out[g]
        for r in range(PACK_ROWS):
            src = raw[g * PACK_ROWS + r]
            for sb in range(n_sb):
                s = sb * stored_sb
                hdr = sb * superblock
                if header:  # the super-block's fp16 d (and dmin after it)
                    for k in range(header // 16):
                        dst[hdr + 16 * k + 2 * r], dst[hdr + 16 * k + 2 * r + 1] = src[s + d_at + 2 * k], src[s + d_at + 2 * k + 1]
                for bi in range(per_sb):
                    blk = hdr + header + bi * block
                    a, b, ok = _block_codes(code, src, s, bi, c)
                    if not ok:
                        bad[g] = 1
                    if per_sb == 1:  # the block's own fp16 d (and m)
                        for k in range(meta // 16):
                            dst[blk + 16 * k + 2 * r], dst[blk + 16 * k + 2 * r + 1] = src[s + 2 * k], src[s + 2 * k + 1]
                    else:
                        dst[blk + r] = a & 255
                        if meta == 16:
                            dst[blk + 8 + r] = b & 255
                    _put_codes(dst, blk + meta, r, c, low_bits, high_bits)


def pack_k(raw: np.ndarray, t: GGMLType, rows: int, cols: int) -> np.ndarray:
    """The first rows // 8 * 8 rows of a weight of a K_LAYOUTS type in its packed layout:
    (rows // 8, group bytes) uint8. Rows past the last full group stay in the stored rows only."""
    lay = K_LAYOUTS[t]
    raw = raw.view(np.uint8).reshape(rows, -1)
    out = np.empty((rows // PACK_ROWS, lay.group_bytes(cols)), np.uint8)
    bad = np.zeros(len(out), np.uint8)
    _pack_k(KERNEL_TYPE_CODES[t], raw, lay.per_sb, lay.stored_sb, lay.header, lay.meta, lay.high_bits, lay.low_bits,
            lay.block, lay.superblock, lay.d_at, out, bad)
    if bad.any():
        raise ValueError(f"pack_k: no packer for {t.name} in _block_codes")
    return out
