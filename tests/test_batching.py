"""Continuous batching: a forward pass over tokens of several sequences equals running each sequence by
itself, and the Batcher / engine serve concurrent requests with the text each returns alone.

On the f32 model the batched and the one-at-a-time products differ only in float summation order
(np.matmul over a batch against the per-row dot of one token), so logits agree to float32 rounding.
The q8_0 file keeps some matrices in F16, which a batch multiplies with register tiles and one token
with a row dot: a last-bit difference there can move one activation across an int8 rounding boundary
of the next Q8_0 product, so its logits agree within the suite's stated int8-flip bound (2e-2 of the
largest logit, tests/test_model.py) and its greedy tokens are equal."""
import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pyggml import Llama
from pyggml.model.kvcache import KVCache
from pyggml.model.llama import batch_runs
from pyggml.server.batching import Batcher, SequenceAborted, sequence_view
from pyggml.server.engine import LlamaEngine

PROMPTS = ["Once upon a time", "The dog ran to the park and", "Lily saw a bird", "Tim had a red ball. He",
           "One day", "The sun was hot", "Sam and Mia played", "A little cat"]


@pytest.fixture(scope="module")
def stories_q8(stories_f32, tmp_path_factory):
    from pyggml.quantize import quantize_file

    out = tmp_path_factory.mktemp("q8") / "stories-q8_0.gguf"
    quantize_file(stories_f32, "q8_0", out)
    return out


def _tolerance(logits: np.ndarray, int8: bool) -> float:
    """float32 rounding of sums over the model's widths, on the scale of the logits (the batched and the
    one-token products add the same terms in another order); with int8 activations, one code flip."""
    return (2e-2 if int8 else 64 * np.finfo(np.float32).eps) * float(np.abs(logits).max())


def test_batch_runs():
    pos = np.array([5, 6, 7, 0, 3, 4])
    seq = np.array([1, 1, 1, 0, 2, 2])
    assert [(r.seq, r.start, r.t0, r.t1) for r in batch_runs(pos, seq)] == [(1, 5, 0, 3), (0, 0, 3, 4), (2, 3, 4, 6)]


@pytest.mark.parametrize("fixture", ["stories_f32", "stories_q8"])
def test_forward_batch_equals_each_sequence_alone(fixture, request):
    path = request.getfixturevalue(fixture)
    with Llama(str(path), n_ctx=64, n_threads=2, verbose=False) as llm:
        model = llm.model
        prompts = [llm.tokenize(p) for p in PROMPTS[:3]]
        steps = 6
        # alone: each sequence in its own cache, prompt in one batch, then greedy one token at a time
        alone = []
        for p in prompts:
            cache = KVCache(llm.config, 64, [layer.backend for layer in model.layers])
            rows = [model.forward(np.array(p), 0, cache)]
            toks = list(p)
            for _ in range(steps):
                toks.append(int(np.argmax(rows[-1])))
                rows.append(model.forward(np.array(toks[-1:]), len(toks) - 1, cache))
            alone.append((rows, toks))
        # together: every prompt in one batch on slots 2, 0, 1, then decode steps of three tokens
        cache = KVCache(llm.config, 64, [layer.backend for layer in model.layers], n_seq=3)
        slots = [2, 0, 1]
        tokens = np.concatenate([p for p in prompts])
        positions = np.concatenate([np.arange(len(p)) for p in prompts])
        seqs = np.concatenate([np.full(len(p), s) for p, s in zip(prompts, slots)])
        ends = np.cumsum([len(p) for p in prompts]) - 1
        got = model.forward_batch(tokens, positions, seqs, cache, ends)
        for step in range(steps + 1):
            for i, (rows, toks) in enumerate(alone):
                tol = _tolerance(rows[step], fixture == "stories_q8")
                np.testing.assert_allclose(got[i], rows[step], rtol=0, atol=tol, err_msg=f"sequence {i}, step {step}")
                assert int(np.argmax(got[i])) == toks[len(prompts[i]) + step] if step < steps else True
            if step == steps:
                break
            nxt = [toks[len(prompts[i]) + step] for i, (_, toks) in enumerate(alone)]
            pos = [len(prompts[i]) + step for i in range(3)]
            got = model.forward_batch(np.array(nxt), np.array(pos), np.array(slots), cache)


def test_forward_batch_refuses_bad_batches(stories_f32):
    with Llama(str(stories_f32), n_ctx=16, n_threads=2, verbose=False, n_seq_max=2) as llm:
        m, c = llm.model, llm.kv_cache
        with pytest.raises(ValueError, match="sequence 2 out of range"):
            m.forward_batch([1, 2], [0, 1], [2, 2], c)
        with pytest.raises(ValueError, match="do not fit the context"):
            m.forward_batch([1, 2], [15, 16], [0, 0], c)
        with pytest.raises(ValueError, match="must be consecutive"):
            m.forward_batch([1, 2, 3], [0, 0, 1], [0, 1, 0], c)
        with pytest.raises(ValueError, match="as many positions"):
            m.forward_batch([1, 2], [0], [0, 0], c)


