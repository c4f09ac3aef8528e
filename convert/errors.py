"""The converter's error type, and the JSON reading that raises it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
