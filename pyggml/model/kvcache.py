"""The KV cache: preallocated per layer, in memory-mapped storage (anonymous, or a named file)."""
from __future__ import annotations

import os
from typing import Sequence

from ..backends import Backend
from .config import LlamaConfig


class KVCache:
    """Keys and values of every layer: layer i holds k, v of shape (n_kv_heads, n_ctx, head_dim),
    float32, on layer i's backend. On the CPU the storage is an np.memmap of `path` when given
    (one file per backend kind), else an anonymous mapping."""

    def __init__(self, config: LlamaConfig, n_ctx: int, backends: Sequence[Backend], path: str | os.PathLike | None = None):
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        self.config = config
        self._layers = []
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(backends):
            groups.setdefault(id(b), []).append(i)
        self._storage = {}
        for key, layer_ids in groups.items():
            b = backends[layer_ids[0]]
            shape = (len(layer_ids), 2, config.n_kv_heads, n_ctx, config.head_dim)
            file = None
            if path is not None and b.name == "cpu":
                file = path
            self._storage[key] = (b, b.kv_storage(shape, file), layer_ids)
        index = {}
        for b, store, layer_ids in self._storage.values():
            for j, li in enumerate(layer_ids):
                index[li] = (store, j)
        self._index = [index[i] for i in range(config.n_layers)]

    def layer(self, i: int):
        store, j = self._index[i]
        return store[j, 0], store[j, 1]

    def storage(self, i: int):
        """The array that holds layer i's keys and values (allocated once, never moved)."""
        return self._index[i][0]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s, _ in self._storage.values())
