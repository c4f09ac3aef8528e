"""A weight matrix as the kernels see it: stored bytes (a view into the GGUF mmap) plus its type."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf.constants import GGMLType
from .quant import registry

# The weight types the kernels compute with, and the small integers they dispatch on: the weight-type
# registry's (quant/registry.py); kernels/cpu.py and the CUDA source (cuda/*.cu) both use these numbers.
KERNEL_TYPE_CODES = registry.KERNEL_TYPE_CODES


@dataclass(frozen=True)
class QWeight:
    """A 2-D weight in its stored form. `raw` is (rows, stored row): uint8 blocks for quantized
    types, float32 for F32, uint16 bits for F16/BF16. `shape` is the logical (rows, cols).
    `packed`: the same weights rearranged for a backend's kernels, when it keeps such a copy (the CPU
    backend: Q4_0 / Q5_0 / Q8_0 in groups of 8 rows, kernels/cpu.pack_int8)."""

    name: str
    raw: np.ndarray
    ggml_type: GGMLType
    shape: tuple[int, int]
    packed: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes
