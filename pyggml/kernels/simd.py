"""Explicit SIMD for the hot dot products, written as LLVM vector IR through numba intrinsics.

numba widens every small-integer product to int64, so an int8 dot product written in plain
numba code becomes scalar `imul`s. Here the block loop of each quantized row-dot is emitted as
portable LLVM vector IR (<16 x i8> loads, i16 multiplies, pairwise adds into <8 x i32>, float
accumulation): LLVM lowers it to the host's best instructions (AVX2 vpmaddwd, AVX-512, NEON)
at JIT time, so no compiler is needed at install time. Activations are quantized to int8 blocks
of 32 (scale per block), as llama.cpp does; `quantize_activations` does that.

Each output is  sum over blocks b of  d_w[b] * d_x[b] * sum_j q_w[b,j] * q_x[b,j]. The products
read the weights packed in groups of 8 rows (packed.py's `packed_kernel` and layout): one vector op then
multiplies four codes of each of 8 rows, and a superblock decoded once serves several tokens, which
makes a prompt batch a matrix-matrix product instead of repeated matrix-vector ones. `row_kernel`
reads a row in its stored GGUF layout, for rows past the last full group.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..gguf.constants import QK, TYPE_TRAITS, GGMLType
from ..tensor import KERNEL_TYPE_CODES

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_FAST = ("fast",)
_CONTRACT = ("contract",)  # fmul + fadd may fuse into an FMA

# The instruction sets the kernels use are the host's, as LLVM reports them, unless PYGGML_SIMD caps
# them: "avx2" (no VNNI), "portable" (plain LLVM vector IR only), "native" (the default). Tests run
# the capped paths on whatever host they have; numba's on-disk cache does not know the setting, so
# a capped run needs its own NUMBA_CACHE_DIR.
SIMD_LEVELS = ("native", "avx2", "portable")
SIMD_LEVEL = os.environ.get("PYGGML_SIMD", "native")
if SIMD_LEVEL not in SIMD_LEVELS:
    raise ImportError(f"PYGGML_SIMD={SIMD_LEVEL!r}: expected one of {', '.join(SIMD_LEVELS)}")
_FEATURES = llvm.get_host_cpu_features().flatten().split(",")

# x86 AVX2 has u8 x i8 -> i16 pair-sum (vpmaddubsw) and i16 x i16 -> i32 pair-sum (vpmaddwd): the
# instructions llama.cpp's AVX2 kernels are built on. Elsewhere the portable IR below is used.
HAS_AVX2 = SIMD_LEVEL != "portable" and "+avx2" in _FEATURES


def _x86(builder, name: str, ret: ir.Type, *operands: ir.Value) -> ir.Value:
    module = builder.module
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, [o.type for o in operands]), name=name)
    return builder.call(fn, operands)


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


class Prefetch(NamedTuple):
    """How a streaming kernel asks for its weights ahead of its loads: `distance` bytes ahead (0: it
    does not), into the L1 cache (level 1: prefetcht0) or the L2 (level 2: prefetcht1)."""

    distance: int = 0
    level: int = 1


NO_PREFETCH = Prefetch()
_LOCALITY = {1: 3, 2: 2}  # LLVM's locality hint for each level (3: prefetcht0, 2: prefetcht1)

# How far ahead the decode products ask for the weights. The hardware prefetchers alone left them well
# short of the read bandwidth. `python tools/bench_cpu_kernels.py`, median GB/s for prefetch 0 / 1024 /
# 3072 bytes into the L1:
#   2 threads of a 2-vCPU Zen 3 VM (read bandwidth 34-43): Q4_0 20.5 / 24.8 / 25.0, Q5_0 23.6 / 23.8 / 24.3,
#   Q8_0 29.1 / 34.3 / 34.3, F16 33.8 / 36.9 / 29.2;
#   16 threads of a 16-vCPU GPU host VM (read 120-180; its cache may hold part of the 512 MiB):
#   Q4_0 95 / 122 / 156, Q8_0 117 / 146 / 184, F16 106 / 128 / 138.
# F16 takes 1024, the better of the two on the 2-vCPU machine, where issue 4's targets are measured.
# On AVX-512 hosts one token's products ask 24 KiB ahead into the L2 instead (a Sapphire Rapids 2-vCPU
# VM, 2 threads, alternated runs: 512 MiB of 5632 x 2048 Q4_K weights 21.6-22.9 -> 23.7-23.9 GB/s; whole
# TinyLlama tg64 q4_0 35.1-35.6 -> 37.2-37.5 t/s, q5_0 23.8-25.4 -> 27.2-29.3, q8_0 21.5-21.6 -> 22.1-22.2,
# Q4_K_M 32.6-32.9 -> 33.7-34.0, Q6_K 28.4-29.2 -> 28.2-28.3; 12 KiB: between the two; 48 KiB: as 24).
# Q6_K too: on that VM 3 KiB into the L1 had looked better (tg64 28.9, 30.2 -> 27.9, 29.2 t/s into the
# L2, two alternated pairs), but on a Zen 4 2-vCPU VM (znver4, AVX-512 VNNI) 24 KiB into the L2 took the
# Q6_K file from 26.9, 29.2, 27.9, 28.4 to 37.8, 31.6, 31.0, 34.0 t/s (four alternated pairs, a noisy host).
# F16 rows too: tg32 of the f16 file 11.70, 11.12, 10.74, 10.75 -> 14.39, 11.53, 11.51, 11.48 (alternated).
# Batches of a few tokens keep 3 KiB into the L1 (pp8 q4_0 159 -> 151 t/s into the L2, Q4_K_M 145 -> 158).
HAS_AVX512 = HAS_AVX2 and SIMD_LEVEL == "native" and "+avx512f" in _FEATURES  # f16tile.WIDE and kpack.PAIRS too
INT8_PREFETCH = Prefetch(24576, 2) if HAS_AVX512 else Prefetch(3072, 1)  # one token
SMALL_BATCH_PREFETCH = Prefetch(3072, 1)  # a few tokens (kernels/cpu.py PACKED_TOKENS)
F16_PREFETCH = Prefetch(24576, 2) if HAS_AVX512 else Prefetch(1024, 1)


def _prefetch(builder, base: ir.Value, offset: ir.Value, level: int = 1) -> None:
    """Ask for the cache line at base + offset bytes into cache `level` (Prefetch); never faults, even
    past the end."""
    p = builder.gep(builder.bitcast(base, _I8.as_pointer()), [offset])
    i32 = lambda v: ir.Constant(_I32, v)  # noqa: E731
    _x86(builder, "llvm.prefetch.p0", ir.VoidType(), p, i32(0), i32(_LOCALITY[level]), i32(1))


def _pair_sum(builder, v: ir.Value, n: int, wide: ir.Type | None = None) -> ir.Value:
    """<n x T> -> <n/2 x T>: adjacent pairs added (sign-extended to `wide` first when given:
    vpmaddwd's shape for i16 -> i32)."""
    even = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(1, n, 2))))
    if wide is not None:
        even, odd = builder.sext(even, _vec(wide, n // 2)), builder.sext(odd, _vec(wide, n // 2))
    return builder.add(even, odd)


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


def _splat_value(builder, value: ir.Value, n: int) -> ir.Value:
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [0] * n))


