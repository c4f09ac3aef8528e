"""serve(): start the HTTP server at once and load the model behind it (503 "Loading model" until then),
as llama-server does."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from .engine import LlamaEngine

# The GIL's switch interval while serving: a slot's worker thread woken with its logits (or the batcher
# woken by the last of them) otherwise waits up to Python's default 5 ms for a busy thread to let go.
SWITCH_INTERVAL = float(os.environ.get("PYGGML_SWITCH_INTERVAL", "0.0005"))

log = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 4096  # the context when none is asked for: the model's, at most this (as `pyggml run`)


@dataclass(frozen=True)
class ServerSettings:
    """`pyggml serve`'s options (llama-server's names and defaults)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 8080
    n_ctx: int | None = None  # None: the model's trained context, at most DEFAULT_MAX_CTX; 0: the model's
    n_batch: int = 512
    n_parallel: int = 1  # slots: sequences decoded together; each gets n_ctx / n_parallel of the context
    n_gpu_layers: int = 0
    n_threads: int | None = None
    api_key: str | None = None
    alias: str | None = None
    max_queue: int = 256
    cont_batching: bool = True
    chat_format: str | None = None
    type_k: str | None = None  # KV cache types (-ctk / -ctv); None: Llama's default (f16)
    type_v: str | None = None
    log_level: str = "info"


def default_ctx(model_path: str) -> int:
    """The model's trained context length, at most DEFAULT_MAX_CTX."""
    from ..gguf import GGUFFile
    from ..model import LlamaConfig

    with GGUFFile(model_path) as f:
        trained = LlamaConfig.from_metadata(f.metadata, model_path).n_ctx_train
    return min(DEFAULT_MAX_CTX, trained) if trained else DEFAULT_MAX_CTX


def load_engine(s: ServerSettings) -> LlamaEngine:
    """The Llama of the settings, behind a LlamaEngine of n_parallel slots. As llama-server, the
    context is shared out: each slot holds n_ctx / n_parallel tokens."""
    from ..api import Llama
    from ..kernels.jitcache import kernels_cold
    from ..kernels.precompile import FirstRun

    n_ctx = s.n_ctx if s.n_ctx is not None else default_ctx(s.model_path)
    n_par = max(1, s.n_parallel)
    if n_ctx and n_ctx < n_par:
        raise ValueError(f"a context of {n_ctx} tokens cannot be shared by {n_par} slots")
    cold = kernels_cold()
    if cold:  # llama-server warms up before its first request; here a cold cache would cost it 5-15 s
        log.info("compiling the CPU kernels once (a fresh install); later starts are quick")
    with warnings.catch_warnings(record=True) as caught, FirstRun(s.type_k, s.type_v, cold) as first:
        warnings.simplefilter("always")
        llm = Llama(s.model_path, n_ctx=n_ctx // n_par if n_ctx else 0, n_batch=s.n_batch, n_threads=s.n_threads,
                    n_gpu_layers=s.n_gpu_layers, seed=-1, chat_format=s.chat_format, verbose=False, n_seq_max=n_par,
                    type_k=s.type_k, type_v=s.type_v)
        first.warm_up(llm)
        if n_par > 1:  # the GPU's captured batch steps, before the first requests (as llama-server warms up)
            llm.model.warm_up_batches(llm.kv_cache, max(llm.token_bos(), 0))
    for w in caught:
        log.warning("%s", w.message)
    log.info("loaded %s: %d slot%s of %d tokens%s", s.model_path, n_par, "s" if n_par > 1 else "", llm.n_ctx(),
             "" if n_par == 1 or s.cont_batching else " (continuous batching off: one sequence per forward pass)")
    return LlamaEngine(llm, max_queue=s.max_queue, model_id=s.alias or Path(s.model_path).name, n_parallel=n_par,
                       continuous=s.cont_batching)


def serve(s: ServerSettings) -> None:
    """Serve until interrupted; raises the model's loading error if it cannot be loaded."""
    import uvicorn

    from .app import create_app

    if s.n_ctx is None:  # reads the file's header: a file that is no GGUF fails here, before listening
        s = replace(s, n_ctx=default_ctx(s.model_path))

    server: uvicorn.Server | None = None

    def stop(_error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_engine(s), api_key=s.api_key, on_load_error=stop)
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server.run()
    finally:
        sys.setswitchinterval(switch)
    error = app.state.pyggml.load_error
    if error is not None:
        raise error
