"""KV cache rows for the attention tests of the GPU kernels and their CPU emulation."""
import numpy as np

from pyggml.model.kvtypes import KV_TYPES


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
