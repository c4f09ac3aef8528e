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


class KVCache:
    """Keys and values of every layer: layer i of slot s holds k, v of shape (n_kv_heads, n_ctx, head_dim),
    float32, on layer i's backend. A backend's layers share one array (layers, 2, n_seq, n_kv_heads,
    n_ctx, head_dim), so every slot of every layer is contiguous. On the CPU the storage is an np.memmap
    of `path` when given (one file per backend kind), else an anonymous mapping."""

    def __init__(self, config: LlamaConfig, n_ctx: int, backends: Sequence[Backend], path: str | os.PathLike | None = None,
                 n_seq: int = 1):
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_seq <= 0:
            raise ValueError(f"n_seq must be positive, got {n_seq}")
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.config = config
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(backends):
            groups.setdefault(id(b), []).append(i)
        self._storage = {}
        for key, layer_ids in groups.items():
            b = backends[layer_ids[0]]
            shape = (len(layer_ids), 2, n_seq, config.n_kv_heads, n_ctx, config.head_dim)
            file = None
            if path is not None and b.name == "cpu":
                file = path
            self._storage[key] = (b, b.kv_storage(shape, file), layer_ids)
        index = {}
        for b, store, layer_ids in self._storage.values():
            for j, li in enumerate(layer_ids):
                index[li] = (store, j)
        self._index = [index[i] for i in range(config.n_layers)]

    def layer(self, i: int, seq: int = 0):
        """(k, v) of layer i in slot seq: (n_kv_heads, n_ctx, head_dim) each."""
        store, j = self._index[i]
        return store[j, 0, seq], store[j, 1, seq]

    def write(self, i: int, seq: int, start: int, k, v) -> None:
        """Store k, v (n_tok, n_kv_heads, head_dim) of layer i at positions start.. of slot seq."""
        store, j = self._index[i]
        n = k.shape[0]
        store[j, 0, seq, :, start : start + n] = k.transpose(1, 0, 2)
        store[j, 1, seq, :, start : start + n] = v.transpose(1, 0, 2)

    def slots(self, i: int):
        """(k, v) of layer i for every slot: (n_seq, n_kv_heads, n_ctx, head_dim) each."""
        store, j = self._index[i]
        return store[j, 0], store[j, 1]

    def write_tokens(self, i: int, seqs, positions, k, v) -> None:
        """Store token t's k, v (n_tok, n_kv_heads, head_dim) of layer i at positions[t] of slot seqs[t]
        (index arrays on the layer's backend): one scatter for a batch of many sequences."""
        store, j = self._index[i]
        store[j, 0][seqs, :, positions] = k
        store[j, 1][seqs, :, positions] = v

    def slot(self, seq: int) -> "KVSlot":
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"slot {seq} out of range [0, {self.n_seq})")
        return KVSlot(self, seq)

    def storage(self, i: int):
        """The array that holds layer i's keys and values (allocated once, never moved)."""
        return self._index[i][0]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s, _ in self._storage.values())


class KVSlot:
    """One sequence's view of a KVCache: what sessions and state snapshots read and write."""

    def __init__(self, cache: KVCache, seq: int):
        self.cache, self.seq = cache, seq
        self.n_ctx, self.config = cache.n_ctx, cache.config

    def layer(self, i: int):
        return self.cache.layer(i, self.seq)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes // self.cache.n_seq
