"""pyggml.quant.codecs against the `gguf` package (gguf-py, ggml's own numpy port) as the oracle.

Quantized bytes must be identical to ggml's reference quantizers, and decoded floats identical
to gguf's dequantizers, because GGUF files written by pyggml are read by llama.cpp and vice versa.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyggml.gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType
from pyggml.quant import codecs
from pyggml.quant.codecs import QuantError, can_quantize, dequantize, quantize, row_nbytes

gguf = pytest.importorskip("gguf")

BLOCK_TYPES = [GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0]
PLAIN_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("PYGGML_TEST_MODELS", REPO_ROOT.parent / "shared" / "models"))
STORIES = MODELS / "stories260K-hf" / "model.safetensors"


# ---------------------------------------------------------------------------------------------
# oracle helpers


def _gtype(qtype: GGMLType):
    return gguf.GGMLQuantizationType[qtype.name]


def oracle_quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """gguf's bytes for float32 `x` (uint8, shape (*rows, row_bytes))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # gguf overflows 1/d on subnormal scales
        out = gguf.quants.quantize(np.asarray(x, dtype=np.float32), _gtype(qtype))
    return np.ascontiguousarray(out).view(np.uint8)


def oracle_dequantize(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf scale times code 0
        out = gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), _gtype(qtype))
    return np.asarray(out, dtype=np.float32)


