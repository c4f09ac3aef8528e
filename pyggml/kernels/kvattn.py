"""The KV cache's CPU kernels: rows written in the cache's type, attention reading that type directly.

Every cache array reaches these kernels as its bytes (uint8, C-contiguous): row (slot s, head h,
position p) of a (n_seq, n_kv, ctx, width) array starts at byte ((s * n_kv + h) * ctx + p) * row_bytes
and holds head_dim values as f32, f16, or ggml's q8_0 / q4_0 blocks (model/kvtypes.py; the codes are
its rows' `code`). The numpy references are KVType.encode / decode and kernels/reference.py's attention.

Attention takes the query heads that share a key head together: each cached row is decoded once into
a float buffer (vcvtph2ps for f16 where the host has F16C; a table elsewhere) and serves every head of
the group, so the cache is read once per token and key head, in its stored size.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .decoders import F16_TABLE
from .dispatch import by_code
from .kvrows import KEYS, KV_F16, KV_F32, KV_Q4_0, KV_Q8_0, VECTOR_HEAD, decode_tile, score_rows
from .jitcache import per_type
from .vmath import exp_f32
from .simd import _CONTRACT, _F32, _I32, _I64, HAS_F16_VECTOR, SIMD_LEVEL, _data, _load_scalar, _load_vec, _splat, _splat_value, _vec

QK = 32  # values per q8_0 / q4_0 block
B_Q8_0, B_Q4_0 = 34, 18  # bytes per block
_NATIVE_HALF = HAS_F16_VECTOR and SIMD_LEVEL != "portable"  # the table path runs where the cap says portable

__all__ = ["kv_write", "attention_seqs"]


@intrinsic
def _float_at(typingctx, buf, off):
    """The float32 at byte `off` of a uint8 array."""
    def codegen(context, builder, sig, args):
        return _load_scalar(builder, _data(context, builder, sig.args[0], args[0]), args[1], _F32)
    return types.float32(buf, off), codegen


@intrinsic
def _half_at(typingctx, buf, off):
    """The fp16 at byte `off` of a uint8 array, as float32 (hardware conversion; hosts with F16C)."""
    def codegen(context, builder, sig, args):
        h = _load_scalar(builder, _data(context, builder, sig.args[0], args[0]), args[1], ir.HalfType())
        return builder.fpext(h, _F32)
    return types.float32(buf, off), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32 as uint32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)
    return types.uint32(types.float32), codegen


@njit(inline="always")
def _half(buf, o, table):
    if _NATIVE_HALF:
        return _half_at(buf, o)
    return table[np.int64(buf[o]) | (np.int64(buf[o + 1]) << 8)]


@njit(cache=True)
def _load_f32(buf, o, hd, out, table):
    for j in range(hd):
        out[j] = _float_at(buf, o + 4 * j)


@njit(cache=True)
def _load_f16(buf, o, hd, out, table):
    for j in range(hd):
        out[j] = _half(buf, o + 2 * j, table)


@njit(cache=True)
def _load_q8_0(buf, o, hd, out, table):
    for b in range(hd // QK):
        ob = o + b * B_Q8_0
        d = _half(buf, ob, table)
        for j in range(QK):
            out[b * QK + j] = d * np.float32(np.int8(buf[ob + 2 + j]))


@njit(cache=True)
def _load_q4_0(buf, o, hd, out, table):
    for b in range(hd // QK):
        ob = o + b * B_Q4_0
        d = _half(buf, ob, table)
        for j in range(QK // 2):
            byte = np.int32(buf[ob + 2 + j])
            out[b * QK + j] = d * np.float32((byte & 15) - 8)
            out[b * QK + j + QK // 2] = d * np.float32((byte >> 4) - 8)


# _load_row(code, buf, o, hd, out, table): decode the row at byte o of buf into out[:hd] (float32).
_load_row = by_code("_load_row", {KV_F32: _load_f32, KV_F16: _load_f16, KV_Q8_0: _load_q8_0, KV_Q4_0: _load_q4_0})


# ------------------------------------------------------------------------------------ writes
@njit(inline="always")
def _f16_bits(x):
    """float32 -> fp16 bits, rounded to nearest even (numpy's astype(float16), ggml's F16C)."""
    b = np.int64(_f32_bits(x))
    sign = (b >> 16) & 0x8000
    e = (b >> 23) & 0xFF
    m = b & 0x7FFFFF
    if e == 0xFF:  # inf, NaN (payload kept, never turned into inf)
        if m == 0:
            return sign | 0x7C00
        h = 0x7C00 | (m >> 13)
        return sign | (h + 1 if h == 0x7C00 else h)
    if e >= 143:  # |x| >= 65536: inf
        return sign | 0x7C00
    if e <= 112:  # subnormal half, or zero
        if e < 102:
            return sign
        sig = m | 0x800000
        shift = 126 - e
        h = sig >> shift
        rem = sig & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (h & 1)):
            h += 1
        return sign | h
    h = ((e - 112) << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1)):
        h += 1  # a carry into the exponent is right, up to inf
    return sign | h


@njit(inline="always")
def _put16(buf, o, bits):
    buf[o] = np.uint8(bits & 0xFF)
    buf[o + 1] = np.uint8((bits >> 8) & 0xFF)


# Rows stored as ggml does (quantize_row_q8_0_ref / q4_0_ref: float32 arithmetic, no contraction into fma).
@njit(cache=True)
def _encode_f32(x, buf, o):
    for j in range(x.size):
        bits = np.int64(_f32_bits(x[j]))
        _put16(buf, o + 4 * j, bits)
        _put16(buf, o + 4 * j + 2, bits >> 16)


@njit(cache=True)
def _encode_f16(x, buf, o):
    for j in range(x.size):
        _put16(buf, o + 2 * j, _f16_bits(x[j]))


@njit(cache=True)
def _encode_q8_0(x, buf, o):
    for b in range(x.size // QK):
        ob = o + b * B_Q8_0
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b * QK + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        _put16(buf, ob, _f16_bits(d))
        for j in range(QK):
            v = np.float64(x[b * QK + j] * inv)  # roundf: half away from zero
            q = np.int64(np.floor(abs(v) + 0.5))
            buf[ob + 2 + j] = np.uint8((q if v >= 0 else -q) & 0xFF)


@njit(cache=True)
def _encode_q4_0(x, buf, o):
    for b in range(x.size // QK):
        ob = o + b * B_Q4_0
        amax, vmax = np.float32(0.0), np.float32(0.0)
        for j in range(QK):
            v = x[b * QK + j]
            if amax < abs(v):
                amax, vmax = abs(v), v
        d = vmax / np.float32(-8.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        _put16(buf, ob, _f16_bits(d))
        for j in range(QK // 2):
            lo = min(15, np.int64(np.float32(x[b * QK + j] * inv) + np.float32(8.5)))
            hi = min(15, np.int64(np.float32(x[b * QK + j + QK // 2] * inv) + np.float32(8.5)))
            buf[ob + 2 + j] = np.uint8(lo | (hi << 4))


# _encode_row(code, x, buf, o): store x (float32, head_dim) at byte o of buf in the type `code`.
_encode_row = by_code("_encode_row", {KV_F32: _encode_f32, KV_F16: _encode_f16, KV_Q8_0: _encode_q8_0,
                                      KV_Q4_0: _encode_q4_0})


@functools.cache
def _writer(code: int):
    """The kernel `(buf, row_bytes, n_kv, ctx, x, seqs, pos)` for rows of the type `code`: x (n_tok, n_kv,
    head_dim) float32, token t's rows into slot seqs[t] at position pos[t]."""
    @njit(cache=True)
    def kernel(buf, row_bytes, n_kv, ctx, x, seqs, pos):
        for t in range(x.shape[0]):
            for h in range(n_kv):
                _encode_row(code, x[t, h], buf, ((seqs[t] * n_kv + h) * ctx + pos[t]) * row_bytes)
    return per_type(kernel)


