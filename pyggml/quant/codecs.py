"""Encode and decode GGUF tensor data of every type pyggml computes with.

Each type has one small codec class (the interface is `base.Codec`): F32, F16, BF16 and the
32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 here; the k-quants Q2_K .. Q6_K and IQ4_NL,
IQ4_XS in kquants.py. A codec works on a 2-D array of blocks, all at once: `encode` turns float32
blocks (n_blocks, block_size) into stored values (uint8 block bytes (n_blocks, type_size), or the
element dtype for the plain types), and `decode` turns stored block bytes (n_blocks, type_size)
into float32 (n_blocks, block_size). The public functions below validate shapes, cut big tensors
into chunks of blocks to bound the temporaries, and reshape rows. Every decoder is bit-exact with
ggml's (and gguf-py's).

Two kinds of encoder:

* exact (`QUANTIZABLE_TYPES`: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): ggml's reference
  quantizers (ggml-quants.c, and gguf-py's numpy port of them) byte for byte, including their
  float32 arithmetic: the scale is computed and used in float32 and only rounded to fp16 when
  stored. Where ggml's C code relies on the x86 result of converting NaN or infinity to an
  integer (a scale so tiny that its inverse overflows), the codes here are 0, which is what that
  conversion gives on x86. `quantize(x, t)` and `pyggml quantize` offer only these.
* approximate (the other `ENCODABLE_TYPES`: the k-quants and IQ4): simple encoders of pyggml's
  own that write valid blocks of good quality but not ggml's bytes (their rule and error bounds
  are in kquants.py). They exist so random-weight test and benchmark models can be written in
  every type, and are reached only by asking: `quantize(x, t, approximate=True)` (which still
  uses the exact encoder where a type has one).
"""
from __future__ import annotations

import numpy as np

from pyggml.gguf.constants import PLAIN_DTYPES, TYPE_TRAITS, GGMLType

from .base import F16, F32, Codec, f16_bits, f16_value, finite_or_zero, inverse, pack_nibbles, unpack_nibbles
from .kquants import KQUANT_CODECS

__all__ = ["QuantError", "row_nbytes", "can_quantize", "quantize", "dequantize", "QUANTIZABLE_TYPES",
           "ENCODABLE_TYPES"]

# Blocks processed per step: bounds the float temporaries (~8 MiB per array for QK = 32).
_CHUNK_ELEMENTS = 1 << 21


class QuantError(ValueError):
    """A tensor cannot be encoded or decoded as the requested ggml type."""


# ---------------------------------------------------------------------------------------------
# quantizers shared by the codecs


def _quantize_signed_max(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q4_0/Q5_0 reference: float32 blocks -> (fp16 scale bytes, unsigned codes).

    The element of largest |x| (the first one on ties) keeps its sign and maps to code 0:
    d = max / -2**(bits-1), q = min(2**bits - 1, trunc(x * (1/d) + 2**(bits-1) + 0.5)).
    """
    offset = 1 << (bits - 1)  # 8 for Q4_0, 16 for Q5_0
    top = (1 << bits) - 1
    imax = np.abs(blocks).argmax(axis=-1)[:, None]
    vmax = np.take_along_axis(blocks, imax, axis=-1)  # (n_blocks, 1)
    d = vmax / np.float32(-offset)  # an all-zero block gives d = -0.0, as in ggml
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.trunc(blocks * inverse(d) + np.float32(offset + 0.5))
    q = np.clip(finite_or_zero(v), 0, top).astype(np.uint8)
    return f16_bits(d), q


def _quantize_min_max(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's Q4_1/Q5_1 reference: float32 blocks -> (fp16 d bytes, fp16 min bytes, unsigned codes).

    d = (max - min) / (2**bits - 1), q = min(2**bits - 1, trunc((x - min) * (1/d) + 0.5)).
    """
    top = (1 << bits) - 1  # 15 for Q4_1, 31 for Q5_1
    lo = blocks.min(axis=-1, keepdims=True)  # (n_blocks, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(top)
        v = np.trunc((blocks - lo) * inverse(d) + np.float32(0.5))
    q = np.clip(finite_or_zero(v), 0, top).astype(np.uint8)
    return f16_bits(d), f16_bits(lo), q


# ---------------------------------------------------------------------------------------------
# codecs, one per type


class _F32Codec(Codec):
    qtype = GGMLType.F32

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        return blocks

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(F32).astype(np.float32)


class _F16Codec(Codec):
    qtype = GGMLType.F16

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # out of range -> inf, NaN stays NaN
            return blocks.astype(F16)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        return f16_value(blocks)


class _BF16Codec(Codec):
    """bfloat16 = the top 16 bits of a float32; ggml_compute_fp32_to_bf16 rounds to nearest even."""

    qtype = GGMLType.BF16

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = np.ascontiguousarray(blocks).view(np.uint32)
        # NaN: keep sign and top payload bits, force the quiet bit (bf16 bit 6 = fp32 bit 22).
        is_nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        n = np.where(is_nan, (n & np.uint32(0xFFFF0000)) | np.uint32(1 << 22), n)
        # Round to nearest even. Cannot overflow uint32: the largest non-NaN pattern is -inf.
        n = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return n.astype(np.uint16)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(blocks).view(PLAIN_DTYPES[GGMLType.BF16]).astype(np.uint32)
        return (bits << np.uint32(16)).view(np.float32)


class _Q4_0Codec(Codec):
    """18 bytes per 32 weights: fp16 d, qs[16] (4-bit codes q, x = (q - 8) * d)."""

    qtype = GGMLType.Q4_0
    bits = 4

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, q = _quantize_signed_max(blocks, _Q4_0Codec.bits)
        return np.concatenate([d, pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = f16_value(blocks[:, :2])
        q = unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(1 << (_Q4_0Codec.bits - 1))
        return d * q.astype(np.float32)


class _Q4_1Codec(Codec):
    """20 bytes per 32 weights: fp16 d, fp16 m, qs[16] (4-bit codes q as Q4_0's, x = q * d + m)."""

    qtype = GGMLType.Q4_1
    bits = 4

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, m, q = _quantize_min_max(blocks, _Q4_1Codec.bits)
        return np.concatenate([d, m, pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d, m = f16_value(blocks[:, :2]), f16_value(blocks[:, 2:4])
        return d * unpack_nibbles(blocks[:, 4:]).astype(np.float32) + m


class _Q5_0Codec(Codec):
    """22 bytes per 32 weights: fp16 d, u32 qh (bit j = bit 4 of code j), qs[16] (low 4 bits)."""

    qtype = GGMLType.Q5_0
    bits = 5

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, q = _quantize_signed_max(blocks, _Q5_0Codec.bits)
        # bit j of the little-endian u32 = bit j % 8 of byte j // 8
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # (n_blocks, 4)
        return np.concatenate([d, qh, pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = f16_value(blocks[:, :2])
        high = np.unpackbits(blocks[:, 2:6], axis=-1, bitorder="little")  # (n_blocks, QK) of 0/1
        q = unpack_nibbles(blocks[:, 6:]) | (high << np.uint8(4))
        q = q.astype(np.int8) - np.int8(1 << (_Q5_0Codec.bits - 1))
        return d * q.astype(np.float32)


class _Q5_1Codec(Codec):
    """24 bytes per 32 weights: fp16 d, fp16 m, u32 qh, qs[16] (5-bit codes as Q5_0's, x = q * d + m)."""

    qtype = GGMLType.Q5_1
    bits = 5

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, m, q = _quantize_min_max(blocks, _Q5_1Codec.bits)
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # (n_blocks, 4)
        return np.concatenate([d, m, qh, pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d, m = f16_value(blocks[:, :2]), f16_value(blocks[:, 2:4])
        high = np.unpackbits(blocks[:, 4:8], axis=-1, bitorder="little")  # (n_blocks, QK) of 0/1
        q = unpack_nibbles(blocks[:, 8:]) | (high << np.uint8(4))
        return d * q.astype(np.float32) + m


class _Q8_0Codec(Codec):
    """34 bytes per 32 weights: fp16 d, int8 qs[32] (x = q * d)."""

    qtype = GGMLType.Q8_0
    qmax = (1 << 7) - 1  # 127

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(_Q8_0Codec.qmax)
        with np.errstate(invalid="ignore", over="ignore"):
            v = blocks * inverse(d)
            a = np.abs(v)
            whole = np.floor(a)
            # roundf: half away from zero (a + 0.5 would double-round in float32)
            q = np.copysign(whole + (a - whole >= np.float32(0.5)), v)
        q = np.clip(finite_or_zero(q), -_Q8_0Codec.qmax, _Q8_0Codec.qmax).astype(np.int8)
        return np.concatenate([f16_bits(d), q.view(np.uint8)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = f16_value(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d


# One row per type pyggml can decode.
_CODECS: dict[GGMLType, type[Codec]] = {
    c.qtype: c
    for c in (_F32Codec, _F16Codec, _BF16Codec, _Q4_0Codec, _Q4_1Codec, _Q5_0Codec, _Q5_1Codec, _Q8_0Codec,
              *KQUANT_CODECS)
}

# Types `quantize` encodes as ggml does, byte for byte (the targets of `pyggml quantize`).
QUANTIZABLE_TYPES = frozenset(t for t, c in _CODECS.items() if c.can_encode and c.exact_encoder)
# Types `quantize(..., approximate=True)` encodes: the above and those with pyggml's own encoder.
ENCODABLE_TYPES = frozenset(t for t, c in _CODECS.items() if c.can_encode)


# ---------------------------------------------------------------------------------------------
# public API


def _encodable(approximate: bool) -> frozenset[GGMLType]:
    return ENCODABLE_TYPES if approximate else QUANTIZABLE_TYPES


def _codec(qtype: GGMLType | int, encode: bool, approximate: bool = False) -> type[Codec]:
    qtype = GGMLType(qtype)
    codec = _CODECS.get(qtype)
    supported = _encodable(approximate) if encode else _CODECS
    if codec is None or qtype not in supported:
        what = "quantize to" if encode else "dequantize"
        names = ", ".join(t.name for t in sorted(supported))
        hint = ""
        if encode and qtype in ENCODABLE_TYPES:
            hint = " (pyggml's encoder for it is not ggml's; pass approximate=True to use it anyway)"
        raise QuantError(f"cannot {what} {qtype.name}{hint}: supported types are {names}")
    return codec


def row_nbytes(qtype: GGMLType | int, n: int) -> int:
    """Bytes taken by a row of `n` elements of type `qtype`."""
    qtype = GGMLType(qtype)
    traits = TYPE_TRAITS[qtype]
    if n < 0 or n % traits.block_size:
        raise QuantError(
            f"a row of {n} elements cannot be stored as {qtype.name}: "
            f"the row length must be a multiple of the block size {traits.block_size}"
        )
    return n // traits.block_size * traits.type_size


def can_quantize(qtype: GGMLType | int, n_cols: int, *, approximate: bool = False) -> bool:
    """Whether rows of `n_cols` elements can be quantized to `qtype` by `quantize` (with `approximate`)."""
    qtype = GGMLType(qtype)
    return (qtype in _encodable(approximate) and n_cols >= 0
            and n_cols % TYPE_TRAITS[qtype].block_size == 0)


def _chunk_blocks(block_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // block_size)


def quantize(x: np.ndarray, qtype: GGMLType | int, *, approximate: bool = False) -> np.ndarray:
    """Encode `x` (any float array; last axis = rows) as `qtype`, exactly as ggml does.

    With `approximate`, types without an exact encoder (`ENCODABLE_TYPES` - `QUANTIZABLE_TYPES`)
    are encoded by pyggml's own valid-block encoders instead of refused (see kquants.py).
    Returns float32 (F32), float16 (F16), uint16 raw bits (BF16), or for the block types
    uint8 of shape (*x.shape[:-1], row_nbytes(qtype, x.shape[-1])).
    """
    codec = _codec(qtype, encode=True, approximate=approximate)
    qtype = codec.qtype
    x = np.asarray(x)
    if x.ndim == 0:
        raise QuantError(f"cannot quantize a 0-d array to {qtype.name}: need at least one axis")
    n = x.shape[-1]
    width = row_nbytes(qtype, n)  # raises QuantError for a bad row length
    block_size, type_size = TYPE_TRAITS[qtype].block_size, TYPE_TRAITS[qtype].type_size
    lead = x.shape[:-1]
    blocks = x.reshape(-1, block_size)  # (n_blocks, block_size)

    if qtype in PLAIN_DTYPES:
        out = np.empty((*lead, n), dtype=PLAIN_DTYPES[qtype])
        flat = out.reshape(-1, 1)
    else:
        out = np.empty((*lead, width), dtype=np.uint8)
        flat = out.reshape(-1, type_size)

    step = _chunk_blocks(block_size)
    for start in range(0, blocks.shape[0], step):
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 -> inf, NaN stays NaN
            chunk = np.ascontiguousarray(blocks[start : start + step], dtype=np.float32)
        flat[start : start + step] = codec.encode(chunk)
    return out


def dequantize(raw: np.ndarray, qtype: GGMLType | int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode data of type `qtype` to a new float32 array of shape (*rows, n).

    `raw` is what `quantize` returns, or raw bytes (uint8) of shape (*rows, row_bytes) as stored
    in a GGUF file. With `shape` (the element shape, last axis = row length), `raw` may be any
    buffer of the right size, e.g. a flat uint8 slice of a memory map.
    """
    codec = _codec(qtype, encode=False)
    qtype = codec.qtype
    raw = np.asarray(raw)
    plain = PLAIN_DTYPES.get(qtype)
    if raw.dtype != np.uint8 and raw.dtype != plain:
        expected = "uint8" if plain is None else f"uint8 or {plain.name}"
        raise QuantError(f"cannot dequantize {qtype.name} from {raw.dtype} data: expected {expected}")
    if raw.ndim == 0:
        raise QuantError(f"cannot dequantize {qtype.name} from a 0-d array")
    data = np.ascontiguousarray(raw).view(np.uint8)  # (*rows, row_bytes)
    block_size, type_size = TYPE_TRAITS[qtype].block_size, TYPE_TRAITS[qtype].type_size

    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise QuantError(f"cannot dequantize {qtype.name} to a 0-d shape")
        width = row_nbytes(qtype, shape[-1])
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        if data.size != n_rows * width:
            raise QuantError(
                f"{qtype.name} data of {data.size} bytes does not hold shape {shape} "
                f"({n_rows} rows of {width} bytes)"
            )
        lead, n = shape[:-1], shape[-1]
    else:
        width = data.shape[-1]
        if width % type_size:
            raise QuantError(
                f"{qtype.name} rows of {width} bytes are not a whole number of {type_size}-byte blocks"
            )
        lead, n = data.shape[:-1], width // type_size * block_size

    blocks = data.reshape(-1, type_size)  # (n_blocks, type_size)
    out = np.empty((*lead, n), dtype=np.float32)
    flat = out.reshape(-1, block_size)
    step = _chunk_blocks(block_size)
    with np.errstate(invalid="ignore", over="ignore"):  # an inf scale times code 0 is NaN, as in ggml
        for start in range(0, blocks.shape[0], step):
            flat[start : start + step] = codec.decode(blocks[start : start + step])
    return out
