"""Decode steps of several sequences at once, one token each, captured as CUDA graphs: LlamaModel's
batch forward (decode_batch_logits) captured once per batch size bucket and replayed, its token /
position / sequence ids copied in once a step. A mixin of CUDABackend (backend.py)."""
from __future__ import annotations

import ctypes

import numpy as np

from .module import MMQ_TYPES


class _BatchStep:
    """A captured decode step of `size` sequences: its token / position / sequence ids on the device
    (filled through pinned memory, one copy), the memory pool its temporaries live in (the graph's
    alone: blocks the capture freed are the graph's to reuse), the graph and its logits."""

    def __init__(self, cp, size: int):
        self.size = size
        self.ids = cp.zeros(3 * size, np.int64)
        self.tok, self.pos, self.seq = (self.ids[i * size:(i + 1) * size] for i in range(3))
        self.host = cp.cuda.alloc_pinned_memory(self.ids.nbytes)
        self.host_np = np.frombuffer(self.host, np.int64, 3 * size)
        self.pool = cp.cuda.MemoryPool()
        self.graph = self.logits = None
        self.host_logits = None  # pinned memory the logits come back through
        self.capturable = False  # every product of the model on mmq (set by decode_batch)

    def put(self, tokens, positions, seqs) -> None:
        """The batch's ids into the pinned buffer, padded to the size with copies of the last token (which
        writes the same cache row with the same values)."""
        n, size = len(tokens), self.size
        for i, a in enumerate((tokens, positions, seqs)):
            row = self.host_np[i * size:(i + 1) * size]
            row[:n] = a
            row[n:] = a[n - 1]


BATCH_BUCKETS = (2, 4, 8, 16, 32, 64)  # the batch sizes decode_batch captures a step for


class BatchedDecode:
    """decode_batch for LlamaModel.forward_batch: batches of up to decode_batch_max single tokens."""

    decode_batch_max = BATCH_BUCKETS[-1]  # larger decode batches run op by op
    batch_sizes = BATCH_BUCKETS  # what LlamaModel.warm_up_batches runs once each
    capture_batches = True  # replay captured steps (False: run the same padded batches eagerly)

    def _capturable(self, model) -> bool:
        """Whether every product of a decode batch runs on mmq (the batch forward can be captured)."""
        mats = [model.output] + [w for L in model.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
        return self.mma and all(w.ggml_type in MMQ_TYPES for w in mats)

    def decode_batch(self, model, tokens, positions, seqs, cache) -> np.ndarray:
        """Next-token logits (n, n_vocab) on the host of n <= decode_batch_max single tokens of distinct
        sequences, every layer and the head here: model.decode_batch_logits, captured once per batch size
        bucket and replayed. A bucket's first batch runs it eagerly (that compiles what it needs and fills
        the step's memory pool with every block the capture then takes), and captures it after."""
        cp, s = self.cp, self.stream
        n = len(tokens)
        size = next(b for b in BATCH_BUCKETS if b >= n)
        key = (id(model), cache.storage(0).data.ptr, cache.n_ctx, cache.type_names, size)
        step = self._batch_steps.get(key)
        if step is None:
            if len(self._batch_steps) >= 2 * len(BATCH_BUCKETS):
                self._batch_steps.pop(next(iter(self._batch_steps)))
            step = self._batch_steps[key] = _BatchStep(cp, size)
            step.capturable = self._capturable(model)
        step.put(tokens, positions, seqs)
        self._queued.record(cp.cuda.get_current_stream())
        s.wait_event(self._queued)
        step.ids.data.copy_from_host_async(ctypes.c_void_p(step.host.ptr), step.ids.nbytes, stream=s)
        if step.graph is None or not self.capture_batches:  # eagerly, and captured after when it can be
            m = size if step.capturable else n  # cuBLAS (the float types' batches) picks by shape: unpadded
            with s, cp.cuda.using_allocator(step.pool.malloc):
                logits = cp.asnumpy(model.decode_batch_logits(step.tok[:m], step.seq[:m], step.pos[:m], cache)[:n], stream=s)
                if step.capturable and self.capture_batches:  # cupy cannot capture cuBLAS
                    s.synchronize()
                    s.begin_capture()
                    try:
                        step.logits = model.decode_batch_logits(step.tok, step.seq, step.pos, cache)
                    finally:
                        graph = s.end_capture()
                    step.graph = graph  # not when the capture raised: the next batch tries again
            return logits
        step.graph.launch(stream=s)
        vocab = step.logits.shape[1]
        if step.host_logits is None:
            step.host_logits = cp.cuda.alloc_pinned_memory(step.logits.nbytes)
        step.logits.data.copy_to_host_async(ctypes.c_void_p(step.host_logits.ptr), 4 * n * vocab, stream=s)
        s.synchronize()
        return np.frombuffer(step.host_logits, np.float32, n * vocab).reshape(n, vocab).copy()  # the buffer is the next step's
