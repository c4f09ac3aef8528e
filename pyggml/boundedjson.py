"""JSON from untrusted files, parsed within a size and a nesting-depth limit.

`json.loads` recurses once per level of nesting: 200,000 `[` end in RecursionError (or, with a raised
recursion limit, a crashed interpreter). The depth is measured before parsing, without recursion.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

_CHUNK = 1 << 24


class JSONLimitError(ValueError):
    """The JSON text is larger or nested deeper than allowed."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings not counted)."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    # Escapes first (\\ before \", as a parser reads them left to right), then every remaining quote
    # opens or closes a string: the even pieces between quotes are what lies outside strings.
    bare = b"".join(data.replace(b"\\\\", b"__").replace(b'\\"', b"__").split(b'"')[0::2])
    deepest = level = 0
    for start in range(0, len(bare), _CHUNK):
        a = np.frombuffer(bare, np.uint8, count=min(_CHUNK, len(bare) - start), offset=start)
        steps = ((a == ord("[")) | (a == ord("{"))).astype(np.int8) - ((a == ord("]")) | (a == ord("}")))
        levels = np.cumsum(steps, dtype=np.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def loads(data: bytes | str, max_bytes: int, max_depth: int) -> Any:
    """Parse `data`; JSONLimitError when it exceeds `max_bytes` or `max_depth`, and ValueError
    (json.JSONDecodeError, UnicodeDecodeError) when it is not UTF-8 JSON."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise JSONLimitError(f"{len(data):,} bytes of JSON, more than the {max_bytes:,} allowed")
    if data.count(b"[") + data.count(b"{") > max_depth:  # else it cannot be nested deeper
        depth = json_depth(data)
        if depth > max_depth:
            raise JSONLimitError(f"JSON nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(data)
    except RecursionError:  # not reached after the depth check; kept so that no parse ever raises it
        raise JSONLimitError("JSON nested too deeply") from None
