"""Q4_1, Q5_1, the k-quants and IQ4_NL / IQ4_XS against the `gguf` package (gguf-py) as the oracle.

Decoding must be bit-identical to gguf's for any stored bytes (pyggml reads llama.cpp's files).
Q4_1 / Q5_1 encoding must be ggml's bytes; the k-quant and IQ4 encoders are pyggml's own, so
they are held to what they promise instead: valid blocks that gguf decodes to the same floats,
and a round-trip error within the bound each type's rule gives (stated per type below).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from pyggml.gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from pyggml.quant import codecs
from pyggml.quant.codecs import ENCODABLE_TYPES, QUANTIZABLE_TYPES, QuantError, can_quantize, dequantize, quantize
from pyggml.quant.kquants import IQ4NL_VALUES
from pyggml.synthetic import random_block_rows

gguf = pytest.importorskip("gguf")

T = GGMLType
EXACT = [T.Q4_1, T.Q5_1]
APPROX = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
DECODE = EXACT + APPROX

# Byte offsets of each type's fp16 scale fields (d, and dmin/m where it has one), from ggml's block
# structs - written out here, not taken from the codecs.
F16_FIELDS = {
    T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
    T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}

rng = np.random.default_rng(20240612)


# ---------------------------------------------------------------------------------------------
# oracle helpers


def _gtype(qtype: GGMLType):
    return gguf.GGMLQuantizationType[qtype.name]


def oracle_quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # gguf overflows 1/d on subnormal scales
        return np.ascontiguousarray(gguf.quants.quantize(np.asarray(x, np.float32), _gtype(qtype))).view(np.uint8)


def oracle_dequantize(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """gguf's floats for stored rows (rows, row_bytes) -> (rows, n)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf scale times code 0
        out = gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), _gtype(qtype))
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], -1)


