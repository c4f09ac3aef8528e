"""The int8-activation products over weights packed in groups of 8 rows (the layout below), built
on simd.py's vector IR: one emitted kernel per type computes a group's 8 rows for one token or a
tile of tokens; kpack.py adds the K-quant and other newer types' emitters to the same kernels."""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from ..gguf.constants import QK
from ..tensor import KERNEL_TYPE_CODES
from .simd import (NO_PREFETCH, Prefetch, _CONTRACT, _F32, _FORMATS, _I8, _I16, _I32, _I64, HAS_F16_VECTOR, HAS_VNNI, _abs_i8, _dot4, _Format,
                   _load_f16x8, _load_scalar, _load_vec, _madd_ones, _maddubs, _prefetch, _sign_i8, _splat, _splat_value,
                   _vec, int8_intrinsic)

# ------------------------------------------------------- weights repacked in groups of 8 rows
# `cpu.pack_int8` stores a Q4_0 / Q5_0 / Q8_0 matrix as groups of 8 rows, and each group block by
# block: the 8 rows' block b side by side in one "superblock" of 8 x the block's bytes,
#   scales   8 x fp16 (row r's at 2r),
#   Q5_0: qh 32 bytes (byte 4r + e, bit k: the 5th bit of row r's element 4k + e),
#   codes    Q4_0/Q5_0 4 x 32 bytes (in the m-th 32, byte 4r + e: row r's stored byte 4m + e, i.e.
#            element 4m + e in its low nibble and 4m + 16 + e in its high one),
#            Q8_0 8 x 32 bytes (in the k-th 32, byte 4r + e: row r's element 4k + e).
# So one 32-byte vector holds four codes of each of the 8 rows, for the same four elements: a
# broadcast of those four activation bytes multiplies all 8 rows at once (vpmaddubsw) and the sums
# stay apart by row, lane r of the result: no horizontal reduction, and the float work is one
# convert and two multiply-adds per block for 8 rows.
PACK_ROWS = 8


class PackedLayout:
    """Where a packed superblock keeps what (bytes), for the kernels here and cpu.pack_int8."""

    def __init__(self, fmt: _Format):
        self.block_bytes, self.bias, self.signed, self.qh = fmt.block_bytes, fmt.bias, fmt.signed, fmt.qh
        self.stored_qs = fmt.qs_offset  # the codes' offset in a stored block
        self.superblock = PACK_ROWS * self.block_bytes
        self.qh_at = 2 * PACK_ROWS  # Q5_0's qh field: after the 8 scales
        self.qs = self.qh_at + (32 if self.qh else 0)  # the codes: after the scales and the qh field
        self.vectors = 8 if self.signed else 4  # 32-byte code vectors: one byte a code, or two nibbles

    def codes(self, builder, w: ir.Value, base: ir.Value):
        """The superblock at base as 8 code vectors (group k: elements 4k .. 4k + 3 of each row) and,
        for signed codes, the signs to put on the activations."""
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        if self.signed:
            q = [_load_vec(builder, w, builder.add(base, const(self.qs + 32 * k)), _I8, 32) for k in range(self.vectors)]
            return [_abs_i8(builder, v) for v in q], q
        codes = [None] * 8
        for m in range(self.vectors):
            v = _load_vec(builder, w, builder.add(base, const(self.qs + 32 * m)), _I8, 32)
            codes[m] = builder.and_(v, _splat(_I8, 32, 15))
            high = builder.lshr(builder.bitcast(v, _vec(_I16, 16)), _splat(_I16, 16, 4))
            codes[m + 4] = builder.and_(builder.bitcast(high, _vec(_I8, 32)), _splat(_I8, 32, 15))
        if self.qh:  # bit k of each byte -> bit 4 of group k's code (16-bit shifts: what crosses bytes is masked off)
            qh = builder.bitcast(_load_vec(builder, w, builder.add(base, const(self.qh_at)), _I8, 32), _vec(_I16, 16))
            for k in range(8):
                s = qh if k == 4 else (builder.shl(qh, _splat(_I16, 16, 4 - k)) if k < 4
                                       else builder.lshr(qh, _splat(_I16, 16, k - 4)))
                codes[k] = builder.or_(codes[k], builder.and_(builder.bitcast(s, _vec(_I8, 32)), _splat(_I8, 32, 16)))
        return codes, None

    def row_sums(self, builder, codes, signs, x) -> ir.Value:
        """<8 x i32>: lane r = sum over the block of row r's codes times the activations x (8 groups of
        4 bytes, each broadcast to <32 x i8>). Unsigned codes' pair sums are added as i16 while they
        fit (Q4_0: 8 groups, 8 * 2 * 15 * 127 < 2^15; Q5_0: 4 groups, 4 * 2 * 31 * 127 < 2^15)."""
        per = 8 if not self.qh else 4
        if self.signed:
            per = 1
            x = [_sign_i8(builder, xk, sk) for xk, sk in zip(x, signs)]
        if HAS_VNNI:
            total = None
            for k in range(8):
                total = _dot4(builder, total, codes[k], x[k])
            return total
        return grouped_pair_sums(builder, codes, x, per, lambda s16, g: _madd_ones(builder, s16))


