"""The engine the HTTP routes call: submit a request, read its chunks as they come, cancel it.

The interface (all that pyggml/server/app.py uses):

    job = engine.submit(kind, params)   kind "completion" | "chat" | "embedding"; params are the keyword
                                        arguments of Llama.create_completion / create_chat_completion /
                                        create_embedding (stream included). Raises EngineBusy when the
                                        queue is full, EngineClosed after close().
    async for item in job               the OpenAI-shaped chunks as they come (stream=True), or the one
                                        result; an error of the request (ContextFullError, ...) is raised
                                        here, before any item when the request itself is at fault
    job.usage, job.timings, job.stopping_word   filled in once the last item has been read
    job.cancel()                        a queued request is dropped; a running one stops before its next
                                        token and frees the engine
    engine.status()                     {"slots_idle", "slots_processing", "requests_queued"}
    engine.tokenize / detokenize / model_id / n_ctx / n_vocab / describe() / close()

`LlamaEngine` implements it over one `Llama`: one request at a time, run on a worker thread (generation
never blocks the event loop), the others waiting in a bounded queue. Continuous batching plugs in here:
an engine that decodes many sequences in one forward pass (pyggml/engine/) serves the same submit / Job
interface, reports its slots in status(), and the routes do not change.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

KINDS = ("completion", "chat", "embedding")
_END = object()  # the last item of every job


class EngineBusy(RuntimeError):
    """Every slot is busy and the queue is full."""


class EngineClosed(RuntimeError):
    """The engine has been closed."""


class _Cancelled(Exception):
    """Raised inside the generation loop to stop a cancelled request."""


class Job:
    """One submitted request: an async iterator over its items, filled by the engine's worker thread."""

    def __init__(self, kind: str, params: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[["Job"], None]):
        self.kind, self.params = kind, params
        self.usage: dict[str, int] | None = None
        self.timings: dict[str, float] | None = None
        self.stopping_word = ""
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the request (a no-op once it has finished)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    def _push(self, item: Any) -> None:
        """Hand an item to the reader (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            self._cancelled.set()

    def __aiter__(self) -> "Job":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        item = await self._items.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item


class LlamaEngine:
    """The engine over one Llama: requests run one at a time on a worker thread; up to `max_queue`
    more wait, in order. The engine owns the Llama it is given (it observes its generations)."""

    n_slots = 1

    def __init__(self, llm, max_queue: int = 256, model_id: str | None = None):
        self.llm = llm
        self.model_id = model_id or Path(llm.model_path).name
        self.max_queue = max(0, int(max_queue))
        self.created = int(time.time())
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._state = None  # the GenerationState of the running generation (see _observe_generations)
        _observe_generations(llm, self._set_state)
        self._thread = threading.Thread(target=self._work, name="pyggml-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ facts
    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def describe(self) -> dict[str, Any]:
        """Facts about the model for GET /v1/models (llama-server's "meta")."""
        cfg = self.llm.config
        return {"n_vocab": self.llm.n_vocab(), "n_ctx_train": cfg.n_ctx_train, "n_embd": self.llm.n_embd(),
                "n_ctx": self.n_ctx, "n_layer": cfg.n_layers}

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=add_special, special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> bytes:
        """The token's own bytes, leading space included (llama.cpp's token piece)."""
        return self.llm.tokenizer.token_to_bytes(token)

    def status(self) -> dict[str, int]:
        with self._cond:
            busy = int(self._running is not None)
            return {"slots_idle": self.n_slots - busy, "slots_processing": busy, "requests_queued": len(self._waiting)}

    # ----------------------------------------------------------------------------- requests
    def submit(self, kind: str, params: dict[str, Any]) -> Job:
        """Queue a request (call from the event loop that will read the job)."""
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; one of {', '.join(KINDS)}")
        job = Job(kind, dict(params), asyncio.get_running_loop(), self._drop)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.max_queue and (self._running is not None or self._waiting):
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: queued requests end, the running one is cancelled."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job._cancelled.set()
            job._push(_END)
        if running is not None:
            running._cancelled.set()
        self._thread.join(timeout)

    def _drop(self, job: Job) -> None:
        """A cancelled job leaves the queue at once (a running one stops at its next token)."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            self.stats["cancelled"] += 1
        job._push(_END)

    def _set_state(self, state) -> None:
        self._state = state

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                job._push(_END)

    def _run(self, job: Job) -> None:
        llm = self.llm
        params = dict(job.params)
        if job.kind != "embedding":
            params["logits_processor"] = _cancel_check(job)
        self._state = None
        try:
            if job.cancelled:
                raise _Cancelled
            method = getattr(llm, {"completion": "create_completion", "chat": "create_chat_completion",
                                   "embedding": "create_embedding"}[job.kind])
            result = method(**params)
            if params.get("stream"):
                try:
                    for chunk in result:
                        job._push(chunk)
                        if job.cancelled:
                            raise _Cancelled
                finally:
                    result.close()
            else:
                job._push(result)
            self._finish(job, result if not params.get("stream") else None)
            self._count("completed")
        except _Cancelled:
            self._count("cancelled")
            log.info("request cancelled")
        except Exception as e:  # noqa: BLE001 - handed to the reader, which maps it to an HTTP error
            self._count("failed")
            log.debug("request failed: %s", e, exc_info=True)
            job._push(e)

    def _count(self, outcome: str) -> None:
        with self._cond:
            self.stats[outcome] += 1

    def _finish(self, job: Job, result: dict | None) -> None:
        """Usage, timings and the stop word of a finished job, from the generation the engine observed."""
        st = self._state
        if result is not None and "usage" in result:
            job.usage = dict(result["usage"])
        elif st is not None:
            job.usage = {"prompt_tokens": st.n_prompt, "completion_tokens": st.n_completion,
                         "total_tokens": st.n_prompt + st.n_completion}
        if st is not None and st.finish_reason == "stop" and job.params.get("stop"):
            stops = job.params["stop"]
            text = self.llm.detokenize(st.tokens).decode("utf-8", errors="ignore")
            job.stopping_word = min(((text.find(s), s) for s in ([stops] if isinstance(stops, str) else stops)
                                     if s and s in text), default=(0, ""))[1]
        t = self.llm.timings
        job.timings = {"prompt_n": t.prompt_tokens, "prompt_ms": 1000 * t.prompt_s,
                       "predicted_n": t.gen_tokens, "predicted_ms": 1000 * t.gen_s}


def _cancel_check(job: Job) -> Callable:
    """A logits processor that changes nothing and stops the generation once the job is cancelled:
    it runs before every sampled token, streamed or not, whatever the chunking."""

    def check(_input_ids, logits):
        if job.cancelled:
            raise _Cancelled
        return logits

    return check


def _observe_generations(llm, on_state: Callable[[Any], None]) -> None:
    """Hand each generation's GenerationState to `on_state`: streamed chunks carry no token counts, so
    the engine reads a streamed request's usage from it once the stream has ended."""
    inner = llm.stream_text

    def stream_text(prompt_tokens, params, max_tokens, stop, state, **kw):
        on_state(state)
        return inner(prompt_tokens, params, max_tokens, stop, state, **kw)

    llm.stream_text = stream_text
