"""The KV cache's element types: one row per type, as llama.cpp's `-ctk/-ctv` names them.

A cache row is one head's key (or value) at one position: head_dim floats, stored as the type says.
f32 and f16 store the floats (float32 / float16 arrays); q8_0 and q4_0 store ggml's blocks of 32 along
head_dim with an fp16 scale (uint8 arrays of `row_width(head_dim)` bytes a row), so the cache's bytes of
one row are exactly ggml's bytes of that row. `code` is the small integer the numba and CUDA kernels
dispatch on (the CUDA constants are generated from these rows: `cuda_defines`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf.constants import TYPE_TRAITS, GGMLType

__all__ = ["KVType", "KV_TYPES", "KVTypeError", "kv_type", "DEFAULT_KV_TYPE", "cuda_defines"]


class KVTypeError(ValueError):
    """A KV cache type that pyggml does not store, or that does not fit the model's head size."""


@dataclass(frozen=True)
class KVType:
    name: str  # llama.cpp's name (-ctk / -ctv, type_k / type_v)
    ggml: GGMLType  # the ggml type whose bytes a row holds
    dtype: np.dtype  # the storage array's element: float32, float16, or uint8 (block bytes)
    code: int  # the kernels' dispatch code

    @property
    def block(self) -> int:
        return TYPE_TRAITS[self.ggml].block_size

    @property
    def quantized(self) -> bool:
        return self.dtype == np.uint8

    def row_width(self, head_dim: int) -> int:
        """Storage elements of one head's row: head_dim floats, or the bytes of head_dim / 32 blocks."""
        if head_dim % self.block:
            raise KVTypeError(f"KV cache type {self.name} stores blocks of {self.block} values along a head, "
                              f"but this model's heads have {head_dim}; use f16 or f32")
        if not self.quantized:
            return head_dim
        return head_dim // self.block * TYPE_TRAITS[self.ggml].type_size

    def row_bytes(self, head_dim: int) -> int:
        return self.row_width(head_dim) * self.dtype.itemsize

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Rows of float32 (..., head_dim) as stored (..., row_width): the numpy reference of every
        backend's cache writes (ggml's rounding: fp16 round-to-nearest-even, q8_0/q4_0 as
        quantize_row_*_ref)."""
        from ..quant.codecs import quantize

        if self.ggml == GGMLType.F32:
            return np.asarray(x, np.float32)
        return quantize(np.asarray(x, np.float32), self.ggml)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows (..., row_width) as float32 (..., head_dim): the reference of every kernel's reads."""
        from ..quant.codecs import dequantize

        rows = np.asarray(rows)
        if self.ggml == GGMLType.F32:
            return rows.astype(np.float32)
        return dequantize(rows, self.ggml)


_ROWS = (
    ("f32", GGMLType.F32, np.float32),
    ("f16", GGMLType.F16, np.float16),
    ("q8_0", GGMLType.Q8_0, np.uint8),
    ("q4_0", GGMLType.Q4_0, np.uint8),
)
KV_TYPES: dict[str, KVType] = {name: KVType(name, g, np.dtype(d), code) for code, (name, g, d) in enumerate(_ROWS)}
DEFAULT_KV_TYPE = "f16"  # as llama.cpp


def kv_type(name: str | int | KVType | None) -> KVType:
    """The row of `name` (None: the default, f16), or of a ggml type id (llama-cpp-python passes
    GGML_TYPE_* ints: 0 f32, 1 f16, 8 q8_0, 2 q4_0); KVTypeError listing the supported names otherwise."""
    if isinstance(name, KVType):
        return name
    if name is None:
        name = DEFAULT_KV_TYPE
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        row = next((t for t in KV_TYPES.values() if t.ggml == int(name)), None)
    else:
        row = KV_TYPES.get(name.lower()) if isinstance(name, str) else None
    if row is None:
        raise KVTypeError(f"KV cache type {name!r} is not supported; choose one of {', '.join(KV_TYPES)}")
    return row


def cuda_defines() -> str:
    """`#define KV_F32 0` ...: the CUDA module's KV type codes, from these rows."""
    return "".join(f"#define KV_{t.name.upper()} {t.code}\n" for t in KV_TYPES.values())
