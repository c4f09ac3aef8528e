"""Saved sessions: the tokens in the KV cache, their keys/values and the last logits, so a
conversation resumes without re-processing its prompt.

File layout (little-endian): magic, u32 version, u64 JSON header length, JSON header
(fingerprint, n_ctx, tokens), then for each layer k[:, :n] and v[:, :n] as float32, then the
last logits (n_vocab float32). Untrusted like any input: sizes are checked before reading.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .gguf.reader import GGUFFile
from .gguf.writer import atomic_output
from .model.config import LlamaConfig
from .model.kvcache import KVCache

MAGIC = b"PYGGMLSS"
VERSION = 1
MAX_HEADER = 64 << 20


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
                         "has_logits": logits is not None, "extra": extra or {}}).encode()
    with atomic_output(path) as out:
        out.write(MAGIC + struct.pack("<IQ", VERSION, len(header)) + header)
        for li in range(cache.config.n_layers):
            for part in cache.layer(li):
                out.write(np.ascontiguousarray(to_host(part[:, :n]), dtype=np.float32).tobytes())
        if logits is not None:
            out.write(np.ascontiguousarray(logits, dtype=np.float32).tobytes())


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
        if version != VERSION:
            raise SessionError(f"{path}: session format version {version}, expected {VERSION}")
        if hlen > min(MAX_HEADER, size):
            raise SessionError(f"{path}: header length {hlen} is larger than the file")
        try:
            header = json.loads(f.read(hlen))
            tokens = [int(t) for t in header["tokens"]]
            n_ctx, saved_fp, has_logits = int(header["n_ctx"]), str(header["fingerprint"]), bool(header["has_logits"])
            extra = dict(header.get("extra") or {})
        except (ValueError, KeyError, TypeError) as e:
            raise SessionError(f"{path}: corrupt session header ({e})") from None
        if saved_fp != fingerprint:
            raise SessionError(f"{path}: the session was saved with another model")
        if n_ctx != cache.n_ctx:
            raise SessionError(f"{path}: the session was saved with a context of {n_ctx} tokens, this one has {cache.n_ctx}")
        n = len(tokens)
        if n > cache.n_ctx or any(not 0 <= t < cfg.n_vocab for t in tokens):
            raise SessionError(f"{path}: corrupt token list")
        per_part = cfg.n_kv_heads * n * cfg.head_dim
        expected = len(MAGIC) + 12 + hlen + 4 * (2 * cfg.n_layers * per_part + (cfg.n_vocab if has_logits else 0))
        if size != expected:
            raise SessionError(f"{path}: {size} bytes, expected {expected} for {n} tokens (truncated or corrupt)")
        for li in range(cfg.n_layers):
            for part in cache.layer(li):
                data = np.frombuffer(f.read(4 * per_part), dtype=np.float32).reshape(cfg.n_kv_heads, n, cfg.head_dim)
                part[:, :n] = to_device(data)
        logits = np.frombuffer(f.read(4 * cfg.n_vocab), dtype=np.float32).copy() if has_logits else None
    return tokens, logits, extra
