"""Vector loops of the CPU decode attention (kvattn.py): cached rows decoded a tile at a time, and one
query head scored against a tile of keys without a horizontal sum per key.

A decode step's attention is one query token against every cached key. Written as scalar numba loops
(decode a row, then a dot product per query head) it ran far from the memory's rate: TinyLlama at
2048 cached positions spent 8 ms a token in attention with an f16 cache and 16 with q8_0, for 46 and
24 MB of rows (~1.5 ms of reading). Here:

- `decode_tile(code, buf, o, stride, m, hd, tile)`: rows o, o + stride, ... (m <= KEYS of them) of a
  cache's bytes as floats into tile[k * hd + j], in vectors of 16 values (f16 by vcvtph2ps, q8_0 /
  q4_0 codes widened and scaled per block); rows m .. KEYS-1 of the tile are zeros.
- `score_rows(q, qo, tile, hd, scale, out, oo)`: out[oo + k] = scale * sum_j q[qo + j] * tile[k * hd + j]
  for the KEYS rows:
  each key's sum is kept as a vector of partial sums, and the partial sums of LANES keys are reduced
  together by a tree of shuffles (LANES - 1 adds for LANES keys instead of log2(LANES) steps per key).

Both need hd % 16 == 0 (`VECTOR_HEAD`); the caller keeps its scalar loops otherwise. The references
are KVType.decode (model/kvtypes.py) and a float dot product: tests/test_kvtypes.py.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..model.kvtypes import KV_TYPES
from .dispatch import by_code
from .simd import _CONTRACT, _F32, _I8, _I32, _I64, HAS_AVX512, HAS_F16_VECTOR, SIMD_LEVEL, _data, _load_scalar, _load_vec, _splat, _splat_value, _vec

KV_F32, KV_F16, KV_Q8_0, KV_Q4_0 = (KV_TYPES[n].code for n in ("f32", "f16", "q8_0", "q4_0"))
KEYS = 16  # rows a tile holds; the keys kvattn's prompt blocks score at once (one 512-bit vector of scores)
CHUNK = 16  # values a decode step widens at once
LANES = 16 if HAS_AVX512 else 8  # partial sums a key keeps in score_rows (one vector register)
# where the vector loops apply: fp16 widened by the hardware (F16C, or ARM's fp16 conversions)
VECTOR_ROWS = HAS_F16_VECTOR and SIMD_LEVEL != "portable"
_HALF = ir.HalfType()


@njit(inline="always")
def VECTOR_HEAD(hd):
    """Whether heads of hd values take the tile loops (kvattn's decode tokens and prompt blocks)."""
    return VECTOR_ROWS and hd % CHUNK == 0


def _i64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _store_vec(builder, base: ir.Value, index: ir.Value, v: ir.Value) -> None:
    """Store <n x float> v at float index `index` of base (unaligned)."""
    p = builder.gep(base, [index])
    builder.store(v, builder.bitcast(p, v.type.as_pointer()), align=4)


def _half_splat(builder, buf: ir.Value, off: ir.Value, n: int) -> ir.Value:
    """The fp16 at byte off of buf as <n x float>, every lane equal."""
    v = _splat_value(builder, _load_scalar(builder, buf, off, ir.IntType(16)), n)
    return builder.fpext(builder.bitcast(v, _vec(_HALF, n)), _vec(_F32, n))


def _emit_row(builder, code: int, buf: ir.Value, o: ir.Value, hd: ir.Value, out: ir.Value, at: ir.Value) -> None:
    """Row at byte o of buf -> out[at .. at + hd), for the KV type `code` (hd % CHUNK == 0)."""
    f16 = _vec(_F32, CHUNK)
    if code in (KV_F32, KV_F16):
        size = 4 if code == KV_F32 else 2
        with cgutils.for_range(builder, builder.udiv(hd, _i64(CHUNK))) as loop:
            j = builder.mul(loop.index, _i64(CHUNK))
            if code == KV_F32:
                v = _load_vec(builder, buf, builder.add(o, builder.mul(j, _i64(size))), _F32, CHUNK)
            else:
                v = builder.fpext(_load_vec(builder, buf, builder.add(o, builder.mul(j, _i64(size))), _HALF, CHUNK), f16)
            _store_vec(builder, out, builder.add(at, j), v)
        return
    block = 34 if code == KV_Q8_0 else 18
    with cgutils.for_range(builder, builder.udiv(hd, _i64(32))) as loop:
        b = loop.index
        ob = builder.add(o, builder.mul(b, _i64(block)))
        d = _half_splat(builder, buf, ob, CHUNK)
        if code == KV_Q8_0:
            halves = [_load_vec(builder, buf, builder.add(ob, _i64(2 + 16 * h)), _I8, 16) for h in (0, 1)]
        else:
            qs = _load_vec(builder, buf, builder.add(ob, _i64(2)), _I8, 16)
            lo = builder.and_(qs, _splat(_I8, 16, 15))
            hi = builder.lshr(qs, _splat(_I8, 16, 4))
            halves = [builder.sub(x, _splat(_I8, 16, 8)) for x in (lo, hi)]
        for h, x in enumerate(halves):
            v = builder.fmul(builder.sitofp(x, f16), d)
            _store_vec(builder, out, builder.add(at, builder.add(builder.mul(b, _i64(32)), _i64(16 * h))), v)


def _rows_intrinsic(code: int):
    @intrinsic
    def rows(typingctx, buf, o, stride, m, hd, tile):
        """tile[k * hd + j] = value j of the row at byte o + k * stride of buf, k < m; zeros for k < KEYS."""
        def codegen(context, builder, sig, args):
            bp, tp = _data(context, builder, sig.args[0], args[0]), _data(context, builder, sig.args[5], args[5])
            o0, st, mm, h = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4))
            with cgutils.for_range(builder, mm) as loop:
                k = loop.index
                _emit_row(builder, code, bp, builder.add(o0, builder.mul(k, st)), h, tp, builder.mul(k, h))
            zero = _splat(_F32, CHUNK, 0.0)
            with cgutils.for_range_slice(builder, builder.mul(mm, builder.udiv(h, _i64(CHUNK))),
                                         builder.mul(_i64(KEYS), builder.udiv(h, _i64(CHUNK))), _i64(1)) as (c, _):
                _store_vec(builder, tp, builder.mul(c, _i64(CHUNK)), zero)
            return context.get_dummy_value()
        return types.void(buf, o, stride, m, hd, tile), codegen
    return rows


