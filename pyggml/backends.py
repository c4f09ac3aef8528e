"""Compute backends. The model asks its layer's backend for every op, so a GPU backend and
per-layer placement (n_gpu_layers) slot in beside the CPU one without touching the model.

A backend owns: how weights are held (`load_weight`), where activations live (`to_device`,
`to_host`), the KV cache storage of its layers (`kv_storage`), and the ops of the forward pass.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import mmap
import os
import sys
import warnings
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from .kernels import compute
from .kvfile import open_kv_parts
from .tensor import QWeight

if TYPE_CHECKING:
    from .gguf.reader import GGUFFile
    from .model.config import LlamaConfig
    from .model.kvtypes import KVType

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The requested device placement cannot be made on this machine."""


class Backend(Protocol):
    name: str

    def load_weight(self, w: QWeight, products: bool = True) -> QWeight: ...  # products: the model multiplies by w
    def load_vector(self, v: np.ndarray): ...
    def to_device(self, x: np.ndarray): ...
    def to_host(self, x) -> np.ndarray: ...
    def kv_storage(self, parts: list[tuple[tuple[int, ...], np.dtype]], path: str | None) -> list: ...  # K, V arrays
    def kv_write(self, slots, t: KVType, x, seqs, positions) -> None: ...  # x[t] encoded at slots[seqs[t], :, positions[t]]
    def empty(self, shape: tuple[int, ...]): ...
    def matmul(self, w: QWeight, x, out=None): ...
    def matmuls(self, weights: Sequence[QWeight], x) -> list: ...  # several weights, one input
    def embed(self, w: QWeight, tokens: np.ndarray): ...
    def rmsnorm(self, x, weight, eps: float): ...
    def rope(self, x, positions: np.ndarray, inv_freq: np.ndarray): ...
    # tokens at start_pos.. of one sequence; k/v caches (n_kv, ctx, width) stored as tk / tv
    def attention(self, q, k_cache, v_cache, start_pos: int, tk: KVType, tv: KVType): ...
    # token t at positions[t] of slot seqs[t]; k/v slots (n_seq, n_kv, ctx, width)
    def attention_seqs(self, q, k_slots, v_slots, seqs, positions, tk: KVType, tv: KVType): ...
    def indices(self, a: np.ndarray): ...  # int64 indices where this backend's ops read them
    def silu_mul(self, gate, up): ...


