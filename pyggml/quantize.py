"""Re-encode a GGUF file's weights: q4_0, q4_1, q5_0, q5_1, q8_0, or f16/bf16/f32 round trips.

One tensor at a time: each weight is dequantized to float32 and re-quantized in bounded row
chunks, so peak memory stays near one tensor's float32 slab whatever the model's size.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .gguf.constants import FILE_TYPE_OF, PLAIN_DTYPES, QUANTIZATION_VERSION, QUANTIZED_TYPES, TYPE_TRAITS, GGMLType, Keys, TensorNames, ValueType
from .gguf.reader import GGUFFile, TensorInfo, tensor_nbytes
from .gguf.values import Typed
from .gguf.writer import TensorPlan, write_gguf
from .quant import codecs

log = logging.getLogger(__name__)

# Types `pyggml quantize` writes, by the names users type.
TARGET_TYPES: dict[str, GGMLType] = {
    "q4_0": GGMLType.Q4_0,
    "q4_1": GGMLType.Q4_1,
    "q5_0": GGMLType.Q5_0,
    "q5_1": GGMLType.Q5_1,
    "q8_0": GGMLType.Q8_0,
    "f16": GGMLType.F16,
    "bf16": GGMLType.BF16,
    "f32": GGMLType.F32,
}
FALLBACK_TYPE = GGMLType.F16  # for rows that block types cannot cut (llama.cpp's last resort too)
NORM_TYPE = GGMLType.F32  # 1-D tensors (norms) are never quantized
CHUNK_ELEMENTS = 1 << 22  # rows are re-encoded in chunks of about this many weights (16 MiB as f32)


class QuantizeError(ValueError):
    """The input cannot be quantized as asked."""


@dataclass
class QuantizeReport:
    in_path: Path
    out_path: Path
    qtype: GGMLType
    n_tensors: int = 0
    n_params: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0
    fallbacks: list[tuple[str, tuple[int, ...], GGMLType]] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.out_bytes / max(self.n_params, 1)

    @property
    def in_bits_per_weight(self) -> float:
        return 8 * self.in_bytes / max(self.n_params, 1)


def default_output_path(in_path: Path, type_name: str) -> Path:
    """stories260K-f16.gguf + q4_0 -> stories260K-q4_0.gguf (beside the input)."""
    stem = re.sub(r"-(f32|f16|bf16|q4_0|q4_1|q5_0|q5_1|q8_0)$", "", in_path.stem, flags=re.IGNORECASE)
    return in_path.with_name(f"{stem}-{type_name}.gguf")


def stored_type(shape: tuple[int, ...], wanted: GGMLType) -> GGMLType:
    """The type a tensor of `shape` is stored as when `wanted` is asked for: 1-D tensors (norms)
    stay F32; rows that do not fill whole blocks fall back to F16. Shared by quantize, convert and
    the random-model generator."""
    if len(shape) < 2:
        return NORM_TYPE
    return wanted if shape[-1] % TYPE_TRAITS[wanted].block_size == 0 else FALLBACK_TYPE


def choose_type(info: TensorInfo, qtype: GGMLType, output_type: GGMLType | None) -> GGMLType:
    """`stored_type`, with output.weight optionally given its own type."""
    wanted = output_type if (info.name == TensorNames.OUTPUT and output_type is not None) else qtype
    return stored_type(info.shape, wanted)


def _reencode(src: np.ndarray, src_type: GGMLType, shape: tuple[int, ...], dst_type: GGMLType) -> np.ndarray:
    """Re-encode a tensor chunk by chunk; returns its stored representation."""
    n_cols = shape[-1]
    flat_src = src.reshape(-1, src.shape[-1])
    n_rows = flat_src.shape[0]
    out_dtype = PLAIN_DTYPES.get(dst_type, np.dtype(np.uint8))
    row_bytes = codecs.row_nbytes(dst_type, n_cols)
    out = np.empty((n_rows, row_bytes // out_dtype.itemsize), dtype=out_dtype)
    step = max(1, CHUNK_ELEMENTS // n_cols)
    for r in range(0, n_rows, step):
        rows = slice(r, min(r + step, n_rows))
        x = codecs.dequantize(flat_src[rows], src_type)
        out[rows] = codecs.quantize(x, dst_type).reshape(rows.stop - rows.start, -1)
    return out


def quantize_file(
    in_path: str | os.PathLike,
    qtype: str | GGMLType,
    out_path: str | os.PathLike | None = None,
    *,
    output_type: str | GGMLType | None = None,
    allow_requantize: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Write a copy of a GGUF file with its weight matrices stored as `qtype`."""
    qtype = _parse_type(qtype)
    output_type = None if output_type is None else _parse_type(output_type)
    in_path = Path(in_path)
    out_path = Path(out_path) if out_path is not None else default_output_path(in_path, qtype.name.lower())
    if out_path.resolve() == in_path.resolve():
        raise QuantizeError(f"{out_path}: the output would overwrite the input")
    start = time.perf_counter()
    src = GGUFFile(in_path)
    report = QuantizeReport(in_path, out_path, qtype)

    plans = []
    for info in src:
        if info.ggml_type in QUANTIZED_TYPES and not allow_requantize and len(info.shape) >= 2:
            raise QuantizeError(f"{in_path}: tensor {info.name!r} is already {info.ggml_type.name}; quantizing it again "
                                "loses quality (pass allow_requantize / --allow-requantize to do it anyway)")
        dst_type = choose_type(info, qtype, output_type)
        if dst_type is FALLBACK_TYPE and dst_type is not qtype and len(info.shape) >= 2:
            report.fallbacks.append((info.name, info.shape, dst_type))
            log.info("%s: %d columns are not a multiple of %d: stored as %s", info.name, info.shape[-1],
                     TYPE_TRAITS[qtype].block_size, dst_type.name)
        report.n_tensors += 1
        report.n_params += info.n_elements
        report.in_bytes += info.nbytes
        report.out_bytes += tensor_nbytes(info.shape, dst_type)

        def load(info=info, dst_type=dst_type) -> np.ndarray:
            data = src.tensor(info.name)
            if info.ggml_type is dst_type:
                out = np.array(data)
            else:
                try:
                    out = _reencode(data, info.ggml_type, info.shape, dst_type)
                except codecs.QuantError as e:
                    raise QuantizeError(f"{in_path}: tensor {info.name!r}: {e}") from None
            src.release(info.name)
            return out

        plans.append(TensorPlan(info.name, info.shape, dst_type, load))

    metadata = dict(src.fields)
    metadata[Keys.FILE_TYPE] = Typed(ValueType.UINT32, int(FILE_TYPE_OF[qtype]))
    if any(p.ggml_type in QUANTIZED_TYPES for p in plans):
        metadata[Keys.QUANTIZATION_VERSION] = Typed(ValueType.UINT32, QUANTIZATION_VERSION)
    else:
        metadata.pop(Keys.QUANTIZATION_VERSION, None)
    write_gguf(out_path, metadata, plans, alignment=src.alignment, progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def _parse_type(t: str | GGMLType) -> GGMLType:
    if isinstance(t, GGMLType):
        if t not in TARGET_TYPES.values():
            raise QuantizeError(f"cannot write {t.name}; choose one of {', '.join(TARGET_TYPES)}")
        return t
    try:
        return TARGET_TYPES[t.lower()]
    except KeyError:
        raise QuantizeError(f"unknown type {t!r}; choose one of {', '.join(TARGET_TYPES)}") from None
