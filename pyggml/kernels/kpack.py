"""Packed int8-activation products of the newer weight types: Q4_1, Q5_1, Q2_K-Q6_K, IQ4_NL, IQ4_XS.

The same scheme as packed.py's Q4_0 / Q5_0 / Q8_0 products (read that module first): at load (kpacker.py) a
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
    Q3_K    d[8] fp16                          sc[8], sc[8] (halves) i8, high bits   3 bit    d*sc*(q-4)
    Q2_K    d[8], dmin[8] fp16                 sc nibbles[8], m nibbles[8] (halves)  2 bit    d*sc*q - dmin*m
    IQ4_NL  -                                  d[8] fp16                             table    d*T[q]
    IQ4_XS  d[8] fp16                          ls[8] i8 (the 6-bit scale - 32)       table    d*ls*T[q]

(the "- " types have one block per super-block). The 4 low bits of the codes are stored as Q4_0's
are (4 x 32 bytes; in the m-th 32, byte 4r + e: row r's elements 4m + e (low nibble) and 4m + 16 + e
(high)); 2-bit codes in 2 x 32 bytes (vector v, byte 4r + e, bits 2j: element 4(4v + j) + e); Q5's
5th and Q3_K's 3rd bits as packed.py's Q5_0 (byte 4r + e, bit k: element 4k + e); Q6_K's 2 high
bits in two 32-byte vectors (vector h, byte 4r + e, bits 2k, 2k + 1: element 4(4h + k) + e).

A block's product for 8 rows is then  acc += float(isum) * (s * d_x) + bias * xc,  with isum the
integer dot of the codes and the activation codes, s the per-row scale and bias the per-row offset
(Q4_1/Q5_1: m; Q4_K/Q5_K: -dmin*m), all exact in float32 as ggml forms them (d*sc of an fp16 and a
6-bit integer is exact). Q6_K, Q3_K and the IQ4 types have signed codes (q - 32, q - 4, T[q]) and
take packed.py's |q| * (x * sign(q)) route; the two 16-weight halves of Q6_K, Q3_K and Q2_K are
weighted by their scales in the integer sums (vpmaddwd with the scales instead of ones, or a vector
multiply after vpdpbusd); Q2_K's mins per half, and with VNNI the offsets of Q6_K and Q3_K (whose codes
then stay unsigned), take the sums of the activation codes of each half, made once per token with the
int8 blocks (quantize_activations' xs) rather than once per row group.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from ..gguf.constants import QK, TYPE_TRAITS, GGMLType
from ..quant.kquants import IQ4NL_VALUES
from ..tensor import KERNEL_TYPE_CODES
from .packed import PackedCall, grouped_pair_sums
from .simd import (NO_PREFETCH, Prefetch, _CONTRACT, _F32, _FEATURES, _I8, _I16, _I32, _I64, HAS_AVX2, HAS_AVX512, HAS_F16_VECTOR,
                   HAS_VNNI, _abs_i8, _dot4, _load_f16x8, _load_vec, _madd_ones, _prefetch, _sign_i8, _splat, _splat_value, _vec, _x86)

_CODES_BYTES = 4 * 32  # the low 4 bits of a block of 8 rows


class KLayout:
    """Where a packed group keeps what (bytes), for one type; the kernel and the packer both read it.

    per_sb: 32-weight blocks per super-block; header: bytes at a super-block's start (fp16 d[8]
    [, dmin[8]]); meta: bytes of per-block scales at each block's start; low_bits: bits of each code
    in the low-bit vectors (4: Q4_0's nibble order, 128 bytes; 2: 64 bytes, vector v byte 4r + e bits
    2j, 2j + 1: element 4(4v + j) + e); high_bits: bits above them (Q5, Q3_K: 1, in 32 bytes as
    packed.py's Q5_0 qh; Q6_K: 2, in 64 bytes); offset: subtracted from a code (signed codes);
    table: codes index IQ4NL_VALUES; affine: x = s*q + bias per block; k_scales: the block scale is
    the super-block's d times a small integer; half_scales: integer scales per 16 weights inside the
    row sums; half_mins: Q2_K's mins per 16 weights; d_at: where a stored super-block keeps its d."""

    def __init__(self, t: GGMLType, per_sb: int, header: int, meta: int, *, low_bits: int = 4, high_bits: int = 0,
                 offset: int = 0, table: bool = False, affine: bool = False, k_scales: bool = False,
                 half_scales: bool = False, half_mins: bool = False, d_at: int = 0):
        self.type, self.per_sb, self.header, self.meta = t, per_sb, header, meta
        self.low_bits, self.high_bits, self.offset, self.table = low_bits, high_bits, offset, table
        self.affine, self.k_scales, self.half_scales, self.half_mins, self.d_at = affine, k_scales, half_scales, half_mins, d_at
        self.signed = bool(offset) or table
        self.high = 32 * high_bits  # bytes of high bits after the meta
        self.block = meta + self.high + 32 * low_bits  # bytes of one block of 8 rows
        self.superblock = header + per_sb * self.block
        tr = TYPE_TRAITS[t]
        self.stored_sb = tr.type_size * (QK * per_sb // tr.block_size)  # stored bytes of one row's super-block

    def group_bytes(self, cols: int) -> int:
        return cols // (QK * self.per_sb) * self.superblock


_T = GGMLType
K_LAYOUTS = {lay.type: lay for lay in (
    KLayout(_T.Q4_1, 1, 0, 32, affine=True),
    KLayout(_T.Q5_1, 1, 0, 32, high_bits=1, affine=True),
    KLayout(_T.Q4_K, 8, 32, 16, affine=True, k_scales=True),
    KLayout(_T.Q5_K, 8, 32, 16, high_bits=1, affine=True, k_scales=True),
    KLayout(_T.Q6_K, 8, 16, 16, high_bits=2, offset=32, half_scales=True, d_at=208),
    KLayout(_T.Q3_K, 8, 16, 16, low_bits=2, high_bits=1, offset=4, half_scales=True, d_at=108),
    KLayout(_T.Q2_K, 8, 32, 16, low_bits=2, half_scales=True, half_mins=True, d_at=80),
    KLayout(_T.IQ4_NL, 1, 0, 16, table=True),
    KLayout(_T.IQ4_XS, 8, 16, 8, table=True, k_scales=True),
)}
K_PACKED_TYPES = frozenset(K_LAYOUTS)


# ------------------------------------------------------------------------------- the kernel
# The emitters below work on W row groups at once (W = 1: 32-byte vectors, 8 rows; W = 2 with
# AVX-512: 64-byte vectors, 16 rows, groups g and g + 1 side by side, their blocks at the same offset
# `group bytes` apart). `At` carries W and the offsets; every load of a group's vector loads it from
# each group and concatenates.
class _At:
    def __init__(self, builder, base, group_bytes, width: int):
        self.b, self.base, self.w = builder, base, width
        self.steps = [ir.Constant(_I64, 0)] + ([group_bytes] if width == 2 else [])

    def load(self, offset, elem, n):
        """n elements at offset in each group, concatenated: <n * W x elem>."""
        parts = [_load_vec(self.b, self.base, self.b.add(offset, s), elem, n) for s in self.steps]
        return parts[0] if self.w == 1 else _cat(self.b, parts[0], parts[1], n)

    def f16(self, offset, table):
        """Eight consecutive fp16 in each group as <8W x float>."""
        if HAS_F16_VECTOR:
            return self.b.fpext(self.load(offset, ir.HalfType(), 8), _vec(_F32, 8 * self.w))
        parts = [_load_f16x8(self.b, self.base, self.b.add(offset, s), 2, table) for s in self.steps]
        return parts[0] if self.w == 1 else _cat(self.b, parts[0], parts[1], 8)

    def ints(self, offset, signed: bool):
        """Eight bytes in each group as <8W x i32>."""
        v = self.load(offset, _I8, 8)
        return (self.b.sext if signed else self.b.zext)(v, _vec(_I32, 8 * self.w))


def _cat(builder, a, b, n: int):
    return builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))