def _tree_masks(lanes: int) -> list[tuple[list[int], list[int]]]:
    """Per step of the reduction, the shuffles that take the first and second halves of every key's
    block of partial sums from two vectors (a: lanes 0.., b: lanes `lanes`..)."""
    steps, width = [], lanes
    while width > 1:
        half, blocks = width // 2, lanes // width
        lo = [blk * width + e for blk in range(blocks) for e in range(half)]
        hi = [blk * width + half + e for blk in range(blocks) for e in range(half)]
        steps.append((lo + [lanes + i for i in lo], hi + [lanes + i for i in hi]))
        width = half
    return steps


def _reduce_keys(builder, vs: list, lanes: int) -> ir.Value:
    """`lanes` vectors <lanes x float> -> one whose lane k is the sum of vs[k]'s lanes."""
    for lo, hi in _tree_masks(lanes):
        nxt = []
        for a, b in zip(vs[0::2], vs[1::2]):
            sa = builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, lanes), lo))
            sb = builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, lanes), hi))
            nxt.append(builder.fadd(sa, sb))
        vs = nxt
    return vs[0]


@intrinsic
def score_rows(typingctx, q, qo, tile, hd, scale, out, oo):
    """out[oo + k] = scale * sum over j < hd of q[qo + j] * tile[k * hd + j], for k < KEYS (hd % LANES == 0)."""
    def codegen(context, builder, sig, args):
        qp, tp, op = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 5))
        q0, h, o0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3, 6))
        scv = _splat_value(builder, context.cast(builder, args[4], sig.args[4], types.float32), LANES)
        for g in range(KEYS // LANES):
            accs = [cgutils.alloca_once_value(builder, _splat(_F32, LANES, 0.0)) for _ in range(LANES)]
            with cgutils.for_range(builder, builder.udiv(h, _i64(LANES))) as loop:
                j = builder.mul(loop.index, _i64(LANES))
                qv = _load_vec(builder, qp, builder.mul(builder.add(q0, j), _i64(4)), _F32, LANES)
                for k in range(LANES):
                    row = builder.mul(_i64(g * LANES + k), h)
                    kv = _load_vec(builder, tp, builder.mul(builder.add(row, j), _i64(4)), _F32, LANES)
                    builder.store(builder.fadd(builder.load(accs[k]), builder.fmul(qv, kv, flags=_CONTRACT), flags=_CONTRACT), accs[k])
            total = builder.fmul(_reduce_keys(builder, [builder.load(a) for a in accs], LANES), scv)
            _store_vec(builder, op, builder.add(o0, _i64(g * LANES)), total)
        return context.get_dummy_value()
    return types.void(q, qo, tile, hd, scale, out, oo), codegen


def _rows_function(code: int):
    rows = _rows_intrinsic(code)

    @njit(inline="always")
    def decode(buf, o, stride, m, hd, tile):
        rows(buf, o, stride, m, hd, tile)
    return decode


# decode_tile(code, buf, o, stride, m, hd, tile): see the module's doc (False for a code it has no row for)
decode_tile = by_code("decode_tile", {c: _rows_function(c) for c in (KV_F32, KV_F16, KV_Q8_0, KV_Q4_0)})
