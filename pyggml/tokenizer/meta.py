"""Typed reads of the tokenizer.ggml.* keys: a file's metadata is untrusted, so a key that is
present must have the type and range its role needs, or the read raises TokenizerError naming it."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import TokenizerError

__all__ = ["string_list", "number_list", "token_id", "flag", "string"]


def _bad(key: str, value: Any, expected: str) -> TokenizerError:
    shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
    return TokenizerError(f"GGUF metadata {key} is {shown}, expected {expected}")


def string_list(meta: Mapping[str, Any], key: str) -> list[str] | None:
    """A list of strings, or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(key, value, "an array of strings")
    return list(value)


def number_list(meta: Mapping[str, Any], key: str, n: int, integral: bool) -> np.ndarray | None:
    """An array of n finite numbers (integers when `integral`), or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iuf":
        raise _bad(key, value, f"an array of {n} numbers")
    if len(value) != n:
        raise TokenizerError(f"GGUF metadata {key} has {len(value)} entries for {n} tokens")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise TokenizerError(f"GGUF metadata {key} holds a non-finite number")
    if integral and value.dtype.kind == "f":
        raise _bad(key, value, "an array of integers")
    return value


def token_id(meta: Mapping[str, Any], key: str, n_vocab: int, default: int | None = None) -> int | None:
    """A token id in [0, n_vocab), `default` when absent."""
    value = meta.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise _bad(key, value, "a token id")
    if not 0 <= value < n_vocab:
        raise TokenizerError(f"GGUF metadata {key} = {int(value)} is outside the vocabulary of {n_vocab} tokens")
    return int(value)


def flag(meta: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    """A boolean (or 0 / 1), `default` when absent."""
    value = meta.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise _bad(key, value, "a boolean")


def string(meta: Mapping[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(key, value, "a string")
    return value
