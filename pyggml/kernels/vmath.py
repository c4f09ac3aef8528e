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