def anonymous_array(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zero-filled array backed by an anonymous memory mapping (pages are touched lazily)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


# glibc gives freed heap above its trim threshold back to the kernel, so each forward pass's
# activations (arrays of a few MB) came back as fresh zeroed pages: 68,000 page faults (280 MB) in a
# pp128 of TinyLlama, about 10% of its time (0.655 -> 0.595 s, Q6_K, 2 threads). The CPU backend asks
# glibc once to keep up to 256 MB of freed heap, and to serve blocks below 32 MB (the ceiling its own
# adaptive threshold reaches) from the heap. Elsewhere (macOS, Windows, musl) nothing changes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


class CPUBackend:
    """numba kernels on the CPU; activations are float32 numpy arrays."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None):
        import numba

        from .kernels import cpu  # imports numba: only when a model is actually loaded

        keep_freed_memory()
        self.k = cpu
        most = numba.config.NUMBA_NUM_THREADS
        self.n_threads = max(1, min(int(n_threads), most)) if n_threads else most

    def on_compute_thread(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the compute thread with this backend's threads (kernels/compute.py):
        the model runs whole forward passes so; the methods that start kernels hand over one call each
        when called from elsewhere (_on_compute_thread below)."""
        return compute.call(fn, *args, threads=self.n_threads, **kwargs)

    def load_weight(self, w: QWeight, products: bool = True) -> QWeight:
        if w.ggml_type not in self.k.SUPPORTED_TYPES:
            raise NotImplementedError(f"{w.name}: the CPU backend cannot compute with {w.ggml_type.name} weights")
        if products and w.ggml_type in self.k.INT8_ACTIVATION_TYPES and w.rows >= self.k.PACK_ROWS:
            # a copy in groups of 8 rows (the products' layout); w.raw stays a view into the mmap
            return dataclasses.replace(w, packed=self.k.pack(w))
        if products and w.ggml_type in self.k.STREAMED_FLOAT_TYPES:
            # F16 / BF16 products stream the stored rows: from anonymous memory (numpy asks for transparent
            # huge pages), not the file's 4 KiB page-cache pages, whose TLB misses and page-bounded hardware
            # prefetch cost a fifth (TinyLlama f16 gate matrices, 2 threads, SPR: 16.6 -> 20 GB/s). The model
            # then releases the file's pages, so the weights stay resident once.
            copy = np.empty_like(w.raw)
            copy[...] = w.raw
            return dataclasses.replace(w, raw=copy)
        return w

    def load_vector(self, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v, dtype=np.float32)

    def to_device(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, np.float32)

    def kv_storage(self, parts: list[tuple[tuple[int, ...], np.dtype]], path: str | os.PathLike | None) -> list[np.ndarray]:
        """KV cache memory, one array per (shape, dtype) part: a named memory-mapped file (kvfile.py:
        created, or reused only when it is pyggml's KV file of these parts), or anonymous mappings."""
        if path is None:
            return [anonymous_array(shape, dtype) for shape, dtype in parts]
        return open_kv_parts(path, parts)

    def kv_write(self, slots: np.ndarray, t: KVType, x: np.ndarray, seqs: np.ndarray, positions: np.ndarray) -> None:
        self.k.kv_write(slots, t.code, x, seqs, positions)

    def matmul(self, w: QWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((x.shape[0], w.rows), np.float32)
        return self.k.matmul(w, x, out)

    def matmuls(self, weights: Sequence[QWeight], x: np.ndarray) -> list[np.ndarray]:
        return self.k.matmuls(weights, x, [np.empty((x.shape[0], w.rows), np.float32) for w in weights])

    def embed(self, w: QWeight, tokens: np.ndarray) -> np.ndarray:
        return self.k.dequantize_rows(w, tokens, np.empty((len(tokens), w.cols), np.float32))

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return self.k.rmsnorm(x, weight, eps, np.empty_like(x))

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        return self.k.rope(x, positions, inv_freq)

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int, tk: KVType,
                  tv: KVType) -> np.ndarray:
        n = q.shape[0]
        return self.k.attention_seqs(q, k_cache[None], v_cache[None], tk.code, tv.code, np.zeros(n, np.int64),
                                     np.arange(start_pos, start_pos + n, dtype=np.int64), np.empty_like(q))

    def attention_seqs(self, q: np.ndarray, k_slots: np.ndarray, v_slots: np.ndarray, seqs: np.ndarray,
                       positions: np.ndarray, tk: KVType, tv: KVType) -> np.ndarray:
        return self.k.attention_seqs(q, k_slots, v_slots, tk.code, tv.code, seqs, positions, np.empty_like(q))

    def indices(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.int64)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self.k.silu_mul(gate, up, np.empty_like(gate))


def _on_compute_thread(cls, names: tuple[str, ...]):
    """Wrap cls's methods `names` (those that start parallel kernels) to run on the compute thread:
    directly when already there (a forward pass the model handed over), else handed over per call."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if compute.here():
                return method(self, *args, **kwargs)
            return self.on_compute_thread(method, self, *args, **kwargs)
        return run

    for name in names:
        setattr(cls, name, wrap(getattr(cls, name)))
    return cls


_on_compute_thread(CPUBackend, ("load_weight", "kv_write", "matmul", "matmuls", "embed", "rmsnorm", "rope", "attention",
                                "attention_seqs", "silu_mul"))

def make_backends(gguf: GGUFFile, config: LlamaConfig, n_gpu_layers: int, n_threads: int | None, n_ctx: int, n_batch: int,
                  kv_types: tuple[KVType, KVType] | None = None):
    """Per-layer backends and the head backend. n_gpu_layers: 0 = CPU only, -1 (or >= n_layers) = all
    on the GPU. Without cupy or a usable GPU the model runs on the CPU, with a warning (as
    llama-cpp-python's CPU build does). The GPU memory a placement needs is checked before anything
    is uploaded."""
    cpu = CPUBackend(n_threads)
    n_layers = config.n_layers
    if n_gpu_layers == 0:
        return [cpu] * n_layers, cpu
    try:
        from .cuda.backend import CUDABackend
        from .cuda.plan import check_fits
        gpu = CUDABackend()
    except ImportError as e:
        warnings.warn(f"n_gpu_layers={n_gpu_layers} ignored, running on the CPU: the GPU backend needs cupy "
                      f"(pip install 'pyggml[cuda]') and an NVIDIA GPU ({e})", RuntimeWarning, stacklevel=3)
        return [cpu] * n_layers, cpu
    except Exception as e:  # noqa: BLE001 - cupy is there but no usable GPU or driver
        warnings.warn(f"n_gpu_layers={n_gpu_layers} ignored, running on the CPU: no usable CUDA GPU "
                      f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
        return [cpu] * n_layers, cpu
    n_gpu = n_layers if n_gpu_layers < 0 or n_gpu_layers >= n_layers else n_gpu_layers
    plan = check_fits(gguf, config, n_gpu, n_ctx, n_batch, gpu.free_memory(), kv_types=kv_types)
    gpu.expect_upload(plan.weight_bytes)
    # The last n_gpu layers go to the GPU (as llama.cpp offloads), the head too when all layers do.
    backends = [cpu] * (n_layers - n_gpu) + [gpu] * n_gpu
    return backends, (gpu if plan.head_on_gpu else cpu)
