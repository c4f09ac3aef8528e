"""The weight-type registry: which ggml types pyggml computes with, and the small integer each
kernel family dispatches on. One row per type; every other table (numba kernels, the CUDA
module's constants, the CLI's choices, the memory plan) is derived from these rows.

The format facts of every type id (block size, bytes per block) are in gguf/constants.py; a type
that is not here can still be read and inspected, but not computed with.
"""
from __future__ import annotations

from ..gguf.constants import TYPE_TRAITS, GGMLType

__all__ = ["COMPUTABLE_TYPES", "KERNEL_TYPE_CODES", "UnsupportedWeightType", "kernel_code", "check_computable",
           "cuda_type_defines"]


class UnsupportedWeightType(ValueError):
    """A tensor uses a ggml type pyggml cannot compute with (it can still be read and inspected)."""


# The types the kernels compute with, in kernel-code order: the code of a type is its position here
# (numba and the CUDA templates take ints, not enums). Append new types at the end.
COMPUTABLE_TYPES: tuple[GGMLType, ...] = (
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q6_K,
    GGMLType.Q4_1, GGMLType.Q5_1,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K,
    GGMLType.IQ4_NL, GGMLType.IQ4_XS,
)

KERNEL_TYPE_CODES: dict[GGMLType, int] = {t: i for i, t in enumerate(COMPUTABLE_TYPES)}


def kernel_code(t: GGMLType, what: str = "tensor") -> int:
    """The kernels' code of type t; UnsupportedWeightType naming `what` when pyggml cannot compute with t."""
    code = KERNEL_TYPE_CODES.get(t)
    if code is None:
        check_computable(what, t)
    return code


def check_computable(what: str, t: GGMLType) -> None:
    """Raise UnsupportedWeightType naming the tensor `what` and its type when t is not computable."""
    if t not in KERNEL_TYPE_CODES:
        names = ", ".join(x.name for x in COMPUTABLE_TYPES)
        raise UnsupportedWeightType(f"{what}: pyggml cannot compute with {GGMLType(t).name} weights "
                                    f"(block size {TYPE_TRAITS[GGMLType(t)].block_size}); supported: {names}")


def cuda_type_defines() -> str:
    """The CUDA module's type constants (`#define T_Q4_0 3` ...), generated from this registry."""
    return "".join(f"#define T_{t.name} {code}\n" for t, code in KERNEL_TYPE_CODES.items())
