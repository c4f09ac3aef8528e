"""Encode and decode GGUF tensor data: F32, F16, BF16, Q4_0, Q5_0, Q8_0 (both ways), Q6_K (read only).

Each type has one small codec class. A codec works on a 2-D array of blocks, all at once:
`encode` turns float32 blocks (n_blocks, block_size) into stored values (uint8 block bytes
(n_blocks, type_size), or the element dtype for the plain types), and `decode` turns stored
block bytes (n_blocks, type_size) into float32 (n_blocks, block_size). The public functions
below validate shapes, cut big tensors into chunks of blocks to bound the temporaries, and
reshape rows.

The quantizers reproduce ggml's reference quantizers (ggml-quants.c, and gguf-py's numpy port
of them) byte for byte, including their float32 arithmetic: the scale is computed and used in
float32 and only rounded to fp16 when stored. Where ggml's C code relies on the x86 result of
converting NaN or infinity to an integer (a scale so tiny that its inverse overflows), the codes
here are 0, which is what that conversion gives on x86.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from pyggml.gguf.constants import PLAIN_DTYPES, QK_K, TYPE_TRAITS, GGMLType

__all__ = ["QuantError", "row_nbytes", "can_quantize", "quantize", "dequantize", "QUANTIZABLE_TYPES"]

# Blocks processed per step: bounds the float temporaries (~8 MiB per array for QK = 32).
_CHUNK_ELEMENTS = 1 << 21

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")


class QuantError(ValueError):
    """A tensor cannot be encoded or decoded as the requested ggml type."""


# ---------------------------------------------------------------------------------------------
# helpers shared by the codecs


def _f16_bits(d: np.ndarray) -> np.ndarray:
    """float32 scales (n_blocks, 1) -> their fp16 bytes (n_blocks, 2), round to nearest even."""
    with np.errstate(over="ignore", invalid="ignore"):  # |d| > 65504 becomes inf, as in ggml
        return d.astype(_F16).view(np.uint8)


def _f16_value(b: np.ndarray) -> np.ndarray:
    """fp16 bytes (n_blocks, 2) -> float32 (n_blocks, 1)."""
    return np.ascontiguousarray(b).view(_F16).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in float32; may be inf when d is subnormal."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _finite_or_zero(v: np.ndarray) -> np.ndarray:
    """Replace NaN and +-inf by 0, the value x86 gives when converting them to an integer."""
    return np.where(np.isfinite(v), v, np.float32(0))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """codes (n_blocks, QK) -> bytes (n_blocks, QK/2): element j low nibble, element j+QK/2 high."""
    half = q.shape[-1] // 2
    return (q[:, :half] & np.uint8(0x0F)) | (q[:, half:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """bytes (n_blocks, QK/2) -> codes (n_blocks, QK), the inverse of `_pack_nibbles`."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


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
        v = np.trunc(blocks * _inverse(d) + np.float32(offset + 0.5))
    q = np.clip(_finite_or_zero(v), 0, top).astype(np.uint8)
    return _f16_bits(d), q


# ---------------------------------------------------------------------------------------------
# codecs, one per type


class _Codec:
    """Block encoder/decoder of one ggml type (see the module docstring)."""

    qtype: ClassVar[GGMLType]
    can_encode: ClassVar[bool] = True

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _F32Codec(_Codec):
    qtype = GGMLType.F32

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        return blocks

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(_F32).astype(np.float32)


class _F16Codec(_Codec):
    qtype = GGMLType.F16

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # out of range -> inf, NaN stays NaN
            return blocks.astype(_F16)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        return _f16_value(blocks)


class _BF16Codec(_Codec):
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


