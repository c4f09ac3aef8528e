"""The register-tiled F16 / BF16 prompt products (kernels/f16tile.py) against float64 products of the
same stored values: odd row counts (rows past the last tile group), token counts that are no multiple
of a tile, columns past the last full vector, several column panels."""
import numpy as np
import pytest

from pyggml.gguf.constants import GGMLType
from pyggml.kernels import cpu, f16tile
from pyggml.tensor import QWeight


def _weights(t, rows, cols, rng):
    W = rng.standard_normal((rows, cols)).astype(np.float16)
    if t is GGMLType.F16:
        return W, W.astype(np.float64)
    bits = (W.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols, n_tok", [(4 * 3 + 3, 2 * f16tile.LANES + 5, 2), (37, 96, f16tile.TOKENS * 2 + 1),
                                               (64, 200, 700), (8, 64, f16tile.TOKENS)])
def test_tiled_product_matches_float64(t, rows, cols, n_tok):
    if t is GGMLType.F16 and f16tile.matmul_f16_tiled is None:
        pytest.skip("no half-precision vector conversion on this CPU")
    rng = np.random.default_rng(rows * cols + n_tok)
    raw, exact_w = _weights(t, rows, cols, rng)
    X = rng.standard_normal((n_tok, cols)).astype(np.float32)
    out = np.full((n_tok, rows), np.nan, np.float32)
    cpu.matmul(QWeight("w", raw, t, (rows, cols)), X, out)
    want = X.astype(np.float64) @ exact_w.T
    # float32 sums of `cols` products, in any order: each partial sum rounds by at most eps of its size
    bound = cols * np.finfo(np.float32).eps * (np.abs(X).astype(np.float64) @ np.abs(exact_w).T)
    assert np.all(np.abs(out - want) <= bound), np.abs(out - want).max()


def test_a_long_prompt_sweeps_several_column_panels():
    """700 tokens x 200 columns: panels of PANEL_BYTES / (4 x 700) columns, so the case above adds up
    several panels' sums in out."""
    panel = max(f16tile.LANES, f16tile.PANEL_BYTES // (4 * 700) // f16tile.LANES * f16tile.LANES)
    assert panel < 200
