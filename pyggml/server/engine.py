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

`LlamaEngine` implements it over one `Llama`: each slot runs its request on a worker thread (generation
never blocks the event loop), the others wait in a bounded queue; with several slots their sequences
are decoded together, many tokens to a forward pass (server/batching.py).
"""
from __future__ import annotations

import asyncio
import json
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


class _Mailbox:
    """Items from the worker threads to the jobs of one event loop: the loop is woken once for each
    burst of items, not once per item (a decode step of 32 sequences hands over 32 chunks at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Queue, Any]] = deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Hand an item to a job's queue (any thread); RuntimeError once the loop is closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class Job:
    """One submitted request: an async iterator over its items, filled by the engine's worker thread."""

    def __init__(self, kind: str, params: dict[str, Any], mailbox: _Mailbox, on_cancel: Callable[["Job"], None]):
        self.kind, self.params = kind, params
        self.usage: dict[str, int] | None = None
        self.timings: dict[str, float] | None = None
        self.stopping_word = ""
        self._mailbox = mailbox
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
            self._mailbox.put(self._items, item)
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
    """The engine over one Llama. With n_parallel = 1 requests run one at a time on a worker thread;
    with more, the Llama's KV cache must hold that many sequences (Llama(n_seq_max=...)) and each slot
    runs its request on its own worker thread, all of them decoded together by one Batcher
    (server/batching.py: continuous batching). Up to `max_queue` more requests wait, in order, for a
    free slot; a request goes to the idle slot whose last prompt shares the longest prefix with it.
    The engine owns the Llama it is given (it observes its generations)."""

    def __init__(self, llm, max_queue: int = 256, model_id: str | None = None, n_parallel: int = 1,
                 n_batch: int | None = None, continuous: bool = True):
        self.llm = llm
        self.model_id = model_id or Path(llm.model_path).name
        self.max_queue = max(0, int(max_queue))
        self.created = int(time.time())
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self.n_slots = max(1, int(n_parallel))
        self.batcher = None
        if self.n_slots > 1:
            from .batching import Batcher, sequence_view

            if llm.kv_cache.n_seq < self.n_slots:
                raise ValueError(f"{self.n_slots} slots need a KV cache of as many sequences (Llama(n_seq_max=...)), "
                                 f"this one holds {llm.kv_cache.n_seq}")
            self.batcher = Batcher(llm.model, llm.kv_cache, n_batch or llm.n_batch, continuous=continuous)
            self.slots = [sequence_view(llm, self.batcher, i) for i in range(self.n_slots)]
        else:
            self.slots = [llm]
        self._cond = threading.Condition()
        self._mailbox: _Mailbox | None = None  # the event loop's, made by the first submit from it
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._keys = [""] * self.n_slots  # each slot's last prompt, to send a follow-up where its prefix is
        self._closed = False
        self._states: list[Any] = [None] * self.n_slots  # the GenerationState of each slot's generation
        for i, slot in enumerate(self.slots):
            _observe_generations(slot, lambda st, i=i: self._states.__setitem__(i, st))
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"pyggml-slot-{i}", daemon=True)
                         for i in range(self.n_slots)]
        for t in self._threads:
            t.start()

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
                "n_ctx": self.n_ctx, "n_layer": cfg.n_layers, "n_slots": self.n_slots}

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=add_special, special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> bytes:
        """The token's own bytes, leading space included (llama.cpp's token piece)."""
        return self.llm.tokenizer.token_to_bytes(token)

    def status(self) -> dict[str, int]:
        with self._cond:
            busy = len(self._running)
            return {"slots_idle": self.n_slots - busy, "slots_processing": busy, "requests_queued": len(self._waiting)}

    # ----------------------------------------------------------------------------- requests
    def submit(self, kind: str, params: dict[str, Any]) -> Job:
        """Queue a request (call from the event loop that will read the job)."""
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; one of {', '.join(KINDS)}")
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        job = Job(kind, dict(params), self._mailbox, self._drop)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.max_queue and (len(self._running) >= self.n_slots or self._waiting):
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers: queued requests end, the running ones are cancelled."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = list(self._running.items())
            self._cond.notify_all()
        for job in waiting:
            job._cancelled.set()
            job._push(_END)
        for slot, job in running:
            job._cancelled.set()
            if self.batcher is not None:
                self.batcher.abort(slot)
        for t in self._threads:
            t.join(timeout)
        if self.batcher is not None:
            self.batcher.close(timeout)

    def _drop(self, job: Job) -> None:
        """A cancelled job leaves the queue at once; a running one stops at its next token, or at once
        when it is waiting for its tokens to be evaluated."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                slot = next((i for i, j in self._running.items() if j is job), None)
                if slot is not None and self.batcher is not None:
                    self.batcher.abort(slot)
                return
            self.stats["cancelled"] += 1
        job._push(_END)

    def _best_slot(self, job: Job) -> int:
        """The idle slot whose last prompt shares the longest prefix with the job's (under _cond)."""
        key = _prompt_key(job)
        idle = [i for i in range(self.n_slots) if i not in self._running]
        return max(idle, key=lambda i: (_common_prefix(self._keys[i], key), -i))

    def _work(self, slot: int) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting and self._best_slot(self._waiting[0]) == slot):
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running[slot] = self._waiting.popleft()
                self._keys[slot] = _prompt_key(job)
                self._cond.notify_all()  # the next waiting job may be another slot's
            try:
                self._run(job, slot)
            finally:
                if self.batcher is not None:
                    self.batcher.release(slot)
                with self._cond:
                    del self._running[slot]
                    self._cond.notify_all()
                job._push(_END)

    def _run(self, job: Job, slot: int) -> None:
        from .batching import SequenceAborted

        llm = self.slots[slot]
        params = dict(job.params)
        llm.before_token = _cancel_check(job)  # a cheap check, not a logits processor (which copies the logits)
        self._states[slot] = None
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
            self._finish(job, slot, result if not params.get("stream") else None)
            self._count("completed")
        except (_Cancelled, SequenceAborted):
            self._count("cancelled")
            log.info("request cancelled")
        except Exception as e:  # noqa: BLE001 - handed to the reader, which maps it to an HTTP error
            self._count("failed")
            log.debug("request failed: %s", e, exc_info=True)
            job._push(e)
        finally:
            llm.before_token = None  # the check holds the job (and its queue of unread chunks): let it go

    def _count(self, outcome: str) -> None:
        with self._cond:
            self.stats[outcome] += 1

    def _finish(self, job: Job, slot: int, result: dict | None) -> None:
        """Usage, timings and the stop word of a finished job, from the generation the engine observed."""
        st, llm = self._states[slot], self.slots[slot]
        if result is not None and "usage" in result:
            job.usage = dict(result["usage"])
        elif st is not None:
            job.usage = {"prompt_tokens": st.n_prompt, "completion_tokens": st.n_completion,
                         "total_tokens": st.n_prompt + st.n_completion}
        if st is not None and st.finish_reason == "stop" and job.params.get("stop"):
            stops = job.params["stop"]
            text = llm.detokenize(st.tokens).decode("utf-8", errors="ignore")
            job.stopping_word = min(((text.find(s), s) for s in ([stops] if isinstance(stops, str) else stops)
                                     if s and s in text), default=(0, ""))[1]
        t = llm.timings
        job.timings = {"prompt_n": t.prompt_tokens, "prompt_ms": 1000 * t.prompt_s,
                       "predicted_n": t.gen_tokens, "predicted_ms": 1000 * t.gen_s}


def _prompt_key(job: Job) -> str:
    """What a request's prompt starts with, as text: the prompt, or the chat messages in order."""
    p = job.params
    if job.kind == "chat":
        return json.dumps(p.get("messages"), sort_keys=True, default=str)
    prompt = p.get("prompt", p.get("input", ""))
    return prompt if isinstance(prompt, str) else json.dumps(prompt, default=str)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _cancel_check(job: Job) -> Callable:
    """The slot's before_token while it runs `job`: stops the generation once the job is cancelled, before
    every sampled token, streamed or not, whatever the chunking."""

    def check() -> None:
        if job.cancelled:
            raise _Cancelled

    return check


def _observe_generations(llm, on_state: Callable[[Any], None]) -> None:
    """Hand each generation's GenerationState to `on_state`: streamed chunks carry no token counts, so
    the engine reads a streamed request's usage from it once the stream has ended."""
    inner = llm.stream_text

    def stream_text(prompt_tokens, params, max_tokens, stop, state, **kw):
        on_state(state)
        return inner(prompt_tokens, params, max_tokens, stop, state, **kw)

    llm.stream_text = stream_text
