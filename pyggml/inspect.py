"""Human-readable summaries of a GGUF file: metadata (long arrays abbreviated) and tensor table."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .gguf.constants import ValueType
from .gguf.reader import GGUFFile
from .gguf.values import Typed
from .quant.registry import KERNEL_TYPE_CODES


MAX_NAME = 64  # columns shown of a key or tensor name (longer ones are cut with "...")
MAX_VALUE = 240  # characters shown of a value


def _safe(text: str, limit: int) -> str:
    """text with every non-printable character escaped (a file's names and strings must not reach
    the terminal raw: escape sequences can retitle or clear it), cut to `limit` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _format_value(v: Typed, max_items: int, depth: int = 0) -> str:
    if v.type is ValueType.STRING:
        return repr(v.value[:MAX_VALUE] + ("..." if len(v.value) > MAX_VALUE else ""))
    if v.type is not ValueType.ARRAY:
        return repr(v.value)
    if depth >= 2:
        return f"[... {len(v.value)} items]"
    items = list(v.value[:max_items]) if not isinstance(v.value, np.ndarray) else v.value[:max_items].tolist()
    if v.elem_type is ValueType.ARRAY:
        shown = [_format_value(x, max_items, depth + 1) for x in items]
    else:
        shown = [repr(x[:MAX_VALUE]) if isinstance(x, str) else repr(x) for x in items]
    more = f", ... ({len(v.value)} items)" if len(v.value) > max_items else ""
    return f"[{', '.join(shown)}{more}]"


def _type_name(v: Typed) -> str:
    if v.type is ValueType.ARRAY:
        return f"arr[{v.elem_type.name.lower()}]"
    return v.type.name.lower()


def metadata_lines(f: GGUFFile, max_items: int = 6) -> list[str]:
    width = min(MAX_NAME, max((len(k) for k in f.fields), default=0))
    return [f"{_safe(key, MAX_NAME):<{width}}  {_type_name(v):<12} {_safe(_format_value(v, max_items), MAX_VALUE)}"
            for key, v in f.fields.items()]


def tensor_lines(f: GGUFFile) -> list[str]:
    """The tensor table; a type pyggml cannot compute with is marked with a `*` and a note below."""
    width = min(MAX_NAME, max((len(t.name) for t in f), default=4))
    lines = [f"{'name':<{width}}  {'type':<8} {'shape':<18} {'bytes':>12}"]
    marked = set()
    for t in f:
        name = t.ggml_type.name
        if t.ggml_type not in KERNEL_TYPE_CODES:
            marked.add(name)
            name += "*"
        lines.append(f"{_safe(t.name, MAX_NAME):<{width}}  {name:<8} {str(list(t.shape)):<18} {t.nbytes:>12,}")
    if marked:
        lines.append(f"* pyggml can read but not compute with {', '.join(sorted(marked))}: a model using it does not load")
    return lines


def summary_lines(f: GGUFFile) -> list[str]:
    n_params = sum(t.n_elements for t in f)
    n_bytes = sum(t.nbytes for t in f)
    types = Counter(t.ggml_type.name for t in f)
    return [
        f"file:       {f.path} ({f.file_size:,} bytes)",
        f"format:     GGUF v{f.version}, alignment {f.alignment}, data at offset {f.data_offset}",
        f"tensors:    {len(f.tensors)} ({', '.join(f'{n} {t}' for t, n in types.most_common())})",
        f"parameters: {n_params:,} in {n_bytes:,} bytes ({8 * n_bytes / max(n_params, 1):.2f} bits per weight)",
    ]
