"""Memory-mapped, defensive GGUF reader.

The file is treated as untrusted: every count, length, type id and offset is checked against
the bytes that remain in the file before anything is allocated or read, and every problem
raises one `GGUFError` that names the file and the byte offset.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_MAX_ALIGNMENT,
    GGUF_SUPPORTED_VERSIONS,
    PLAIN_DTYPES,
    SCALAR_DTYPES,
    TYPE_TRAITS,
    GGMLType,
    Keys,
    ValueType,
)
from .values import Typed, plain

log = logging.getLogger(__name__)

MAX_DIMS = 4  # GGML_MAX_DIMS
_LINUX_MADV_POPULATE_READ = 22  # <sys/mman.h>; Python's mmap names it from 3.13 on
MAX_NESTING = 8  # nested metadata arrays deeper than this are refused
MAX_NAME_LENGTH = 1 << 16  # tensor names and keys; ggml limits tensor names to 64 bytes


class GGUFError(ValueError):
    """A GGUF file is malformed or uses something pyggml cannot read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `shape` is in numpy order (slowest first): dims reversed."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def dims(self) -> tuple[int, ...]:
        """GGUF order: dims[0] is the fastest-varying (row length)."""
        return tuple(reversed(self.shape))


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    """Bytes of a tensor of `shape` (numpy order); the row length must fill whole blocks."""
    traits = TYPE_TRAITS[ggml_type]
    n_cols = shape[-1] if shape else 1
    if n_cols % traits.block_size:
        raise ValueError(f"row length {n_cols} is not a multiple of the {ggml_type.name} block size {traits.block_size}")
    return math.prod(shape[:-1]) * (n_cols // traits.block_size) * traits.type_size


class _Cursor:
    """Reads little-endian primitives from a byte buffer, checking bounds first."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: at offset {self.pos if at is None else at}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but the file has {self.size - self.pos} left (truncated or corrupt)")

    def take(self, n: int, what: str) -> np.ndarray:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, vt: ValueType, what: str) -> Any:
        dtype = SCALAR_DTYPES[vt]
        value = self.take(dtype.itemsize, what).view(dtype)[0]
        if vt is ValueType.BOOL:
            if value > 1:
                raise self.fail(f"{what}: bool byte is {int(value)}, expected 0 or 1", self.pos - 1)
            return bool(value)
        return float(value) if vt in (ValueType.FLOAT32, ValueType.FLOAT64) else int(value)

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str, max_length: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if max_length is not None and n > max_length:
            raise self.fail(f"{what} length {n} exceeds the limit of {max_length}", start)
        raw = self.take(n, what)
        try:
            return raw.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})", start) from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: 32k-150k of them), with string()'s checks in one
        loop over the bytes (a call per string made every run's start 0.1 s slower)."""
        data = memoryview(self.buf)
        out = []
        pos, size = self.pos, self.size
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
            n = int.from_bytes(data[pos : pos + 8], "little")
            if n > size - pos - 8:
                self.pos = pos + 8
                self.need(n, f"{what}[{i}]")
            try:
                out.append(str(data[pos + 8 : pos + 8 + n], "utf-8"))
            except UnicodeDecodeError as e:
                raise self.fail(f"{what}[{i}] is not valid UTF-8 ({e.reason})", pos) from None
            pos += 8 + n
        self.pos = pos
        return out

    def value_type(self, what: str) -> ValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(f"{what}: unknown metadata value type {raw}", at) from None

    def value(self, vt: ValueType, what: str, depth: int = 0) -> Typed:
        if vt is ValueType.STRING:
            return Typed(vt, self.string(what))
        if vt is not ValueType.ARRAY:
            return Typed(vt, self.scalar(vt, what))
        if depth >= MAX_NESTING:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_NESTING}")
        elem = self.value_type(f"{what} element type")
        at = self.pos
        count = self.u64(f"{what} element count")
        # Every element takes at least this many bytes, so the count is bounded by what is left.
        min_size = 8 if elem in (ValueType.STRING, ValueType.ARRAY) else SCALAR_DTYPES[elem].itemsize
        if count * min_size > self.size - self.pos:
            raise self.fail(f"{what}: array of {count} {elem.name} elements cannot fit in the {self.size - self.pos} bytes left", at)
        if elem in SCALAR_DTYPES:
            dtype = SCALAR_DTYPES[elem]
            arr = self.take(count * dtype.itemsize, what).view(dtype).copy()  # detached from the mapping
            if elem is ValueType.BOOL:
                if arr.size and arr.max() > 1:
                    raise self.fail(f"{what}: bool array holds a byte other than 0 or 1", at)
                arr = arr.astype(np.bool_)
            return Typed(vt, arr, elem)
        if elem is ValueType.STRING:
            return Typed(vt, self.strings(count, what), elem)
        return Typed(vt, [self.value(ValueType.ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)], elem)