def _maddubs(builder, u: ir.Value, s: ir.Value) -> ir.Value:
    """<32 x u8> * <32 x i8> -> <16 x i16> adjacent pair sums (vpmaddubsw; callers keep them below 2^15)."""
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), u, s)
    return _pair_sum(builder, builder.mul(builder.zext(u, _vec(_I16, 32)), builder.sext(s, _vec(_I16, 32))), 32)


# AVX-512 VNNI (with VL) and AVX-VNNI have vpdpbusd: u8 x i8 products of each 4 bytes summed into an
# i32 lane and added to an accumulator, in one instruction: it replaces the vpmaddubsw + vpmaddwd
# (+ vpaddd) of each code vector, and lane r of a packed group's vector is then row r's sum directly.
HAS_VNNI = HAS_AVX2 and SIMD_LEVEL == "native" and ("+avxvnni" in _FEATURES or all(
    f in _FEATURES for f in ("+avx512vnni", "+avx512vl")))


def _dot4(builder, acc: ir.Value | None, u: ir.Value, s: ir.Value) -> ir.Value:
    """<8 x i32> acc + sums of the 4-byte products u8(u) x i8(s) per i32 lane (vpdpbusd; HAS_VNNI only)."""
    i32x8 = _vec(_I32, 8)
    a = acc if acc is not None else _splat(_I32, 8, 0)
    return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", i32x8, a, builder.bitcast(u, i32x8), builder.bitcast(s, i32x8))


