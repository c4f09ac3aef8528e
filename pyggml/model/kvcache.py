"""The KV cache: preallocated per layer, in memory-mapped storage (anonymous, or a named file).

It holds `n_seq` sequences (slots) of `n_ctx` positions each: a server decodes several sequences in one
forward pass, each attending to its own slot; `Llama` uses one. The cache owns its layout and its
writes (`write`); the model only says which token of which sequence goes where.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..backends import Backend
from .config import LlamaConfig
from .kvtypes import KVType, kv_type


class KVCache:
    """Keys and values of every layer: layer i of slot s holds k and v of shape (n_kv_heads, n_ctx,
    width), on layer i's backend, each row one head at one position stored as its KV type says
    (kvtypes.py: float32 / float16 head_dim wide, or ggml's q8_0 / q4_0 blocks as bytes). A backend's
    layers share one K array (layers, n_seq, n_kv_heads, n_ctx, width_k) and one V array, so every slot
    of every layer is contiguous. On the CPU the storage is an np.memmap of `path` when given (one file
    per backend kind), else an anonymous mapping."""

    def __init__(self, config: LlamaConfig, n_ctx: int, backends: Sequence[Backend], path: str | os.PathLike | None = None,
                 n_seq: int = 1, type_k: str | KVType = "f32", type_v: str | KVType = "f32"):
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_seq <= 0:
            raise ValueError(f"n_seq must be positive, got {n_seq}")
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.config = config
        self.type_k, self.type_v = kv_type(type_k), kv_type(type_v)
        hd = config.head_dim
        widths = (self.type_k.row_width(hd), self.type_v.row_width(hd))  # KVTypeError before any allocation
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(backends):
            groups.setdefault(id(b), []).append(i)
        self._storage = {}
        for key, layer_ids in groups.items():
            b = backends[layer_ids[0]]
            parts = [((len(layer_ids), n_seq, config.n_kv_heads, n_ctx, w), t.dtype)
                     for w, t in zip(widths, (self.type_k, self.type_v))]
            file = path if path is not None and b.name == "cpu" else None
            self._storage[key] = (b, b.kv_storage(parts, file), layer_ids)
        index = {}
        for b, (ks, vs), layer_ids in self._storage.values():
            for j, li in enumerate(layer_ids):
                index[li] = (b, ks, vs, j)
        self._index = [index[i] for i in range(config.n_layers)]

    @property
    def types(self) -> tuple[KVType, KVType]:
        return self.type_k, self.type_v

    @property
    def type_names(self) -> tuple[str, str]:
        """(keys, values) type names, as sessions and states record them."""
        return self.type_k.name, self.type_v.name

    def bytes_per_token(self) -> int:
        """KV bytes one position of one sequence takes, over every layer."""
        cfg = self.config
        return cfg.n_layers * cfg.n_kv_heads * (self.type_k.row_bytes(cfg.head_dim) + self.type_v.row_bytes(cfg.head_dim))

    def layer(self, i: int, seq: int = 0):
        """(k, v) of layer i in slot seq: (n_kv_heads, n_ctx, width) each, as stored."""
        _, ks, vs, j = self._index[i]
        return ks[j, seq], vs[j, seq]

    def slots(self, i: int):
        """(k, v) of layer i for every slot: (n_seq, n_kv_heads, n_ctx, width) each, as stored."""
        _, ks, vs, j = self._index[i]
        return ks[j], vs[j]

    def write_tokens(self, i: int, seqs, positions, k, v) -> None:
        """Store token t's k, v (n_tok, n_kv_heads, head_dim; float32) of layer i at positions[t] of slot
        seqs[t] (index arrays on the layer's backend), encoded as the cache's types."""
        b, ks, vs, j = self._index[i]
        b.kv_write(ks[j], self.type_k, k, seqs, positions)
        b.kv_write(vs[j], self.type_v, v, seqs, positions)

    def slot(self, seq: int) -> "KVSlot":
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"slot {seq} out of range [0, {self.n_seq})")
        return KVSlot(self, seq)

    def storage(self, i: int):
        """The array that holds layer i's keys (allocated once, never moved)."""
        return self._index[i][1]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for _, (k, v), _ in self._storage.values())


class KVSlot:
    """One sequence's view of a KVCache: what sessions and state snapshots read and write."""

    def __init__(self, cache: KVCache, seq: int):
        self.cache, self.seq = cache, seq
        self.n_ctx, self.config = cache.n_ctx, cache.config

    def layer(self, i: int):
        return self.cache.layer(i, self.seq)

    @property
    def types(self):
        return self.cache.types

    @property
    def type_names(self) -> tuple[str, str]:
        return self.cache.type_names

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes // self.cache.n_seq
