"""Whether numba's on-disk cache holds compiled CPU kernels. On a fresh install (or after numba or
the kernel sources change) numba compiles them on first use, which takes tens of seconds; the CLI
says so once instead of sitting silent. Library code only answers; it never prints.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Kernels every forward pass calls, whatever the weight types: when their cache is fresh, pyggml has
# run since its kernel sources last changed.
CORE_KERNELS = ("_rmsnorm", "_rope", "_silu_mul", "_quantize_activations")

# Kernels made per weight type by a factory (one compiled only when a model has that type): not module
# globals, so their factories list them here.
_PER_TYPE: list = []


def per_type(dispatcher):
    """Record a dispatcher a per-type factory made (for n_kernels_ready); returns it."""
    _PER_TYPE.append(dispatcher)
    return dispatcher


def cached_kernels() -> list:
    """The numba dispatchers of the CPU kernels that keep their code on disk (cache=True)."""
    from numba.core.dispatcher import Dispatcher

    from . import cpu, decoders, kpack, kpacker, kvattn

    seen: dict[int, Dispatcher] = {id(d): d for d in _PER_TYPE}
    for module in (cpu, decoders, kpack, kpacker, kvattn):
        for v in vars(module).values():
            if isinstance(v, Dispatcher) and hasattr(v._cache, "_cache_file"):
                seen.setdefault(id(v), v)
    return list(seen.values())


def kernels_cold() -> bool:
    """True when numba's cache has no usable code for the core CPU kernels (nothing there yet, or made
    by another numba version or from older sources), so the first forward pass will compile them.
    False when the cache is fresh, or when it cannot be read (numba's internals differ)."""
    try:
        core = [k for k in cached_kernels() if k.__name__ in CORE_KERNELS]
        # numba's index of a kernel's cached code; empty when missing or stale (numba's own freshness test)
        return any(not k._cache._cache_file._load_index() for k in core)
    except Exception as e:  # noqa: BLE001 - an internal numba API: never fail a run over a notice
        log.info("cannot tell whether numba's kernel cache is fresh: %s", e)
        return False


def n_kernels_ready() -> int:
    """Kernel specialisations compiled (or loaded from the cache) in this process so far."""
    return sum(len(k.overloads) for k in cached_kernels())