def _madd_ones(builder, p16: ir.Value) -> ir.Value:
    """<16 x i16> -> <8 x i32> adjacent pair sums (vpmaddwd with ones)."""
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), p16, _splat(_I16, 16, 1))
    return _pair_sum(builder, p16, 16, _I32)


def _abs_i8(builder, v: ir.Value) -> ir.Value:
    """|v| of signed bytes, read as unsigned (|-128| = 128)."""
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), v, v)
    return builder.select(builder.icmp_signed("<", v, _splat(_I8, 32, 0)), builder.neg(v), v)


def _sign_i8(builder, x: ir.Value, s: ir.Value) -> ir.Value:
    """x * sign(s) per byte (vpsignb): with _abs_i8(s), |s| * (x * sign(s)) = s * x."""
    if HAS_AVX2:
        return _x86(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), x, s)
    zero = _splat(_I8, 32, 0)
    neg = builder.select(builder.icmp_signed("<", s, zero), builder.neg(x), x)
    return builder.select(builder.icmp_signed("==", s, zero), zero, neg)


# ------------------------------------------------------------------ one block's codes
# A weight block decodes to 32 codes (<32 x i8>) plus how they multiply: Q4_0/Q5_0 codes are
# unsigned (nibble | 5th bit; their bias 8 / 16 is taken off later through the activations' block
# sums), Q8_0 codes are signed.
class _Format:
    def __init__(self, ggml_type: GGMLType, qs_offset: int, bias: int, signed: bool):
        self.block_bytes = TYPE_TRAITS[ggml_type].type_size
        self.qs_offset, self.bias, self.signed = qs_offset, bias, signed
        self.qh = qs_offset > 2  # Q5_0: the u32 of 5th bits sits between the scale and the codes
        self.name = ggml_type.name.lower()

    def codes(self, builder, w: ir.Value, offset: ir.Value) -> ir.Value:
        at = builder.add(offset, ir.Constant(_I64, self.qs_offset))
        if self.signed:
            return _load_vec(builder, w, at, _I8, 32)
        # byte j holds element j (low nibble) and element j + 16 (high): the 16 bytes go to both halves
        # (vbroadcasti128), the upper half's 32-bit words shift right by 4 (vpsrlvd), and a mask keeps
        # each byte's low nibble; what the shift pulls in from the next byte is masked off.
        q = _load_vec(builder, w, at, _I8, 16)
        both = builder.bitcast(builder.shuffle_vector(q, q, ir.Constant(_vec(_I32, 32), list(range(16)) * 2)), _vec(_I32, 8))
        shifted = builder.lshr(both, ir.Constant(_vec(_I32, 8), [ir.Constant(_I32, 0)] * 4 + [ir.Constant(_I32, 4)] * 4))
        codes = builder.and_(builder.bitcast(shifted, _vec(_I8, 32)), _splat(_I8, 32, 15))
        if self.qh:  # Q5_0: element j's 5th bit is bit j of the u32 qh at offset 2
            qh = _load_vec(builder, w, builder.add(offset, ir.Constant(_I64, 2)), _I8, 4)
            spread = builder.shuffle_vector(qh, qh, ir.Constant(_vec(_I32, 32), [j // 8 for j in range(32)]))
            bit = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, 1 << (j % 8)) for j in range(32)])
            on = builder.icmp_unsigned("!=", builder.and_(spread, bit), _splat(_I8, 32, 0))
            codes = builder.or_(codes, builder.select(on, _splat(_I8, 32, 16), _splat(_I8, 32, 0)))
        return codes

    def prepare(self, builder, codes: ir.Value):
        """Per-row work shared by every token: |q| for signed codes (vpmaddubsw needs one unsigned side)."""
        return _abs_i8(builder, codes) if self.signed else codes

    def times(self, builder, codes: ir.Value, prepared: ir.Value, x: ir.Value) -> ir.Value:
        """sum_j code_j * x_j over the block, as <8 x i32> partial sums (the codes' bias is taken off
        by the caller): |q| * (x * sign(q)) for signed codes."""
        if self.signed:
            x = _sign_i8(builder, x, codes)
        return _madd_ones(builder, _maddubs(builder, prepared, x))


