"""Saved sessions: the tokens in the KV cache, their keys/values and the last logits, so a
conversation resumes without re-processing its prompt.

File layout (little-endian): magic, u32 version, u64 JSON header length, JSON header
(fingerprint, n_ctx, tokens, has_logits, extra, type_k, type_v), then for each layer k[:, :n] and
v[:, :n] as the cache stores them (model/kvtypes.py; version 1 files hold float32), then the last logits
(n_vocab float32). Untrusted like any input: sizes are checked before
reading, the header is parsed within size and depth limits and every field's type is checked.
Saving writes a temp file beside the target and renames it into place; `check_writable` lets a
caller find out before a generation that the save would fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .boundedjson import loads as bounded_json_loads
from .gguf.reader import GGUFFile
from .gguf.writer import atomic_output
from .model.config import LlamaConfig
from .model.kvcache import KVCache

MAGIC = b"PYGGMLSS"
VERSION = 2  # 2: the KV cache types in the header, rows stored in them
MAX_HEADER = 64 << 20
MAX_HEADER_DEPTH = 32  # {extra: {messages: [{content: [{...}]}]}} is 6


class SessionError(ValueError):
    """A session file is malformed or belongs to another model or context size."""


def model_fingerprint(f: GGUFFile, config: LlamaConfig) -> str:
    """Identifies the weights: hyperparameters, tensor table, and a sample of the embedding bytes."""
    h = hashlib.sha256(json.dumps(config.__dict__, sort_keys=True).encode())
    for t in f:
        h.update(f"{t.name}:{t.ggml_type.name}:{t.shape}".encode())
    for name in ("token_embd.weight", "output_norm.weight"):
        if name in f.tensors:
            h.update(f.tensor(name).reshape(-1).view(np.uint8)[: 1 << 20].tobytes())
    return h.hexdigest()


def save_session(path: str | os.PathLike, fingerprint: str, cache: KVCache, tokens: list[int], logits: np.ndarray | None,
                 to_host, extra: dict | None = None) -> None:
    """`extra` is any JSON-able data the caller wants back (e.g. a chat history)."""
    n = len(tokens)
    header = json.dumps({"fingerprint": fingerprint, "n_ctx": cache.n_ctx, "tokens": [int(t) for t in tokens],
                         "has_logits": logits is not None, "extra": extra or {},
                         "type_k": cache.type_names[0], "type_v": cache.type_names[1]}).encode()
    with atomic_output(path) as out:
        out.write(MAGIC + struct.pack("<IQ", VERSION, len(header)) + header)
        for li in range(cache.config.n_layers):
            for part, t in zip(cache.layer(li), cache.types):
                out.write(np.ascontiguousarray(to_host(part[:, :n]), dtype=t.dtype).tobytes())
        if logits is not None:
            out.write(np.ascontiguousarray(logits, dtype=np.float32).tobytes())


def _header_fields(header: Any, path: Path) -> tuple[list[int], int, str, bool, dict]:
    """(tokens, n_ctx, fingerprint, has_logits, extra) of a parsed header, each of its JSON type."""
    def bad(what: str) -> SessionError:
        return SessionError(f"{path}: corrupt session header: {what}")

    if not isinstance(header, dict):
        raise bad(f"expected an object, found {type(header).__name__}")
    for key, kind, name in (("fingerprint", str, "a string"), ("n_ctx", int, "an integer"),
                            ("tokens", list, "a list"), ("has_logits", bool, "true or false")):
        if key not in header:
            raise bad(f"{key} is missing")
        if not isinstance(header[key], kind) or (kind is int and isinstance(header[key], bool)):
            raise bad(f"{key} is {type(header[key]).__name__}, expected {name}")
    tokens = header["tokens"]
    if not all(type(t) is int for t in tokens):
        raise bad("tokens must all be integers")
    extra = header.get("extra", {})
    if not isinstance(extra, dict):
        raise bad(f"extra is {type(extra).__name__}, expected an object")
    return tokens, header["n_ctx"], header["fingerprint"], header["has_logits"], extra


def session_messages(extra: dict, path: str | os.PathLike) -> list[dict[str, str]]:
    """The chat history a session's `extra` holds (`extra["messages"]`, as the CLI saves it): a list of
    {"role": str, "content": str}; SessionError naming the entry otherwise."""
    messages = extra.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise SessionError(f"{path}: extra.messages is {type(messages).__name__}, expected a list of messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SessionError(f"{path}: extra.messages[{i}] is not a {{\"role\": string, \"content\": string}} message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_writable(path: str | os.PathLike) -> None:
    """SessionError now if a session could not be saved at `path` later (so that a caller can say so
    before a generation rather than lose it after): `path` must not be a directory, and the directory
    it goes in must exist and take a new file, or be creatable."""
    path = Path(path)
    if path.is_dir():
        raise SessionError(f"{path}: is a directory; a session is saved as a file")
    parent = path.parent
    if parent.is_dir():
        try:  # the truest test: make the temp file the save will make (named so a stale one gets removed)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise SessionError(f"{path}: cannot save a session there: {e.strerror}") from None
        return
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SessionError(f"{path}: cannot save a session there: cannot create {parent} in {ancestor}")


def load_session(path: str | os.PathLike, fingerprint: str, cache: KVCache, to_device) -> tuple[list[int], np.ndarray | None, dict]:
    """Restore a session into `cache`; returns (tokens, last logits, extra)."""
    path = Path(path)
    cfg = cache.config
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise SessionError(f"{path}: cannot open session: {e.strerror}") from None
    with f:
        head = f.read(len(MAGIC) + 12)
        if len(head) < len(MAGIC) + 12 or head[: len(MAGIC)] != MAGIC:
            raise SessionError(f"{path}: not a pyggml session file")
        version, hlen = struct.unpack("<IQ", head[len(MAGIC):])
        if version not in (1, VERSION):
            raise SessionError(f"{path}: session format version {version}, expected {VERSION}")
        if hlen > min(MAX_HEADER, size):
            raise SessionError(f"{path}: header length {hlen} is larger than the file")
        try:
            header = bounded_json_loads(f.read(hlen), MAX_HEADER, MAX_HEADER_DEPTH)
        except ValueError as e:
            raise SessionError(f"{path}: corrupt session header ({e})") from None
        tokens, n_ctx, saved_fp, has_logits, extra = _header_fields(header, path)
        if saved_fp != fingerprint:
            raise SessionError(f"{path}: the session was saved with another model")
        if n_ctx != cache.n_ctx:
            raise SessionError(f"{path}: the session was saved with a context of {n_ctx} tokens, this one has {cache.n_ctx}")
        n = len(tokens)
        if n > cache.n_ctx or any(not 0 <= t < cfg.n_vocab for t in tokens):
            raise SessionError(f"{path}: corrupt token list")
        saved = ("f32", "f32") if version == 1 else (header.get("type_k"), header.get("type_v"))
        if saved != cache.type_names:
            raise SessionError(f"{path}: the session was saved with KV cache types {saved[0]}/{saved[1]} (keys/values); this "
                               f"context stores {'/'.join(cache.type_names)} (-ctk/-ctv)")
        widths = [t.row_width(cfg.head_dim) for t in cache.types]
        part_bytes = [cfg.n_kv_heads * n * w * t.dtype.itemsize for w, t in zip(widths, cache.types)]
        expected = len(MAGIC) + 12 + hlen + cfg.n_layers * sum(part_bytes) + (4 * cfg.n_vocab if has_logits else 0)
        if size != expected:
            raise SessionError(f"{path}: {size} bytes, expected {expected} for {n} tokens (truncated or corrupt)")
        for li in range(cfg.n_layers):
            for part, t, w, nb in zip(cache.layer(li), cache.types, widths, part_bytes):
                data = np.frombuffer(f.read(nb), dtype=t.dtype).reshape(cfg.n_kv_heads, n, w)
                part[:, :n] = to_device(data)
        logits = np.frombuffer(f.read(4 * cfg.n_vocab), dtype=np.float32).copy() if has_logits else None
    return tokens, logits, extra