def as_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Bitwise equality of float32 arrays (tells -0.0 from 0.0, NaN payloads included)."""
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def assert_quantize_matches(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    ours = quantize(x, qtype)
    assert ours.dtype == np.uint8
    assert ours.shape == (*x.shape[:-1], row_nbytes(qtype, x.shape[-1]))
    assert np.array_equal(ours, oracle_quantize(x, qtype))
    return ours


# ---------------------------------------------------------------------------------------------
# test data: blocks of QK weights with the cases ggml's rounding rules must survive

rng = np.random.default_rng(20240611)
f32 = np.float32


def _block(**at: float) -> np.ndarray:
    b = np.zeros(QK, dtype=np.float32)
    for i, v in at.items():
        b[int(i[1:])] = v
    return b


def _cases() -> dict[str, np.ndarray]:
    """name -> float32 array whose last axis is a multiple of QK."""
    tiny = np.nextafter(f32(0), f32(1))  # smallest subnormal
    half_down = np.nextafter(f32(0.5), f32(0))
    cases = {
        "normal": rng.standard_normal((16, 256)).astype(np.float32),
        "wide_range": (rng.standard_normal((8, 128)) * np.exp(rng.uniform(-30, 30, (8, 128)))).astype(np.float32),
        "extremes": np.stack([
            np.full(QK, 1e30, np.float32), np.full(QK, -1e30, np.float32),
            _block(b3=1e30, b7=-1e30, b9=1.0), _block(b0=-1e30, b1=1e-30, b2=1e-45),
            _block(b5=3.0e38, b6=-3.4e38), _block(b31=65504.0 * 127 * 2),  # fp16 scale overflows to inf
        ]),
        "subnormal": np.stack([
            np.full(QK, 1e-40, np.float32), _block(b5=1e-44), _block(b0=tiny, b1=-tiny),
            np.linspace(-1e-39, 1e-39, QK, dtype=np.float32), np.full(QK, 2e-38, np.float32),
            np.full(QK, 1.5e-38, np.float32), np.full(QK, 6e-38, np.float32),
            _block(b0=1e-30, b1=1e-41, b2=-3e-39),
        ]),
        "huge_and_tiny": np.stack([
            _block(b0=1e30, b1=1e-40, b2=-1e-44, b3=1.0),
            _block(b10=-3e38, b11=1e-45, b12=1e-38, b13=-1e20),
            np.where(np.arange(QK) % 2 == 0, 1e25, 1e-42).astype(np.float32),
        ]),
        "zeros": np.stack([np.zeros(QK, np.float32), -np.zeros(QK, np.float32), _block(b4=-0.0)]),
        "one_nonzero": np.stack([_block(b0=1.0), _block(b31=-2.5), _block(b17=1e-3), _block(b15=-7.0)]),
        # scales of exactly 1.0 make x * (1/d) exact, so these land on .5 and on integers
        "ties_q8": np.stack([
            np.concatenate([[127.0], np.arange(-15.5, 15.5, 1.0)]).astype(np.float32),
            np.concatenate([[-127.0], np.arange(-126.5, 126.5, 8.0)[:QK - 1]]).astype(np.float32),
            _block(b0=127.0, b1=half_down, b2=-half_down, b3=0.5, b4=-0.5, b5=126.5, b6=-126.5),
        ]),
        "ties_q4": np.stack([
            np.concatenate([[-8.0], np.arange(-7.5, 8.0, 0.5)]).astype(np.float32),
            np.concatenate([[8.0], -np.arange(-7.5, 8.0, 0.5)]).astype(np.float32),
            # x*id + 8.5 rounds in float32: these are exactly where float64 would disagree
            _block(b0=-8.0, b1=np.nextafter(f32(-0.5), f32(-1)), b2=np.nextafter(f32(7.5), f32(0)), b3=7.5, b4=8.0),
        ]),
        "ties_q5": np.stack([
            np.concatenate([[-16.0], np.arange(-15.5, 15.5, 1.0)]).astype(np.float32),
            np.concatenate([[16.0], np.arange(-15.0, 16.0, 1.0)]).astype(np.float32),
            _block(b0=-16.0, b1=np.nextafter(f32(-0.5), f32(-1)), b2=15.5, b3=16.0, b4=-15.5),
        ]),
        "first_of_equal_maxima": np.stack([_block(b0=3.0, b1=-3.0, b2=1.0), _block(b0=-3.0, b1=3.0, b2=1.0)]),
        "integers_mid_block": (rng.integers(-20, 20, (4, 64))).astype(np.float32),
        "rows_3d": rng.standard_normal((2, 3, 96)).astype(np.float32),
    }
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# quantize: bit-identical to ggml


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(CASES))
def test_quantize_matches_ggml(case: str, qtype: GGMLType) -> None:
    assert_quantize_matches(CASES[case], qtype)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantize_matches_ggml_across_chunks(monkeypatch: pytest.MonkeyPatch, qtype: GGMLType) -> None:
    monkeypatch.setattr(codecs, "_CHUNK_ELEMENTS", 3 * QK)  # 3 blocks per step, last step partial
    x = rng.standard_normal((7, 160)).astype(np.float32)
    assert_quantize_matches(x, qtype)
    assert_same_floats(dequantize(quantize(x, qtype), qtype), oracle_dequantize(oracle_quantize(x, qtype), qtype))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantize_converts_other_dtypes_and_layouts_via_float32(qtype: GGMLType) -> None:
    x64 = rng.standard_normal((64, 96))  # float64
    expected = oracle_quantize(x64.astype(np.float32), qtype)
    assert np.array_equal(quantize(x64, qtype), expected)
    xt = np.ascontiguousarray(x64.T).T  # non-contiguous view, same values
    assert np.array_equal(quantize(xt, qtype), expected)
    x16 = x64.astype(np.float16)
    assert np.array_equal(quantize(x16, qtype), oracle_quantize(x16.astype(np.float32), qtype))


def test_known_bytes_without_oracle() -> None:
    """Byte layouts written out by hand, so a wrong oracle cannot hide a wrong layout."""
    zeros = np.zeros((1, QK), np.float32)
    # An all-zero block: max = +0.0, d = 0.0 / -8 = -0.0 (fp16 0x8000), every code 8.
    assert quantize(zeros, GGMLType.Q4_0).tobytes() == b"\x00\x80" + b"\x88" * (QK // 2)
    assert quantize(zeros, GGMLType.Q5_0).tobytes() == b"\x00\x80" + b"\xff" * 4 + b"\x00" * (QK // 2)
    assert quantize(zeros, GGMLType.Q8_0).tobytes() == b"\x00\x00" + b"\x00" * QK

    # Q4_0 with d = 1: element j in the low nibble of byte j, element j+16 in the high nibble.
    x = np.zeros((1, QK), np.float32)
    x[0, 0] = -8.0  # code 0
    x[0, 1] = 7.0  # code 15
    x[0, 16] = -3.0  # code 5
    q = quantize(x, GGMLType.Q4_0)[0]
    assert q[:2].tobytes() == np.float16(1.0).tobytes()
    assert q[2] == 0x50 and q[3] == 0x8F and np.all(q[4:] == 0x88)

    # Q5_0 with d = 1: qh bit j is bit 4 of code j = x_j + 16.
    x = np.zeros((1, QK), np.float32)
    x[0, 0] = -16.0  # code 0
    x[0, 20] = -1.0  # code 15: bit 4 clear
    q = quantize(x, GGMLType.Q5_0)[0]
    qh = int.from_bytes(q[2:6].tobytes(), "little")
    assert qh == 0xFFFFFFFF & ~(1 << 0) & ~(1 << 20)
    assert q[6] == 0x00 and q[6 + 4] == 0xF0  # element 20 is the high nibble of byte 4

    # Q8_0: d = amax / 127, codes round half away from zero.
    x = np.zeros((1, QK), np.float32)
    x[0, :4] = [127.0, 2.5, -2.5, -0.5]
    q = quantize(x, GGMLType.Q8_0)[0]
    assert q[:2].tobytes() == np.float16(1.0).tobytes()
    assert list(q[2:6].view(np.int8)) == [127, 3, -3, -1]


# ---------------------------------------------------------------------------------------------
# plain types


def _plain_inputs() -> np.ndarray:
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, 6e-8, 3e-8, 3.4e38, -3.4e38, 1e-45],
        dtype=np.float32,
    )
    bits = np.array(
        [0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0xFFFFFFFF, 0x7F7FFFFF,  # NaNs, max float
         0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00008000, 0x80018000],  # bf16 ties
        dtype=np.uint32,
    ).view(np.float32)
    normal = (rng.standard_normal(999) * np.exp(rng.uniform(-40, 40, 999))).astype(np.float32)
    return np.concatenate([special, bits, normal]).reshape(32, -1)


def test_f32_is_float32() -> None:
    x = _plain_inputs()
    out = quantize(x, GGMLType.F32)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert_same_floats(out, x)  # NaN payloads kept
    finite = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    assert_same_floats(quantize(finite.astype(np.float64), GGMLType.F32), finite)


def test_f16_matches_gguf() -> None:
    x = _plain_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType.F16)
        x64 = x.astype(np.float64)
        from_f64 = x64.astype(np.float32).astype(np.float16)
    ours = quantize(x, GGMLType.F16)
    assert ours.dtype == np.float16 and ours.shape == x.shape
    assert np.array_equal(as_bytes(ours), as_bytes(expected))
    assert np.array_equal(as_bytes(quantize(x64, GGMLType.F16)), as_bytes(from_f64))


def test_f16_from_float64_rounds_through_float32() -> None:
    # 1 + 2^-11 + 2^-40: float64 -> float16 rounds up; via float32 (1 + 2^-11, a tie) it rounds to even, 1.0
    x = np.array([[1.0 + 2.0**-11 + 2.0**-40]])
    assert quantize(x, GGMLType.F16)[0, 0] == np.float16(1.0)


def test_bf16_matches_gguf() -> None:
    x = _plain_inputs()
    expected = oracle_quantize(x, GGMLType.BF16).view(np.uint16)
    ours = quantize(x, GGMLType.BF16)
    assert ours.dtype == np.uint16 and ours.shape == x.shape
    assert np.array_equal(ours, expected)
    # a few values by hand: quiet NaN forced, ties to even, carry into the exponent
    hand = np.array([0x7F800001, 0x3F808000, 0x3F818000, 0x3F7FFFFF], dtype=np.uint32).view(np.float32)
    assert list(quantize(hand[None], GGMLType.BF16)[0]) == [0x7FC0, 0x3F80, 0x3F82, 0x3F80]


# ---------------------------------------------------------------------------------------------
# dequantize: identical to gguf's


def _random_blocks(qtype: GGMLType, n_blocks: int) -> np.ndarray:
    """Random stored bytes (any codes), with finite fp16 scales where the type has one."""
    size = TYPE_TRAITS[qtype].type_size
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    d = (rng.standard_normal((n_blocks, 1)) * np.exp(rng.uniform(-12, 10, (n_blocks, 1)))).astype(np.float16)
    d[0] = 0.0
    d[1] = -0.0
    d[2] = np.float16(6e-8)  # subnormal
    d[3] = np.float16(65504.0)
    d_at = size - 2 if qtype == GGMLType.Q6_K else 0
    raw[:, d_at : d_at + 2] = d.view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, GGMLType.Q6_K], ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf(qtype: GGMLType) -> None:
    blocks_per_row = 4 if qtype == GGMLType.Q6_K else 6
    raw = _random_blocks(qtype, 24 * blocks_per_row).reshape(24, -1)  # (rows, row_bytes)
    ours = dequantize(raw, qtype)
    n = blocks_per_row * TYPE_TRAITS[qtype].block_size
    assert ours.shape == (24, n) and ours.dtype == np.float32
    assert_same_floats(ours, oracle_dequantize(raw, qtype).reshape(24, n))


def test_q6_k_by_hand() -> None:
    """ql = 0x21 everywhere, qh = 0b11100100, scales i - 8, d = 0.5, spelled out from ggml's loop."""
    block = np.zeros(210, np.uint8)
    block[:128] = 0x21  # low nibble 1, high nibble 2
    block[128:192] = 0b11_10_01_00  # 2-bit fields 0, 1, 2, 3 for k = 0..3
    block[192:208] = (np.arange(16) - 8).astype(np.int8).view(np.uint8)
    block[208:210] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    expected = np.empty(QK_K, np.float32)
    for i in range(QK_K):
        k = (i % 128) // 32  # which quarter of the half
        low = 1 if k < 2 else 2
        q = low | (k << 4)
        expected[i] = 0.5 * (i // 16 - 8) * (q - 32)
    assert_same_floats(dequantize(block, GGMLType.Q6_K, shape=(QK_K,)), expected)


@pytest.mark.parametrize("case", ["normal", "extremes", "subnormal", "zeros", "ties_q4", "rows_3d"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_quantized_matches_gguf(qtype: GGMLType, case: str) -> None:
    q = quantize(CASES[case], qtype)
    expected = oracle_dequantize(q.reshape(-1, q.shape[-1]), qtype).reshape(CASES[case].shape)
    assert_same_floats(dequantize(q, qtype), expected)


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda t: t.name)
def test_dequantize_plain_types(qtype: GGMLType) -> None:
    x = _plain_inputs()
    stored = quantize(x, qtype)
    if qtype == GGMLType.BF16:
        expected = oracle_dequantize(as_bytes(stored), qtype)
    else:
        expected = np.asarray(gguf.quants.dequantize(stored, _gtype(qtype)), dtype=np.float32)
    ours = dequantize(stored, qtype)
    assert_same_floats(ours, expected.reshape(x.shape))
    assert_same_floats(dequantize(as_bytes(stored), qtype), ours)  # raw file bytes, rows kept
    assert_same_floats(dequantize(as_bytes(stored).ravel(), qtype, shape=x.shape), ours)


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, GGMLType.Q6_K], ids=lambda t: t.name)
def test_dequantize_flat_buffer_with_shape(qtype: GGMLType) -> None:
    shape = (3, 2, 2 * TYPE_TRAITS[qtype].block_size)
    raw = _random_blocks(qtype, 3 * 2 * 2)
    by_rows = dequantize(raw.reshape(6, -1), qtype)
    ours = dequantize(raw.ravel(), qtype, shape=shape)
    assert ours.shape == shape
    assert_same_floats(ours.reshape(6, -1), by_rows)