# ---------------------------------------------------------------------------------- attention
BLOCK_TOKENS = 16  # consecutive query tokens of one sequence that share each decoded key and value row


@intrinsic
def _score_keys(typingctx, q, qo, kt, n_j, scale, out, oo):
    """out[oo + k] = scale * sum over j < n_j of q[qo + j] * kt[KEYS * j + k], k < KEYS: one query against KEYS
    keys held transposed (kt: n_j x KEYS floats), the sums in vector registers (no horizontal adds);
    four of them in turn (j mod 4), so that no FMA waits for the one before."""
    def codegen(context, builder, sig, args):
        qp, ktp, op = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 5))
        vt = _vec(_F32, KEYS)
        q0, n, o0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3, 6))
        accs = [cgutils.alloca_once_value(builder, _splat(_F32, KEYS, 0.0)) for _ in range(4)]

        def step(j, acc):
            qj = _splat_value(builder, builder.load(builder.gep(qp, [builder.add(q0, j)])), KEYS)
            kj = _load_vec(builder, ktp, builder.mul(j, ir.Constant(_I64, 4 * KEYS)), _F32, KEYS)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(qj, kj, flags=_CONTRACT), flags=_CONTRACT), acc)
        four = builder.mul(builder.udiv(n, ir.Constant(_I64, 4)), ir.Constant(_I64, 4))
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), four, ir.Constant(_I64, 4)) as (j, _):
            for u in range(4):
                step(builder.add(j, ir.Constant(_I64, u)), accs[u])
        with cgutils.for_range_slice(builder, four, n, ir.Constant(_I64, 1)) as (j, _):
            step(j, accs[0])
        a = [builder.load(x) for x in accs]
        total = builder.fadd(builder.fadd(a[0], a[1]), builder.fadd(a[2], a[3]))
        scale = _splat_value(builder, context.cast(builder, args[4], sig.args[4], types.float32), KEYS)
        builder.store(builder.fmul(total, scale),
                      builder.bitcast(builder.gep(op, [o0]), vt.as_pointer()), align=4)
    return types.void(q, qo, kt, n_j, scale, out, oo), codegen


