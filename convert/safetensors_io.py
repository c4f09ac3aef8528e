"""Lazy, torch-free reading of (sharded) safetensors checkpoints.

A safetensors file is a u64 little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the data section. Files are treated as untrusted: every
length and offset is checked against the file size before use. Nothing is read until a
tensor's `load()` is called, and then only as a view into a memory map.
"""
from __future__ import annotations

import logging
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyggml.boundedjson import loads as bounded_json_loads

from .errors import MAX_JSON_DEPTH, ConversionError, read_json

log = logging.getLogger(__name__)

__all__ = ["LazyTensor", "read_safetensors_header", "open_checkpoint", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

HEADER_LENGTH_BYTES = 8  # u64 little-endian
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

# Element sizes of every safetensors dtype, so any valid file parses; LOADABLE are those we can load.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
LOADABLE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # bf16 as raw bits


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, not yet read. `shape` is numpy order (as stored)."""

    name: str
    path: Path
    dtype: str  # safetensors dtype name: 'F32', 'F16', 'BF16', ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int

    def load(self, float32: bool = False) -> np.ndarray:
        """The data as a read-only memory-mapped array (BF16 as uint16 bits), or as float32."""
        dtype = LOADABLE.get(self.dtype)
        if dtype is None:
            raise ConversionError(
                f"{self.path}: tensor {self.name!r} has dtype {self.dtype}; "
                f"only {', '.join(LOADABLE)} weights can be converted"
            )
        if self.nbytes == 0:
            raw = np.empty(self.shape, dtype=dtype)
        else:
            raw = np.memmap(self.path, mode="r", dtype=dtype, offset=self.offset, shape=self.shape)
        if not float32:
            return raw
        if self.dtype == "BF16":
            return bf16_bits_to_f32(raw)
        return raw.astype(np.float32, copy=False)


def _header_error(path: Path, what: str) -> ConversionError:
    return ConversionError(f"{path}: not a valid safetensors file: {what}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Parse and validate the header of one safetensors file; return its tensors, unread."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below forever; a device never ends
            raise ConversionError(f"{path}: not a regular file, so not a safetensors file")
        file_size = st.st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_LENGTH_BYTES)
            if len(head) < HEADER_LENGTH_BYTES:
                raise _header_error(path, f"file is {file_size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + n > file_size:
                raise _header_error(
                    path, f"header length {n} runs past the end of the file ({file_size} bytes)"
                    if HEADER_LENGTH_BYTES + n > file_size else f"header length {n} exceeds {MAX_HEADER_BYTES}"
                )
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read safetensors file: {e}") from e
    try:
        header = bounded_json_loads(raw, MAX_HEADER_BYTES, MAX_JSON_DEPTH)
    except ValueError as e:  # not UTF-8, not JSON, or nested too deeply
        raise _header_error(path, f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")

    data_start = HEADER_LENGTH_BYTES + n
    data_size = file_size - data_start
    tensors: dict[str, LazyTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _parse_entry(path, name, entry, data_start, data_size)
    _check_extents(path, tensors, data_start)
    return tensors


def _check_extents(path: Path, tensors: dict[str, LazyTensor], data_start: int) -> None:
    """No two tensors' bytes may overlap (the safetensors library refuses such files too)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, name), (begin, _, next_name) in zip(spans, spans[1:]):
        if begin < end:
            raise _header_error(path, f"the data of tensors {name!r} and {next_name!r} overlap "
                                      f"(bytes {begin - data_start}..{end - data_start} of the data section)")


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> LazyTensor:
    def bad(what: str) -> ConversionError:
        return ConversionError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] fall outside the {data_size}-byte data section (file truncated?)")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise bad(f"data_offsets [{begin}, {end}] span {end - begin} bytes; shape {shape} of {dtype} needs {nbytes}")
    return LazyTensor(name, path, dtype, tuple(shape), data_start + begin, nbytes)


def open_checkpoint(model_dir: str | os.PathLike) -> dict[str, LazyTensor]:
    """All tensors of a HF model directory: `model.safetensors`, or the shards its index names.

    Without either, any `*.safetensors` files in the directory are read together.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        return _open_sharded(index_path)
    if (model_dir / SINGLE_FILE).is_file():
        return read_safetensors_header(model_dir / SINGLE_FILE)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pth"))
        hint = f" (found {', '.join(others)}: re-save the model with safetensors)" if others else ""
        raise ConversionError(f"{model_dir}: no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards{hint}")
    return _merge({f: read_safetensors_header(f) for f in files})


def _merge(per_file: dict[Path, dict[str, LazyTensor]]) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for path, part in per_file.items():
        for name, t in part.items():
            if name in tensors:
                raise ConversionError(f"tensor {name!r} appears in both {tensors[name].path} and {path}")
            tensors[name] = t
    return tensors


def _open_sharded(index_path: Path) -> dict[str, LazyTensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index_path}: expected a \"weight_map\" object of tensor name -> shard file name")

    shard_names = sorted(set(weight_map.values()))
    shards: dict[Path, dict[str, LazyTensor]] = {}
    for shard in shard_names:
        shard_path = index_path.parent / shard
        if Path(shard).name != shard:
            raise ConversionError(f"{index_path}: shard {shard!r} is not a plain file name in the model directory")
        if not shard_path.is_file():
            raise ConversionError(f"{index_path}: names shard {shard}, expected at {shard_path}, which does not exist")
        shards[shard_path] = read_safetensors_header(shard_path)

    tensors: dict[str, LazyTensor] = {}
    for name, shard in weight_map.items():
        found = shards[index_path.parent / shard].get(name)
        if found is None:
            raise ConversionError(f"{index_path}: tensor {name!r} should be in {shard}, but that shard lacks it")
        tensors[name] = found
    unlisted = sorted(n for part in shards.values() for n in part if n not in weight_map)
    if unlisted:
        log.warning("%s: shards hold tensors the index does not list, ignored: %s", index_path, ", ".join(unlisted))
    return tensors