# With VNNI the signed codes are multiplied unsigned (no sign per activation vector and token): the
# IQ4 values + TABLE_BIAS (1 .. 241), Q6_K's and Q3_K's codes before their offset; the products' excess
# (TABLE_BIAS, resp. the offset, times the activations' sum) is taken off afterwards.
TABLE_BIAS = 128


def _lookup(builder, nibbles, nb: int, add: int = 0):
    """<nb x i8> of 4-bit indices -> the IQ4_NL values they name, plus `add` (vpshufb)."""
    values = [int(v) + add for v in IQ4NL_VALUES]
    if HAS_AVX2:
        table = ir.Constant(_vec(_I8, nb), [ir.Constant(_I8, v & 0xFF) for v in values * (nb // 16)])
        name = "llvm.x86.avx2.pshuf.b" if nb == 32 else "llvm.x86.avx512.pshuf.b.512"
        return _x86(builder, name, _vec(_I8, nb), table, nibbles)
    out = _splat(_I8, nb, 0)
    for i, v in enumerate(values):
        hit = builder.icmp_unsigned("==", nibbles, _splat(_I8, nb, i))
        out = builder.select(hit, _splat(_I8, nb, v & 0xFF), out)
    return out


def _shifted_bits(builder, v16, src: int, dst: int, mask: int):
    """Per byte of v16 (an i16 view of the bytes): bits from `src` moved to `dst`, masked."""
    n16 = v16.type.count
    if src < dst:
        v16 = builder.shl(v16, _splat(_I16, n16, dst - src))
    elif src > dst:
        v16 = builder.lshr(v16, _splat(_I16, n16, src - dst))
    return builder.and_(builder.bitcast(v16, _vec(_I8, 2 * n16)), _splat(_I8, 2 * n16, mask))


def _codes(builder, lay: KLayout, at: _At, blk):
    """The block at blk as 8 code vectors (vector k: elements 4k .. 4k + 3 of each row)."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    nb = 32 * at.w
    i16 = _vec(_I16, nb // 2)
    base = builder.add(blk, const(lay.meta + lay.high))
    codes = [None] * 8
    if lay.low_bits == 4:
        for m in range(4):
            v = at.load(builder.add(base, const(32 * m)), _I8, 32)
            codes[m] = builder.and_(v, _splat(_I8, nb, 15))
            codes[m + 4] = _shifted_bits(builder, builder.bitcast(v, i16), 4, 0, 15)
    else:  # 2 bits: vector k // 4, bits 2(k % 4)
        lv = [builder.bitcast(at.load(builder.add(base, const(32 * v)), _I8, 32), i16) for v in range(2)]
        codes = [_shifted_bits(builder, lv[k // 4], 2 * (k % 4), 0, 3) for k in range(8)]
    hi_at = builder.add(blk, const(lay.meta))
    top = lay.low_bits
    if lay.high_bits == 1:  # Q5, Q3_K: bit k of byte 4r + e -> bit `top` of group k's code
        qh = builder.bitcast(at.load(hi_at, _I8, 32), i16)
        codes = [builder.or_(c, _shifted_bits(builder, qh, k, top, 1 << top)) for k, c in enumerate(codes)]
    elif lay.high_bits == 2:  # Q6_K: bits 2k', 2k' + 1 of vector k // 4 -> bits 4, 5 of group k's code
        hv = [builder.bitcast(at.load(builder.add(hi_at, const(32 * h)), _I8, 32), i16) for h in range(2)]
        codes = [builder.or_(c, _shifted_bits(builder, hv[k // 4], 2 * (k % 4), top, 3 << top)) for k, c in enumerate(codes)]
    if lay.offset and not HAS_VNNI:
        codes = [builder.sub(c, _splat(_I8, nb, lay.offset)) for c in codes]
    if lay.table:
        codes = [_lookup(builder, c, nb, TABLE_BIAS if HAS_VNNI else 0) for c in codes]
    return codes


def _abs(builder, v):
    """|v| of signed bytes read as unsigned (vpabsb at any width)."""
    if v.type.count == 32:
        return _abs_i8(builder, v)
    zero = _splat(_I8, v.type.count, 0)
    return builder.select(builder.icmp_signed("<", v, zero), builder.neg(v), v)


def _sign(builder, x, s):
    """x * sign(s) per byte (vpsignb; AVX-512 has none at 512 bits: two masked selects)."""
    if x.type.count == 32:
        return _sign_i8(builder, x, s)
    zero = _splat(_I8, x.type.count, 0)
    neg = builder.select(builder.icmp_signed("<", s, zero), builder.neg(x), x)
    return builder.select(builder.icmp_signed("==", s, zero), zero, neg)


def _dot(builder, acc, u, s):
    """vpdpbusd at the width of u (256 or 512 bits)."""
    if u.type.count == 32:
        return _dot4(builder, acc, u, s)
    i32 = _vec(_I32, 16)
    a = acc if acc is not None else _splat(_I32, 16, 0)
    return _x86(builder, "llvm.x86.avx512.vpdpbusd.512", i32, a, builder.bitcast(u, i32), builder.bitcast(s, i32))


def _row_sums(builder, lay: KLayout, codes, prepared, x, half_scales):
    """<8W x i32>: lane r = row r's integer dot over the block (with VNNI: types without half scales,
    the others take _half_sums). Without VNNI (W = 1 only): unsigned
    4-bit codes add 8 pair sums as i16 (8 * 2 * 15 * 127 < 2^15), 5-bit ones 4; Q6_K's |q - 32| <= 32
    (Q2_K's, Q3_K's <= 4) add the 4 of a half (4 * 2 * 32 * 127 < 2^15) before its scale multiplies
    them; IQ4's |T[q]| <= 127 one at a time."""
    if HAS_VNNI:  # one vpdpbusd per code vector (the table types' excess comes off with their bias)
        acc = None
        for k in range(8):
            acc = _dot(builder, acc, codes[k], x[k])
        return acc
    if lay.signed:
        x = [_sign(builder, xk, ck) for xk, ck in zip(x, codes)]
    per = 4 if (lay.high or lay.half_scales) else 8
    if lay.table:
        per = 1
    if half_scales is None:
        return grouped_pair_sums(builder, prepared, x, per, lambda s16, g: _madd_ones(builder, s16))
    # per is 4 here: group g is half g, weighted by its scales in the pair sum
    return grouped_pair_sums(builder, prepared, x, per, lambda s16, g: (
        _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), s16, half_scales[g]) if HAS_AVX2
        else _pair_mul(builder, s16, half_scales[g])))


