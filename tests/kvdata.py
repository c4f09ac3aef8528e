"""KV cache rows, and the error measure, for the tests of the GPU kernels and of their CPU emulation."""
import numpy as np

from pyggml.model.kvtypes import KV_TYPES


def rel_err(got, want) -> float:
    """The largest error against the largest output."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def kv_rows(rng, shape) -> np.ndarray:
    """float32 rows (..., head_dim) with what breaks an encoder: a zero block, a block whose largest
    |x| appears with both signs (q4_0 takes the first), tiny and large scales, exact halves."""
    x = rng.standard_normal(shape, dtype=np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :32 if shape[-1] >= 32 else None] = 0
    if flat.shape[0] > 3 and shape[-1] >= 32:
        flat[1, :32] = rng.standard_normal(32, dtype=np.float32)
        flat[1, 5], flat[1, 9] = -3.0, 3.0  # a tie in |x|: the first (negative) one sets d
        flat[2] *= np.float32(1e-6)
        flat[3] *= np.float32(300)
        flat[1, 32:] = np.arange(shape[-1] - 32, dtype=np.float32) * 0.5 - 7.5  # halves: ties of every rounding
    return x


def stored(rng, t, shape) -> tuple[np.ndarray, np.ndarray]:
    """(rows as stored, their decoded floats) for rows of `shape` (..., head_dim)."""
    rows = KV_TYPES[t].encode(kv_rows(rng, shape))
    return rows, KV_TYPES[t].decode(rows)


def decode_step_cache(rng, tk: str, tv: str, n_kv: int, n_ctx: int, hd: int, n: int):
    """The cache a decode step at position n-1 reads, and this token's rows: (k, kf, v, vf, new), k and v
    as stored with kf and vf their decoded floats, new (2, n_kv, hd) the token's key and value rows as
    the QKV product leaves them. Row n-1 is stored for f32/f16 (the product stores those) and zero for
    q8_0/q4_0 (the attention kernel must encode and store it); kf / vf hold it decoded either way."""
    k, kf = stored(rng, tk, (n_kv, n_ctx, hd))
    v, vf = stored(rng, tv, (n_kv, n_ctx, hd))
    new = kv_rows(rng, (2, n_kv, hd))
    for rows, full, t, x in ((k, kf, KV_TYPES[tk], new[0]), (v, vf, KV_TYPES[tv], new[1])):
        enc = t.encode(x)
        rows[:, n - 1] = enc if not t.quantized else 0
        full[:, n - 1] = t.decode(enc)
    return k, kf, v, vf, new
