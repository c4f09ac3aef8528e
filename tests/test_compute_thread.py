"""The CPU backend's parallel kernels start on one thread of the process (pyggml/kernels/compute.py):
a model loaded on one thread and run from others never gives numba a second OpenMP team."""
import threading

import numba
import numpy as np
import pytest

from pyggml.api import Llama
from pyggml.gguf.constants import GGMLType
from pyggml.kernels import compute
from pyggml.synthetic import write_random_model


def test_call_runs_every_caller_on_one_thread():
    seen = []

    def work(v):
        seen.append(threading.get_ident())
        return v * 2

    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(compute.call(work, i, threads=1))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 2, 4, 6]
    assert compute.call(work, 5, threads=1) == 10
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()
    assert compute.call(compute.here, threads=1) and not compute.here()


def test_call_raises_the_works_error_and_nests():
    def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        compute.call(fail, threads=1)
    # a call made on the compute thread runs there at once (no deadlock), with the thread count it asks for
    assert compute.call(lambda: compute.call(numba.get_num_threads, threads=1), threads=numba.config.NUMBA_NUM_THREADS) == 1


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compute") / "tiny-q8_0.gguf"
    write_random_model(path, "tiny", GGMLType.Q8_0)
    return path


def test_model_kernels_start_on_the_compute_thread_with_its_threads(tiny_file, monkeypatch):
    """Loaded here, generating from two other threads: every kernel the CPU backend starts runs on
    the compute thread, with the Llama's n_threads, and the text is the one generated here."""
    llm = Llama(str(tiny_file), n_ctx=64, n_threads=1, verbose=False)
    backend = llm.model.layers[0].backend
    kernels = backend.k
    calls = []

    class Recording:
        def __getattr__(self, name):
            f = getattr(kernels, name)
            if not callable(f):
                return f

            def record(*args, **kwargs):
                calls.append((threading.get_ident(), numba.get_num_threads()))
                return f(*args, **kwargs)
            return record

    expected = llm.create_completion("ab", max_tokens=6, temperature=0.0)["choices"][0]["text"]
    monkeypatch.setattr(backend, "k", Recording())
    texts = []
    workers = [threading.Thread(target=lambda: texts.append(
        llm.create_completion("ab", max_tokens=6, temperature=0.0)["choices"][0]["text"])) for _ in range(2)]
    for w in workers:
        w.start()
        w.join()  # one after another: a Llama holds one sequence
    assert texts == [expected, expected]
    assert calls and {c for c in calls} == {(calls[0][0], 1)}
    assert calls[0][0] not in {w.ident for w in workers} | {threading.get_ident()}
