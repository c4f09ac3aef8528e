"""Float32 math that LLVM vectorises inside numba loops (libm's calls are one element at a time)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .simd import _F32, _I8, _I32, _I64, _load_vec, _splat, _splat_value, _vec, _x86


@intrinsic
def _pow2(typingctx, n):
    """2.0 ** n as float32 for -126 <= n <= 127: (n + 127) in the exponent bits."""
    def codegen(context, builder, sig, args):
        bits = builder.shl(builder.add(args[0], ir.Constant(_I32, 127)), ir.Constant(_I32, 23))
        return builder.bitcast(bits, _F32)
    return types.float32(types.int32), codegen


@njit(inline="always")
def exp_f32(x):
    """exp(x) in float32 arithmetic LLVM vectorises (libm's expf is a call per element): 2^n * 2^f with
    n = round(x log2 e), |f| <= 1/2, 2^f by its Taylor series to degree 7 (relative error < 2e-7),
    2^n put in the exponent bits; x clamped to [-87, 88] (results 1.6e-38 .. 1.7e38)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    t = x * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = (t - n) * np.float32(0.6931471805599453)  # 2^(t - n) = e^f, |f| <= 0.35
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    return p * _pow2(np.int32(n))


@intrinsic
def quantize_block32(typingctx, x, xo, xq, qo, xd, xc, xs, b):
    """The 32 floats x[xo:xo + 32] as ggml's Q8_0 block (quantize_row_q8_0_ref, float32 arithmetic):
    d = amax / 127, xq[qo:qo + 32] = x / d rounded half away from zero, xd[b] = d, xs[2b], xs[2b + 1] the
    sums of each half's codes, xc[b] = d * their sum. In two vectors of 16 (a scalar loop ran ~1 ns an
    element); the same bits as the scalar code for every input without NaN."""
    def codegen(context, builder, sig, args):
        v16, i16v, b16 = _vec(_F32, 16), _vec(_I32, 16), _vec(_I8, 16)
        xp, qp, dp, cp, sp = (context.make_array(sig.args[k])(context, builder, args[k]).data for k in (0, 2, 4, 5, 6))
        xo, qo, bi = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 3, 7))
        halves = [_load_vec(builder, xp, builder.mul(builder.add(xo, ir.Constant(_I64, 16 * h)), ir.Constant(_I64, 4)), _F32, 16)
                  for h in range(2)]
        absv = [_x86(builder, "llvm.fabs.v16f32", v16, h) for h in halves]
        amax = _x86(builder, "llvm.vector.reduce.fmax.v16f32", _F32, _x86(builder, "llvm.maxnum.v16f32", v16, *absv))
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
        nonzero = builder.fcmp_ordered("!=", d, ir.Constant(_F32, 0.0))
        inv = builder.select(nonzero, builder.fdiv(ir.Constant(_F32, 1.0), d), ir.Constant(_F32, 0.0))
        sums = []
        for h, half in enumerate(halves):
            v = builder.fmul(half, _splat_value(builder, inv, 16))
            r = _x86(builder, "llvm.floor.v16f32", v16, builder.fadd(_x86(builder, "llvm.fabs.v16f32", v16, v), _splat(_F32, 16, 0.5)))
            q = builder.fptosi(r, i16v)
            q = builder.select(builder.fcmp_ordered("<", v, _splat(_F32, 16, 0.0)), builder.neg(q), q)
            at = builder.gep(qp, [builder.add(qo, ir.Constant(_I64, 16 * h))])
            builder.store(builder.trunc(q, b16), builder.bitcast(at, b16.as_pointer()), align=1)
            sums.append(_x86(builder, "llvm.vector.reduce.add.v16i32", _I32, q))
        s_at = builder.mul(bi, ir.Constant(_I64, 2))
        for h in range(2):
            builder.store(sums[h], builder.gep(sp, [builder.add(s_at, ir.Constant(_I64, h))]))
        builder.store(d, builder.gep(dp, [bi]))
        builder.store(builder.fmul(d, builder.sitofp(builder.add(sums[0], sums[1]), _F32)), builder.gep(cp, [bi]))
        return context.get_dummy_value()
    return types.void(x, xo, xq, qo, xd, xc, xs, b), codegen