class _Q4_0Codec(_Codec):
    """18 bytes per 32 weights: fp16 d, qs[16] (4-bit codes q, x = (q - 8) * d)."""

    qtype = GGMLType.Q4_0
    bits = 4

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, q = _quantize_signed_max(blocks, _Q4_0Codec.bits)
        return np.concatenate([d, _pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = _f16_value(blocks[:, :2])
        q = _unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(1 << (_Q4_0Codec.bits - 1))
        return d * q.astype(np.float32)


class _Q5_0Codec(_Codec):
    """22 bytes per 32 weights: fp16 d, u32 qh (bit j = bit 4 of code j), qs[16] (low 4 bits)."""

    qtype = GGMLType.Q5_0
    bits = 5

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d, q = _quantize_signed_max(blocks, _Q5_0Codec.bits)
        # bit j of the little-endian u32 = bit j % 8 of byte j // 8
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # (n_blocks, 4)
        return np.concatenate([d, qh, _pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = _f16_value(blocks[:, :2])
        high = np.unpackbits(blocks[:, 2:6], axis=-1, bitorder="little")  # (n_blocks, QK) of 0/1
        q = _unpack_nibbles(blocks[:, 6:]) | (high << np.uint8(4))
        q = q.astype(np.int8) - np.int8(1 << (_Q5_0Codec.bits - 1))
        return d * q.astype(np.float32)


class _Q8_0Codec(_Codec):
    """34 bytes per 32 weights: fp16 d, int8 qs[32] (x = q * d)."""

    qtype = GGMLType.Q8_0
    qmax = (1 << 7) - 1  # 127

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(_Q8_0Codec.qmax)
        with np.errstate(invalid="ignore", over="ignore"):
            v = blocks * _inverse(d)
            a = np.abs(v)
            whole = np.floor(a)
            # roundf: half away from zero (a + 0.5 would double-round in float32)
            q = np.copysign(whole + (a - whole >= np.float32(0.5)), v)
        q = np.clip(_finite_or_zero(q), -_Q8_0Codec.qmax, _Q8_0Codec.qmax).astype(np.int8)
        return np.concatenate([_f16_bits(d), q.view(np.uint8)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d = _f16_value(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d


class _Q6_KCodec(_Codec):
    """210 bytes per 256 weights: ql[128], qh[64], int8 scales[16], fp16 d (read only).

    A super-block is two halves of 128 weights; half h uses ql[64h:64h+64] and qh[32h:32h+32].
    Within a half, weight 32k + l (k = 0..3, l = 0..31) has low 4 bits from ql[l + 32(k % 2)]
    (low nibble for k < 2, high nibble for k >= 2) and high 2 bits (qh[l] >> 2k) & 3;
    x = d * scales[i // 16] * (q - 32) for weight i of the super-block.
    """

    qtype = GGMLType.Q6_K
    can_encode = False

    _QL = QK_K // 2
    _QH = QK_K // 4
    _SCALES = QK_K // 16
    _HALF = 128  # weights per half super-block

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        c = _Q6_KCodec
        n = blocks.shape[0]
        n_halves = QK_K // c._HALF
        ql = blocks[:, : c._QL].reshape(n, n_halves, c._HALF // 2)  # (n, 2, 64)
        qh = blocks[:, c._QL : c._QL + c._QH].reshape(n, n_halves, c._HALF // 4)  # (n, 2, 32)
        rest = blocks[:, c._QL + c._QH :]
        scales = rest[:, : c._SCALES].view(np.int8).astype(np.float32)  # (n, 16)
        d = _f16_value(rest[:, c._SCALES :])  # (n, 1)

        low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=-1)  # (n, 2, 128)
        shifts = np.arange(0, 8, 2, dtype=np.uint8)[:, None]  # (4, 1)
        high = ((qh[:, :, None, :] >> shifts) & np.uint8(3)).reshape(n, n_halves, c._HALF)
        q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)  # (n, 2, 128)
        q = q.reshape(n, c._SCALES, QK_K // c._SCALES).astype(np.float32)  # (n, 16, 16)
        return ((d * scales)[:, :, None] * q).reshape(n, QK_K)


_CODECS: dict[GGMLType, type[_Codec]] = {
    c.qtype: c for c in (_F32Codec, _F16Codec, _BF16Codec, _Q4_0Codec, _Q5_0Codec, _Q8_0Codec, _Q6_KCodec)
}

QUANTIZABLE_TYPES = frozenset(t for t, c in _CODECS.items() if c.can_encode)


# ---------------------------------------------------------------------------------------------
# public API


def _codec(qtype: GGMLType | int, encode: bool) -> type[_Codec]:
    qtype = GGMLType(qtype)
    codec = _CODECS.get(qtype)
    if codec is None or (encode and not codec.can_encode):
        what = "quantize to" if encode else "dequantize"
        supported = QUANTIZABLE_TYPES if encode else _CODECS
        names = ", ".join(t.name for t in sorted(supported))
        raise QuantError(f"cannot {what} {qtype.name}: supported types are {names}")
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


def can_quantize(qtype: GGMLType | int, n_cols: int) -> bool:
    """Whether rows of `n_cols` elements can be quantized to `qtype` by `quantize`."""
    qtype = GGMLType(qtype)
    return qtype in QUANTIZABLE_TYPES and n_cols >= 0 and n_cols % TYPE_TRAITS[qtype].block_size == 0


def _chunk_blocks(block_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // block_size)


def quantize(x: np.ndarray, qtype: GGMLType | int) -> np.ndarray:
    """Encode `x` (any float array; last axis = rows) as `qtype`, exactly as ggml does.

    Returns float32 (F32), float16 (F16), uint16 raw bits (BF16), or for the block types
    uint8 of shape (*x.shape[:-1], row_nbytes(qtype, x.shape[-1])).
    """
    codec = _codec(qtype, encode=True)
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
