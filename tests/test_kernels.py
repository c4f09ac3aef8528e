"""Every numba kernel against its numpy reference: all weight types, GQA, odd shapes, 1 token and a batch."""
import numpy as np
import pytest

from conftest import random_q6_k
from pyggml.gguf import GGMLType
from pyggml.gguf.constants import TYPE_TRAITS
from pyggml.kernels import cpu, reference as ref
from pyggml.quant import codecs
from pyggml.tensor import QWeight

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0]
# (rows, cols): one row, one block, odd row counts, several blocks
SHAPES = [(1, 32), (7, 32), (33, 64), (130, 256), (5, 96)]


def _weight(rng, rows, cols, t, kind="normal"):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "zero-block":
        w[:, :32] = 0
    elif kind == "extreme":
        w[0, :32] *= 1e4
        w[-1, -32:] *= 1e-6
    raw = codecs.quantize(w, t, approximate=True)  # K and IQ4 types: pyggml's own encoder (valid blocks)
    return QWeight("w", raw, t, (rows, cols))


def _tol(x, rows_cols):
    return 1e-5 * (np.abs(x).max() + 1) * np.sqrt(rows_cols[1])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "zero-block", "extreme"])
def test_matvec_and_matmul_equal_reference(t, shape, kind):
    """Float-activation types equal the float reference; int8-activation types (Q4_0/Q5_0/Q8_0) equal
    the exact int8-activation reference up to float rounding, and differ from the float reference by
    no more than the rounding of x to int8 blocks allows (stated bound, checked per output)."""
    rng = np.random.default_rng(hash((t, shape, kind)) % 2**32)
    w = _weight(rng, *shape, t, kind)
    for n_tok in (1, 2, 9):
        X = rng.standard_normal((n_tok, shape[1])).astype(np.float32)
        if kind == "extreme":
            X[:, :32] *= 1e3
        got = cpu.matmul(w, X, np.empty((n_tok, shape[0]), np.float32))
        if n_tok == 1:
            assert np.array_equal(cpu.matvec(w, X[0], np.empty(shape[0], np.float32)), got[0])
        want = ref.matmul(w.raw, t, X)
        if t in cpu.INT8_ACTIVATION_TYPES:
            exact = ref.matmul_int8_activations(w.raw, t, X)
            np.testing.assert_allclose(got, exact, rtol=1e-4, atol=_tol(exact, shape))
            bound = ref.int8_activation_error_bound(w.raw, t, X)
            assert np.all(np.abs(got - want) <= bound * 1.001 + _tol(want, shape))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=_tol(want, shape))


