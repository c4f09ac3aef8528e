"""Continuous batching: the sequences of concurrent requests share each forward pass.

`Batcher` owns a model, its KV cache of n_seq slots and one thread that runs every forward pass. A
sequence (a request being generated on its slot) asks for tokens to be evaluated (`evaluate`) and
waits. The batcher waits until every busy sequence has asked (or `max_wait` has passed), puts their
one-token decode steps first, fills the rest of the batch (n_batch tokens) with chunks of prompts in
the order they came, runs one `forward_batch` - which reads each weight once for all of them - and
hands each sequence whose tokens are all done the logits after its last one. A prompt longer than
what a batch has left is prefilled over several steps, interleaved with the running decodes (chunked
prefill), so a new request never stalls the streams already running.

`sequence_view(llm, batcher, seq)` is a `Llama` on slot `seq` whose evaluation goes through the
batcher: completions, chat, sampling, grammars and streaming run unchanged on it, and the slot keeps
its last context, so a follow-up request that shares the prefix reuses it.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..generation import Timings

log = logging.getLogger(__name__)


class SequenceAborted(RuntimeError):
    """The sequence was aborted (its request was cancelled) while its tokens waited to be evaluated."""


@dataclass(eq=False)
class _Eval:
    """One evaluation asked for by a sequence: tokens at positions start.., `done` of them evaluated."""

    seq: int
    tokens: np.ndarray
    start: int
    done: int = 0
    logits: np.ndarray | None = None
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done


class Batcher:
    """Runs the forward passes of up to cache.n_seq sequences together (see the module docstring).
    `lock` is held around every forward pass (other users of the model take it too). continuous=False:
    one sequence per forward pass, in turn (llama-server's --no-cont-batching)."""

    def __init__(self, model, cache, n_batch: int, lock: threading.Lock | None = None, max_wait: float = 0.05,
                 continuous: bool = True):
        self.model, self.cache = model, cache
        self.n_batch = max(1, int(n_batch))
        self.lock = lock or threading.Lock()
        self.max_wait = max_wait
        self.continuous = continuous
        self.stats = {"steps": 0, "tokens": 0, "decode_tokens": 0, "prompt_tokens": 0, "max_batch": 0}
        self._cond = threading.Condition()
        self._pending: dict[int, _Eval] = {}
        self._busy: set[int] = set()  # sequences in the middle of a request: a step waits for them
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pyggml-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by sequences
    def evaluate(self, seq: int, tokens: np.ndarray, start: int) -> np.ndarray:
        """Evaluate `tokens` at positions start.. of slot seq; the next-token logits after the last one.
        Blocks until done; raises SequenceAborted when abort(seq) comes first."""
        if not 0 <= seq < self.cache.n_seq:
            raise ValueError(f"slot {seq} out of range [0, {self.cache.n_seq})")
        if start < 0 or start + len(tokens) > self.cache.n_ctx:
            raise ValueError(f"positions {start}..{start + len(tokens) - 1} do not fit the context of {self.cache.n_ctx} tokens")
        e = _Eval(seq, np.asarray(tokens, dtype=np.int64).reshape(-1), int(start))
        if len(e.tokens) == 0:
            raise ValueError("no tokens to evaluate")
        with self._cond:
            if self._closed:
                raise SequenceAborted("the batcher is closed")
            if seq in self._pending:
                raise RuntimeError(f"slot {seq} already has an evaluation waiting")
            self._busy.add(seq)
            self._pending[seq] = e
            if len(self._pending) == 1 or self._ready():  # the batcher waits for a first evaluation, or for all
                self._cond.notify_all()
        e.event.wait()
        if e.error is not None:
            raise e.error
        return e.logits

    def release(self, seq: int) -> None:
        """The sequence's request has ended: steps no longer wait for it."""
        with self._cond:
            self._busy.discard(seq)
            self._cond.notify_all()

    def abort(self, seq: int) -> None:
        """A waiting evaluation of slot seq ends with SequenceAborted (tokens already evaluated stay
        in the cache, unreferenced)."""
        with self._cond:
            e = self._pending.pop(seq, None)
            self._busy.discard(seq)
            self._cond.notify_all()
        if e is not None:
            e.error = SequenceAborted(f"slot {seq} was aborted")
            e.event.set()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
            self._cond.notify_all()
        for e in pending:
            e.error = SequenceAborted("the batcher is closed")
            e.event.set()
        self._thread.join(timeout)

    # ---------------------------------------------------------------------- the batch loop
    def _ready(self) -> bool:
        return bool(self._pending) and len(self._pending) >= len(self._busy)

    def _wait_for_batch(self) -> list[tuple[_Eval, int]] | None:
        """The next batch: [(evaluation, number of its tokens)], or None once closed."""
        with self._cond:
            while not self._closed and not self._pending:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while not self._closed and not self._ready():  # the other busy sequences are sampling
                left = deadline - time.monotonic()
                if left <= 0 or not self._pending:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            return self._take()

    def _take(self) -> list[tuple[_Eval, int]]:
        """Decode steps (one token left) first, then prompt chunks in arrival order, n_batch tokens in all."""
        waiting = list(self._pending.values())  # dicts keep insertion order: arrival order
        order = [e for e in waiting if e.left == 1] + [e for e in waiting if e.left > 1]
        if not self.continuous:  # one sequence a pass: the one that has waited longest
            order = waiting[:1]
        parts, budget = [], self.n_batch
        for e in order:
            if budget == 0:
                break
            n = min(e.left, budget)
            parts.append((e, n))
            budget -= n
        return parts

    def _loop(self) -> None:
        while True:
            parts = self._wait_for_batch()
            if parts is None:
                return
            if parts:
                self._step(parts)

    def _step(self, parts: list[tuple[_Eval, int]]) -> None:
        tokens = np.concatenate([e.tokens[e.done : e.done + n] for e, n in parts])
        positions = np.concatenate([np.arange(e.start + e.done, e.start + e.done + n) for e, n in parts])
        seqs = np.concatenate([np.full(n, e.seq) for e, n in parts])
        ends, rows, at = [], [], 0
        for e, n in parts:
            at += n
            if e.done + n == len(e.tokens):  # its last token is in this batch: its logits are wanted
                ends.append(e)
                rows.append(at - 1)
        try:
            with self.lock:  # a prompt chunk alone still gets one row of logits, unused
                logits = self.model.forward_batch(tokens, positions, seqs, self.cache, rows or [len(tokens) - 1])
        except Exception as err:  # noqa: BLE001 - every sequence of the batch gets the error
            log.debug("batch of %d tokens failed: %s", len(tokens), err, exc_info=True)
            self._finish([(e, None) for e, _ in parts], err)
            return
        self._count(parts, len(tokens))
        with self._cond:
            for e, n in parts:
                e.done += n
        self._finish([(e, logits[i]) for i, e in enumerate(ends)], None)

    def _finish(self, results: list[tuple[_Eval, np.ndarray | None]], error: BaseException | None) -> None:
        with self._cond:
            for e, row in results:
                if self._pending.get(e.seq) is e:
                    del self._pending[e.seq]
                else:  # aborted meanwhile: its waiter has been woken already
                    continue
                e.logits, e.error = row, error
                e.event.set()

    def _count(self, parts: list[tuple[_Eval, int]], n_tokens: int) -> None:
        st = self.stats
        st["steps"] += 1
        st["tokens"] += n_tokens
        decode = sum(n for e, n in parts if len(e.tokens) == 1)
        st["decode_tokens"] += decode
        st["prompt_tokens"] += n_tokens - decode
        st["max_batch"] = max(st["max_batch"], n_tokens)


class _SerializedModel:
    """The model as a sequence sees it: its direct uses (echo log-probabilities, embeddings on scratch
    caches) take the batcher's lock, so no two forward passes ever run at once."""

    def __init__(self, model, lock: threading.Lock):
        self._model, self._lock = model, lock

    def forward(self, *args: Any, **kwargs: Any):
        with self._lock:
            return self._model.forward(*args, **kwargs)

    def hidden_states(self, *args: Any, **kwargs: Any):
        with self._lock:
            return self._model.hidden_states(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def sequence_view(llm, batcher: Batcher, seq: int):
    """A Llama on slot `seq` of the batcher's cache, sharing llm's model, tokenizer and template; its
    own context (tokens, logits), sampler state and timings. Evaluation goes through the batcher."""
    view = copy.copy(llm)
    view.kv_cache = batcher.cache.slot(seq)
    view.model = _SerializedModel(batcher.model, batcher.lock)
    view.tokens, view._logits = [], None
    view.n_batch = batcher.cache.n_ctx  # the batcher cuts prompts into batches itself
    view.timings = Timings()
    view.cache = None
    view._warned = set()
    view.set_seed(-1)
    view._evaluate = lambda tokens, start: batcher.evaluate(seq, tokens, start)
    return view