def _greedy_alone(path, prompts, n_tokens):
    with Llama(str(path), n_ctx=128, n_threads=2, verbose=False) as llm:
        return [llm.create_completion(p, max_tokens=n_tokens, temperature=0)["choices"][0]["text"] for p in prompts]


@pytest.mark.parametrize("fixture,n_slots", [("stories_f32", 16), ("stories_f32", 4), ("stories_q8", 8)])
def test_concurrent_greedy_requests_equal_their_text_alone(fixture, n_slots, request):
    path = request.getfixturevalue(fixture)
    prompts = (PROMPTS * 2)[:16]
    want = _greedy_alone(path, prompts, 24)
    with Llama(str(path), n_ctx=128, n_threads=2, verbose=False, n_seq_max=n_slots) as llm:
        batcher = Batcher(llm.model, llm.kv_cache, n_batch=64)
        views = [sequence_view(llm, batcher, s) for s in range(n_slots)]
        free = list(range(n_slots))
        lock = threading.Lock()

        def ask(prompt):
            with lock:
                s = free.pop()
            try:
                return views[s].create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
            finally:
                batcher.release(s)
                with lock:
                    free.append(s)

        try:
            with ThreadPoolExecutor(n_slots) as pool:
                got = list(pool.map(ask, prompts))
        finally:
            batcher.close()
    assert got == want
    assert batcher.stats["max_batch"] > 1  # sequences did share forward passes
    assert batcher.stats["decode_tokens"] >= 16 * 23


def test_long_prompt_is_prefilled_in_chunks_beside_running_decodes(stories_f32):
    with Llama(str(stories_f32), n_ctx=256, n_threads=2, verbose=False, n_seq_max=2) as llm:
        long_prompt = " ".join(PROMPTS * 4)
        want = _greedy_alone_ctx(stories_f32, [PROMPTS[0], long_prompt], 16, 256)
        batcher = Batcher(llm.model, llm.kv_cache, n_batch=8)  # a long prompt takes many steps
        views = [sequence_view(llm, batcher, s) for s in range(2)]

        def ask(s, prompt):
            try:
                return views[s].create_completion(prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
            finally:
                batcher.release(s)

        try:
            with ThreadPoolExecutor(2) as pool:
                got = list(pool.map(ask, [0, 1], [PROMPTS[0], long_prompt]))
        finally:
            batcher.close()
    assert got == want
    assert batcher.stats["max_batch"] == 8


def _greedy_alone_ctx(path, prompts, n_tokens, n_ctx):
    with Llama(str(path), n_ctx=n_ctx, n_threads=2, verbose=False) as llm:
        return [llm.create_completion(p, max_tokens=n_tokens, temperature=0)["choices"][0]["text"] for p in prompts]


def test_abort_wakes_a_waiting_sequence_and_the_slot_is_reusable(stories_f32):
    with Llama(str(stories_f32), n_ctx=128, n_threads=2, verbose=False, n_seq_max=2) as llm:
        gate = threading.Event()
        real = llm.model.forward_batch

        def held(*a, **kw):  # the first pass waits, so the abort comes while slot 1 is waiting
            assert gate.wait(10)
            return real(*a, **kw)

        llm.model.forward_batch = held
        batcher = Batcher(llm.model, llm.kv_cache, n_batch=64)
        view = sequence_view(llm, batcher, 1)
        errors = []

        def run():
            try:
                view.create_completion(PROMPTS[1], max_tokens=8, temperature=0)
            except SequenceAborted as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while not batcher._pending:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        batcher.abort(1)
        t.join(10)
        gate.set()
        assert len(errors) == 1 and not t.is_alive()
        llm.model.forward_batch = real
        try:
            text = view.create_completion(PROMPTS[0], max_tokens=16, temperature=0)["choices"][0]["text"]
        finally:
            batcher.close()
    assert text == _greedy_alone(stories_f32, [PROMPTS[0]], 16)[0]


def test_engine_slots_reuse_a_shared_prefix(stories_f32):
    """A follow-up request goes to the slot that holds its prefix and evaluates only the new tokens."""
    llm = Llama(str(stories_f32), n_ctx=128, n_threads=2, verbose=False, n_seq_max=3)
    engine = LlamaEngine(llm, n_parallel=3)

    async def ask(prompt):
        job = engine.submit("completion", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        return [item async for item in job][0], job

    try:
        first, _ = asyncio.run(ask("Once upon a time there was a little girl named Lily."))
        slot = next(i for i, v in enumerate(engine.slots) if v.tokens)
        follow = "Once upon a time there was a little girl named Lily. She liked"
        _, job = asyncio.run(ask(follow))
        assert [i for i, v in enumerate(engine.slots) if v.tokens] == [slot]  # the same slot took it
        n_new = len(llm.tokenize(follow)) - len(llm.tokenize("Once upon a time there was a little girl named Lily."))
        assert job.timings["prompt_n"] <= n_new + 1
        assert engine.status() == {"slots_idle": 3, "slots_processing": 0, "requests_queued": 0}
    finally:
        engine.close()
        llm.close()


def test_chained_decode_keeps_every_generation_rule(stories_f32):
    """The batcher runs a plain sequence's decode loop itself (batching.Chain): sampled requests (their
    own seeded RNG, penalties), stop strings, max_tokens and end-of-generation give the text and the
    finish reasons they give alone; the slot's context holds exactly the evaluated tokens, so a
    follow-up request on it matches a fresh one; a cancel raised by the check before a token comes out of
    the sequence's thread and leaves the slot reusable."""
    asks = [dict(prompt=PROMPTS[0], max_tokens=20, temperature=0.8, seed=7, repeat_penalty=1.3),
            dict(prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=["small"]),
            dict(prompt=PROMPTS[2], max_tokens=1, temperature=0),
            dict(prompt=PROMPTS[3], max_tokens=120, temperature=0)]
    with Llama(str(stories_f32), n_ctx=128, n_threads=2, verbose=False) as alone:
        want = [alone.create_completion(**a)["choices"][0] for a in asks]
        follow = alone.create_completion(PROMPTS[4], max_tokens=12, temperature=0)["choices"][0]["text"]
    assert {w["finish_reason"] for w in want} == {"stop", "length"}
    with Llama(str(stories_f32), n_ctx=128, n_threads=2, verbose=False, n_seq_max=4) as llm:
        batcher = Batcher(llm.model, llm.kv_cache, n_batch=64)
        views = [sequence_view(llm, batcher, s) for s in range(4)]
        try:
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda i: views[i].create_completion(**asks[i])["choices"][0], range(4)))
            assert [(g["text"], g["finish_reason"]) for g in got] == [(w["text"], w["finish_reason"]) for w in want]
            assert batcher.stats["max_batch"] > 1
            # the context is what the cache holds: the prompt and every token but the last (not evaluated)
            for i in (0, 2):
                assert want[i]["finish_reason"] == "length"
                n_prompt = len(llm.tokenize(asks[i]["prompt"].encode()))
                assert len(views[i].tokens) == n_prompt + asks[i]["max_tokens"] - 1
            assert views[1].create_completion(PROMPTS[4], max_tokens=12, temperature=0)["choices"][0]["text"] == follow

            calls = []

            def cancel_third():
                calls.append(threading.current_thread().name)
                if len(calls) == 3:
                    raise KeyError("cancelled")

            views[2].before_token = cancel_third
            with pytest.raises(KeyError, match="cancelled"):
                views[2].create_completion(PROMPTS[5], max_tokens=30, temperature=0)
            assert "pyggml-batcher" in calls  # the check ran where the chain chooses its tokens
            views[2].before_token = None
            assert views[2].create_completion(PROMPTS[4], max_tokens=12, temperature=0)["choices"][0]["text"] == follow
        finally:
            batcher.close()
    assert not batcher._pending