_FORMATS = {GGMLType.Q4_0: _Format(GGMLType.Q4_0, 2, 8, False),
            GGMLType.Q5_0: _Format(GGMLType.Q5_0, 6, 16, False),
            GGMLType.Q8_0: _Format(GGMLType.Q8_0, 2, 0, True)}

# fp16 -> f32: one vcvtph2ps with F16C (native on ARM); else the 65536-entry table the caller passes.
HAS_F16_VECTOR = "+f16c" in _FEATURES or "+fp-armv8" in _FEATURES or "+neon" in _FEATURES


def _load_f16_splat(builder, base: ir.Value, offset: ir.Value, table: ir.Value, n: int = 8) -> ir.Value:
    """The fp16 at base + offset, as <n x float> with every lane equal. With F16C the half is
    broadcast first and widened as a vector (vpbroadcastw + vcvtph2ps): a scalar convert would merge
    into whatever register LLVM picks and chain each block onto the previous block's accumulator."""
    bits = _load_scalar(builder, base, offset, _I16)
    if HAS_F16_VECTOR:
        halves = builder.bitcast(_splat_value(builder, bits, n), _vec(ir.HalfType(), n))
        return builder.fpext(halves, _vec(_F32, n))
    return _splat_value(builder, builder.load(builder.gep(table, [builder.zext(bits, _I64)])), n)


def _load_f16x8(builder, base: ir.Value, offset: ir.Value, stride: int, table: ir.Value) -> ir.Value:
    """Eight fp16 values stride bytes apart as <8 x float>: gathered through integer registers (the
    integer units are idle in these loops) and widened by one vcvtph2ps."""
    bits = [_load_scalar(builder, base, builder.add(offset, ir.Constant(_I64, k * stride)), _I16) for k in range(8)]
    if not HAS_F16_VECTOR:
        vals = [builder.load(builder.gep(table, [builder.zext(b, _I64)])) for b in bits]
        v = ir.Constant(_vec(_F32, 8), ir.Undefined)
        for k, val in enumerate(vals):
            v = builder.insert_element(v, val, ir.Constant(_I32, k))
        return v
    words = []
    for half in (bits[:4], bits[4:]):
        w = builder.zext(half[0], _I64)
        for k in range(1, 4):
            w = builder.or_(w, builder.shl(builder.zext(half[k], _I64), ir.Constant(_I64, 16 * k)))
        words.append(w)
    v = builder.insert_element(ir.Constant(_vec(_I64, 2), ir.Undefined), words[0], ir.Constant(_I32, 0))
    v = builder.insert_element(v, words[1], ir.Constant(_I32, 1))
    return builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _hadd(builder, a: ir.Value, b: ir.Value) -> ir.Value:
    """vphaddd's shape: per 128-bit half, [a0+a1, a2+a3, b0+b1, b2+b3]."""
    even = ir.Constant(_vec(_I32, 8), [0, 2, 8, 10, 4, 6, 12, 14])
    odd = ir.Constant(_vec(_I32, 8), [1, 3, 9, 11, 5, 7, 13, 15])
    return builder.add(builder.shuffle_vector(a, b, even), builder.shuffle_vector(a, b, odd))


