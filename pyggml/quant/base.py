"""What every codec shares: the codec interface and the bit-level helpers of ggml's block layouts.

codecs.py (plain types and the 32-weight blocks) and kquants.py (256-weight super-blocks, IQ4)
build on this module; nothing here knows a particular type.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from pyggml.gguf.constants import GGMLType

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")


class Codec:
    """Block encoder/decoder of one ggml type.

    `decode`: stored block bytes (n_blocks, type_size) -> float32 (n_blocks, block_size).
    `encode`: float32 (n_blocks, block_size) -> stored values, when `can_encode`.
    `exact_encoder`: the encoder writes ggml's reference quantizer's bytes, byte for byte; when
    False it is a simpler encoder of pyggml's own that writes valid blocks (see kquants.py).
    """

    qtype: ClassVar[GGMLType]
    can_encode: ClassVar[bool] = True
    exact_encoder: ClassVar[bool] = True

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def f16_bits(d: np.ndarray) -> np.ndarray:
    """float32 scales (n_blocks, 1) -> their fp16 bytes (n_blocks, 2), round to nearest even."""
    with np.errstate(over="ignore", invalid="ignore"):  # |d| > 65504 becomes inf, as in ggml
        return np.ascontiguousarray(d.astype(F16)).view(np.uint8)


def f16_value(b: np.ndarray) -> np.ndarray:
    """fp16 bytes (n_blocks, 2) -> float32 (n_blocks, 1)."""
    return np.ascontiguousarray(b).view(F16).astype(np.float32)


def inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in float32; may be inf when d is subnormal."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def finite_or_zero(v: np.ndarray) -> np.ndarray:
    """Replace NaN and +-inf by 0, the value x86 gives when converting them to an integer."""
    return np.where(np.isfinite(v), v, np.float32(0))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """codes (n_blocks, QK) -> bytes (n_blocks, QK/2): element j low nibble, element j+QK/2 high."""
    half = q.shape[-1] // 2
    return (q[:, :half] & np.uint8(0x0F)) | (q[:, half:] << np.uint8(4))


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """bytes (n_blocks, QK/2) -> codes (n_blocks, QK), the inverse of `pack_nibbles`."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def split_fields(b: np.ndarray, width: int, count: int) -> np.ndarray:
    """Unsigned words (..., m) -> their `count` bit fields of `width` bits (..., count, m), lowest first."""
    t = b.dtype.type
    shifts = (np.arange(count, dtype=b.dtype) * t(width))[:, None]  # (count, 1)
    return (b[..., None, :] >> shifts) & t((1 << width) - 1)


def join_fields(v: np.ndarray, width: int) -> np.ndarray:
    """Bit fields (..., count, m), each < 2**width -> words (..., m) of v's dtype; inverts `split_fields`."""
    t = v.dtype.type
    out = np.zeros(v.shape[:-2] + v.shape[-1:], dtype=v.dtype)
    for i in range(v.shape[-2]):
        out |= v[..., i, :] << t(width * i)
    return out


def cut(blocks: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Block bytes (n_blocks, sum(sizes)) -> one (n_blocks, size) view per field, in order."""
    return np.split(blocks, np.cumsum(sizes)[:-1], axis=-1)
