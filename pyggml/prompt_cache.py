"""In-memory context snapshots and the prefix cache built from them (llama-cpp-python's LlamaState,
LlamaRAMCache): a completion whose prompt starts like an earlier one restores that context instead
of processing the shared prefix again."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class LlamaState:
    """A context snapshot: the tokens in the KV cache, their keys/values, the next-token logits."""

    input_ids: np.ndarray          # (n_tokens,) int32
    scores: np.ndarray | None      # (n_vocab,) float32 logits after input_ids, or None
    n_tokens: int
    kv: list[tuple[np.ndarray, np.ndarray]]  # per layer: k, v (n_kv_heads, n_tokens, width) as the cache stores them
    seed: int | None
    fingerprint: str = ""          # the model it belongs to
    n_ctx: int = 0
    kv_types: tuple[str, str] = ("f32", "f32")  # the KV cache types of kv (model/kvtypes.py)

    @property
    def llama_state_size(self) -> int:
        """Bytes held (llama-cpp-python's name; the caches size themselves by it)."""
        return sum(k.nbytes + v.nbytes for k, v in self.kv) + self.input_ids.nbytes + (
            self.scores.nbytes if self.scores is not None else 0)


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BaseLlamaCache(ABC):
    """Maps token sequences to LlamaState; lookup returns the entry sharing the longest prefix."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def cache_size(self) -> int: ...

    @abstractmethod
    def __getitem__(self, key: Sequence[int]) -> LlamaState: ...

    @abstractmethod
    def __contains__(self, key: Sequence[int]) -> bool: ...

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None: ...


class LlamaRAMCache(BaseLlamaCache):
    """Least-recently-used snapshots in memory, up to capacity_bytes."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        super().__init__(capacity_bytes)
        self.cache_state: OrderedDict[tuple[int, ...], LlamaState] = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(s.llama_state_size for s in self.cache_state.values())

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_len = None, 0
        for k in self.cache_state:
            n = longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        k = self._find_longest_prefix_key(tuple(key))
        if k is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(k)
        return self.cache_state[k]

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(int(t) for t in key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and self.cache_state:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache  # llama-cpp-python's older name
