"""The first run's compiling, on two processes.

numba compiles one function at a time in a process (a global compiler lock), and the first run after an
install compiles about twenty: the per-type products and the packer, which depend on the model's weight
types, and the rest of the forward pass (norms, RoPE, the activations' int8 blocks, KV writes and
attention of the cache's types), which does not. `start` runs the second kind in a helper process,
on a tiny random model of F32 weights with the same KV types, while this process loads the real model
(packing it) and compiles its products (`compile_products`); `finish` waits for the helper, whose code
this process then loads from numba's on-disk cache. Nothing depends on the helper: if it fails or is
slow, this process compiles whatever is missing itself.

The helper is `python -m pyggml.kernels.precompile TYPE_K TYPE_V` ("-" for Llama's default type).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

HELPER_TIMEOUT_S = 120.0
_TINY = dict(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab=260, ctx=64)  # head_dim 32: any KV type


def start(type_k: str | None, type_v: str | None) -> subprocess.Popen | None:
    """The helper process, compiling with this one's environment (numba cache, SIMD cap, threads);
    None where it cannot be started."""
    cmd = [sys.executable, "-m", "pyggml.kernels.precompile", type_k or "-", type_v or "-"]
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=dict(os.environ))
    except OSError:
        return None


def finish(helper: subprocess.Popen | None, timeout: float = HELPER_TIMEOUT_S) -> None:
    """Wait for the helper (killed after `timeout` s, or at once when this process is failing)."""
    if helper is None:
        return
    try:
        helper.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


class FirstRun:
    """Around loading a model when numba's cache is cold (`active`): the helper process starts on entry,
    warm_up(llm) compiles this model's products, waits for the helper and runs llm.warm_up() (both
    nothing when not active), and exit stops a helper still running (a failed load)."""

    def __init__(self, type_k: str | None, type_v: str | None, active: bool):
        self.kv_types, self.active, self.helper = (type_k, type_v), active, None

    def __enter__(self) -> "FirstRun":
        if self.active:
            self.helper = start(*self.kv_types)
        return self

    def warm_up(self, llm) -> None:
        if self.active:
            on_cpu = compile_products(llm)
            finish(self.helper, HELPER_TIMEOUT_S if on_cpu else 0)  # a model all on the GPU needs none of its kernels
            llm.warm_up()

    def __exit__(self, *exc: object) -> None:
        finish(self.helper, timeout=0)


def compile_products(llm) -> bool:
    """Compile (or load) the products and the embedding lookup of each weight type a CPU layer of the
    model has, by running each such kernel once on its first weight of that type: one token, then two.
    False when nothing of the model is on the CPU."""
    from ..backends import CPUBackend

    model = llm.model
    seen: set = set()
    weights = [(model.head_backend, w) for w in (model.tok_embd, model.output)]
    for layer in model.layers:
        weights += [(layer.backend, w) for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                                                  layer.w_down)]
    for backend, w in weights:
        if isinstance(backend, CPUBackend) and w.ggml_type not in seen:
            seen.add(w.ggml_type)
            for n_tok in (1, 2):
                backend.matmul(w, np.zeros((n_tok, w.cols), np.float32))
    if isinstance(model.head_backend, CPUBackend):
        model.head_backend.embed(model.tok_embd, np.zeros(1, np.int64))
    return bool(seen) or isinstance(model.head_backend, CPUBackend)


def _helper(type_k: str | None, type_v: str | None) -> None:
    """Compile what the forward pass needs besides the products and the embedding lookup of the model's
    types: a tiny model's forward on a CPU backend whose products and lookups return zeros (arrays of
    the shapes and layouts real ones have), so no F32 product is compiled for nothing."""
    from ..api import Llama
    from ..backends import CPUBackend
    from ..gguf.constants import GGMLType
    from ..synthetic import Shape, write_random_model
    from .cpu import quantize_activations

    class NoProducts(CPUBackend):
        def matmul(self, w, x, out=None):
            return np.zeros((x.shape[0], w.rows), np.float32)

        def matmuls(self, weights, x):
            return [self.matmul(w, x) for w in weights]

        def embed(self, w, tokens):
            return np.zeros((len(tokens), w.cols), np.float32)

    quantize_activations(np.zeros((2, 32), np.float32))
    kv = {k: v for k, v in (("type_k", type_k), ("type_v", type_v)) if v}
    with tempfile.TemporaryDirectory(prefix="pyggml-precompile-") as d:
        path = os.path.join(d, "tiny.gguf")
        write_random_model(path, Shape(**_TINY), GGMLType.F32, workers=1)
        with Llama(path, n_ctx=8, n_gpu_layers=0, verbose=False, **kv) as llm:
            backend = NoProducts()
            llm.model.head_backend = backend
            for layer in llm.model.layers:
                layer.backend = backend
            llm.warm_up()


if __name__ == "__main__":
    _helper(*(None if a == "-" else a for a in sys.argv[1:3]))
