"""Float32 math that LLVM vectorises inside numba loops (libm's calls are one element at a time)."""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _pow2(typingctx, n):
    """2.0 ** n as float32 for -126 <= n <= 127: (n + 127) in the exponent bits."""
    def codegen(context, builder, sig, args):
        from llvmlite import ir
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
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


def _call(builder, name: str, ret, *operands):
    """A call of the LLVM intrinsic `name` (declared in the module on first use)."""
    from llvmlite import ir
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ret, [o.type for o in operands]), name=name)
    return builder.call(fn, operands)


@intrinsic
def quantize_block32(typingctx, x, xo, xq, qo, xd, xc, xs, b):
    """The 32 floats x[xo:xo + 32] as ggml's Q8_0 block (quantize_row_q8_0_ref, float32 arithmetic):
    d = amax / 127, xq[qo:qo + 32] = x / d rounded half away from zero, xd[b] = d, xs[2b], xs[2b + 1] the
    sums of each half's codes, xc[b] = d * their sum. In two vectors of 16 (a scalar loop ran ~1 ns an
    element); the same bits as the scalar code for every input without NaN."""
    def codegen(context, builder, sig, args):
        from llvmlite import ir
        f32, i32, i64, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
        v16, i16v, b16 = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i8, 16)
        xp, qp, dp, cp, sp = (context.make_array(sig.args[k])(context, builder, args[k]).data for k in (0, 2, 4, 5, 6))
        xo, qo, bi = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 3, 7))
        splat = lambda s: builder.shuffle_vector(  # noqa: E731
            builder.insert_element(ir.Constant(v16, ir.Undefined), s, ir.Constant(i32, 0)), ir.Constant(v16, ir.Undefined),
            ir.Constant(ir.VectorType(i32, 16), [0] * 16))
        halves = [builder.load(builder.bitcast(builder.gep(xp, [builder.add(xo, ir.Constant(i64, 16 * h))]), v16.as_pointer()),
                               align=4) for h in range(2)]
        absv = [_call(builder, "llvm.fabs.v16f32", v16, h) for h in halves]
        amax = _call(builder, "llvm.vector.reduce.fmax.v16f32", f32, _call(builder, "llvm.maxnum.v16f32", v16, *absv))
        d = builder.fdiv(amax, ir.Constant(f32, 127.0))
        nonzero = builder.fcmp_ordered("!=", d, ir.Constant(f32, 0.0))
        inv = builder.select(nonzero, builder.fdiv(ir.Constant(f32, 1.0), d), ir.Constant(f32, 0.0))
        sums = []
        for h, half in enumerate(halves):
            v = builder.fmul(half, splat(inv))
            r = _call(builder, "llvm.floor.v16f32", v16,
                      builder.fadd(_call(builder, "llvm.fabs.v16f32", v16, v), ir.Constant(v16, [ir.Constant(f32, 0.5)] * 16)))
            q = builder.fptosi(r, i16v)
            q = builder.select(builder.fcmp_ordered("<", v, ir.Constant(v16, [ir.Constant(f32, 0.0)] * 16)), builder.neg(q), q)
            at = builder.gep(qp, [builder.add(qo, ir.Constant(i64, 16 * h))])
            builder.store(builder.trunc(q, b16), builder.bitcast(at, b16.as_pointer()), align=1)
            sums.append(_call(builder, "llvm.vector.reduce.add.v16i32", i32, q))
        s_at = builder.mul(bi, ir.Constant(i64, 2))
        for h in range(2):
            builder.store(sums[h], builder.gep(sp, [builder.add(s_at, ir.Constant(i64, h))]))
        builder.store(d, builder.gep(dp, [bi]))
        builder.store(builder.fmul(d, builder.sitofp(builder.add(sums[0], sums[1]), f32)), builder.gep(cp, [bi]))
        return context.get_dummy_value()
    return types.void(x, xo, xq, qo, xd, xc, xs, b), codegen
