"""Typed GGUF metadata values, shared by the reader and the writer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import SCALAR_DTYPES, ValueType

_DTYPE_TO_VALUE_TYPE = {dt: vt for vt, dt in SCALAR_DTYPES.items() if vt is not ValueType.BOOL}


@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type stated, so it is written back exactly as read.

    For arrays, `elem_type` names the element type; nested arrays hold a list of `Typed`.
    """

    type: ValueType
    value: Any
    elem_type: ValueType | None = None


def _infer_int_type(values: list[int]) -> ValueType:
    lo, hi = min(values), max(values)
    if lo >= 0 and hi < 2**32:
        return ValueType.UINT32
    if lo >= -(2**31) and hi < 2**31:
        return ValueType.INT32
    if lo >= -(2**63) and hi < 2**63:
        return ValueType.INT64
    if lo >= 0 and hi < 2**64:
        return ValueType.UINT64
    raise ValueError(f"integer {hi if hi >= 2**63 else lo} does not fit any GGUF integer type")


def _infer_scalar_type(values: list[Any]) -> ValueType:
    if all(isinstance(v, bool) for v in values):
        return ValueType.BOOL
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return _infer_int_type([int(v) for v in values])
    if all(isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) for v in values):
        return ValueType.FLOAT32
    if all(isinstance(v, str) for v in values):
        return ValueType.STRING
    raise TypeError(f"cannot infer one GGUF type for values of types {sorted({type(v).__name__ for v in values})}")


def as_typed(value: Any) -> Typed:
    """Give a plain Python/numpy value its GGUF type (int -> UINT32 when it fits, float -> FLOAT32)."""
    if isinstance(value, Typed):
        return value
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TypeError(f"metadata arrays must be 1-D, got shape {value.shape}")
        if value.dtype == np.bool_:
            return Typed(ValueType.ARRAY, value.astype(np.uint8), ValueType.BOOL)
        dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        vt = _DTYPE_TO_VALUE_TYPE.get(np.dtype(dtype))
        if vt is None:
            raise TypeError(f"no GGUF array type for numpy dtype {value.dtype}")
        return Typed(ValueType.ARRAY, value, vt)
    if isinstance(value, (list, tuple)):
        if not value:
            raise TypeError("an empty list has no element type: pass Typed(ValueType.ARRAY, [], elem_type)")
        if all(isinstance(v, (list, tuple, np.ndarray, Typed)) for v in value):
            return Typed(ValueType.ARRAY, [as_typed(v) for v in value], ValueType.ARRAY)
        return Typed(ValueType.ARRAY, list(value), _infer_scalar_type(list(value)))
    return Typed(_infer_scalar_type([value]), value)


def plain(value: Typed) -> Any:
    """The Python value of a Typed (nested arrays become lists of plain values)."""
    if value.type is ValueType.ARRAY and value.elem_type is ValueType.ARRAY:
        return [plain(v) for v in value.value]
    return value.value
