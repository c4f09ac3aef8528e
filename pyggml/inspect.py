"""Human-readable summaries of a GGUF file: metadata (long arrays abbreviated) and tensor table."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .gguf.constants import ValueType
from .gguf.reader import GGUFFile
from .gguf.values import Typed
from .quant.registry import KERNEL_TYPE_CODES


def _format_value(v: Typed, max_items: int) -> str:
    if v.type is ValueType.STRING:
        s = v.value if len(v.value) <= 120 else v.value[:117] + "..."
        return repr(s)
    if v.type is not ValueType.ARRAY:
        return repr(v.value)
    items = list(v.value[:max_items]) if not isinstance(v.value, np.ndarray) else v.value[:max_items].tolist()
    if v.elem_type is ValueType.ARRAY:
        shown = [_format_value(x, max_items) for x in items]
    else:
        shown = [repr(x) for x in items]
    more = f", ... ({len(v.value)} items)" if len(v.value) > max_items else ""
    return f"[{', '.join(shown)}{more}]"


def _type_name(v: Typed) -> str:
    if v.type is ValueType.ARRAY:
        return f"arr[{v.elem_type.name.lower()}]"
    return v.type.name.lower()


def metadata_lines(f: GGUFFile, max_items: int = 6) -> list[str]:
    width = max((len(k) for k in f.fields), default=0)
    return [f"{key:<{width}}  {_type_name(v):<12} {_format_value(v, max_items)}" for key, v in f.fields.items()]


def tensor_lines(f: GGUFFile) -> list[str]:
    """The tensor table; a type pyggml cannot compute with is marked with a `*` and a note below."""
    width = max((len(t.name) for t in f), default=4)
    lines = [f"{'name':<{width}}  {'type':<8} {'shape':<18} {'bytes':>12}"]
    marked = set()
    for t in f:
        name = t.ggml_type.name
        if t.ggml_type not in KERNEL_TYPE_CODES:
            marked.add(name)
            name += "*"
        lines.append(f"{t.name:<{width}}  {name:<8} {str(list(t.shape)):<18} {t.nbytes:>12,}")
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