@intrinsic
def _mix_values(typingctx, w, wo, vt, hd, acc, ao):
    """acc[ao + j] += sum over k < KEYS of w[wo + k] * vt[hd * k + j], j < hd (a multiple of 16): KEYS value
    rows (vt: KEYS x hd floats) weighted into one query head's sums, up to four vectors of 16 sums at a
    time in registers (four independent chains of FMAs, not one)."""
    def codegen(context, builder, sig, args):
        wp, vp, ap = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 4))
        vt16 = _vec(_F32, 16)
        w0, n, a0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3, 5))
        ws = [_splat_value(builder, builder.load(builder.gep(wp, [builder.add(w0, ir.Constant(_I64, k))])), 16)
              for k in range(KEYS)]

        def chunks(j, count: int):
            at = [builder.bitcast(builder.gep(ap, [builder.add(a0, builder.add(j, ir.Constant(_I64, 16 * c)))]), vt16.as_pointer())
                  for c in range(count)]
            a = [builder.load(p, align=4) for p in at]
            for k in range(KEYS):
                row = builder.mul(n, ir.Constant(_I64, k))
                for c in range(count):
                    off = builder.mul(builder.add(row, builder.add(j, ir.Constant(_I64, 16 * c))), ir.Constant(_I64, 4))
                    a[c] = builder.fadd(a[c], builder.fmul(ws[k], _load_vec(builder, vp, off, _F32, 16), flags=_CONTRACT),
                                        flags=_CONTRACT)
            for p, v in zip(at, a):
                builder.store(v, p, align=4)
        wide = builder.mul(builder.udiv(n, ir.Constant(_I64, 64)), ir.Constant(_I64, 64))
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), wide, ir.Constant(_I64, 64)) as (j, _):
            chunks(j, 4)
        with cgutils.for_range_slice(builder, wide, builder.mul(builder.udiv(n, ir.Constant(_I64, 16)), ir.Constant(_I64, 16)),
                                     ir.Constant(_I64, 16)) as (j, _):
            chunks(j, 1)
    return types.void(w, wo, vt, hd, acc, ao), codegen


