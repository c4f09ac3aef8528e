"""Explicit SIMD for the hot dot products, written as LLVM vector IR through numba intrinsics.

numba widens every small-integer product to int64, so an int8 dot product written in plain
numba code becomes scalar `imul`s. Here the block loop of each quantized row-dot is emitted as
portable LLVM vector IR (<16 x i8> loads, i16 multiplies, pairwise adds into <8 x i32>, float
accumulation): LLVM lowers it to the host's best instructions (AVX2 vpmaddwd, AVX-512, NEON)
at JIT time, so no compiler is needed at install time. Activations are quantized to int8 blocks
of 32 (scale per block), as llama.cpp does; `quantize_activations` does that.

Each intrinsic computes one row: sum over blocks b of  d_w[b] * d_x[b] * sum_j q_w[b,j] * q_x[b,j].
"""
from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..gguf.constants import QK, TYPE_TRAITS, GGMLType

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_FAST = ("fast",)

# x86 AVX2 has u8 x i8 -> i16 pair-sum (vpmaddubsw) and i16 x i16 -> i32 pair-sum (vpmaddwd): the
# instructions llama.cpp's AVX2 kernels are built on. Elsewhere the portable IR below is used.
HAS_AVX2 = "+avx2" in llvm.get_host_cpu_features().flatten().split(",")


def _x86(builder, name: str, ret: ir.Type, *operands: ir.Value) -> ir.Value:
    module = builder.module
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, [o.type for o in operands]), name=name)
    return builder.call(fn, operands)


def _maddubs_to_i32(builder, u: ir.Value, s: ir.Value) -> ir.Value:
    """AVX2: <32 x u8> * <32 x i8> -> <8 x i32> sums of 4 adjacent products."""
    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), u, s)
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), p16, _splat(_I16, 16, 1))


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(t: ir.Type, n: int, value) -> ir.Constant:
    return ir.Constant(_vec(t, n), [ir.Constant(t, value)] * n)


def _data(context, builder, ty, value) -> ir.Value:
    return context.make_array(ty)(context, builder, value).data


def _length(context, builder, ty, value) -> ir.Value:
    return cgutils.unpack_tuple(builder, context.make_array(ty)(context, builder, value).shape, 1)[0]


def _load_vec(builder, base: ir.Value, offset: ir.Value, elem: ir.Type, n: int) -> ir.Value:
    """Unaligned load of <n x elem> at base + offset bytes."""
    p = builder.gep(builder.bitcast(base, _I8.as_pointer()), [offset])
    return builder.load(builder.bitcast(p, _vec(elem, n).as_pointer()), align=1)


def _load_scalar(builder, base: ir.Value, offset: ir.Value, elem: ir.Type) -> ir.Value:
    p = builder.gep(builder.bitcast(base, _I8.as_pointer()), [offset])
    return builder.load(builder.bitcast(p, elem.as_pointer()), align=1)


