"""The numba row decoders against the `gguf` package's dequantize, bit for bit, for every computable type."""
import numpy as np
import pytest
from numba import njit

from pyggml.gguf import GGMLType
from pyggml.gguf.constants import QK_K, TYPE_TRAITS
from pyggml.kernels import decoders
from pyggml.quant.registry import COMPUTABLE_TYPES, KERNEL_TYPE_CODES

gquants = pytest.importorskip("gguf.quants")
gguf = pytest.importorskip("gguf")

# Byte offsets of each block's fp16 scale fields (ggml's block_* structs); random bytes there could be
# inf / NaN, so the tests write finite halves instead. Float types have no such field.
F16_FIELDS = {
    GGMLType.F32: (), GGMLType.F16: (), GGMLType.BF16: (),
    GGMLType.Q4_0: (0,),  # d, qs[16]
    GGMLType.Q4_1: (0, 2),  # d, m, qs[16]
    GGMLType.Q5_0: (0,),  # d, qh[4], qs[16]
    GGMLType.Q5_1: (0, 2),  # d, m, qh[4], qs[16]
    GGMLType.Q8_0: (0,),  # d, qs[32]
    GGMLType.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    GGMLType.Q3_K: (108,),  # hmask[32], qs[64], scales[12], d
    GGMLType.Q4_K: (0, 2),  # d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: (0, 2),  # d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: (208,),  # ql[128], qh[64], scales[16], d
    GGMLType.IQ4_NL: (0,),  # d, qs[16]
    GGMLType.IQ4_XS: (0,),  # d, scales_h (u16), scales_l[4], qs[128]
}
COLS = 3 * QK_K  # several blocks (and super-blocks) per row


def _random_rows(rng, t, rows, cols, scale="any"):
    """Random valid rows of type t: random bytes, with every fp16 scale field a finite half - any finite
    bit pattern (subnormal .. 65504) or, with scale="normal", uniform in [-2, 2]."""
    tr = TYPE_TRAITS[t]
    nb = cols // tr.block_size
    raw = rng.integers(0, 256, (rows, nb, tr.type_size), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        if scale == "normal":
            h = rng.uniform(-2, 2, (rows, nb)).astype(np.float16).view(np.uint16)
        else:
            h = rng.integers(0, 1 << 16, (rows, nb), dtype=np.uint16)
            h = np.where((h & 0x7C00) == 0x7C00, h & ~np.uint16(0x4000), h).astype(np.uint16)  # no inf / NaN
        raw[:, :, off:off + 2] = h[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def _oracle(t, raw):
    return gquants.dequantize(raw, gguf.GGMLQuantizationType(int(t))).reshape(raw.shape[0], -1)


def _assert_bits_equal(got, want):
    """Equal bit for bit, except that any NaN equals any NaN (inf - inf may pick either sign)."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    both_nan = np.isnan(got) & np.isnan(want)
    diff = (got.view(np.uint32) != want.view(np.uint32)) & ~both_nan
    if diff.any():
        i = np.argwhere(diff)[0]
        pytest.fail(f"{diff.sum()} values differ; first at {tuple(i)}: {got[tuple(i)]!r} != {want[tuple(i)]!r}")


@pytest.mark.parametrize("t", COMPUTABLE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", ["normal", "any"])
def test_random_rows_equal_gguf(t, scale):
    """Gathered rows (out of order, one repeated) of several blocks each equal gguf's dequantize."""
    rng = np.random.default_rng([int(t), scale == "any"])
    raw = _random_rows(rng, t, 6, COLS, scale)
    rows = np.array([4, 0, 5, 2, 2], np.int64)
    got = decoders.dequantize_rows(t, raw, rows)
    assert got.shape == (rows.size, COLS)
    _assert_bits_equal(got, _oracle(t, raw[rows]))


@pytest.mark.parametrize("t", COMPUTABLE_TYPES, ids=lambda t: t.name)
def test_one_block_row(t):
    rng = np.random.default_rng(100 + int(t))
    raw = _random_rows(rng, t, 3, TYPE_TRAITS[t].block_size, "normal")
    _assert_bits_equal(decoders.dequantize_rows(t, raw), _oracle(t, raw))


@pytest.mark.parametrize("t", COMPUTABLE_TYPES, ids=lambda t: t.name)
def test_zero_rows(t):
    raw = np.zeros((2, COLS // TYPE_TRAITS[t].block_size * TYPE_TRAITS[t].type_size), np.uint8)
    got = decoders.dequantize_rows(t, raw)
    _assert_bits_equal(got, _oracle(t, raw))
    assert not np.any(got)


def test_every_computable_type_is_decoded():
    """Each registry type has a decoder branch (decoding a row raises nothing and differs by type) and a
    test layout; the codes are those of the registry."""
    assert set(F16_FIELDS) == set(COMPUTABLE_TYPES)
    rng = np.random.default_rng(7)
    for t in COMPUTABLE_TYPES:
        assert getattr(decoders, f"_C_{t.name}") == KERNEL_TYPE_CODES[t]
        raw = _random_rows(rng, t, 1, COLS, "normal")
        out = np.full((1, COLS), np.nan, np.float32)
        decoders.decode_rows(KERNEL_TYPE_CODES[t], raw, np.zeros(1, np.int64), out, decoders.F16_TABLE)
        _assert_bits_equal(out, _oracle(t, raw))


@pytest.mark.parametrize("code", [-1, len(COMPUTABLE_TYPES), 1000])
def test_unknown_code_raises(code):
    raw = np.zeros((1, 4 * COLS), np.uint8)
    out = np.zeros((1, COLS), np.float32)
    with pytest.raises(ValueError, match="unknown weight type code"):
        decoders.decode_rows(code, raw, np.zeros(1, np.int64), out, decoders.F16_TABLE)


def test_dequantize_rows_checks_its_arguments():
    raw = np.zeros((2, TYPE_TRAITS[GGMLType.Q4_K].type_size), np.uint8)
    with pytest.raises(ValueError, match="Q8_K is not computable"):
        decoders.dequantize_rows(GGMLType.Q8_K, raw)
    with pytest.raises(ValueError, match="whole number"):
        decoders.dequantize_rows(GGMLType.Q4_K, raw[:, :-1])
    with pytest.raises(IndexError):
        decoders.dequantize_rows(GGMLType.Q4_K, raw, [2])



@njit(cache=True)
def _one_row(code, row, out, table, checked):
    """decode_row (checked) or try_decode_row, as another kernel would call them."""
    if checked:
        decoders.decode_row(code, row, out, table)
        return True
    return decoders.try_decode_row(code, row, out, table)


def test_decode_row_raises_and_try_decode_row_reports_an_unknown_code():
    """The single-row dispatch used inside other kernels: never falls through to another type's decoder."""
    row = np.zeros(COLS * 4, np.uint8)
    out = np.full(COLS, 1.0, np.float32)
    with pytest.raises(ValueError, match="unknown weight type code"):
        _one_row(len(COMPUTABLE_TYPES), row, out, decoders.F16_TABLE, True)
    assert not _one_row(-1, row, out, decoders.F16_TABLE, False) and np.all(out == 1.0)
    assert _one_row(KERNEL_TYPE_CODES[GGMLType.Q4_K], row, out, decoders.F16_TABLE, False) and not np.any(out)