@functools.cache
def _attention(code_k: int, code_v: int):
    """The kernel `(q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, blocks, out, table)` for K rows of the type
    code_k and V rows of code_v (each pair compiled when first used)."""
    @njit(parallel=True, cache=True)
    def kernel(q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, blocks, out, table):
        n_blocks = blocks.size - 1
        n_items = n_blocks * n_kv
        for it in prange(n_items):
            # a prompt's later blocks see more keys: items are taken from both ends in turn, so that each
            # thread's contiguous share of the iterations holds as many cheap ones as dear ones
            bg = it // 2 if it % 2 == 0 else n_items - 1 - it // 2
            t0, t1, g = blocks[bg // n_kv], blocks[bg // n_kv + 1], bg % n_kv
            # the loops of one item are functions of their own (taking the codes at run time, so that the
            # kernel's closure holds plain ints and numba can cache it): its parallel passes over a body
            # this size took seconds
            if t1 - t0 == 1 and VECTOR_HEAD(q.shape[2]):
                _attend_one_tiles(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t0, g)
            elif t1 - t0 == 1:
                _attend_one(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t0, g)
            else:
                _attend_block(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t0, t1, g)
    return per_type(kernel)


@njit(fastmath=True)
def _attend_one(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t, g):
    """Causal GQA attention of token t's query heads of key head g: q (n_tok, n_head, hd) float32; kb, vb
    the bytes of (n_seq, n_kv, ctx, width) caches with rows of rk / rv bytes; token t attends to
    positions 0..pos[t] of slot seqs[t]. Each key and value row is decoded once for the group's heads."""
    n_head, hd = q.shape[1], q.shape[2]
    group = n_head // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    n = pos[t] + 1
    base = (seqs[t] * n_kv + g) * ctx
    row = np.empty(hd, np.float32)
    scores = np.empty((group, n), np.float32)
    for p in range(n):
        _load_row(code_k, kb, (base + p) * rk, hd, row, table)
        for i in range(group):
            s = np.float32(0.0)
            for j in range(hd):
                s += q[t, g * group + i, j] * row[j]
            scores[i, p] = s * scale
    for i in range(group):
        _softmax(scores[i], n)
    acc = np.zeros((group, hd), np.float32)
    for p in range(n):
        _load_row(code_v, vb, (base + p) * rv, hd, row, table)
        for i in range(group):
            w = scores[i, p]
            for j in range(hd):
                acc[i, j] += w * row[j]
    for i in range(group):
        for j in range(hd):
            out[t, g * group + i, j] = acc[i, j]


@njit(fastmath=True)
def _attend_one_tiles(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t, g):
    """_attend_one in vectors (kvrows.VECTOR_HEAD): KEYS rows at a time decoded into a
    tile (kvrows.decode_tile) that each head of the group scores at once (kvrows.score_rows) and, for the
    values, weighs into its sums (_mix_values); the last tile's missing rows are zeros of weight 0."""
    n_head, hd = q.shape[1], q.shape[2]
    group = n_head // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    n = pos[t] + 1
    n_pad = (n + KEYS - 1) // KEYS * KEYS
    base = (seqs[t] * n_kv + g) * ctx
    tile = np.empty(KEYS * hd, np.float32)
    qf = q.reshape(-1)
    scores = np.empty((group, n_pad), np.float32)
    sf = scores.reshape(-1)
    for p0 in range(0, n, KEYS):
        decode_tile(code_k, kb, (base + p0) * rk, rk, min(KEYS, n - p0), hd, tile)
        for i in range(group):  # the zero rows past n score 0: weight 0 below, left out of the softmax
            score_rows(qf, (t * n_head + g * group + i) * hd, tile, hd, scale, sf, i * n_pad + p0)
    for i in range(group):
        _softmax(scores[i], n)
    acc = np.zeros(group * hd, np.float32)
    for p0 in range(0, n, KEYS):
        decode_tile(code_v, vb, (base + p0) * rv, rv, min(KEYS, n - p0), hd, tile)
        for i in range(group):
            _mix_values(sf, i * n_pad + p0, tile, hd, acc, i * hd)
    for i in range(group):
        for j in range(hd):
            out[t, g * group + i, j] = acc[i * hd + j]


@njit(inline="always")
def _softmax(s, n):
    """s[:n] -> softmax(s[:n]) in place."""
    m = np.float32(-np.inf)
    for p in range(n):
        m = max(m, s[p])
    total = np.float32(0.0)
    for p in range(n):
        e = exp_f32(s[p] - m)
        s[p] = e
        total += e
    inv = np.float32(1.0) / total
    for p in range(n):
        s[p] *= inv


@njit(fastmath=True)
def _attend_block(code_k, code_v, q, kb, vb, rk, rv, n_kv, ctx, seqs, pos, out, table, t0, t1, g):
    """_attend_one for tokens t0 .. t1 - 1 at once: one sequence's consecutive positions (a prompt's).
    Each key row is decoded once for the block, into a transposed tile of KEYS keys that every query
    head of every token scores in one vector (_score_keys); each value row once as well."""
    n_head, hd = q.shape[1], q.shape[2]
    group = n_head // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    nt = t1 - t0
    n = pos[t1 - 1] + 1  # the last token sees the most keys
    n_pad = (n + KEYS - 1) // KEYS * KEYS  # scores past each token's own position are set to 0 after its softmax
    base = (seqs[t0] * n_kv + g) * ctx
    vec = VECTOR_HEAD(hd)  # kvrows' tile decoders
    row = np.empty(hd, np.float32)
    rows = np.empty(KEYS * hd, np.float32)
    kt = np.zeros(hd * KEYS, np.float32)
    qf = q.reshape(-1)
    scores = np.zeros((nt, group, n_pad), np.float32)
    sf = scores.reshape(-1)
    for p0 in range(0, n, KEYS):
        m = min(KEYS, n - p0)
        if vec:
            decode_tile(code_k, kb, (base + p0) * rk, rk, m, hd, rows)
            for k in range(KEYS):
                for j in range(hd):
                    kt[KEYS * j + k] = rows[k * hd + j]
        else:
            for k in range(m):
                _load_row(code_k, kb, (base + p0 + k) * rk, hd, row, table)
                for j in range(hd):
                    kt[KEYS * j + k] = row[j]
        for tt in range(nt):
            if p0 <= pos[t0 + tt]:
                for i in range(group):
                    _score_keys(qf, ((t0 + tt) * n_head + g * group + i) * hd, kt, hd, scale, sf, (tt * group + i) * n_pad + p0)
    for tt in range(nt):
        for i in range(group):
            _softmax(scores[tt, i], pos[t0 + tt] + 1)
            scores[tt, i, pos[t0 + tt] + 1:] = 0  # the keys after a token's own: weight 0 in a tile of values
    acc = np.zeros((nt, group, hd), np.float32)
    af = acc.reshape(-1)
    vt = np.zeros(KEYS * hd, np.float32)
    for p0 in range(0, n, KEYS):
        m = min(KEYS, n - p0)
        if vec:
            decode_tile(code_v, vb, (base + p0) * rv, rv, m, hd, vt)
        else:
            for k in range(m):
                _load_row(code_v, vb, (base + p0 + k) * rv, hd, vt[k * hd:(k + 1) * hd], table)
            vt[m * hd:] = 0
        for tt in range(nt):
            if p0 <= pos[t0 + tt]:
                for i in range(group):
                    if hd % 16 == 0:  # rows past m: zeros, under weights of 0
                        _mix_values(sf, (tt * group + i) * n_pad + p0, vt, hd, af, (tt * group + i) * hd)
                    else:
                        for k in range(m):
                            w = scores[tt, i, p0 + k]
                            for j in range(hd):
                                acc[tt, i, j] += w * vt[k * hd + j]
    for tt in range(nt):
        for i in range(group):
            for j in range(hd):
                out[t0 + tt, g * group + i, j] = acc[tt, i, j]


def _blocks(seqs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Start indices of the attention's token blocks, and the end: runs of one sequence at consecutive
    positions, cut every BLOCK_TOKENS tokens (a decode step's tokens are blocks of one)."""
    n = len(seqs)
    if n == 1:
        return np.array([0, 1], np.int64)
    brk = np.flatnonzero((seqs[1:] != seqs[:-1]) | (pos[1:] != pos[:-1] + 1)) + 1
    starts = []
    for a, b in zip(np.concatenate(([0], brk)), np.concatenate((brk, [n]))):
        starts.extend(range(int(a), int(b), BLOCK_TOKENS))
    return np.array(starts + [n], np.int64)


# ------------------------------------------------------------------------------------ public API
def _bytes(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:  # reshape would copy, and a write would go to the copy
        raise ValueError(f"KV cache array of shape {a.shape} is not C-contiguous")
    return a.reshape(-1).view(np.uint8)


def _check(code: int) -> int:
    if code not in (KV_F32, KV_F16, KV_Q8_0, KV_Q4_0):
        raise ValueError(f"no CPU KV kernel for type code {code}")
    return code


def kv_write(slots: np.ndarray, code: int, x: np.ndarray, seqs: np.ndarray, pos: np.ndarray) -> None:
    """slots (n_seq, n_kv, ctx, width) stored as type `code`; x (n_tok, n_kv, head_dim): token t's rows
    encoded into slot seqs[t] at position pos[t]."""
    n_kv, ctx = slots.shape[1], slots.shape[2]
    row_bytes = slots.shape[3] * slots.itemsize
    _writer(_check(code))(_bytes(slots), row_bytes, n_kv, ctx, np.ascontiguousarray(x, np.float32), seqs, pos)


def attention_seqs(q: np.ndarray, k: np.ndarray, v: np.ndarray, code_k: int, code_v: int, seqs: np.ndarray,
                   pos: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Tokens of several sequences: k, v (n_seq, n_kv, ctx, width) stored as code_k / code_v; token t at
    pos[t] of slot seqs[t]; q, out (n_tok, n_head, head_dim)."""
    rk, rv = k.shape[3] * k.itemsize, v.shape[3] * v.itemsize
    _attention(_check(code_k), _check(code_v))(q, _bytes(k), _bytes(v), rk, rv, k.shape[1], k.shape[2], seqs, pos,
                                               _blocks(seqs, pos), out, F16_TABLE)
    return out