def grouped_pair_sums(builder, u: list, s: list, per: int, widen) -> ir.Value:
    """The AVX2-shaped integer dot of code vectors u with activation vectors s: the vpmaddubsw pair sums
    of each `per` consecutive vectors added as i16 (the caller keeps them below 2^15), each group's sum
    made <8 x i32> by widen(s16, group index) (vpmaddwd with ones or with scales), the groups added."""
    total = None
    for k0 in range(0, len(u), per):
        s16 = None
        for k in range(k0, k0 + per):
            p = _maddubs(builder, u[k], s[k])
            s16 = p if s16 is None else builder.add(s16, p)
        s32 = widen(s16, k0 // per)
        total = s32 if total is None else builder.add(total, s32)
    return total


PACKED_LAYOUTS = {t: PackedLayout(fmt) for t, fmt in _FORMATS.items()}


class PackedCall:
    """What a packed emitter takes from its kernel's arguments (sig, args: without the type code):
    the arrays, the row group, tokens t0 .. t0 + n_tok - 1 with their activation offsets, and the
    blocks b0 .. b1; `accumulators` and `store` are the per-token sums and their write to out."""

    def __init__(self, context, builder, sig, args, n_tok: int):
        arrays = (context.make_array(sig.args[k])(context, builder, args[k]) for k in (0, 2, 3, 4, 8, 9, 10))
        self.w, self.xq, self.xd, self.xc, self.out, self.table, self.xs = (a.data for a in arrays)
        shape = lambda k: cgutils.unpack_tuple(builder, context.make_array(sig.args[k])(context, builder, args[k]).shape, 2)[1]  # noqa: E731
        self.group, tok0, self.b0, self.b1 = args[1], args[5], args[6], args[7]
        self.group_bytes, cols, nb, self.out_cols = shape(0), shape(2), shape(3), shape(8)
        self.tok = [builder.add(tok0, ir.Constant(_I64, j)) for j in range(n_tok)]
        self.x_off = [builder.mul(t, cols) for t in self.tok]  # token j's activation codes
        self.d_off = [builder.mul(t, nb) for t in self.tok]  # and its block scales
        self.w_off = builder.mul(self.group, self.group_bytes)

    def x_groups(self, builder, j: int, b, lanes: int = 8, first: int = 0, count: int = 8) -> list:
        """Token j's activation codes of block b as 8 broadcasts of 4 bytes (<4 * lanes x i8>), or
        `count` of them from broadcast `first`."""
        xo = builder.add(self.x_off[j], builder.mul(b, ir.Constant(_I64, QK)))
        return [builder.bitcast(_splat_value(builder, _load_scalar(builder, self.xq, builder.add(xo, ir.Constant(_I64, 4 * k)), _I32),
                                             lanes), _vec(_I8, 4 * lanes)) for k in range(first, first + count)]

    def scalar(self, builder, array, j: int, b):
        """Token j's value of block b in xd or xc."""
        return builder.load(builder.gep(array, [builder.add(self.d_off[j], b)]))

    def half_sums(self, builder, j: int, b) -> list:
        """Token j's sums of the activation codes of each half of block b (xs), as two i32 scalars."""
        at = builder.mul(builder.add(self.d_off[j], b), ir.Constant(_I64, 2))
        return [builder.load(builder.gep(self.xs, [builder.add(at, ir.Constant(_I64, h))])) for h in range(2)]

    @staticmethod
    def accumulators(builder, n_tok: int, lanes: int = 8) -> list:
        zero = ir.Constant(_vec(_F32, lanes), [ir.Constant(_F32, 0.0)] * lanes)
        return [cgutils.alloca_once_value(builder, zero) for _ in range(n_tok)]

    def store(self, builder, acc: list, lanes: int = 8) -> None:
        """out[t, 8g ..] = the sums (b0 == 0), or += them."""
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        first = builder.icmp_signed("==", self.b0, const(0))
        for j, t in enumerate(self.tok):
            at = builder.mul(builder.add(builder.mul(t, self.out_cols), builder.mul(self.group, const(PACK_ROWS))), const(4))
            p = builder.bitcast(builder.gep(builder.bitcast(self.out, _I8.as_pointer()), [at]), _vec(_F32, lanes).as_pointer())
            total = builder.load(acc[j])
            builder.store(builder.select(first, total, builder.fadd(builder.load(p, align=4), total)), p, align=4)


def _emit_packed(context, builder, sig, args, fmt: PackedLayout, n_tok: int, prefetch: Prefetch) -> None:
    """The loop of `packed_kernel` for one format (sig, args: the kernel's, without the code)."""
    call = PackedCall(context, builder, sig, args, n_tok)
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    acc = call.accumulators(builder, n_tok)
    with cgutils.for_range_slice(builder, call.b0, call.b1, const(1), inc=True) as (b, _):
        base = builder.add(call.w_off, builder.mul(b, const(fmt.superblock)))
        if prefetch.distance:
            for k in range(0, fmt.superblock, 64):
                _prefetch(builder, call.w, builder.add(base, const(prefetch.distance + k)), prefetch.level)
        if HAS_F16_VECTOR:
            dw = builder.fpext(_load_vec(builder, call.w, base, ir.HalfType(), 8), _vec(_F32, 8))
        else:
            dw = _load_f16x8(builder, call.w, base, 2, call.table)
        codes, signs = fmt.codes(builder, call.w, base)
        for j in range(n_tok):
            x = call.x_groups(builder, j, b)
            sums = builder.sitofp(fmt.row_sums(builder, codes, signs, x), _vec(_F32, 8))
            dx = call.scalar(builder, call.xd, j, b)
            a = builder.load(acc[j])
            a = builder.fadd(a, builder.fmul(sums, builder.fmul(dw, _splat_value(builder, dx, 8)), flags=_CONTRACT), flags=_CONTRACT)
            if fmt.bias:  # the codes' bias: - bias * d_w * (d_x * sum of the block's activation codes)
                xc = call.scalar(builder, call.xc, j, b)
                neg = _splat_value(builder, builder.fmul(xc, ir.Constant(_F32, -float(fmt.bias))), 8)
                a = builder.fadd(a, builder.fmul(dw, neg, flags=_CONTRACT), flags=_CONTRACT)
            builder.store(a, acc[j])
    call.store(builder, acc)


def packed_kernel(tokens: dict, prefetch: Prefetch = NO_PREFETCH, more: tuple = ()):
    """An intrinsic `packed(code, w, g, xq, xd, xc, t0, b0, b1, out, table, xs)`: out[t0 + j, 8g .. 8g + 7] for
    j < n_tok = tokens[the weight type], the dots of row group g of a packed weight (`cpu.pack_int8`: rows of groups, each
    n_blocks superblocks) with tokens t0 .. t0 + n_tok - 1 of int8-block activations, over blocks
    b0 .. b1: stored when b0 == 0, added otherwise. code: KERNEL_TYPE_CODES of Q4_0, Q5_0 or Q8_0.
    Each superblock is decoded once for all n_tok tokens. prefetch: how far ahead to ask for the
    weights, and into which cache (simd.Prefetch); table: fp16 -> f32 (used without F16C only). Per token and superblock:
    8 activation broadcasts, 8 vpmaddubsw, the i16 adds, 1-8 vpmaddwd, a convert and two
    multiply-adds, for 8 rows. more: further (type code, emit) pairs of other packed layouts
    (kpack.py's), dispatched by the same code branch."""
    return int8_intrinsic("packed int8 kernel", [
        (KERNEL_TYPE_CODES[t], lambda c, b, sig, args, fmt=fmt, n=tokens[t]: _emit_packed(c, b, sig, args, fmt, n, prefetch))
        for t, fmt in PACKED_LAYOUTS.items()] + list(more))
