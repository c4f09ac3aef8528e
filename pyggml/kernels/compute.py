"""The one thread of the process that starts the CPU backend's parallel kernels.

numba's parallel kernels (threading layer "omp", GNU OpenMP) run on a team of threads that belongs to
the thread that starts them, and a thread keeps its team for as long as it lives. With two live
teams libgomp manages more threads than there are CPUs and stops spinning between parallel regions,
so every region pays for waking its team. Measured on a 2-core host (numba 0.68, libgomp): a
2-thread `prange` over 20,000 floats took 13.5 us a call from the only team's thread and 67-74 us
from a second thread while the main thread's team lived; a tiny model's decode token 0.3 ms against
2.4-2.8 ms. Loading on the main thread and then decoding on a worker thread is exactly what a server
does (and an application that embeds the library in a thread pool).

So the CPU backend's kernels run on one thread, `pyggml-cpu`, started on first use: `call` hands the
work over and waits (the model hands over whole forward passes, one hand-over per pass, not per
kernel). numba's thread count is a per-thread setting; each call carries the count it wants.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

class _Work:
    __slots__ = ("fn", "args", "kwargs", "threads", "done", "result", "error")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, threads: int):
        self.fn, self.args, self.kwargs, self.threads = fn, args, kwargs, threads
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Worker:
    def __init__(self):
        self.queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="pyggml-cpu", daemon=True)
        self.threads = 0  # numba's thread count on this thread (0: not set yet)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            w = self.queue.get()
            try:
                w.result = self.run(w.fn, w.args, w.kwargs, w.threads)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                w.error = e
            finally:
                w.done.set()

    def run(self, fn: Callable, args: tuple, kwargs: dict, threads: int) -> Any:
        """fn(*args, **kwargs) here, on the worker's thread, with `threads` numba threads."""
        if threads != self.threads:
            import numba

            numba.set_num_threads(threads)
            self.threads = threads
        return fn(*args, **kwargs)


_worker: _Worker | None = None
_ident = -1  # the compute thread's threading.get_ident()
_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _worker, _lock, _ident
    _worker, _lock, _ident = None, threading.Lock(), -1  # the child has no such thread: the next call starts one


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _get() -> _Worker:
    global _worker, _ident
    w = _worker
    if w is None:
        with _lock:
            if _worker is None:
                _worker = _Worker()
                _ident = _worker.thread.ident
            w = _worker
    return w


def here() -> bool:
    """Whether the caller is the compute thread (whose numba thread count is the current call's)."""
    return threading.get_ident() == _ident


def call(fn: Callable, *args: Any, threads: int, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on the compute thread with `threads` numba threads; its result, or its
    exception raised here. Calls from several threads run one at a time, in the order they come. A
    KeyboardInterrupt while waiting is raised once the work has finished (it may be writing a KV cache)."""
    w = _get()
    if here():
        return w.run(fn, args, kwargs, threads)
    work = _Work(fn, args, kwargs, threads)
    w.queue.put(work)
    interrupted: BaseException | None = None
    while True:
        try:
            work.done.wait()
            break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
    if work.error is not None:
        raise_error_of(work)
    return work.result


def raise_error_of(holder: Any) -> None:
    """Raise holder.error (another thread's exception handed over), taking it off the holder first: the
    exception's traceback holds the raising frames, so a frame (or a holder it holds) that kept the
    exception would make a cycle that keeps both, and whatever they hold, until a full collection."""
    err, holder.error = holder.error, None
    try:
        raise err
    finally:
        err = None