def _pair_mul(builder, a16, b16):
    """vpmaddwd without AVX2: <16 x i16> x <16 x i16> -> <8 x i32> adjacent products summed."""
    prod = builder.mul(builder.sext(a16, _vec(_I32, 16)), builder.sext(b16, _vec(_I32, 16)))
    even = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


def _block_scales(builder, lay: KLayout, at: _At, hdr, blk, table):
    """(s, bias, half, mins): the block's per-row scale and offset as <8W x float> (bias None when the
    type has none); for the half-scale types their two halves' integer scales, as <16 x i16> (lanes
    2r, 2r + 1: row r) for vpmaddwd, or with VNNI d times them as <8W x float> (lane r); for Q2_K
    its mins (dmin, m_a and m_b as <8W x float>, m exact), else None."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    lanes = 8 * at.w
    table_bias = lambda s: builder.fmul(s, ir.Constant(_vec(_F32, lanes), [ir.Constant(_F32, -TABLE_BIAS)] * lanes))  # noqa: E731
    if lay.per_sb == 1:  # Q4_1, Q5_1, IQ4_NL: fp16 d[8] (and m[8]) in the block
        s = at.f16(blk, table)
        bias = at.f16(builder.add(blk, const(16)), table) if lay.affine else None
        if lay.table and HAS_VNNI:
            bias = table_bias(s)
        return s, bias, None, None
    d = at.f16(hdr, table)
    if not lay.half_scales:  # Q4_K, Q5_K: sc[8], m[8] u8; IQ4_XS: ls[8] i8
        s = builder.fmul(d, builder.sitofp(at.ints(blk, signed=lay.signed), _vec(_F32, lanes)))
        bias = None
        if lay.affine:
            dmin = at.f16(builder.add(hdr, const(16)), table)
            m = builder.sitofp(at.ints(builder.add(blk, const(8)), signed=False), _vec(_F32, lanes))
            bias = builder.fneg(builder.fmul(dmin, m))
        if lay.table and HAS_VNNI:
            bias = table_bias(s)
        return s, bias, None, None
    raw = [at.ints(builder.add(blk, const(8 * h)), signed=not lay.half_mins) for h in range(2)]
    mins = None
    if lay.half_mins:  # Q2_K: [sc_a | sc_b << 4] x 8, [m_a | m_b << 4] x 8
        lo = lambda v: builder.and_(v, _splat(_I32, lanes, 15))  # noqa: E731
        hi = lambda v: builder.lshr(v, _splat(_I32, lanes, 4))  # noqa: E731
        half = [lo(raw[0]), hi(raw[0])]
        mins = (at.f16(builder.add(hdr, const(16)), table), lo(raw[1]), hi(raw[1]))
    else:  # Q6_K, Q3_K: i8 scales of each half
        half = raw
    if not HAS_VNNI:  # <16 x i16>: lanes 2r, 2r + 1, for vpmaddwd
        pair = ir.Constant(_vec(_I32, 16), [r for r in range(8) for _ in range(2)])
        half = [builder.trunc(builder.shuffle_vector(v, v, pair), _vec(_I16, 16)) for v in half]
    else:  # d * scale in float, exact (an fp16 times a small integer): _half_sums
        half = [builder.fmul(d, builder.sitofp(v, _vec(_F32, lanes))) for v in half]
    if mins is not None:  # small integers, exact in float (_emit_kpacked)
        mins = (mins[0], *(builder.sitofp(v, _vec(_F32, lanes)) for v in mins[1:]))
    return d, None, half, mins


def _half_sums(builder, lay: KLayout, call, codes, b, half, mins, acc, n_tok: int, lanes: int) -> None:
    """With VNNI, the half-scale types (Q6_K, Q3_K, Q2_K): one half of the block at a time for every
    token, acc[j] += float(sum_j (q_j - offset) x_j over the half) * (d * sc_half * d_x). The integer sum
    starts from -offset * (the half's activation sum) (the codes stay unsigned for vpdpbusd); one half's
    4 dot accumulators a token, not 8, keep a tile of 8 tokens in registers. Q2_K's mins: the half's
    sum is d * sc_half * isum - dmin * m_half * (the half's activation sum), times d_x."""
    if mins is not None:
        mins = [builder.fmul(mins[0], m) for m in mins[1:]]  # dmin * m of each half
    for h in range(2):
        for j in range(n_tok):
            x = call.x_groups(builder, j, b, lanes, first=4 * h, count=4)
            isum = None
            if lay.offset:
                xs = call.half_sums(builder, j, b)[h]
                isum = _splat_value(builder, builder.mul(xs, ir.Constant(_I32, -lay.offset)), lanes)
            for k in range(4):
                isum = _dot(builder, isum, codes[4 * h + k], x[k])
            dx = _splat_value(builder, call.scalar(builder, call.xd, j, b), lanes)
            a = builder.load(acc[j])
            f = builder.sitofp(isum, _vec(_F32, lanes))
            if mins is None:
                a = builder.fadd(a, builder.fmul(f, builder.fmul(half[h], dx), flags=_CONTRACT), flags=_CONTRACT)
            else:
                xs = _splat_value(builder, builder.sitofp(call.half_sums(builder, j, b)[h], _F32), lanes)
                t = builder.fsub(builder.fmul(f, half[h], flags=_CONTRACT), builder.fmul(mins[h], xs), flags=_CONTRACT)
                a = builder.fadd(a, builder.fmul(t, dx, flags=_CONTRACT), flags=_CONTRACT)
            builder.store(a, acc[j])


def _emit_kpacked(context, builder, sig, args, lay: KLayout, n_tok: int, prefetch: Prefetch, width: int = 1) -> None:
    """The loop of the packed kernel for one layout (sig, args: the kernel's, without the code), over
    `width` row groups (g, and g + 1 when 2)."""
    call = PackedCall(context, builder, sig, args, n_tok)
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    lanes = 8 * width
    at = _At(builder, call.w, call.group_bytes, width)
    acc = call.accumulators(builder, n_tok, lanes)
    with cgutils.for_range_slice(builder, call.b0, call.b1, const(1), inc=True) as (b, _):
        hdr = builder.add(call.w_off, builder.mul(builder.udiv(b, const(lay.per_sb)), const(lay.superblock)))
        blk = builder.add(builder.add(hdr, const(lay.header)), builder.mul(builder.urem(b, const(lay.per_sb)), const(lay.block)))
        if prefetch.distance:
            for g in range(width):
                for k in range(0, lay.block, 64):
                    _prefetch(builder, call.w, builder.add(builder.add(blk, at.steps[g]), const(prefetch.distance + k)), prefetch.level)
        s, bias, half, mins = _block_scales(builder, lay, at, hdr, blk, call.table)
        codes = _codes(builder, lay, at, blk)
        prepared = [_abs(builder, c) for c in codes] if lay.signed and not HAS_VNNI else codes
        if HAS_VNNI and half is not None:
            _half_sums(builder, lay, call, codes, b, half, mins, acc, n_tok, lanes)
        else:
            for j in range(n_tok):
                dx = _splat_value(builder, call.scalar(builder, call.xd, j, b), lanes)
                a = builder.load(acc[j])
                x = call.x_groups(builder, j, b, lanes)
                sums = builder.sitofp(_row_sums(builder, lay, codes, prepared, x, half), _vec(_F32, lanes))
                a = builder.fadd(a, builder.fmul(sums, builder.fmul(s, dx), flags=_CONTRACT), flags=_CONTRACT)
                if bias is not None:
                    xc = _splat_value(builder, call.scalar(builder, call.xc, j, b), lanes)
                    a = builder.fadd(a, builder.fmul(bias, xc, flags=_CONTRACT), flags=_CONTRACT)
                if mins is not None:  # Q2_K without VNNI: - dmin * d_x * (m_a * S_a + m_b * S_b), exact in float (< 2^16)
                    sa, sb = (_splat_value(builder, builder.sitofp(v, _F32), lanes) for v in call.half_sums(builder, j, b))
                    msum = builder.fadd(builder.fmul(mins[1], sa), builder.fmul(mins[2], sb))
                    a = builder.fsub(a, builder.fmul(msum, builder.fmul(mins[0], dx)))
                builder.store(a, acc[j])
    call.store(builder, acc, lanes)


def kpacked_emitters(tokens: dict, prefetch: Prefetch = NO_PREFETCH, width: int = 1) -> tuple:
    """(type code, emit) pairs for packed.packed_kernel's `more`: the products of a weight packed by
    `kpacker.pack_k`, with packed_kernel's arguments and meaning; tokens: tokens per call by type; width 2:
    row groups g and g + 1 at once in 512-bit vectors (PAIRS only)."""
    return tuple((KERNEL_TYPE_CODES[t], lambda c, b, sig, args, lay=lay, n=tokens[t]:
                  _emit_kpacked(c, b, sig, args, lay, n, prefetch, width)) for t, lay in K_LAYOUTS.items())


# Two row groups a call in 512-bit vectors where the host has AVX-512 (BW for the byte ops, VNNI).
PAIRS = HAS_VNNI and HAS_AVX512 and all(f in _FEATURES for f in ("+avx512bw", "+avx512vnni"))