@pytest.mark.parametrize("t", sorted(cpu.INT8_ACTIVATION_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_int8_products_over_groups_tiles_and_panels(t):
    """The int8 kernels' structure at its edges: two packed groups of 8 rows plus 3 rows in the stored
    layout; in those rows 8-block steps and 3 more; a full token tile plus one token; a batch long
    enough that the columns are split into panels. Each equals the exact int8-activation reference up
    to float rounding, and, without panels, a prompt's rows equal the products of its tokens one at a
    time bit for bit (the same operations in the same order)."""
    rng = np.random.default_rng(11)
    rows, cols = 2 * cpu.PACK_ROWS + 3, 32 * 19 * (8 if TYPE_TRAITS[t].block_size > 32 else 1)  # 19 blocks (K: 19 x 8)
    w = _weight(rng, rows, cols, t)
    n_panel = cpu.PANEL_BYTES // (32 * 8)  # tokens for which a panel is 8 blocks: 19 = 8 + 8 + 3
    for n_tok in (1, cpu.PACKED_TOKENS[t] + 1, n_panel + 1):
        X = rng.standard_normal((n_tok, cols)).astype(np.float32)
        got = cpu.matmul(w, X, np.empty((n_tok, rows), np.float32))
        exact = ref.matmul_int8_activations(w.raw, t, X)
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=_tol(exact, (rows, cols)))
        if n_tok <= cpu.PACKED_TOKENS[t] + 1:
            for j in range(n_tok):
                assert np.array_equal(got[j], cpu.matvec(w, X[j], np.empty(rows, np.float32)))


@pytest.mark.parametrize("t", sorted(cpu.INT8_ACTIVATION_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_cpu_backend_packs_int8_weights_once(t):
    """The CPU backend keeps a packed copy of an int8-type weight (its stored bytes stay the mmap view)
    and its products equal those of the unpacked weight, which matmul packs on the fly."""
    from pyggml.backends import CPUBackend

    rng = np.random.default_rng(12)
    w = _weight(rng, 3 * cpu.PACK_ROWS + 5, TYPE_TRAITS[t].block_size * 9, t)
    loaded = CPUBackend().load_weight(w)
    assert loaded.raw is w.raw and loaded.packed.shape[0] == 3
    X = rng.standard_normal((7, w.cols)).astype(np.float32)
    assert np.array_equal(CPUBackend().matmul(loaded, X), cpu.matmul(w, X, np.empty((7, w.rows), np.float32)))


@pytest.mark.parametrize("n_tok", [1, 6])
def test_matmuls_equal_separate_products(n_tok):
    """Several weights of one input (q, k, v; gate, up), mixed int8 and float types: one shared
    quantization of the input gives the same bits as a product at a time."""
    rng = np.random.default_rng(3)
    weights = [_weight(rng, rows, 64, t) for rows, t in ((40, GGMLType.Q4_0), (9, GGMLType.F16), (9, GGMLType.Q8_0))]
    X = rng.standard_normal((n_tok, 64)).astype(np.float32)
    got = cpu.matmuls(weights, X, [np.empty((n_tok, w.rows), np.float32) for w in weights])
    for w, g in zip(weights, got):
        assert np.array_equal(g, cpu.matmul(w, X, np.empty((n_tok, w.rows), np.float32)))


@pytest.mark.parametrize("t", TYPES + [GGMLType.Q6_K], ids=lambda t: t.name)
def test_dequantize_rows_is_exact(t):
    rng = np.random.default_rng(5)
    cols = 256 * 2
    if t is GGMLType.Q6_K:  # no encoder: random blocks with finite fp16 scales
        raw = random_q6_k(rng, 9, cols, 0.01, 0.01)
    else:
        raw = codecs.quantize(rng.standard_normal((9, cols)).astype(np.float32), t)
    w = QWeight("w", raw, t, (9, cols))
    rows = np.array([8, 0, 3, 3])
    got = cpu.dequantize_rows(w, rows, np.empty((4, cols), np.float32))
    assert np.array_equal(got, ref.dequantize_weight(raw, t)[rows])
    x = rng.standard_normal(cols).astype(np.float32)
    exact = ref.matmul_int8_activations(raw, t, x) if t in cpu.INT8_ACTIVATION_TYPES else ref.matmul(raw, t, x)
    np.testing.assert_allclose(cpu.matvec(w, x, np.empty(9, np.float32)), exact, rtol=1e-4, atol=_tol(exact, (9, cols)))
    with pytest.raises(IndexError):
        cpu.dequantize_rows(w, np.array([9]), np.empty((1, cols), np.float32))


def test_rmsnorm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 67)).astype(np.float32) * 5
    w = rng.standard_normal(67).astype(np.float32)
    np.testing.assert_allclose(cpu.rmsnorm(x, w, 1e-5, np.empty_like(x)), ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope_dim,head_dim", [(8, 8), (64, 64), (32, 64)])
def test_rope_adjacent_pairs(rope_dim, head_dim):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, head_dim)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4095])
    inv_freq = 10000.0 ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    want = ref.rope(x, pos, rope_dim, 10000.0)
    got = cpu.rope(x.copy(), pos, inv_freq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[..., rope_dim:], x[..., rope_dim:])


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("n_tok,start", [(1, 0), (1, 9), (5, 0), (4, 7)])
def test_attention_gqa_causal(n_head, n_kv, n_tok, start):
    rng = np.random.default_rng(3)
    hd, ctx = 16, 32
    q = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n_kv, ctx, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, ctx, hd)).astype(np.float32)
    k[:, start + n_tok :] = 1e6  # positions past the last token must not be read
    n = q.shape[0]
    got = cpu.attention_seqs(q, k[None], v[None], 0, 0, np.zeros(n, np.int64), np.arange(start, start + n), np.empty_like(q))
    np.testing.assert_allclose(got, ref.attention(q, k, v, start), rtol=1e-4, atol=1e-5)


def test_silu_mul():
    rng = np.random.default_rng(4)
    g, u = (rng.standard_normal((3, 50)).astype(np.float32) * 4 for _ in range(2))
    np.testing.assert_allclose(cpu.silu_mul(g, u, np.empty_like(g)), ref.silu_mul(g, u), rtol=1e-5, atol=1e-6)
