"""The converter's error type, and the JSON reading that raises it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pyggml.boundedjson import loads as bounded_json_loads

# Limits on the JSON files of a checkpoint: far beyond any real one (tokenizer.json files of 256k
# vocabularies are ~35 MB; none nests deeper than ~8), small enough that a hostile one cannot exhaust
# memory or the parser's recursion.
MAX_JSON_BYTES = 256 << 20
MAX_JSON_DEPTH = 64


class ConversionError(ValueError):
    """A model directory cannot be converted: a file is missing, malformed or unsupported.

    The message names the file (and tensor, where there is one) and what was expected.
    """


def read_json_object(path: Path, required: bool = False) -> dict[str, Any]:
    """A JSON file holding one object; {} when it is absent and not `required`."""
    if not path.is_file():
        if required:
            raise ConversionError(f"{path.parent}: expected {path.name} at {path}, which does not exist")
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Any JSON file, parsed within MAX_JSON_DEPTH and `max_bytes`; ConversionError naming the file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConversionError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a JSON file may have")
        return bounded_json_loads(path.read_bytes(), max_bytes, MAX_JSON_DEPTH)
    except (OSError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{path}: cannot read JSON: {e}") from None
