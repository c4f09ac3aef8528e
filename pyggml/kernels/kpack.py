"""Packed int8-activation products of the newer weight types: Q4_1, Q5_1, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS.

The same scheme as simd.py's Q4_0 / Q5_0 / Q8_0 products (read that module first): at load a
weight is copied into groups of 8 rows, each 32-weight block of the 8 rows side by side, so one
32-byte vector holds four codes of each of the 8 rows and the sums stay apart by row (lane r). The
activations are the same int8 blocks of 32 (scale d_x, and xc = d_x * sum of the block's codes).
What differs by type is how a block's codes and its per-row scales are stored:

    type    per 8 blocks (a K super-block)    per block of 8 rows                   codes    x (per weight)
    Q4_1    -                                  d[8], m[8] fp16                       4 bit    d*q + m
    Q5_1    -                                  d[8], m[8] fp16, qh 32 bytes          5 bit    d*q + m
    Q4_K    d[8], dmin[8] fp16                 sc[8], m[8] u8                        4 bit    d*sc*q - dmin*m
    Q5_K    d[8], dmin[8] fp16                 sc[8], m[8] u8, qh 32 bytes           5 bit    d*sc*q - dmin*m
    Q6_K    d[8] fp16                          sc[8] (elements 0-15), sc[8] (16-31)  6 bit    d*sc*(q-32)
                                               i8, high bits 64 bytes
    IQ4_NL  -                                  d[8] fp16                             table    d*T[q]
    IQ4_XS  d[8] fp16                          ls[8] i8 (the 6-bit scale - 32)       table    d*ls*T[q]

(the "- " types have one block per super-block). The 4 low bits of the codes are stored as Q4_0's
are (4 x 32 bytes; in the m-th 32, byte 4r + e: row r's elements 4m + e (low nibble) and 4m + 16 + e
(high)); Q5's 5th bits as simd.py's packed Q5_0 (byte 4r + e, bit k: element 4k + e); Q6_K's 2 high
bits in two 32-byte vectors (vector h, byte 4r + e, bits 2k, 2k + 1: element 4(4h + k) + e).

A block's product for 8 rows is then  acc += float(isum) * (s * d_x) + bias * xc,  with isum the
integer dot of the codes and the activation codes, s the per-row scale and bias the per-row offset
(Q4_1/Q5_1: m; Q4_K/Q5_K: -dmin*m), all exact in float32 as ggml forms them (d*sc of an fp16 and a
6-bit integer is exact). Q6_K and the IQ4 types have signed codes (q - 32, T[q]) and take simd.py's
|q| * (x * sign(q)) route; Q6_K's two 16-weight halves are weighted by their scales in the integer
pair sum (vpmaddwd with the scales instead of ones).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils

from ..gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from ..quant.kquants import IQ4NL_VALUES
from ..tensor import KERNEL_TYPE_CODES
from .simd import (HAS_AVX2, HAS_F16_VECTOR, HAS_VNNI, _dot4, PACK_ROWS, _CONTRACT, _F32, _I8, _I16, _I32, _I64, _abs_i8,
                   _load_f16x8, _load_scalar, _load_vec, _madd_ones, _maddubs, _prefetch, _sign_i8, _splat, _splat_value,
                   _vec, _x86)

_CODES_BYTES = 4 * 32  # the low 4 bits of a block of 8 rows


class KLayout:
    """Where a packed group keeps what (bytes), for one type; the kernel and the packer both read it."""

    def __init__(self, t: GGMLType, per_sb: int, header: int, meta: int, high: int, signed: bool, table: bool,
                 affine: bool, k_scales: bool, half_scales: bool):
        self.type, self.per_sb = t, per_sb  # 32-weight blocks per super-block
        self.header = header  # bytes at the start of a super-block (its fp16 d[8] [, dmin[8]])
        self.meta = meta  # bytes of per-block scales at the start of each block
        self.high = high  # bytes of high bits after them (Q5: 32, Q6_K: 64)
        self.block = meta + high + _CODES_BYTES  # bytes of one block of 8 rows
        self.superblock = header + per_sb * self.block
        self.signed, self.table, self.affine = signed, table, affine
        self.k_scales = k_scales  # the block scale is the super-block's d times a small integer
        self.half_scales = half_scales  # Q6_K: integer scales per 16 weights, inside the pair sums
        tr = TYPE_TRAITS[t]
        self.stored_sb = tr.type_size * (QK * per_sb // tr.block_size)  # stored bytes of one row's super-block

    def group_bytes(self, cols: int) -> int:
        return cols // (QK * self.per_sb) * self.superblock


K_LAYOUTS = {
    GGMLType.Q4_1: KLayout(GGMLType.Q4_1, 1, 0, 32, 0, False, False, True, False, False),
    GGMLType.Q5_1: KLayout(GGMLType.Q5_1, 1, 0, 32, 32, False, False, True, False, False),
    GGMLType.Q4_K: KLayout(GGMLType.Q4_K, 8, 32, 16, 0, False, False, True, True, False),
    GGMLType.Q5_K: KLayout(GGMLType.Q5_K, 8, 32, 16, 32, False, False, True, True, False),
    GGMLType.Q6_K: KLayout(GGMLType.Q6_K, 8, 16, 16, 64, True, False, False, False, True),
    GGMLType.IQ4_NL: KLayout(GGMLType.IQ4_NL, 1, 0, 16, 0, True, True, False, False, False),
    GGMLType.IQ4_XS: KLayout(GGMLType.IQ4_XS, 8, 16, 8, 0, True, True, False, True, False),
}
K_PACKED_TYPES = frozenset(K_LAYOUTS)


# ------------------------------------------------------------------------------- the kernel
def _f16x8(builder, base, offset, table):
    """Eight consecutive fp16 at base + offset as <8 x float>."""
    if HAS_F16_VECTOR:
        return builder.fpext(_load_vec(builder, base, offset, ir.HalfType(), 8), _vec(_F32, 8))
    return _load_f16x8(builder, base, offset, 2, table)


def _int8x8(builder, base, offset, signed: bool):
    """Eight bytes at base + offset as <8 x float> (signed or unsigned)."""
    v = _load_vec(builder, base, offset, _I8, 8)
    wide = builder.sext(v, _vec(_I32, 8)) if signed else builder.zext(v, _vec(_I32, 8))
    return builder.sitofp(wide, _vec(_F32, 8))


def _lookup(builder, nibbles):
    """<32 x i8> of 4-bit indices -> the IQ4_NL values they name (vpshufb with AVX2)."""
    values = [int(v) for v in IQ4NL_VALUES]
    if HAS_AVX2:
        table = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, v & 0xFF) for v in values * 2])
        return _x86(builder, "llvm.x86.avx2.pshuf.b", _vec(_I8, 32), table, nibbles)
    out = _splat(_I8, 32, 0)
    for i, v in enumerate(values):
        hit = builder.icmp_unsigned("==", nibbles, _splat(_I8, 32, i))
        out = builder.select(hit, _splat(_I8, 32, v & 0xFF), out)
    return out


def _shifted_bits(builder, v16, src: int, dst: int, mask: int):
    """Per byte of v16 (<16 x i16> view of 32 bytes): bits from `src` moved to `dst`, masked."""
    if src < dst:
        v16 = builder.shl(v16, _splat(_I16, 16, dst - src))
    elif src > dst:
        v16 = builder.lshr(v16, _splat(_I16, 16, src - dst))
    return builder.and_(builder.bitcast(v16, _vec(_I8, 32)), _splat(_I8, 32, mask))


def _codes(builder, lay: KLayout, w, blk):
    """The block at blk as 8 code vectors (vector k: elements 4k .. 4k + 3 of each row)."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    at = builder.add(blk, const(lay.meta + lay.high))
    codes = [None] * 8
    for m in range(4):
        v = _load_vec(builder, w, builder.add(at, const(32 * m)), _I8, 32)
        codes[m] = builder.and_(v, _splat(_I8, 32, 15))
        codes[m + 4] = _shifted_bits(builder, builder.bitcast(v, _vec(_I16, 16)), 4, 0, 15)
    hi_at = builder.add(blk, const(lay.meta))
    if lay.high == 32:  # Q5: bit k of byte 4r + e -> bit 4 of group k's code
        qh = builder.bitcast(_load_vec(builder, w, hi_at, _I8, 32), _vec(_I16, 16))
        codes = [builder.or_(c, _shifted_bits(builder, qh, k, 4, 16)) for k, c in enumerate(codes)]
    elif lay.high == 64:  # Q6_K: bits 2k', 2k' + 1 of vector k // 4 -> bits 4, 5 of group k's code, then - 32
        hv = [builder.bitcast(_load_vec(builder, w, builder.add(hi_at, const(32 * h)), _I8, 32), _vec(_I16, 16))
              for h in range(2)]
        codes = [builder.sub(builder.or_(c, _shifted_bits(builder, hv[k // 4], 2 * (k % 4), 4, 0x30)), _splat(_I8, 32, 32))
                 for k, c in enumerate(codes)]
    if lay.table:
        codes = [_lookup(builder, c) for c in codes]
    return codes


def _row_sums(builder, lay: KLayout, codes, prepared, x, half_scales):
    """<8 x i32>: lane r = row r's integer dot over the block. Unsigned 4-bit codes add 8 pair sums
    as i16 (8 * 2 * 15 * 127 < 2^15), 5-bit ones 4; Q6_K's |q - 32| <= 32 add the 4 of a half
    (4 * 2 * 32 * 127 < 2^15) before its scale multiplies them; IQ4's |T[q]| <= 127 one at a time."""
    if lay.signed:
        x = [_sign_i8(builder, xk, ck) for xk, ck in zip(x, codes)]
    if HAS_VNNI:  # one vpdpbusd per code vector; Q6_K's halves apart, then times their scales
        halves = [None, None]
        for k in range(8):
            h = k // 4 if half_scales is not None else 0
            halves[h] = _dot4(builder, halves[h], prepared[k], x[k])
        if half_scales is None:
            return halves[0]
        return builder.add(builder.mul(halves[0], half_scales[0]), builder.mul(halves[1], half_scales[1]))
    per = 4 if (lay.high or lay.half_scales) else 8
    if lay.table:
        per = 1
    total = None
    for k0 in range(0, 8, per):
        s16 = None
        for k in range(k0, k0 + per):
            p = _maddubs(builder, prepared[k], x[k])
            s16 = p if s16 is None else builder.add(s16, p)
        if half_scales is not None:
            s32 = _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), s16, half_scales[k0 // 4]) if HAS_AVX2 else \
                _pair_mul(builder, s16, half_scales[k0 // 4])
        else:
            s32 = _madd_ones(builder, s16)
        total = s32 if total is None else builder.add(total, s32)
    return total


def _pair_mul(builder, a16, b16):
    """vpmaddwd without AVX2: <16 x i16> x <16 x i16> -> <8 x i32> adjacent products summed."""
    prod = builder.mul(builder.sext(a16, _vec(_I32, 16)), builder.sext(b16, _vec(_I32, 16)))
    even = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


def _block_scales(builder, lay: KLayout, w, hdr, blk, table):
    """(s, bias, half_scales): the block's per-row scale and offset as <8 x float> (bias None when
    the type has none) and, for Q6_K, its two halves' scales as <16 x i16> (lanes 2r, 2r + 1: row r)
    for vpmaddwd, or with VNNI as <8 x i32> (lane r)."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    half = None
    if lay.per_sb == 1:  # Q4_1, Q5_1, IQ4_NL: fp16 d[8] (and m[8]) in the block
        s = _f16x8(builder, w, blk, table)
        bias = _f16x8(builder, w, builder.add(blk, const(16)), table) if lay.affine else None
        return s, bias, half
    d = _f16x8(builder, w, hdr, table)
    bias = None
    if lay.half_scales:  # Q6_K
        s = d
        raw = [_load_vec(builder, w, builder.add(blk, const(8 * h)), _I8, 8) for h in range(2)]
        if HAS_VNNI:  # <8 x i32>: lane r, row r's scale
            half = [builder.sext(v, _vec(_I32, 8)) for v in raw]
        else:  # <16 x i16>: lanes 2r, 2r + 1, for vpmaddwd
            pair = ir.Constant(_vec(_I32, 16), [r for r in range(8) for _ in range(2)])
            half = [builder.sext(builder.shuffle_vector(v, v, pair), _vec(_I16, 16)) for v in raw]
    else:  # Q4_K, Q5_K: sc[8], m[8] u8; IQ4_XS: ls[8] i8
        s = builder.fmul(d, _int8x8(builder, w, blk, signed=lay.signed))
        if lay.affine:
            dmin = _f16x8(builder, w, builder.add(hdr, const(16)), table)
            bias = builder.fneg(builder.fmul(dmin, _int8x8(builder, w, builder.add(blk, const(8)), signed=False)))
    return s, bias, half


def _emit_kpacked(context, builder, sig, args, lay: KLayout, n_tok: int, prefetch: int) -> None:
    """The loop of `kpacked_kernel` for one layout (sig, args: the kernel's, without the code)."""
    wa, xqa, xda, xca, outa, tablea = (context.make_array(sig.args[k])(context, builder, args[k])
                                       for k in (0, 2, 3, 4, 8, 9))
    group, tok0, b0, b1 = args[1], args[5], args[6], args[7]
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    group_bytes = cgutils.unpack_tuple(builder, wa.shape, 2)[1]
    cols = cgutils.unpack_tuple(builder, xqa.shape, 2)[1]
    nb = cgutils.unpack_tuple(builder, xda.shape, 2)[1]
    out_cols = cgutils.unpack_tuple(builder, outa.shape, 2)[1]
    tok = [builder.add(tok0, const(j)) for j in range(n_tok)]
    x_off = [builder.mul(t, cols) for t in tok]
    d_off = [builder.mul(t, nb) for t in tok]
    w_off = builder.mul(group, group_bytes)
    zero = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
    acc = [cgutils.alloca_once_value(builder, zero) for _ in range(n_tok)]
    with cgutils.for_range_slice(builder, b0, b1, const(1), inc=True) as (b, _):
        hdr = builder.add(w_off, builder.mul(builder.udiv(b, const(lay.per_sb)), const(lay.superblock)))
        blk = builder.add(builder.add(hdr, const(lay.header)), builder.mul(builder.urem(b, const(lay.per_sb)), const(lay.block)))
        if prefetch:
            for k in range(0, lay.block, 64):
                _prefetch(builder, wa.data, builder.add(blk, const(prefetch + k)))
        s, bias, half = _block_scales(builder, lay, wa.data, hdr, blk, tablea.data)
        codes = _codes(builder, lay, wa.data, blk)
        prepared = [_abs_i8(builder, c) for c in codes] if lay.signed else codes
        xblk = builder.mul(b, const(QK))
        for j in range(n_tok):
            xo = builder.add(x_off[j], xblk)
            x = [builder.bitcast(_splat_value(builder, _load_scalar(builder, xqa.data, builder.add(xo, const(4 * k)), _I32), 8),
                                 _vec(_I8, 32)) for k in range(8)]
            sums = builder.sitofp(_row_sums(builder, lay, codes, prepared, x, half), _vec(_F32, 8))
            dx = builder.load(builder.gep(xda.data, [builder.add(d_off[j], b)]))
            a = builder.load(acc[j])
            a = builder.fadd(a, builder.fmul(sums, builder.fmul(s, _splat_value(builder, dx, 8)), flags=_CONTRACT), flags=_CONTRACT)
            if bias is not None:
                xc = builder.load(builder.gep(xca.data, [builder.add(d_off[j], b)]))
                a = builder.fadd(a, builder.fmul(bias, _splat_value(builder, xc, 8), flags=_CONTRACT), flags=_CONTRACT)
            builder.store(a, acc[j])
    first = builder.icmp_signed("==", b0, const(0))
    for j in range(n_tok):
        at = builder.mul(builder.add(builder.mul(tok[j], out_cols), builder.mul(group, const(PACK_ROWS))), const(4))
        p = builder.bitcast(builder.gep(builder.bitcast(outa.data, _I8.as_pointer()), [at]), _vec(_F32, 8).as_pointer())
        total = builder.load(acc[j])
        builder.store(builder.select(first, total, builder.fadd(builder.load(p, align=4), total)), p, align=4)


def kpacked_emitters(tokens: dict, prefetch: int = 0) -> tuple:
    """(type code, emit) pairs for simd.packed_kernel's `more`: the products of a weight packed by
    `pack_k`, with packed_kernel's arguments and meaning; tokens: tokens per call by type."""
    return tuple((KERNEL_TYPE_CODES[t], lambda c, b, sig, args, lay=lay, n=tokens[t]: _emit_kpacked(c, b, sig, args, lay, n, prefetch))
                 for t, lay in K_LAYOUTS.items())


# ------------------------------------------------------------------------------- the packer
_C = {t: KERNEL_TYPE_CODES[t] for t in K_LAYOUTS}
_Q4_1, _Q5_1, _Q4_K, _Q5_K, _Q6_K, _IQ4_NL, _IQ4_XS = (_C[t] for t in (
    GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS))


@njit(inline="always")
def _k4_scale_min(raw, at, j):
    """Q4_K / Q5_K: scale and min j (< 8) of the 12 packed bytes at raw[at]."""
    if j < 4:
        return np.int64(raw[at + j]) & 63, np.int64(raw[at + j + 4]) & 63
    return ((np.int64(raw[at + j + 4]) & 15) | ((np.int64(raw[at + j - 4]) >> 6) << 4),
            (np.int64(raw[at + j + 4]) >> 4) | ((np.int64(raw[at + j]) >> 6) << 4))


@njit(inline="always")
def _block_codes(code, raw, s, bi, c):
    """Codes c[32] of block bi of the stored super-block at raw[s] (low 4 bits, plus Q5's 5th bit and
    Q6_K's 2 high bits above them); returns (meta byte a, meta byte b) of the block where it has them,
    and False for a code with no packer (a raise here would keep the caller's prange serial)."""
    a = b = 0
    if code == _Q4_1 or code == _IQ4_NL:
        q = s + (4 if code == _Q4_1 else 2)
        for j in range(16):
            c[j], c[j + 16] = np.int64(raw[q + j]) & 15, np.int64(raw[q + j]) >> 4
    elif code == _Q5_1:
        qh = np.uint32(np.int64(raw[s + 4])) | (np.uint32(np.int64(raw[s + 5])) << 8) | (np.uint32(np.int64(raw[s + 6])) << 16) | (np.uint32(np.int64(raw[s + 7])) << 24)
        for j in range(16):
            c[j] = (np.int64(raw[s + 8 + j]) & 15) | (((qh >> j) & 1) << 4)
            c[j + 16] = (np.int64(raw[s + 8 + j]) >> 4) | (((qh >> (j + 16)) & 1) << 4)
    elif code == _Q4_K or code == _Q5_K:
        a, b = _k4_scale_min(raw, s + 4, bi)
        q = s + (16 if code == _Q4_K else 48) + 32 * (bi // 2)
        for j in range(32):
            v = np.int64(raw[q + j])
            c[j] = (v >> 4) if bi % 2 else (v & 15)
            if code == _Q5_K:
                c[j] |= ((np.int64(raw[s + 16 + j]) >> bi) & 1) << 4
    elif code == _Q6_K:
        half, g = bi // 4, bi % 4
        for j in range(32):
            lo = np.int64(raw[s + 64 * half + j + 32 * (g & 1)])
            c[j] = ((lo & 15) if g < 2 else (lo >> 4)) | (((np.int64(raw[s + 128 + 32 * half + j]) >> (2 * g)) & 3) << 4)
        a, b = np.int64(raw[s + 192 + 2 * bi]), np.int64(raw[s + 193 + 2 * bi])
    elif code == _IQ4_XS:
        sh = np.int64(np.int64(raw[s + 2])) | (np.int64(np.int64(raw[s + 3])) << 8)
        a = (((np.int64(raw[s + 4 + bi // 2]) >> (4 * (bi % 2))) & 15) | (((sh >> (2 * bi)) & 3) << 4)) - 32
        for j in range(16):
            v = np.int64(raw[s + 8 + 16 * bi + j])
            c[j], c[j + 16] = v & 15, v >> 4
    else:
        return a, b, False
    return a, b, True


@njit(parallel=True, cache=True)
def _pack_k(code, raw, per_sb, stored_sb, header, meta, high, block, superblock, out, bad):
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
                if header:  # the super-block's fp16 d (and dmin)
                    at = s + 208 if code == _Q6_K else s
                    dst[hdr + 2 * r], dst[hdr + 2 * r + 1] = src[at], src[at + 1]
                    if header == 32:
                        dst[hdr + 16 + 2 * r], dst[hdr + 17 + 2 * r] = src[s + 2], src[s + 3]
                for bi in range(per_sb):
                    blk = hdr + header + bi * block
                    a, b, ok = _block_codes(code, src, s, bi, c)
                    if not ok:
                        bad[g] = 1
                    if per_sb == 1:  # the block's own fp16 d (and m)
                        dst[blk + 2 * r], dst[blk + 2 * r + 1] = src[s], src[s + 1]
                        if meta == 32:
                            dst[blk + 16 + 2 * r], dst[blk + 17 + 2 * r] = src[s + 2], src[s + 3]
                    else:
                        dst[blk + r] = a & 255
                        if meta == 16:
                            dst[blk + 8 + r] = b & 255
                    hb, cb = blk + meta, blk + meta + high
                    for m in range(4):
                        for e in range(4):
                            dst[cb + 32 * m + 4 * r + e] = (c[4 * m + e] & 15) | ((c[4 * m + 16 + e] & 15) << 4)
                    if high == 32:
                        for e in range(4):
                            v = 0
                            for k in range(8):
                                v |= ((c[4 * k + e] >> 4) & 1) << k
                            dst[hb + 4 * r + e] = v
                    elif high == 64:
                        for h in range(2):
                            for e in range(4):
                                v = 0
                                for k in range(4):
                                    v |= ((c[4 * (4 * h + k) + e] >> 4) & 3) << (2 * k)
                                dst[hb + 32 * h + 4 * r + e] = v


def pack_k(raw: np.ndarray, t: GGMLType, rows: int, cols: int) -> np.ndarray:
    """The first rows // 8 * 8 rows of a weight of a K_LAYOUTS type in its packed layout:
    (rows // 8, group bytes) uint8. Rows past the last full group stay in the stored rows only."""
    lay = K_LAYOUTS[t]
    raw = raw.view(np.uint8).reshape(rows, -1)
    out = np.empty((rows // PACK_ROWS, lay.group_bytes(cols)), np.uint8)
    bad = np.zeros(len(out), np.uint8)
    _pack_k(KERNEL_TYPE_CODES[t], raw, lay.per_sb, lay.stored_sb, lay.header, lay.meta, lay.high, lay.block,
            lay.superblock, out, bad)
    if bad.any():
        raise ValueError(f"pack_k: no packer for {t.name} in _block_codes")
    return out