def _pair_sum_i32(builder, p16: ir.Value, n: int) -> ir.Value:
    """<n x i16> -> <n/2 x i32>: adjacent pairs added after sign extension (vpmaddwd's shape)."""
    even = builder.shuffle_vector(p16, p16, ir.Constant(_vec(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(p16, p16, ir.Constant(_vec(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(builder.sext(even, _vec(_I32, n // 2)), builder.sext(odd, _vec(_I32, n // 2)))


def _halve(builder, v: ir.Value, n: int) -> ir.Value:
    lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(n // 2))))
    hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(n // 2, n))))
    return lo, hi


def _hsum(builder, v: ir.Value, n: int) -> ir.Value:
    """Horizontal sum of <n x float> by halving."""
    while n > 1:
        lo, hi = _halve(builder, v, n)
        v, n = builder.fadd(lo, hi, flags=_FAST), n // 2
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _block_loop(context, builder, sig, args, block_bytes: int, body, bias: int = 0):
    """Emit: acc = 0; for b in range(nb): acc += (d_w[b] * d_x[b]) * (body(b) - bias * xsum[b]);
    return hsum(acc).

    args = (w_row u8[:], xq i8[:], xd f32[:], xsum f32[:], table f32[:]). `body(builder, w, wblk,
    xq, xblk)` returns the block's <8 x i32> partial sums of q_w * q_x; the constant `bias` of the
    weight codes (8 for Q4_0, 16 for Q5_0) is taken off through xsum, the per-block sum of q_x.
    One accumulator chain: LLVM's own unrolling of it measured faster than hand-split accumulators.
    """
    w, xq, xd, xsum, table = (_data(context, builder, t, a) for t, a in zip(sig.args, args))
    nb = _length(context, builder, sig.args[2], args[2])
    zero = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
    fzero = ir.Constant(_F32, 0.0)
    entry = builder.block
    loop = builder.append_basic_block("blocks")
    done = builder.append_basic_block("done")
    builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(_I64, 0)), loop, done)

    builder.position_at_end(loop)
    b, acc, corr = builder.phi(_I64), builder.phi(_vec(_F32, 8)), builder.phi(_F32)
    b.add_incoming(ir.Constant(_I64, 0), entry)
    acc.add_incoming(zero, entry)
    corr.add_incoming(fzero, entry)
    wblk = builder.mul(b, ir.Constant(_I64, block_bytes))
    xblk = builder.mul(b, ir.Constant(_I64, QK))
    dbits = builder.zext(_load_scalar(builder, w, wblk, _I16), _I64)
    scale = builder.fmul(builder.load(builder.gep(table, [dbits])), builder.load(builder.gep(xd, [b])), flags=_FAST)
    partial = builder.sitofp(body(builder, w, wblk, xq, xblk), _vec(_F32, 8))
    splat = builder.insert_element(ir.Constant(_vec(_F32, 8), ir.Undefined), scale, ir.Constant(_I32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(_vec(_I32, 8), [0] * 8))
    new_acc = builder.fadd(acc, builder.fmul(partial, splat, flags=_FAST), flags=_FAST)
    new_corr = corr
    if bias:
        xs = builder.load(builder.gep(xsum, [b]))
        new_corr = builder.fadd(corr, builder.fmul(scale, xs, flags=_FAST), flags=_FAST)
    b_next = builder.add(b, ir.Constant(_I64, 1))
    for phi, value in ((b, b_next), (acc, new_acc), (corr, new_corr)):
        phi.add_incoming(value, builder.block)
    builder.cbranch(builder.icmp_signed("<", b_next, nb), loop, done)

    builder.position_at_end(done)
    final_acc, final_corr = builder.phi(_vec(_F32, 8)), builder.phi(_F32)
    for phi, init, value in ((final_acc, zero, new_acc), (final_corr, fzero, new_corr)):
        phi.add_incoming(init, entry)
        phi.add_incoming(value, loop)
    total = _hsum(builder, final_acc, 8)
    if bias:
        total = builder.fsub(total, builder.fmul(final_corr, ir.Constant(_F32, float(bias))))
    return total


def _nibbles_times_x(builder, w, wblk, qs_offset: int, xq, xblk, high_bits=None):
    """Q4_0/Q5_0 block: the unsigned codes (nibble | 5th bit) times the 32 int8 activations,
    -> <8 x i32> partial sums (the codes' bias is taken off by the block loop)."""
    q = _load_vec(builder, w, builder.add(wblk, ir.Constant(_I64, qs_offset)), _I8, 16)
    lo = builder.and_(q, _splat(_I8, 16, 15))
    hi = builder.lshr(q, _splat(_I8, 16, 4))
    if HAS_AVX2:
        codes = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32))))  # elements 0..31
        if high_bits is not None:
            codes = builder.or_(codes, high_bits)
        return _maddubs_to_i32(builder, codes, _load_vec(builder, xq, xblk, _I8, 32))
    lo, hi = builder.zext(lo, _vec(_I16, 16)), builder.zext(hi, _vec(_I16, 16))
    if high_bits is not None:
        lo = builder.or_(lo, builder.zext(_halve(builder, high_bits, 32)[0], _vec(_I16, 16)))
        hi = builder.or_(hi, builder.zext(_halve(builder, high_bits, 32)[1], _vec(_I16, 16)))
    x_lo = builder.sext(_load_vec(builder, xq, xblk, _I8, 16), _vec(_I16, 16))
    x_hi = builder.sext(_load_vec(builder, xq, builder.add(xblk, ir.Constant(_I64, 16)), _I8, 16), _vec(_I16, 16))
    p = builder.add(builder.mul(lo, x_lo), builder.mul(hi, x_hi))  # |p| <= 2 * 31 * 127: fits i16
    return _pair_sum_i32(builder, p, 16)


_ROW_SIG_ARGS = (types.Array(types.uint8, 1, "C"), types.Array(types.int8, 1, "C"), types.Array(types.float32, 1, "C"),
                 types.Array(types.float32, 1, "C"), types.Array(types.float32, 1, "C"))


def _check_args(*tys) -> None:
    for got, want in zip(tys, _ROW_SIG_ARGS):
        if not (isinstance(got, types.Array) and got.dtype == want.dtype and got.ndim == 1):
            raise TypeError(f"row-dot intrinsic expects {want}, got {got}")


@intrinsic
def dot_q4_0(typingctx, w_row, xq, xd, xsum, table):
    """Dot of one Q4_0 row (raw bytes) with int8-block activations (xq, xd, xsum); table: fp16 -> f32."""
    _check_args(w_row, xq, xd, xsum, table)

    def codegen(context, builder, sig, args):
        return _block_loop(context, builder, sig, args, TYPE_TRAITS[GGMLType.Q4_0].type_size,
                           lambda bld, w, wblk, xq_, xblk: _nibbles_times_x(bld, w, wblk, 2, xq_, xblk), bias=8)

    return types.float32(w_row, xq, xd, xsum, table), codegen


@intrinsic
def dot_q5_0(typingctx, w_row, xq, xd, xsum, table):
    """Dot of one Q5_0 row with int8-block activations: the 5th bits come from the u32 qh."""
    _check_args(w_row, xq, xd, xsum, table)

    def body(bld, w, wblk, xq_, xblk):
        # element j's 5th bit is bit j of qh: spread qh's byte j // 8 to lane j, test bit j % 8
        qh = _load_vec(bld, w, bld.add(wblk, ir.Constant(_I64, 2)), _I8, 4)
        spread = bld.shuffle_vector(qh, qh, ir.Constant(_vec(_I32, 32), [j // 8 for j in range(32)]))
        bit = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, 1 << (j % 8)) for j in range(32)])
        on = bld.icmp_unsigned("!=", bld.and_(spread, bit), _splat(_I8, 32, 0))
        high = bld.select(on, _splat(_I8, 32, 16), _splat(_I8, 32, 0))
        return _nibbles_times_x(bld, w, wblk, 6, xq_, xblk, high_bits=high)

    def codegen(context, builder, sig, args):
        return _block_loop(context, builder, sig, args, TYPE_TRAITS[GGMLType.Q5_0].type_size, body, bias=16)

    return types.float32(w_row, xq, xd, xsum, table), codegen


@intrinsic
def dot_q8_0(typingctx, w_row, xq, xd, xsum, table):
    """Dot of one Q8_0 row with int8-block activations (xsum is unused: Q8_0 codes are signed)."""
    _check_args(w_row, xq, xd, xsum, table)

    def body(bld, w, wblk, xq_, xblk):
        q = _load_vec(bld, w, bld.add(wblk, ir.Constant(_I64, 2)), _I8, 32)
        x = _load_vec(bld, xq_, xblk, _I8, 32)
        if HAS_AVX2:  # |q| * sign(q) * x: u8 x i8, as vpmaddubsw needs one unsigned side
            abs_q = _x86(bld, "llvm.x86.avx2.psign.b", _vec(_I8, 32), q, q)
            signed_x = _x86(bld, "llvm.x86.avx2.psign.b", _vec(_I8, 32), x, q)
            return _maddubs_to_i32(bld, abs_q, signed_x)
        p = _pair_sum_i32(bld, bld.mul(bld.sext(q, _vec(_I16, 32)), bld.sext(x, _vec(_I16, 32))), 32)
        lo, hi = _halve(bld, p, 16)
        return bld.add(lo, hi)

    def codegen(context, builder, sig, args):
        return _block_loop(context, builder, sig, args, TYPE_TRAITS[GGMLType.Q8_0].type_size, body)

    return types.float32(w_row, xq, xd, xsum, table), codegen


# F16 weights: <8 x half> loads widened to float (vcvtph2ps with F16C, native on ARM), then
# multiply-added with float activations. Without hardware half support LLVM would call a runtime
# helper that numba's JIT may not provide, so the caller keeps its table-based kernel there.
_FEATURES = llvm.get_host_cpu_features().flatten().split(",")
HAS_F16_VECTOR = "+f16c" in _FEATURES or "+fp-armv8" in _FEATURES or "+neon" in _FEATURES


@intrinsic
def dot_f16(typingctx, w_row, x):
    """Dot of one F16 row (raw bytes, 2 per element) with float32 activations."""
    if not (isinstance(w_row, types.Array) and w_row.dtype == types.uint8 and isinstance(x, types.Array)
            and x.dtype == types.float32):
        raise TypeError(f"dot_f16 expects (u8[:], f32[:]), got ({w_row}, {x})")

    def codegen(context, builder, sig, args):
        w = _data(context, builder, sig.args[0], args[0])
        xp = _data(context, builder, sig.args[1], args[1])
        n = _length(context, builder, sig.args[1], args[1])
        lanes = 8
        n_vec = builder.sdiv(n, ir.Constant(_I64, lanes))
        entry = builder.block
        loop = builder.append_basic_block("f16")
        done = builder.append_basic_block("f16_done")
        zero = ir.Constant(_vec(_F32, lanes), [ir.Constant(_F32, 0.0)] * lanes)
        builder.cbranch(builder.icmp_signed(">", n_vec, ir.Constant(_I64, 0)), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(_I64)
        acc = builder.phi(_vec(_F32, lanes))
        i.add_incoming(ir.Constant(_I64, 0), entry)
        acc.add_incoming(zero, entry)
        h = _load_vec(builder, w, builder.mul(i, ir.Constant(_I64, 2 * lanes)), ir.HalfType(), lanes)
        xv = _load_vec(builder, xp, builder.mul(i, ir.Constant(_I64, 4 * lanes)), _F32, lanes)
        new_acc = builder.fadd(acc, builder.fmul(builder.fpext(h, _vec(_F32, lanes)), xv, flags=_FAST), flags=_FAST)
        i_next = builder.add(i, ir.Constant(_I64, 1))
        i.add_incoming(i_next, builder.block)
        acc.add_incoming(new_acc, builder.block)
        builder.cbranch(builder.icmp_signed("<", i_next, n_vec), loop, done)
        builder.position_at_end(done)
        result = builder.phi(_vec(_F32, lanes))
        result.add_incoming(zero, entry)
        result.add_incoming(new_acc, loop)
        total = cgutils.alloca_once_value(builder, _hsum(builder, result, lanes))
        # the last n % 8 elements, one at a time
        tail_start = builder.mul(n_vec, ir.Constant(_I64, lanes))
        with cgutils.for_range_slice(builder, tail_start, n, ir.Constant(_I64, 1), inc=True) as (j, _):
            hj = _load_scalar(builder, w, builder.mul(j, ir.Constant(_I64, 2)), ir.HalfType())
            xj = _load_scalar(builder, xp, builder.mul(j, ir.Constant(_I64, 4)), _F32)
            builder.store(builder.fadd(builder.load(total), builder.fmul(builder.fpext(hj, _F32), xj)), total)
        return builder.load(total)

    return types.float32(w_row, x), codegen