def assert_same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Bitwise equality of float32 arrays, except that any NaN equals any NaN."""
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    assert np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def with_scales(qtype: GGMLType, raw: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """raw blocks (n, type_size) with every fp16 scale field set from halves (n, n_fields) float16."""
    raw = raw.copy()
    for i, at in enumerate(F16_FIELDS[qtype]):
        raw[:, at : at + 2] = np.ascontiguousarray(halves[:, i : i + 1]).view(np.uint8)
    return raw


def random_blocks(qtype: GGMLType, n: int) -> np.ndarray:
    """Random bytes (any codes and sub-scales) with finite fp16 scales of moderate magnitude, either sign."""
    raw = rng.integers(0, 256, (n, TYPE_TRAITS[qtype].type_size), dtype=np.uint8)
    k = len(F16_FIELDS[qtype])
    halves = rng.standard_normal((n, k)) * np.exp(rng.uniform(-8, 3, (n, k)))
    return with_scales(qtype, raw, halves.astype(np.float16))


# ---------------------------------------------------------------------------------------------
# decode: bit-identical to gguf


def _check_decode(qtype: GGMLType, blocks: np.ndarray, per_row: int = 2) -> None:
    rows = blocks.reshape(-1, per_row * blocks.shape[-1])  # (rows, row_bytes)
    ours = dequantize(rows, qtype)
    assert ours.shape == (rows.shape[0], per_row * TYPE_TRAITS[qtype].block_size)
    assert_same_floats(ours, oracle_dequantize(rows, qtype))


@pytest.mark.parametrize("qtype", DECODE, ids=lambda t: t.name)
def test_decode_random_blocks(qtype: GGMLType) -> None:
    _check_decode(qtype, random_blocks(qtype, 64))


@pytest.mark.parametrize("qtype", DECODE, ids=lambda t: t.name)
def test_decode_zero_blocks(qtype: GGMLType) -> None:
    zeros = np.zeros((4, TYPE_TRAITS[qtype].type_size), np.uint8)
    _check_decode(qtype, zeros)
    # a zero block is +-0 for the min types (d*q - dmin*m) and the symmetric ones (d*s*q, negative codes)
    assert not np.any(dequantize(zeros, qtype, shape=(4, TYPE_TRAITS[qtype].block_size)))


EXTREME_HALVES = np.array([65504.0, -65504.0, 6e-8, -6e-8, 2**-14, 0.0, -0.0, -1.5, 1e-5, -3e-3], np.float16)


@pytest.mark.parametrize("qtype", DECODE, ids=lambda t: t.name)
def test_decode_extreme_scales(qtype: GGMLType) -> None:
    k = len(F16_FIELDS[qtype])
    n = 4 * EXTREME_HALVES.size
    raw = rng.integers(0, 256, (n, TYPE_TRAITS[qtype].type_size), dtype=np.uint8)
    columns = [np.tile(EXTREME_HALVES, 4)] + [rng.permutation(np.tile(EXTREME_HALVES, 4)) for _ in range(k - 1)]
    halves = np.stack(columns, 1)
    _check_decode(qtype, with_scales(qtype, raw, halves))
    # the sub-scales and codes at their extremes too: all-zero and all-one bits
    for fill in (0x00, 0xFF):
        _check_decode(qtype, with_scales(qtype, np.full_like(raw, fill), halves))


@pytest.mark.parametrize("qtype", DECODE, ids=lambda t: t.name)
def test_decode_non_finite_scales(qtype: GGMLType) -> None:
    k = len(F16_FIELDS[qtype])
    halves = np.array([np.inf, -np.inf, np.nan, 1.0], np.float16)
    halves = np.stack([np.repeat(halves, 4)] + [np.tile(halves, 4) for _ in range(k - 1)], 1)
    raw = rng.integers(0, 256, (halves.shape[0], TYPE_TRAITS[qtype].type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore"):
        _check_decode(qtype, with_scales(qtype, raw, halves))


@pytest.mark.parametrize("qtype", DECODE, ids=lambda t: t.name)
def test_decode_across_chunks_and_flat_buffers(monkeypatch: pytest.MonkeyPatch, qtype: GGMLType) -> None:
    raw = random_blocks(qtype, 21).reshape(7, -1)  # 7 rows of 3 blocks
    whole = dequantize(raw, qtype)
    monkeypatch.setattr(codecs, "_CHUNK_ELEMENTS", 2 * TYPE_TRAITS[qtype].block_size)  # last step partial
    assert_same_floats(dequantize(raw, qtype), whole)
    assert_same_floats(dequantize(raw.ravel(), qtype, shape=whole.shape), whole)


def test_q4_k_scale_packing_by_hand() -> None:
    """Sub-block j of a Q4_K block with every code 1: x = d*sc_j - dmin*m_j, the 6-bit fields set bit by bit."""
    sc = np.array([1, 2, 3, 63, 17, 33, 48, 62])
    m = np.array([5, 0, 63, 7, 40, 16, 1, 63])
    s = np.zeros(12, np.uint8)
    for j in range(8):
        if j < 4:
            s[j] |= sc[j]
            s[j + 4] |= m[j]
        else:  # low 4 bits in byte j+4, high 2 bits in the top of bytes j-4 (sc) and j (m)
            s[j + 4] = (sc[j] & 15) | ((m[j] & 15) << 4)
            s[j - 4] |= (sc[j] >> 4) << 6
            s[j] |= (m[j] >> 4) << 6
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes() + np.float16(0.25).tobytes(), np.uint8),
                            s, np.full(QK_K // 2, 0x11, np.uint8)])
    expected = np.repeat(0.5 * sc - 0.25 * m, 32).astype(np.float32)
    assert_same_floats(dequantize(block, T.Q4_K, shape=(QK_K,)), expected)


def test_iq4_xs_by_hand() -> None:
    """IQ4_XS sub-block j with scale ls_j - 32 and index (i % 16) for weight i (nibbles as Q4_0's)."""
    ls = np.array([0, 1, 31, 32, 33, 47, 62, 63])
    scales_h = sum(int(v >> 4) << (2 * j) for j, v in enumerate(ls))
    scales_l = [(ls[2 * b] & 15) | ((ls[2 * b + 1] & 15) << 4) for b in range(4)]
    qs = np.tile(np.array([i | (i << 4) for i in range(16)], np.uint8), 8)  # element l and l+16 share index l
    block = np.concatenate([np.frombuffer(np.float16(2.0).tobytes() + scales_h.to_bytes(2, "little"), np.uint8),
                            np.array(scales_l, np.uint8), qs])
    idx = np.tile(np.arange(16), 16)
    expected = (2.0 * np.repeat(ls - 32, 32) * IQ4NL_VALUES[idx]).astype(np.float32)
    assert_same_floats(dequantize(block, T.IQ4_XS, shape=(QK_K,)), expected)


# ---------------------------------------------------------------------------------------------
# Q4_1 / Q5_1 encode: ggml's bytes


def _block(**at: float) -> np.ndarray:
    b = np.zeros(QK, np.float32)
    for i, v in at.items():
        b[int(i[1:])] = v
    return b


ENCODE_CASES = {
    "normal": rng.standard_normal((16, 256)).astype(np.float32),
    "wide_range": (rng.standard_normal((8, 128)) * np.exp(rng.uniform(-30, 30, (8, 128)))).astype(np.float32),
    "zeros": np.stack([np.zeros(QK, np.float32), -np.zeros(QK, np.float32), _block(b4=-0.0)]),
    "constant": np.stack([np.full(QK, v, np.float32) for v in (3.0, -2.5, 1e-3, 65504.0, 1e-40)]),
    "one_nonzero": np.stack([_block(b0=1.0), _block(b31=-2.5), _block(b17=1e-3)]),
    "huge_and_tiny": np.stack([
        np.full(QK, 1e30, np.float32), _block(b3=1e30, b7=-1e30, b9=1.0), _block(b5=3.0e38, b6=-3.4e38),
        _block(b0=-1e30, b1=1e-30, b2=1e-45), _block(b31=65504.0 * 31 * 2), _block(b0=1e-44, b1=-1e-45),
        np.linspace(-1e-39, 1e-39, QK, dtype=np.float32), _block(b0=1e-30, b1=1e-41, b2=-3e-39),
        np.where(np.arange(QK) % 2 == 0, 1e25, 1e-42).astype(np.float32),
    ]),
    # integer ranges: (x - min) / d lands on .5 and on integers
    "ties": np.stack([np.arange(QK, dtype=np.float32) / 2, np.arange(QK, dtype=np.float32) * 15 / 31,
                      np.concatenate([[0.0, 15.0], np.arange(0.5, 15.5, 0.5)]).astype(np.float32)]),
    "rows_3d": rng.standard_normal((2, 3, 96)).astype(np.float32),
}


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_matches_ggml(case: str, qtype: GGMLType) -> None:
    x = ENCODE_CASES[case]
    ours = quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == (*x.shape[:-1], x.shape[-1] // QK * TYPE_TRAITS[qtype].type_size)
    expected = oracle_quantize(x, qtype).reshape(ours.shape)
    assert np.array_equal(ours, expected)
    flat = ours.reshape(-1, ours.shape[-1])
    assert_same_floats(dequantize(flat, qtype), oracle_dequantize(flat, qtype))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_encode_float64_input_rounds_through_float32(qtype: GGMLType) -> None:
    x64 = rng.standard_normal((8, 96))
    assert np.array_equal(quantize(x64, qtype), oracle_quantize(x64.astype(np.float32), qtype))


def test_q4_1_known_bytes() -> None:
    x = np.zeros((1, QK), np.float32)
    assert quantize(x, T.Q4_1).tobytes() == b"\x00\x00" * 2 + b"\x00" * (QK // 2)
    x[0] = np.arange(QK) % 16  # min 0, max 15: d = 1, code = x; element j low nibble, j + 16 high
    q = quantize(x, T.Q4_1)[0]
    assert q[:2].tobytes() == np.float16(1.0).tobytes() and q[2:4].tobytes() == np.float16(0.0).tobytes()
    assert list(q[4:]) == [j | (j << 4) for j in range(16)]


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_exact_round_trip_within_half_a_step(qtype: GGMLType) -> None:
    x = ENCODE_CASES["normal"].reshape(-1, QK)
    y = dequantize(quantize(x, qtype), qtype)
    step = (x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / (15 if qtype is T.Q4_1 else 31)
    # truncating (x-min)/d + 0.5 is round-to-nearest; plus the fp16 rounding of d (times q) and of min
    assert np.all(np.abs(y - x) <= step * (0.5 + 31 * 2.0**-11) + np.abs(x).max(-1, keepdims=True) * 2.0**-11)


# ---------------------------------------------------------------------------------------------
# approximate encoders (k-quants, IQ4): valid blocks, stated error bounds


def _bound(qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """Largest |decode(encode(x)) - x| each block (rows of x) may show, from kquants.py's rule.

    A super-block scale is the least fp16 >= need / s_top, so d <= need/s_top * (1 + 2^-10) + 2^-24
    (2^-24: the fp16 subnormal spacing). Affine types: dmin <= R/s_top (+), each step <= span + d with
    span <= (R + dmin)/q_top, error <= step/2; R = max - min(min, 0). Symmetric types: step <= A/q_neg + d,
    error <= 1 step (the opposite extreme clips), or 14 steps of the IQ4 value table; A = max |x|.
    IQ4_NL has no sub-scales: d is A/127 rounded to the nearest fp16 (possibly down).
    """
    def up(need: np.ndarray, top: int) -> np.ndarray:
        return need / top * (1 + 2.0**-10) + 2.0**-24

    x = x.astype(np.float64)
    hi, lo, a = x.max(-1, keepdims=True), np.minimum(x.min(-1, keepdims=True), 0), np.abs(x).max(-1, keepdims=True)
    rounding = 1 + 2.0**-16  # float32 arithmetic of the encoder and decoder
    affine = {T.Q2_K: (3, 15), T.Q4_K: (15, 63), T.Q5_K: (31, 63)}
    if qtype in affine:
        q_top, s_top = affine[qtype]
        span = (hi - lo + up(-lo, s_top)) / q_top
        return 0.5 * (span + up(span, s_top)) * rounding
    if qtype is T.IQ4_NL:
        return (14 * a / 127 + 113 * (a / 127 * 2.0**-11 + 2.0**-25)) * rounding  # +A clips to 113 |d|
    q_neg, s_top, steps = {T.Q3_K: (4, 31, 1), T.Q6_K: (32, 127, 1), T.IQ4_XS: (127, 31, 14)}[qtype]
    return steps * (a / q_neg + up(a / q_neg, s_top)) * rounding


# rms error / sigma on N(0, sigma) weights: measured 0.357, 0.157, 0.080, 0.039, 0.019, 0.080, 0.081
# (Q4_0 0.086, Q4_1 0.078, Q5_1 0.038): each at least as good as the 32-block type of its bit width.
RMS_LIMIT = {T.Q2_K: 0.38, T.Q3_K: 0.17, T.Q4_K: 0.086, T.Q5_K: 0.043, T.Q6_K: 0.021, T.IQ4_NL: 0.086, T.IQ4_XS: 0.086}


@pytest.mark.parametrize("sigma", [1e-3, 1.0, 300.0])
@pytest.mark.parametrize("qtype", APPROX, ids=lambda t: t.name)
def test_approximate_round_trip(qtype: GGMLType, sigma: float) -> None:
    x = (rng.standard_normal((32, 1024)) * sigma).astype(np.float32)
    x[3, :QK_K] = 0  # an all-zero super-block
    x[5, :QK_K] = np.abs(x[5, :QK_K])  # all positive, all negative
    x[6, :QK_K] = -np.abs(x[6, :QK_K])
    x[7, 40:56] = 0  # a zero sub-block
    x[8, :QK_K] *= 1e-3  # a quiet super-block
    raw = quantize(x, qtype, approximate=True)
    y = dequantize(raw, qtype)
    assert_same_floats(y, oracle_dequantize(raw, qtype))  # valid blocks: gguf reads the same floats
    bs = TYPE_TRAITS[qtype].block_size
    xb, yb = x.reshape(-1, bs), y.reshape(-1, bs)
    assert np.all(np.abs(yb - xb) <= _bound(qtype, xb))
    assert not yb[~xb.any(-1)].any()  # zero blocks stay zero
    assert np.sqrt(np.mean((y - x) ** 2)) <= RMS_LIMIT[qtype] * sigma


@pytest.mark.parametrize("qtype", APPROX, ids=lambda t: t.name)
def test_approximate_encoders_survive_extreme_inputs(qtype: GGMLType) -> None:
    """Tiny, subnormal and fp16-overflowing magnitudes still give valid, finite blocks."""
    bs = TYPE_TRAITS[qtype].block_size
    x = rng.standard_normal((6, 2 * QK_K)).astype(np.float32)
    x[0] *= 1e-30
    x[1] *= 1e-42
    x[2] *= 1e12  # the scale saturates at 65504: values clip, blocks stay valid
    x[3, ::7] = 3e38
    x[4] = 7.0  # constant
    raw = quantize(x, qtype, approximate=True)
    y = dequantize(raw, qtype)
    assert_same_floats(y, oracle_dequantize(raw, qtype))
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y[0] - x[0]) <= 2e-7)  # the smallest fp16 subnormal scales are coarser than 1e-30
    assert np.all(np.abs(y[4] - 7.0) <= _bound(qtype, x[4].reshape(-1, bs)).max())


@pytest.mark.parametrize("qtype", APPROX, ids=lambda t: t.name)
def test_approximate_encoding_only_when_asked(qtype: GGMLType) -> None:
    x = np.zeros((2, QK_K), np.float32)
    assert qtype not in QUANTIZABLE_TYPES and qtype in ENCODABLE_TYPES
    assert not can_quantize(qtype, QK_K) and can_quantize(qtype, QK_K, approximate=True)
    with pytest.raises(QuantError, match=rf"{qtype.name}.*approximate=True"):
        quantize(x, qtype)


@pytest.mark.parametrize("qtype", EXACT + [T.Q4_0, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_approximate_flag_keeps_exact_encoders(qtype: GGMLType) -> None:
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(quantize(x, qtype, approximate=True), quantize(x, qtype))


def test_quantizable_types_are_the_exact_ones() -> None:
    assert QUANTIZABLE_TYPES == {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
    assert ENCODABLE_TYPES == QUANTIZABLE_TYPES | set(APPROX)


def test_iq4nl_values_match_gguf() -> None:
    assert IQ4NL_VALUES.dtype == np.int8
    assert tuple(int(v) for v in IQ4NL_VALUES) == tuple(gguf.quants.IQ4_NL.kvalues)


@pytest.mark.parametrize("qtype", [*DECODE, T.Q4_0, T.Q5_0, T.Q8_0, T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_random_block_rows_are_valid_with_sane_scales(qtype: GGMLType) -> None:
    raw = random_block_rows(qtype, 6, 512, seed=3)
    assert raw.dtype == np.uint8 and raw.shape == (6, codecs.row_nbytes(qtype, 512))
    w = dequantize(raw, qtype)
    assert np.all(np.isfinite(w))
    assert 0.5 / np.sqrt(512) < w.std() < 2 / np.sqrt(512)  # N(0, 1/sqrt(cols)) weights, quantized
    if qtype in DECODE:
        assert_same_floats(w, oracle_dequantize(raw, qtype))
