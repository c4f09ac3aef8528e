"""SentencePiece's precompiled normalization map (NormalizerSpec.precompiled_charsmap).

SentencePiece models trained with a normalization rule such as nmt_nfkc carry the rule compiled
into a blob: u32 little-endian trie size, a Darts-clone double-array trie over UTF-8 byte
strings, then the replacement strings, NUL-terminated, that the trie's values point into.
sentencepiece replaces the longest matching prefix at every position; so does this module, so
normalization matches it exactly where unicodedata's NFKC would only come close.
"""
from __future__ import annotations

import struct

import numpy as np

from .base import TokenizerError

__all__ = ["CharsMap"]


class CharsMap:
    """Longest-prefix replacement over UTF-8 bytes, read from a precompiled_charsmap blob."""

    def __init__(self, blob: bytes):
        blob = bytes(blob)
        if len(blob) < 4:
            raise TokenizerError(f"precompiled_charsmap of {len(blob)} bytes is too short for its header")
        (trie_size,) = struct.unpack_from("<I", blob, 0)
        if trie_size % 4 or 4 + trie_size > len(blob):
            raise TokenizerError(
                f"precompiled_charsmap: trie of {trie_size} bytes does not fit the {len(blob)}-byte blob"
            )
        # Python ints index faster than numpy scalars in the per-byte walk below.
        self._units: list[int] = np.frombuffer(blob, "<u4", trie_size // 4, 4).tolist()
        self._strings = blob[4 + trie_size :]

    def match(self, data: bytes, pos: int) -> tuple[int, str] | None:
        """(length, replacement) of the longest rule matching data[pos:], or None."""
        units = self._units
        n_units = len(units)
        if not n_units:
            return None
        unit = units[0]
        node = _offset(unit)
        best = None
        for i in range(pos, len(data)):
            c = data[i]
            if c == 0:
                break
            node ^= c
            if node >= n_units:
                break
            unit = units[node]
            if unit & 0x800000FF != c:  # label mismatch: no rule continues with this byte
                break
            node ^= _offset(unit)
            if (unit >> 8) & 1 and node < n_units:  # a rule ends here; its value is in the leaf
                best = (i + 1 - pos, units[node] & 0x7FFFFFFF)
        if best is None:
            return None
        length, value = best
        end = self._strings.find(b"\0", value)
        raw = self._strings[value : end if end >= 0 else len(self._strings)]
        return length, raw.decode("utf-8", "replace")


def _offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)