class GGUFFile:
    """A GGUF file opened for reading: metadata, tensor infos and zero-copy tensor views.

    `metadata` maps keys to plain values (numbers, str, lists of str, numpy arrays for numeric
    arrays); `fields` keeps the same values with their GGUF types so they can be written back.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror}") from None
        if size < len(GGUF_MAGIC) + 4 + 8 + 8:
            raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header (truncated file?)")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:  # a directory, a device, no permission
            raise GGUFError(f"{self.path}: cannot open: {e.strerror}") from None
        self._mm = np.frombuffer(self._map, dtype=np.uint8)
        self.file_size = size
        cur = _Cursor(self._mm, str(self.path))
        self._parse(cur)

    # ----------------------------------------------------------------------------------- parsing
    def _parse(self, cur: _Cursor) -> None:
        magic = cur.take(4, "magic").tobytes()
        if magic != GGUF_MAGIC:
            raise cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file", 0)
        self.version = cur.u32("version")
        if self.version not in GGUF_SUPPORTED_VERSIONS:
            raise cur.fail(f"unsupported GGUF version {self.version} (supported: {GGUF_SUPPORTED_VERSIONS}; "
                           "a big-endian file also shows up this way)", 4)
        at = cur.pos
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # A key/value needs >= 12 bytes (length + type), a tensor info >= 24 (name length, n_dims, type, offset).
        if n_kv * 12 + n_tensors * 24 > cur.size - cur.pos:
            raise cur.fail(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in a {cur.size}-byte file", at)

        self.fields: dict[str, Typed] = {}
        for i in range(n_kv):
            key_at = cur.pos
            key = cur.string(f"metadata key #{i}", MAX_NAME_LENGTH)
            if key in self.fields:
                raise cur.fail(f"metadata key {key!r} appears twice", key_at)
            vt = cur.value_type(f"type of {key!r}")
            self.fields[key] = cur.value(vt, f"value of {key!r}")
        self.metadata: dict[str, Any] = {k: plain(v) for k, v in self.fields.items()}

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if Keys.ALIGNMENT in self.fields:
            field = self.fields[Keys.ALIGNMENT]
            a = field.value
            if field.type is not ValueType.UINT32 or not (0 < a <= GGUF_MAX_ALIGNMENT) or a & (a - 1):
                raise cur.fail(f"{Keys.ALIGNMENT} = {a!r} ({field.type.name}) must be a u32 power of two "
                               f"no larger than {GGUF_MAX_ALIGNMENT}")
            self.alignment = a

        infos: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            info_at = cur.pos
            name = cur.string(f"tensor #{i} name", MAX_NAME_LENGTH)
            if name in seen:
                raise cur.fail(f"tensor {name!r} appears twice", info_at)
            seen.add(name)
            n_dims = cur.u32(f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}", info_at)
            dims = [cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims)]
            type_at = cur.pos
            raw_type = cur.u32(f"tensor {name!r} type")
            try:
                ggml_type = GGMLType(raw_type)
            except ValueError:
                raise cur.fail(f"tensor {name!r} has unknown ggml type id {raw_type}", type_at) from None
            offset = cur.u64(f"tensor {name!r} offset")
            shape = tuple(reversed(dims))
            if any(d == 0 for d in dims) or math.prod(dims) > cur.size * TYPE_TRAITS[ggml_type].block_size:
                raise cur.fail(f"tensor {name!r} dims {dims} are empty or larger than the file could hold", info_at)
            try:
                nbytes = tensor_nbytes(shape, ggml_type)
            except ValueError as e:
                raise cur.fail(f"tensor {name!r}: {e}", info_at) from None
            if offset % self.alignment:
                raise cur.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {self.alignment}", info_at)
            infos.append((name, shape, ggml_type, offset, nbytes))

        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0  # as llama.cpp's loader: each tensor starts where the one before it ends, padded
        for name, shape, ggml_type, offset, nbytes in infos:
            if offset != expected:
                raise GGUFError(f"{self.path}: tensor {name!r} has data offset {offset}, expected {expected}: tensors "
                                f"must follow each other in order without overlap (corrupt or hostile file)")
            expected += -(-nbytes // self.alignment) * self.alignment
            start = self.data_offset + offset
            if start + nbytes > self.file_size:
                raise GGUFError(f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) runs past the end "
                                f"of the file ({self.file_size} bytes): truncated file?")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
        log.debug("%s: GGUF v%d, %d tensors, %d keys", self.path, self.version, len(self.tensors), len(self.fields))

    # ------------------------------------------------------------------------------------ access
    def tensor(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of a tensor's stored data.

        F32/F16/F64/ints: their dtype and shape. BF16: uint16 bits. Quantized: uint8 of shape
        (*rows, row_bytes), raw blocks as stored.
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        raw = self._mm[info.offset : info.offset + info.nbytes]
        if info.ggml_type in PLAIN_DTYPES:
            return raw.view(PLAIN_DTYPES[info.ggml_type]).reshape(info.shape)
        return raw.reshape(*info.shape[:-1], -1)

    def populate(self, name: str) -> None:
        """Map a tensor's pages into this process in one call (Linux MADV_POPULATE_READ), for a caller
        about to read all of it: a page fault per 4 KiB page costs several times as much here
        (1.1 GB from the page cache: 0.11 s populated, 0.49 s faulted). Elsewhere, or on kernels
        before 5.14, nothing happens and the pages fault in as they are read."""
        info = self.tensors[name]
        if self._map is None or sys.platform != "linux" or info.nbytes == 0:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._map.madvise(getattr(mmap, "MADV_POPULATE_READ", _LINUX_MADV_POPULATE_READ), start,
                              info.offset + info.nbytes - start)
        except OSError:
            pass

    def release(self, name: str) -> None:
        """Tell the OS this process is done with a tensor's pages (they stay in the page cache).

        Streaming tools call it after each tensor so a file larger than RAM is not all resident.
        """
        info = self.tensors[name]
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get(Keys.ARCHITECTURE)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        """Drop the mapping; it is unmapped once no tensor view still refers to it."""
        self._mm = None
        self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
