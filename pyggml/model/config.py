"""Hyperparameters of a LLaMA-family model, read from GGUF metadata alone."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..gguf.constants import Keys
from .archs import ARCHITECTURES, Arch

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
ROPE_SCALING_TYPES = ("none", "linear")  # {arch}.rope.scaling.type values pyggml computes


class ModelError(ValueError):
    """A GGUF file does not describe a model pyggml can run."""


# Bounds of each hyperparameter, checked before anything is sized from it: far beyond any real model,
# small enough that a hostile file cannot make pyggml allocate without limit (llama.cpp caps layers at 512).
LIMITS: dict[str, tuple[float, float]] = {
    Keys.BLOCK_COUNT: (1, 512),
    Keys.EMBEDDING_LENGTH: (1, 1 << 17),
    Keys.FEED_FORWARD_LENGTH: (1, 1 << 20),
    Keys.HEAD_COUNT: (1, 1 << 12),
    Keys.HEAD_COUNT_KV: (1, 1 << 12),
    Keys.KEY_LENGTH: (2, 1 << 12),
    Keys.VALUE_LENGTH: (2, 1 << 12),
    Keys.ROPE_DIMENSION_COUNT: (2, 1 << 12),
    Keys.CONTEXT_LENGTH: (1, 1 << 24),
    Keys.VOCAB_SIZE: (1, 1 << 22),
    Keys.ROPE_FREQ_BASE: (1e-3, 1e12),
    Keys.RMS_EPS: (1e-12, 0.1),
    Keys.ROPE_SCALING_FACTOR: (1e-3, 1e6),
}


def metadata_number(meta: Mapping[str, Any], key: str, arch: str, default: Any = None, kind: type = int,
                    source: str = "model") -> Any:
    """The number at `key` ({arch} filled in), of type `kind`, finite, integral for ints and inside
    LIMITS[key]; ModelError naming the key otherwise. `default` when absent (None: required)."""
    full = Keys.arch(key, arch)
    value = meta.get(full, default)
    if value is None:
        raise ModelError(f"{source}: metadata key {full!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
        raise ModelError(f"{source}: metadata key {full!r} is {shown}, expected a number")
    if not math.isfinite(value) or (kind is int and value != int(value)):
        raise ModelError(f"{source}: metadata key {full!r} is {value!r}, expected {'an integer' if kind is int else 'a finite number'}")
    lo, hi = LIMITS.get(key, (-math.inf, math.inf))
    if not lo <= value <= hi:
        raise ModelError(f"{source}: metadata key {full!r} is {value!r}, outside [{lo:g}, {hi:g}]")
    return kind(value)


@dataclass(frozen=True)
class LlamaConfig:
    n_vocab: int
    dim: int  # embedding length
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_ctx_train: int
    rope_dim: int  # dimensions of each head that RoPE rotates
    rope_freq_base: float
    rms_eps: float
    arch: str = "llama"
    head_dim: int = 0  # attention.key_length; 0: dim // n_heads
    rope_linear_factor: float = 1.0  # rope.scaling.type "linear": positions are divided by this

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads if self.n_heads else 0)

    @property
    def architecture(self) -> Arch:
        return ARCHITECTURES[self.arch]

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> "LlamaConfig":
        arch = meta.get(Keys.ARCHITECTURE)
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"{source}: general.architecture is {arch!r}; pyggml runs {', '.join(SUPPORTED_ARCHITECTURES)}")

        def get(key: str, default: Any = None, kind: type = int) -> Any:
            return metadata_number(meta, key, arch, default, kind, source)

        n_heads = get(Keys.HEAD_COUNT)
        dim = get(Keys.EMBEDDING_LENGTH)
        tokens = meta.get(Keys.TOKENS)
        n_tokens = len(tokens) if isinstance(tokens, (list, tuple)) else None
        n_vocab = get(Keys.VOCAB_SIZE, n_tokens) if (Keys.arch(Keys.VOCAB_SIZE, arch) in meta or n_tokens) else None
        if n_vocab is None:
            raise ModelError(f"{source}: neither {Keys.arch(Keys.VOCAB_SIZE, arch)!r} nor {Keys.TOKENS!r} gives the vocabulary size")
        head_dim = get(Keys.KEY_LENGTH, dim // n_heads if n_heads else 0)
        if get(Keys.VALUE_LENGTH, head_dim) != head_dim:
            raise ModelError(f"{source}: {Keys.arch(Keys.VALUE_LENGTH, arch)!r} differs from the key length {head_dim}; "
                             f"pyggml needs them equal")
        scaling = meta.get(Keys.arch(Keys.ROPE_SCALING_TYPE, arch), "none")
        if not isinstance(scaling, str) or scaling not in ROPE_SCALING_TYPES:
            raise ModelError(f"{source}: {Keys.arch(Keys.ROPE_SCALING_TYPE, arch)!r} is {scaling!r}; pyggml computes "
                             f"{', '.join(ROPE_SCALING_TYPES)}")
        factor = get(Keys.ROPE_SCALING_FACTOR, 1.0, float) if scaling == "linear" else 1.0
        cfg = cls(
            arch=arch,
            head_dim=head_dim,
            rope_linear_factor=factor,
            n_vocab=int(n_vocab),
            dim=dim,
            n_layers=get(Keys.BLOCK_COUNT),
            n_heads=n_heads,
            n_kv_heads=get(Keys.HEAD_COUNT_KV, n_heads),
            ffn_dim=get(Keys.FEED_FORWARD_LENGTH),
            n_ctx_train=get(Keys.CONTEXT_LENGTH),
            rope_dim=get(Keys.ROPE_DIMENSION_COUNT, head_dim),
            rope_freq_base=get(Keys.ROPE_FREQ_BASE, 10000.0, float),
            rms_eps=get(Keys.RMS_EPS, 1e-5, float),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "model") -> None:
        for name in ("n_vocab", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ModelError(f"{source}: {name} = {getattr(self, name)} must be positive")
        if self.head_dim <= 0 or self.n_heads % self.n_kv_heads:
            raise ModelError(f"{source}: head_dim {self.head_dim}, {self.n_heads} heads and {self.n_kv_heads} KV heads "
                             f"do not divide evenly")
        if not self.rope_linear_factor > 0:
            raise ModelError(f"{source}: rope.scaling.factor {self.rope_linear_factor} must be positive")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ModelError(f"{source}: rope.dimension_count {self.rope_dim} must be even and at most head_dim {self.head_dim}")
