"""Register-tiled products of F16 (and BF16) weights with a batch of float activations (prompts).

One call of a tile kernel multiplies ROWS weight rows by TOKENS activation rows over a range of
columns, holding the ROWS x TOKENS sums in vector registers: each weight vector (loaded as halves,
widened to float in the register: vcvtph2ps, or a shift for bf16) and each activation vector serves
several multiply-adds, where a row-by-token dot loads two vectors per multiply-add and is bound by the
loads. The kernel sweeps the activations in column panels that stay in L2 while every row group of
a thread passes over them, adding each panel's sums to `out`.

Width: 16 floats a vector and 6 rows x 4 tokens where the host has AVX-512 (32 vector registers: 24
sums, 6 weight vectors, an activation vector), 8 floats and 4 x 2 elsewhere (16 registers). A 5632 x
2048 product of 128 tokens, 2 threads, Sapphire Rapids: 6 x 4 180-183 GFLOP/s, 4 x 6 155-160, 4 x 3
145-148, 4 x 4 103-105 (best of 5 runs each).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _F32, _I16, _I32, _I64, HAS_AVX512, HAS_F16_VECTOR, _data, _hsum, _load_vec, _vec

WIDE = HAS_AVX512
LANES = 16 if WIDE else 8
ROWS = 6 if WIDE else 4
TOKENS = 4 if WIDE else 2


def _l2_bytes(default: int = 512 << 10) -> int:
    """The first CPU's L2 cache size from Linux's sysfs ("2048K"), else `default`."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, IndexError, KeyError):
        return default


# Activation columns of all tokens per panel (float32): a quarter of L2, 128-512 KiB. Each tile call then
# covers more columns for its sums' horizontal adds and stores. The 5632 x 2048 f16 product of 128
# tokens, 2 threads, SPR (2 MiB L2): panels of 128 KiB 119-157 GFLOP/s, 256 KiB 135-194, 512 KiB
# 202-209, 1 MiB 141; a Zen 3 (512 KiB L2) keeps the 128 KiB measured there before.
PANEL_BYTES = min(512 << 10, max(128 << 10, _l2_bytes() // 4))
_CONTRACT = ("contract",)


def _widen(builder, base: ir.Value, offset: ir.Value, bf16: bool) -> ir.Value:
    """<LANES x half or bf16> at base + offset bytes, as <LANES x float>."""
    if bf16:  # bf16 is the top half of an f32: shift the 16 bits up
        bits = _load_vec(builder, base, offset, _I16, LANES)
        wide = builder.shl(builder.zext(bits, _vec(_I32, LANES)), ir.Constant(_vec(_I32, LANES), [ir.Constant(_I32, 16)] * LANES))
        return builder.bitcast(wide, _vec(_F32, LANES))
    return builder.fpext(_load_vec(builder, base, offset, ir.HalfType(), LANES), _vec(_F32, LANES))


def tile_kernel(n_rows: int, n_tok: int, bf16: bool):
    """The intrinsic tile(w, row_bytes, r0, x, cols, t0, c0, c1, out, n_out): for r < n_rows, t < n_tok,
    out[(t0 + t) * n_out + r0 + r] += sum over c0 <= c < c1 of W[r0 + r, c] * x[(t0 + t) * cols + c];
    w: the rows' bytes (u8, row_bytes each), x and out flat float32. c1 - c0 is a multiple of LANES
    except at the end of a row, whose last columns go one at a time."""

    @intrinsic
    def tile(typingctx, w, row_bytes, r0, x, cols, t0, c0, c1, out, n_out):
        if not (isinstance(w, types.Array) and w.dtype == types.uint8 and isinstance(x, types.Array)
                and x.dtype == types.float32 and isinstance(out, types.Array) and out.dtype == types.float32):
            raise TypeError(f"f16 tile expects (u8[:], int, int, f32[:], int, int, int, int, f32[:], int), got {w}, {x}, {out}")

        def codegen(context, builder, sig, args):
            wp, xp, op = (_data(context, builder, sig.args[i], args[i]) for i in (0, 3, 8))
            rb, r0_, cols_, t0_, c0_, c1_, nout = (context.cast(builder, args[i], sig.args[i], types.int64)
                                                   for i in (1, 2, 4, 5, 6, 7, 9))
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            zero = ir.Constant(_vec(_F32, LANES), [ir.Constant(_F32, 0.0)] * LANES)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_tok)] for _ in range(n_rows)]
            wrow = [builder.mul(builder.add(r0_, const(r)), rb) for r in range(n_rows)]
            xrow = [builder.mul(builder.add(t0_, const(t)), cols_) for t in range(n_tok)]
            n_vec = builder.sdiv(builder.sub(c1_, c0_), const(LANES))
            with cgutils.for_range(builder, n_vec) as loop:
                c = builder.add(c0_, builder.mul(loop.index, const(LANES)))
                wv = [_widen(builder, wp, builder.add(wrow[r], builder.mul(c, const(2))), bf16) for r in range(n_rows)]
                for t in range(n_tok):
                    xv = _load_vec(builder, xp, builder.mul(builder.add(xrow[t], c), const(4)), _F32, LANES)
                    for r in range(n_rows):
                        a = builder.load(acc[r][t])
                        builder.store(builder.fadd(a, builder.fmul(wv[r], xv, flags=_CONTRACT), flags=_CONTRACT), acc[r][t])
            tail0 = builder.add(c0_, builder.mul(n_vec, const(LANES)))
            for r in range(n_rows):
                for t in range(n_tok):
                    total = cgutils.alloca_once_value(builder, _hsum(builder, builder.load(acc[r][t]), LANES))
                    with cgutils.for_range_slice(builder, tail0, c1_, const(1), inc=True) as (j, _):
                        if bf16:
                            bits = builder.load(builder.bitcast(builder.gep(wp, [builder.add(wrow[r], builder.mul(j, const(2)))]),
                                                                _I16.as_pointer()), align=1)
                            wj = builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), _F32)
                        else:
                            h = builder.load(builder.bitcast(builder.gep(wp, [builder.add(wrow[r], builder.mul(j, const(2)))]),
                                                             ir.HalfType().as_pointer()), align=1)
                            wj = builder.fpext(h, _F32)
                        xj = builder.load(builder.gep(xp, [builder.add(xrow[t], j)]))
                        builder.store(builder.fadd(builder.load(total), builder.fmul(wj, xj)), total)
                    at = builder.gep(op, [builder.add(builder.mul(builder.add(t0_, const(t)), nout), builder.add(r0_, const(r)))])
                    builder.store(builder.fadd(builder.load(at), builder.load(total)), at)
            return context.get_dummy_value()

        return types.void(w, row_bytes, r0, x, cols, t0, c0, c1, out, n_out), codegen

    return tile


