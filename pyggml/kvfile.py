"""A KV cache backed by a named file (`--kv-file`), made safe to point anywhere.

The file starts with pyggml's own header: magic, version, and the shape and element type of each
array the cache holds (keys, values; each starts on a page boundary). An absent path is created (never over an existing file, and only when the disk has
room for it); an existing one is reused only when it carries that header for the same shape, so a
mistyped path (the model file, a document) is refused and never truncated or overwritten.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import numpy as np

MAGIC = b"PYGGMLKV"
VERSION = 2  # 2: several arrays (keys and values of their own types)
HEADER_BYTES = 4096  # the data starts on a page boundary
DISK_MARGIN = 256 << 20  # free space left after the file is made


class KVFileError(OSError):
    """A --kv-file path cannot be used for this cache."""


def _header(parts: list[tuple[tuple[int, ...], np.dtype]]) -> bytes:
    desc = json.dumps({"parts": [{"shape": list(shape), "dtype": np.dtype(dtype).str} for shape, dtype in parts]},
                      sort_keys=True).encode()
    head = MAGIC + struct.pack("<II", VERSION, len(desc)) + desc
    if len(head) > HEADER_BYTES:
        raise KVFileError(f"a KV cache of {len(parts)} arrays does not fit the file header")
    return head + bytes(HEADER_BYTES - len(head))


def _page(n: int) -> int:
    return -(-n // HEADER_BYTES) * HEADER_BYTES


def open_kv_file(path: str | os.PathLike, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """One array of `shape` mapped from `path` (see open_kv_parts)."""
    return open_kv_parts(path, [(tuple(shape), dtype)])[0]


def open_kv_parts(path: str | os.PathLike, parts: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Writable arrays of the (shape, dtype) `parts` mapped from `path` (created, or reused when it is
    pyggml's KV file of these parts); KVFileError naming the path otherwise."""
    path = Path(path)
    header = _header(parts)
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in parts]
    offsets = [HEADER_BYTES + sum(_page(n) for n in sizes[:i]) for i in range(len(sizes))]
    nbytes = offsets[-1] + sizes[-1] - HEADER_BYTES if parts else 0
    if path.exists():
        try:
            with open(path, "rb") as f:
                found = f.read(HEADER_BYTES)
            size = path.stat().st_size
        except OSError as e:
            raise KVFileError(f"{path}: cannot read it to check it is a KV cache file: {e.strerror}") from None
        if not found.startswith(MAGIC):
            raise KVFileError(f"{path}: exists and is not a pyggml KV cache file; refusing to overwrite it "
                              f"(give a new path, or remove the file yourself)")
        if found != header or size != HEADER_BYTES + nbytes:
            raise KVFileError(f"{path}: is a pyggml KV cache file for another model, context size or cache type; refusing to "
                              f"reuse it (give a new path, or remove the file yourself)")
        fd = os.open(path, os.O_RDWR)
    else:
        try:
            free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
        except OSError as e:
            raise KVFileError(f"{path}: cannot check the free space of its folder: {e.strerror}") from None
        if HEADER_BYTES + nbytes + DISK_MARGIN > free:
            raise KVFileError(f"{path}: the KV cache needs {nbytes / 2**30:.2f} GiB but its disk has {free / 2**30:.2f} "
                              f"GiB free; use a smaller context or another folder")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise KVFileError(f"{path}: cannot create it: {e.strerror}") from None
        try:
            os.write(fd, header)
            os.ftruncate(fd, HEADER_BYTES + nbytes)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise KVFileError(f"{path}: cannot size it to {HEADER_BYTES + nbytes} bytes: {e.strerror}") from None
    try:
        buf = mmap.mmap(fd, HEADER_BYTES + nbytes, access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)
    return [np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)
            for (shape, dtype), off in zip(parts, offsets)]