# ---------------------------------------------------------------------------------------------
# real weights


@pytest.fixture(scope="module")
def stories_weights() -> dict[str, np.ndarray]:
    if not STORIES.is_file():
        pytest.skip(f"test model not found: {STORIES} (set PYGGML_TEST_MODELS)")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    return safetensors_numpy.load_file(str(STORIES))


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_real_weights_match_gguf(stories_weights: dict[str, np.ndarray], qtype: GGMLType) -> None:
    checked = 0
    for name, w in stories_weights.items():
        if not can_quantize(qtype, w.shape[-1]):
            continue
        ours = quantize(w, qtype)
        expected = oracle_quantize(w, qtype)
        assert np.array_equal(as_bytes(ours), expected), name
        assert_same_floats(dequantize(ours, qtype), oracle_dequantize(expected, qtype).reshape(w.shape))
        checked += 1
    assert checked >= 30  # every 2-D weight except ffn_down (rows of 172), plus 1-D norms of 64


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_round_trip_error_is_within_one_step(qtype: GGMLType) -> None:
    x = CASES["normal"]
    y = dequantize(quantize(x, qtype), qtype)
    blocks = x.reshape(-1, QK)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    if qtype == GGMLType.Q8_0:
        qmax, bound = 127, 0.5  # round to nearest
    else:
        qmax, bound = (8 if qtype == GGMLType.Q4_0 else 16), 1.0  # nearest, but +max clips one step
    step = amax / qmax
    err = np.abs(y.reshape(-1, QK) - blocks)
    assert np.all(err <= step * (bound + qmax * 2.0**-11))  # plus |q| times the fp16 rounding of d
    assert np.mean(err) < 0.3 * np.mean(step)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_requantizing_dequantized_data_is_lossless(qtype: GGMLType) -> None:
    q = quantize(CASES["normal"], qtype)
    assert np.array_equal(quantize(dequantize(q, qtype), qtype), q)


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda t: t.name)
def test_plain_round_trip_is_exact_for_representable_values(qtype: GGMLType) -> None:
    x = rng.standard_normal((4, 40)).astype(np.float32)
    x = dequantize(quantize(x, qtype), qtype)  # now representable in qtype
    assert_same_floats(dequantize(quantize(x, qtype), qtype), x)