_F16_TILE, _F16_COL, _F16_ROW = tile_kernel(ROWS, TOKENS, False), tile_kernel(ROWS, 1, False), tile_kernel(1, 1, False)
_BF16_TILE, _BF16_COL, _BF16_ROW = tile_kernel(ROWS, TOKENS, True), tile_kernel(ROWS, 1, True), tile_kernel(1, 1, True)


def _sweep(tile, col, row):
    """The parallel kernel over one weight kind's tile intrinsics."""

    @njit(parallel=True, cache=True)
    def sweep(w, x, out, n_tasks):
        """out (n_tok, rows) = x (n_tok, cols) @ W.T; w: the stored rows, (rows, 2 cols) bytes; out zeroed."""
        rows, row_bytes = w.shape
        n_tok, cols = x.shape
        wf, xf, of = w.reshape(-1), x.reshape(-1), out.reshape(-1)
        groups = rows // ROWS
        panel = max(LANES, (PANEL_BYTES // (4 * n_tok)) // LANES * LANES)
        for task in prange(n_tasks):
            g0, g1 = groups * task // n_tasks, groups * (task + 1) // n_tasks
            r_end = rows if task == n_tasks - 1 else g1 * ROWS  # the last task takes the rows past the last group
            for c0 in range(0, cols, panel):
                c1 = min(cols, c0 + panel)
                for g in range(g0, g1):
                    t = 0
                    while t + TOKENS <= n_tok:
                        tile(wf, row_bytes, g * ROWS, xf, cols, t, c0, c1, of, rows)
                        t += TOKENS
                    for t in range(t, n_tok):
                        col(wf, row_bytes, g * ROWS, xf, cols, t, c0, c1, of, rows)
                for r in range(g1 * ROWS, r_end):
                    for t in range(n_tok):
                        row(wf, row_bytes, r, xf, cols, t, c0, c1, of, rows)

    return sweep


matmul_f16_tiled = _sweep(_F16_TILE, _F16_COL, _F16_ROW) if HAS_F16_VECTOR else None
matmul_bf16_tiled = _sweep(_BF16_TILE, _BF16_COL, _BF16_ROW)
