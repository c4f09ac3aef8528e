"""Continuous batching: the sequences of concurrent requests share each forward pass.

`Batcher` owns a model, its KV cache of n_seq slots and one thread that runs every forward pass. A
sequence (a request being generated on its slot) asks for tokens to be evaluated (`evaluate`) and
waits. The batcher waits until every busy sequence has asked (or `max_wait` has passed), puts their
one-token decode steps first, fills the rest of the batch (n_batch tokens) with chunks of prompts in
the order they came, runs one `forward_batch` - which reads each weight once for all of them - and
hands each sequence whose tokens are all done the logits after its last one. A prompt longer than
what a batch has left is prefilled over several steps, interleaved with the running decodes (chunked
prefill), so a new request never stalls the streams already running.

A plain generation (no grammar, logits processor, stopping criteria or log-probabilities) hands its
decode loop to the batcher instead (`chain`, `Chain`): after each step the batcher's thread chooses every
such sequence's next token itself (the sequence's cancel check, its sampler, end-of-generation, its
limits) and queues it for the next step at once, then hands the tokens to the sequences' threads, which
stream them while the next step runs. Steps no longer wait for a thread per sequence to wake up, sample
and ask again (~65 us a wake-up round trip on a 2-core VM; 32 of them a step).

`sequence_view(llm, batcher, seq)` is a `Llama` on slot `seq` whose evaluation goes through the
batcher: completions, chat, sampling, grammars and streaming run unchanged on it, and the slot keeps
its last context, so a follow-up request that shares the prefix reuses it.
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..generation import Timings
from ..kernels.compute import raise_error_of

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
    chain: "Chain | None" = None  # a decode loop the batcher runs (Batcher.chain)

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done


class Chain:
    """A sequence's decode loop run by the batcher (Batcher.chain): after each forward pass that
    evaluated its token, `choose(logits, token)` picks the next one on the batcher's thread, and that
    token joins the next step at once, so steps never wait for the sequence's own thread. That thread
    reads ("token", id), then ("end", None) or ("error", exception) from `out`.
    choose returns (next token or None to end, whether to evaluate it)."""

    def __init__(self, seq: int, choose):
        self.seq, self.choose = seq, choose
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.evaluated: list[int] = []  # tokens whose forward pass has run, in order
        self.logits: np.ndarray | None = None  # after the last of them
        self.stopped = False
        self.idle = threading.Event()  # set once no evaluation of the chain waits or runs

    def _end(self, kind: str, value=None) -> None:
        self.out.put((kind, value))
        self.idle.set()


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
        self._running: list[_Eval] = []  # the evaluations of the step that runs now
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pyggml-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by sequences
    def evaluate(self, seq: int, tokens: np.ndarray, start: int) -> np.ndarray:
        """Evaluate `tokens` at positions start.. of slot seq; the next-token logits after the last one.
        Blocks until done; raises SequenceAborted when abort(seq) comes first."""
        e = _Eval(seq, np.asarray(tokens, dtype=np.int64).reshape(-1), int(start))
        self._queue(e)
        e.event.wait()
        if e.error is not None:
            raise_error_of(e)
        return e.logits

    def _queue(self, e: _Eval) -> None:
        """Check an evaluation's slot and positions, and queue it."""
        if not 0 <= e.seq < self.cache.n_seq:
            raise ValueError(f"slot {e.seq} out of range [0, {self.cache.n_seq})")
        if len(e.tokens) == 0:
            raise ValueError("no tokens to evaluate")
        if e.start < 0 or e.start + len(e.tokens) > self.cache.n_ctx:
            raise ValueError(f"positions {e.start}..{e.start + len(e.tokens) - 1} do not fit the context of "
                             f"{self.cache.n_ctx} tokens")
        with self._cond:
            if self._closed:
                raise SequenceAborted("the batcher is closed")
            if e.seq in self._pending:
                raise RuntimeError(f"slot {e.seq} already has an evaluation waiting")
            self._busy.add(e.seq)
            self._pending[e.seq] = e
            if len(self._pending) == 1 or self._ready():  # the batcher waits for a first evaluation, or for all
                self._cond.notify_all()

    def chain(self, seq: int, token: int, start: int, choose) -> Chain:
        """Run slot seq's decode loop here, from `token` at position `start` (see Chain)."""
        c = Chain(seq, choose)
        self._queue(_Eval(seq, np.array([token], np.int64), int(start), chain=c))
        return c

    def stop_chain(self, c: Chain) -> None:
        """End a chain early (its reader has stopped): returns once no evaluation of it waits or runs."""
        with self._cond:
            c.stopped = True
            e = self._pending.get(c.seq)
            if e is not None and e.chain is c and e not in self._running:
                del self._pending[c.seq]
                c.idle.set()
            self._cond.notify_all()
        c.idle.wait()

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
            if e.chain is not None:
                e.chain._end("error", e.error)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
            self._cond.notify_all()
        for e in pending:
            e.error = SequenceAborted("the batcher is closed")
            e.event.set()
            if e.chain is not None:
                e.chain._end("error", e.error)
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
            parts = self._take()
            self._running = [e for e, _ in parts]
            return parts

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
        chains = []
        with self._cond:
            self._running = []
            for e, row in results:
                if self._pending.get(e.seq) is e:
                    del self._pending[e.seq]
                else:  # aborted meanwhile: its waiter has been woken already
                    continue
                e.logits, e.error = row, error
                e.event.set()
                if e.chain is not None:
                    chains.append(e)
        if chains:
            self._advance(chains)

    def _advance(self, evals: list[_Eval]) -> None:
        """Chains' evaluations have run: choose each one's next token (outside the lock: it samples),
        queue those for the next step, and only then hand the tokens to the sequences' threads, whose
        wake-ups would otherwise slow this thread down while it chooses."""
        out: list[tuple[Chain, str, object]] = []  # what each chain's reader gets, in order
        follow: list[tuple[_Eval, int]] = []
        for e in evals:
            c = e.chain
            if e.error is not None:
                out.append((c, "error", e.error))
                continue
            token = int(e.tokens[0])
            c.evaluated.append(token)
            c.logits = e.logits
            if c.stopped:
                c.idle.set()
                continue
            try:
                nxt, more = c.choose(e.logits, token)
            except BaseException as err:  # noqa: BLE001 - the sequence's thread raises it
                out.append((c, "error", err))
                continue
            if nxt is not None:
                out.append((c, "token", nxt))
            if nxt is None or not more:
                out.append((c, "end", None))
            else:
                follow.append((e, nxt))
        with self._cond:
            for e, nxt in follow:
                c = e.chain
                if c.stopped:
                    c.idle.set()
                elif self._closed:
                    out.append((c, "error", SequenceAborted("the batcher is closed")))
                elif e.seq in self._pending:
                    out.append((c, "error", RuntimeError(f"slot {e.seq} already has an evaluation waiting")))
                else:
                    self._pending[e.seq] = _Eval(e.seq, np.array([nxt], np.int64), e.start + 1, chain=c)
            if self._pending and self._ready():
                self._cond.notify_all()
        for c, kind, value in out:
            if kind == "token":
                c.out.put((kind, value))
            else:
                c._end(kind, value)
        out.clear()  # an error's traceback holds this frame: were the frame to hold the error, the cycle
        value = None  # would keep both (and the sequences' logits) until a full collection

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
    view._chain = lambda token, start, choose: batcher.chain(seq, token, start, choose)
    view._chain_stop = batcher.stop_chain
    return view