# ---------------------------------------------------------------------------------------------
# geometry and errors


def test_row_nbytes() -> None:
    assert row_nbytes(GGMLType.Q4_0, 64) == 36
    assert row_nbytes(GGMLType.Q5_0, 64) == 44
    assert row_nbytes(GGMLType.Q8_0, 4096) == 4096 // 32 * 34
    assert row_nbytes(GGMLType.Q6_K, 512) == 420
    assert row_nbytes(GGMLType.F16, 172) == 344
    assert row_nbytes(GGMLType.BF16, 3) == 6
    assert row_nbytes(GGMLType.F32, 172) == 688
    with pytest.raises(QuantError, match="Q6_K"):
        row_nbytes(GGMLType.Q6_K, 4096 + 32)


def test_can_quantize() -> None:
    assert can_quantize(GGMLType.Q4_0, 64)
    assert not can_quantize(GGMLType.Q4_0, 172)
    assert can_quantize(GGMLType.F16, 172)
    assert can_quantize(GGMLType.BF16, 1)
    assert can_quantize(GGMLType.Q4_1, 64)
    assert not can_quantize(GGMLType.Q6_K, 256)  # pyggml's encoder is not ggml's: only when asked
    assert can_quantize(GGMLType.Q6_K, 256, approximate=True)
    assert not can_quantize(GGMLType.IQ2_XXS, 256, approximate=True)  # no codec


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_row_length_not_a_multiple_of_the_block_raises(qtype: GGMLType) -> None:
    x = np.zeros((64, 172), np.float32)
    with pytest.raises(QuantError, match=rf"{qtype.name}.*172|172.*{qtype.name}") as info:
        quantize(x, qtype)
    assert isinstance(info.value, ValueError)


