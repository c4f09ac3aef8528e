"""Streaming GGUF v3 writer.

The layout is fixed before any tensor data is produced: header, metadata and tensor infos
(offsets computed from shapes and types), padding, then each tensor's data in turn, produced by
its `load()` only when it is written, so peak memory is one tensor. Output goes to a temporary
file in the target directory that is renamed into place only when everything was written.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, PLAIN_DTYPES, SCALAR_DTYPES, GGMLType, Keys, ValueType
from .reader import tensor_nbytes
from .values import Typed, as_typed

__all__ = ["TensorPlan", "Typed", "write_gguf", "atomic_output"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, numpy-order shape, stored type, and how to produce its data.

    `load()` returns the data in its stored representation: float32 / float16 / uint16 (bf16 bits)
    arrays for plain types, uint8 blocks (any shape, right byte count) for quantized types.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(v: Typed) -> bytes:
    """The bytes of a value, without its leading type id."""
    if v.type is ValueType.STRING:
        return _string(v.value)
    if v.type is not ValueType.ARRAY:
        return np.array([v.value], dtype=SCALAR_DTYPES[v.type]).tobytes()
    elem = v.elem_type
    if elem is None:
        raise TypeError("an array value needs an element type")
    head = struct.pack("<IQ", elem, len(v.value))
    if elem is ValueType.STRING:
        return head + b"".join(_string(s) for s in v.value)
    if elem is ValueType.ARRAY:
        return head + b"".join(_encode_value(as_typed(x)) for x in v.value)
    return head + np.asarray(v.value).astype(SCALAR_DTYPES[elem], copy=False).tobytes()


def encode_header(metadata: dict[str, Any], tensors: list[TensorPlan], alignment: int) -> tuple[bytes, list[int]]:
    """Header + metadata + tensor infos, and each tensor's offset within the data section."""
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        typed = as_typed(value)
        out += [_string(key), struct.pack("<I", typed.type), _encode_value(typed)]
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        dims = tuple(reversed(t.shape))
        out += [_string(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, pos)]
        pos += -(-t.nbytes // alignment) * alignment
    return b"".join(out), offsets


class Terminated(SystemExit):
    """SIGTERM arrived while an output file was being written (the temp file is removed)."""


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files (.NAME.PID.XXXX.tmp) that killed runs writing `path` left behind: those
    whose process is gone."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        try:
            os.kill(int(parts[0]), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        log.info("removing %s, left by a run that was killed", tmp)
        tmp.unlink(missing_ok=True)


class atomic_output:
    """Context manager yielding a temp file beside `path`; renamed to `path` only on success.

    On any exception, KeyboardInterrupt and SIGTERM (in the main thread, turned into `Terminated`)
    included, the temp file is removed and `path` is untouched. The temp file's name carries the
    writer's pid, so the next run writing `path` removes what a SIGKILLed one left.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self._old_term = None
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise Terminated(128 + signal.SIGTERM)
            self._old_term = signal.signal(signal.SIGTERM, on_term)
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.close()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp made it 0600
                os.replace(self.tmp, self.path)
            else:
                self.tmp.unlink(missing_ok=True)


def _check_data(plan: TensorPlan, data: np.ndarray) -> np.ndarray:
    expected = PLAIN_DTYPES.get(plan.ggml_type, np.dtype(np.uint8))
    if data.dtype != expected:
        raise TypeError(f"tensor {plan.name!r}: load() gave {data.dtype}, a {plan.ggml_type.name} tensor is stored as {expected}")
    if data.nbytes != plan.nbytes:
        raise ValueError(f"tensor {plan.name!r}: load() gave {data.nbytes} bytes, shape {plan.shape} as "
                         f"{plan.ggml_type.name} takes {plan.nbytes}")
    return np.ascontiguousarray(data)


def write_gguf(
    path: str | os.PathLike,
    metadata: dict[str, Any],
    tensors: Iterable[TensorPlan],
    alignment: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Write a GGUF v3 file, streaming one tensor at a time; `path` appears only when complete.

    Metadata values may be plain Python/numpy values (types inferred, see `as_typed`) or `Typed`.
    """
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"tensor {dup!r} is planned twice")
    metadata = dict(metadata)
    if alignment is None:
        alignment = int(as_typed(metadata.get(Keys.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)).value)
    if alignment != GGUF_DEFAULT_ALIGNMENT:
        metadata[Keys.ALIGNMENT] = Typed(ValueType.UINT32, alignment)
    header, offsets = encode_header(metadata, tensors, alignment)
    with atomic_output(path) as f:
        f.write(header)
        f.write(bytes(-len(header) % alignment))
        for i, (plan, offset) in enumerate(zip(tensors, offsets)):
            if progress is not None:
                progress(plan.name, i, len(tensors))
            data = _check_data(plan, plan.load())
            f.write(memoryview(data).cast("B"))
            f.write(bytes(-plan.nbytes % alignment))
            del data
    log.info("wrote %s: %d tensors, %d keys", path, len(tensors), len(metadata))