def test_an_error_handed_to_a_sequence_leaves_no_cycle(stories_f32):
    """An error the batcher hands a sequence (here a cancel raised by the check on the batcher's thread)
    is raised without a reference cycle through the frames it passes (exception -> traceback -> frame ->
    exception): they and the generation's logits go when the request ends, not when the cyclic
    collector next runs, which on a quiet server may be never (the abuse run's first round kept ~70 MiB
    of batch logits that way)."""
    with Llama(str(stories_f32), n_ctx=128, n_threads=2, verbose=False, n_seq_max=2) as llm:
        batcher = Batcher(llm.model, llm.kv_cache, n_batch=64)
        view = sequence_view(llm, batcher, 0)
        calls = []

        def cancel_third():
            calls.append(1)
            if len(calls) == 3:
                raise KeyError("cancelled")

        view.before_token = cancel_third
        gc.collect()
        gc.disable()
        try:
            try:
                view.create_completion(PROMPTS[5], max_tokens=30, temperature=0)
            except KeyError:
                pass
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            ours = [o for o in gc.garbage if type(o).__name__ == "frame" and "pyggml" in o.f_code.co_filename]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            batcher.close()
        assert len(calls) == 3
        assert not ours, [f"{f.f_code.co_name} {f.f_code.co_filename}:{f.f_lineno}" for f in ours]


def test_warm_up_batches_is_for_captured_batch_steps_only(stories_f32):
    """On the CPU (no captured batch steps) the server's warm-up runs nothing and writes nothing."""
    with Llama(str(stories_f32), n_ctx=64, n_threads=2, verbose=False, n_seq_max=4) as llm:
        layers = range(llm.config.n_layers)
        before = [np.array(llm.kv_cache.storage(i), copy=True) for i in layers]
        assert llm.model.warm_up_batches(llm.kv_cache, 1) == []
        assert all(np.array_equal(b, llm.kv_cache.storage(i)) for i, b in zip(layers, before))