def test_unsupported_types_raise() -> None:
    x = np.zeros((2, QK_K), np.float32)
    with pytest.raises(QuantError, match="Q6_K.*approximate=True"):
        quantize(x, GGMLType.Q6_K)
    with pytest.raises(QuantError, match="IQ2_XXS"):
        quantize(x, GGMLType.IQ2_XXS, approximate=True)
    with pytest.raises(QuantError, match="IQ2_XXS"):
        dequantize(np.zeros((2, 66), np.uint8), GGMLType.IQ2_XXS)


def test_dequantize_bad_input_raises() -> None:
    with pytest.raises(QuantError, match="Q4_0"):
        dequantize(np.zeros((2, 19), np.uint8), GGMLType.Q4_0)  # not whole blocks
    with pytest.raises(QuantError, match="Q8_0"):
        dequantize(np.zeros(34 * 3, np.uint8), GGMLType.Q8_0, shape=(2, 64))  # wrong size
    with pytest.raises(QuantError, match="Q8_0"):
        dequantize(np.zeros(34 * 3, np.uint8), GGMLType.Q8_0, shape=(3, 33))  # not whole blocks
    with pytest.raises(QuantError, match="F16"):
        dequantize(np.zeros((2, 4), np.float32), GGMLType.F16)  # float32 data is not F16