def _transpose_sum8(builder, v: list) -> ir.Value:
    """Eight <8 x i32> -> one <8 x i32> whose lane k is the sum of v[k]'s lanes."""
    abcd = _hadd(builder, _hadd(builder, v[0], v[1]), _hadd(builder, v[2], v[3]))  # [a b c d | a b c d] halves
    efgh = _hadd(builder, _hadd(builder, v[4], v[5]), _hadd(builder, v[6], v[7]))
    lo = builder.shuffle_vector(abcd, efgh, ir.Constant(_vec(_I32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(abcd, efgh, ir.Constant(_vec(_I32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.add(lo, hi)


_ROW_ARGS = (types.Array(types.uint8, 2, "C"), types.int64, types.Array(types.int8, 2, "C"),
             types.Array(types.float32, 2, "C"), types.Array(types.float32, 2, "C"), types.int64, types.int64,
             types.int64, types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C"),
             types.Array(types.int32, 2, "C"))


def int8_intrinsic(what: str, emitters):
    """An intrinsic `(code, w, i, xq, xd, xc, t, b0, b1, out, table, xs)` of the int8-activation kernels
    (arguments as _ROW_ARGS): emitters are (type code, emit(context, builder, sig, args)) pairs, sig
    and args without the code. Where the code is a compile-time constant (a global or a closure's), only
    that type's loop is emitted; otherwise the loop of every type is, and one branch per call picks it.
    Either way a code with no emitter does nothing: callers pass only the codes they were made for
    (cpu.py's per-type factories check them), and may hold a call for another layout behind a runtime
    test (the paired k-packed kernels behind `pairs`)."""
    @intrinsic(prefer_literal=True)
    def kernel(typingctx, code, w, i, xq, xd, xc, t, b0, b1, out, table, xs):
        for got, want in zip((w, i, xq, xd, xc, t, b0, b1, out, table, xs), _ROW_ARGS):
            if isinstance(want, types.Array) and not (isinstance(got, types.Array) and got.dtype == want.dtype
                                                      and got.ndim == want.ndim):
                raise TypeError(f"{what} expects {want}, got {got}")
        sig = types.void(types.int64, w, types.int64, xq, xd, xc, types.int64, types.int64, types.int64, out, table, xs)
        chosen = emitters
        if isinstance(code, types.IntegerLiteral):  # none for a type this kernel lacks: a call that does nothing
            chosen = [(v, e) for v, e in emitters if v == code.literal_value]

        def codegen(context, builder, sig, args):
            inner = types.void(*sig.args[1:])
            for value, emit in chosen:
                with builder.if_then(builder.icmp_signed("==", args[0], ir.Constant(_I64, value))):
                    emit(context, builder, inner, args[1:])
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _emit_row(context, builder, sig, args, fmt: _Format, prefetch: Prefetch) -> None:
    """The loop of `row_kernel` for one weight format (sig, args: the kernel's, without the code)."""
    wa, xqa, xda, xca, outa, tablea = (context.make_array(sig.args[k])(context, builder, args[k])
                                       for k in (0, 2, 3, 4, 8, 9))
    row, tok, b0, b1 = args[1], args[5], args[6], args[7]
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    row_off = builder.mul(row, cgutils.unpack_tuple(builder, wa.shape, 2)[1])
    x_off = builder.mul(tok, cgutils.unpack_tuple(builder, xqa.shape, 2)[1])
    d_off = builder.mul(tok, cgutils.unpack_tuple(builder, xda.shape, 2)[1])
    out_cols = cgutils.unpack_tuple(builder, outa.shape, 2)[1]
    zero = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
    acc8 = cgutils.alloca_once_value(builder, zero)  # the dot, lanes summed at the end
    corr8 = cgutils.alloca_once_value(builder, zero)  # sum of d_w * xc: the codes' bias comes off at the end
    acc = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
    corr = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))

    def block_sum(b):  # <8 x i32> partial sums of block b
        codes = fmt.codes(builder, wa.data, builder.add(row_off, builder.mul(b, const(fmt.block_bytes))))
        x = _load_vec(builder, xqa.data, builder.add(x_off, builder.mul(b, const(QK))), _I8, 32)
        return fmt.times(builder, codes, fmt.prepare(builder, codes), x)

    # eight blocks at a time, their scales as vectors
    n8 = builder.sdiv(builder.sub(b1, b0), const(8))
    with cgutils.for_range(builder, n8) as loop:
        g = builder.add(b0, builder.mul(loop.index, const(8)))
        at = builder.add(row_off, builder.mul(g, const(fmt.block_bytes)))
        if prefetch.distance:
            for k in range(0, 8 * fmt.block_bytes, 64):
                _prefetch(builder, wa.data, builder.add(at, const(prefetch.distance + k)), prefetch.level)
        totals = _transpose_sum8(builder, [block_sum(builder.add(g, const(k))) for k in range(8)])  # lane k: block g + k
        dw = _load_f16x8(builder, wa.data, at, fmt.block_bytes, tablea.data)
        dx = _load_vec(builder, xda.data, builder.mul(builder.add(d_off, g), const(4)), _F32, 8)
        scaled = builder.fmul(builder.sitofp(totals, _vec(_F32, 8)), builder.fmul(dw, dx, flags=_FAST), flags=_FAST)
        builder.store(builder.fadd(builder.load(acc8), scaled, flags=_FAST), acc8)
        if fmt.bias:
            xc8 = _load_vec(builder, xca.data, builder.mul(builder.add(d_off, g), const(4)), _F32, 8)
            builder.store(builder.fadd(builder.load(corr8), builder.fmul(dw, xc8, flags=_FAST), flags=_FAST), corr8)
    # the last < 8 blocks one at a time
    with cgutils.for_range_slice(builder, builder.add(b0, builder.mul(n8, const(8))), b1, const(1), inc=True) as (b, _):
        at = builder.add(row_off, builder.mul(b, const(fmt.block_bytes)))
        dw = builder.extract_element(_load_f16_splat(builder, wa.data, at, tablea.data), ir.Constant(_I32, 0))
        dx = builder.load(builder.gep(xda.data, [builder.add(d_off, b)]))
        partial = _hsum(builder, builder.sitofp(block_sum(b), _vec(_F32, 8)), 8)
        builder.store(builder.fadd(builder.load(acc), builder.fmul(partial, builder.fmul(dw, dx, flags=_FAST), flags=_FAST),
                                   flags=_FAST), acc)
        if fmt.bias:
            xc = builder.load(builder.gep(xca.data, [builder.add(d_off, b)]))
            builder.store(builder.fadd(builder.load(corr), builder.fmul(dw, xc, flags=_FAST), flags=_FAST), corr)
    total = builder.fadd(builder.load(acc), _hsum(builder, builder.load(acc8), 8), flags=_FAST)
    if fmt.bias:
        bias = builder.fadd(builder.load(corr), _hsum(builder, builder.load(corr8), 8), flags=_FAST)
        total = builder.fsub(total, builder.fmul(bias, ir.Constant(_F32, float(fmt.bias))))
    p = builder.gep(outa.data, [builder.add(builder.mul(tok, out_cols), row)])
    first = builder.icmp_signed("==", b0, const(0))
    builder.store(builder.select(first, total, builder.fadd(builder.load(p), total)), p)


def row_kernel(prefetch: Prefetch = INT8_PREFETCH):
    """An intrinsic `row(code, w, r, xq, xd, xc, t, b0, b1, out, table, xs)`: out[t, r] = dot(W[r], x[t])
    of a weight in its stored layout with int8-block activations, over the blocks b0 .. b1 of the
    row: stored when b0 == 0, added to out otherwise.

    code: the weight type (KERNEL_TYPE_CODES: Q4_0, Q5_0 or Q8_0; the loop for each is emitted, and
    one branch per call picks it); w: the weight's stored rows (uint8, rows x row bytes); xq/xd/xc:
    the activations as int8 blocks, their scales, and scale * sum of the block's codes (tokens x
    cols, tokens x blocks twice); table: fp16 -> f32 (used without F16C only); prefetch: how far ahead of
    its loads to ask for the row, and into which cache (Prefetch).
    Eight blocks at a time: their eight integer sums are reduced side by side into one vector
    (vphaddd), which is converted and scaled by the eight block scales at once, so the float work is
    per eight blocks, not per block; the codes' bias (Q4_0, Q5_0) comes off at the end through xc.
    Used for the rows of a weight past its last group of 8 (the rest is packed: `packed_kernel`) and
    by tools/bench_cpu_kernels.py.
    """
    return int8_intrinsic("int8 row kernel", [
        (KERNEL_TYPE_CODES[t], lambda c, b, sig, args, fmt=fmt: _emit_row(c, b, sig, args, fmt, prefetch))
        for t, fmt in _FORMATS.items()])


# F16 weights: <8 x half> loads widened to float (vcvtph2ps with F16C, native on ARM), then
# multiply-added with float activations. Without hardware half support LLVM would call a runtime
# helper that numba's JIT may not provide, so the caller keeps its table-based kernel there.


def f16_dot_kernel(prefetch: Prefetch = NO_PREFETCH, lanes: int = 8, ways: int = 4):
    """The intrinsic `dot_f16(w_row, x)`, asking for the row `prefetch` ahead of its loads;
    `ways` accumulators of `lanes` floats."""
    @intrinsic
    def dot_f16(typingctx, w_row, x):
        """Dot of one F16 row (raw bytes, 2 per element) with float32 activations. Four accumulators
        of 8 lanes: one chain would wait on the add latency instead of memory."""
        if not (isinstance(w_row, types.Array) and w_row.dtype == types.uint8 and isinstance(x, types.Array)
                and x.dtype == types.float32):
            raise TypeError(f"dot_f16 expects (u8[:], f32[:]), got ({w_row}, {x})")

        def codegen(context, builder, sig, args):
            w = _data(context, builder, sig.args[0], args[0])
            xp = _data(context, builder, sig.args[1], args[1])
            n = _length(context, builder, sig.args[1], args[1])
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            zero = ir.Constant(_vec(_F32, lanes), [ir.Constant(_F32, 0.0)] * lanes)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(ways)]

            def step(i, k):  # acc[k] += w[8i : 8i+8] * x[8i : 8i+8]
                h = _load_vec(builder, w, builder.mul(i, const(2 * lanes)), ir.HalfType(), lanes)
                xv = _load_vec(builder, xp, builder.mul(i, const(4 * lanes)), _F32, lanes)
                prod = builder.fmul(builder.fpext(h, _vec(_F32, lanes)), xv, flags=_FAST)
                builder.store(builder.fadd(builder.load(acc[k]), prod, flags=_FAST), acc[k])

            n_vec = builder.sdiv(n, const(lanes))
            n_main = builder.sdiv(n_vec, const(ways))
            with cgutils.for_range(builder, n_main) as loop:
                for k in range(0, 2 * lanes * ways if prefetch.distance else 0, 64):  # each 64-byte line of the step's reads
                    _prefetch(builder, w, builder.add(builder.mul(loop.index, const(2 * lanes * ways)), const(prefetch.distance + k)),
                              prefetch.level)
                for k in range(ways):
                    step(builder.add(builder.mul(loop.index, const(ways)), const(k)), k)
            with cgutils.for_range_slice(builder, builder.mul(n_main, const(ways)), n_vec, const(1), inc=True) as (i, _):
                step(i, 0)
            total_v = builder.load(acc[0])
            for k in range(1, ways):
                total_v = builder.fadd(total_v, builder.load(acc[k]), flags=_FAST)
            total = cgutils.alloca_once_value(builder, _hsum(builder, total_v, lanes))
            # the last n % 8 elements, one at a time
            with cgutils.for_range_slice(builder, builder.mul(n_vec, const(lanes)), n, const(1), inc=True) as (j, _):
                hj = _load_scalar(builder, w, builder.mul(j, const(2)), ir.HalfType())
                xj = _load_scalar(builder, xp, builder.mul(j, const(4)), _F32)
                builder.store(builder.fadd(builder.load(total), builder.fmul(builder.fpext(hj, _F32), xj)), total)
            return builder.load(total)

        return types.float32(w_row, x), codegen

    return dot_f16


# On AVX-512 hosts the product alone streams a little faster with two accumulators of 16 floats 2048
# bytes ahead (`bench_cpu_kernels.py --types F16 --prefetch 1024,2048 --f16-vectors 8x4,16x2`, SPR 2 vCPUs,
# read 33.4 GB/s: 8x4@1024 23.5-25.3 GB/s, 16x2@2048 26.5-27.5), but TinyLlama f16 decode did not move
# (112-113 ms a token either way): the default stays.
dot_f16 = f16_dot_kernel(F16_PREFETCH)


@intrinsic
def load_u32(typingctx, data, offset):
    """The little-endian uint32 at byte `offset` of a uint8 array, any alignment: one load (numba
    would load, bounds-wrap and combine four bytes). The caller keeps offset + 4 <= data.size."""
    if not (isinstance(data, types.Array) and data.dtype == types.uint8 and isinstance(offset, types.Integer)):
        raise TypeError(f"load_u32 expects (u8[:], int), got ({data}, {offset})")

    def codegen(context, builder, sig, args):
        at = context.cast(builder, args[1], sig.args[1], types.int64)
        return _load_scalar(builder, _data(context, builder, sig.args[0], args[0]), at, _I32)

    return types.uint32(data, offset), codegen
