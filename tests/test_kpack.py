"""kpack.py's packed int8-activation products (Q4_1, Q5_1, Q2_K-Q6_K, IQ4_NL, IQ4_XS) against
the exact int8-activation reference over the `gguf` package's dequantization of random blocks: every
code and sub-scale bit pattern, sane fp16 scales, groups of 8 rows plus a remainder, one token, a
token tile plus one, and a batch split into column panels."""
import numpy as np
import pytest

from pyggml.gguf.constants import TYPE_TRAITS, GGMLType
from pyggml.kernels import cpu, kpack, reference as ref
from pyggml.tensor import QWeight

gguf_quants = pytest.importorskip("gguf.quants")

# Byte offsets of each block's fp16 scale fields (the rest of a block is any bit pattern).
F16_FIELDS = {GGMLType.Q4_1: (0, 2), GGMLType.Q5_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
              GGMLType.Q6_K: (208,), GGMLType.Q3_K: (108,), GGMLType.Q2_K: (80, 82), GGMLType.IQ4_NL: (0,),
              GGMLType.IQ4_XS: (0,)}
TYPES = sorted(kpack.K_LAYOUTS, key=lambda t: t.value)


def random_rows(rng, t: GGMLType, rows: int, cols: int, zero_first: bool = False, fields=F16_FIELDS) -> np.ndarray:
    """Blocks of random bits with sane fp16 scales at fields[t]; zero_first: every row's first block all zero."""
    tr = TYPE_TRAITS[t]
    raw = rng.integers(0, 256, (rows, cols // tr.block_size * tr.type_size), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, tr.type_size)
    for at in fields[t]:
        v = (rng.uniform(1e-3, 1e-2, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])).astype(np.float16)
        blocks[:, :, at:at + 2] = v[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
    if zero_first:
        blocks[:, 0] = 0
    return raw


def test_every_packed_type_has_a_layout_and_a_tile():
    assert set(TYPES) <= cpu.INT8_ACTIVATION_TYPES and set(TYPES) == set(F16_FIELDS)
    assert all(t in cpu.PACKED_TOKENS for t in TYPES)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_packed_products_equal_exact_int8_reference(t):
    rng = np.random.default_rng(int(t))
    per = kpack.K_LAYOUTS[t].per_sb * 32
    rows, cols = 2 * cpu.PACK_ROWS + 3, per * (19 if per == 32 else 3)
    raw = random_rows(rng, t, rows, cols, zero_first=True)
    w = QWeight("w", raw, t, (rows, cols))
    W = gguf_quants.dequantize(raw, t.value).astype(np.float64)
    n_panel = cpu.PANEL_BYTES // (32 * 8)  # tokens for which a panel is 8 blocks
    for n_tok in (1, cpu.PACKED_TOKENS[t] + 1, n_panel + 1):
        X = rng.standard_normal((n_tok, cols)).astype(np.float32)
        got = cpu.matmul(w, X, np.empty((n_tok, rows), np.float32))
        exact = ref.quantize_activations(X) @ W.T
        tol = 1e-6 * (np.abs(ref.quantize_activations(X)) @ np.abs(W).T)  # float32 rounding of the sums
        assert np.all(np.abs(got - exact) <= tol + 1e-30), (n_tok, np.abs(got - exact).max())
        if n_tok <= cpu.PACKED_TOKENS[t] + 1:
            for j in range(n_tok):
                assert np.array_equal(got[j], cpu.matvec(w, X[j], np.empty(rows, np.float32)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_cpu_backend_packs_once(t):
    from pyggml.backends import CPUBackend

    rng = np.random.default_rng(7)
    cols = kpack.K_LAYOUTS[t].per_sb * 32 * 2
    raw = random_rows(rng, t, 3 * cpu.PACK_ROWS, cols)
    w = QWeight("w", raw, t, (3 * cpu.PACK_ROWS, cols))
    loaded = CPUBackend().load_weight(w)
    assert loaded.raw is w.raw and loaded.packed.shape == (3, kpack.K_LAYOUTS[t].group_bytes(cols))
    X = rng.standard_normal((5, cols)).astype(np.float32)
    assert np.array_equal(CPUBackend().matmul(loaded, X), cpu.matmul(w, X, np.empty((5, w.rows), np.float32)))
