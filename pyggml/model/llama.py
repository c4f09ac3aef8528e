"""The LLaMA forward pass over weights that stay in the GGUF mmap.

Blueprint (LlamaConfig) / weights (views into the file, each placed on a backend) / state
(the KV cache) are separate. `forward_batch(tokens, positions, seqs, cache, rows)` runs one batch in
which every token has its own position and sequence (slot of the cache): the products read each weight
once for the whole batch, attention looks only at the token's own sequence. `forward(tokens, start_pos,
cache)` is the batch of one sequence.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..backends import Backend
from ..gguf.constants import GGMLType, TensorNames
from ..gguf.reader import GGUFFile
from ..quant.registry import check_computable
from ..tensor import QWeight
from .config import LlamaConfig, ModelError
from . import archs
from .kvcache import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """Tokens t0..t1-1 of a batch: consecutive positions start.. of sequence seq."""

    seq: int
    start: int
    t0: int
    t1: int


def batch_runs(positions: np.ndarray, seqs: np.ndarray) -> list[Run]:
    """The batch cut where the sequence changes or the positions stop being consecutive."""
    runs, t0, n = [], 0, len(positions)
    for t in range(1, n + 1):
        if t == n or seqs[t] != seqs[t - 1] or positions[t] != positions[t - 1] + 1:
            runs.append(Run(int(seqs[t0]), int(positions[t0]), t0, t))
            t0 = t
    return runs


@dataclass
class Layer:
    backend: Backend
    attn_norm: np.ndarray  # (dim,)
    wq: QWeight  # (q_dim, dim): rows in adjacent-pair RoPE order (NeoX files: permuted at load)
    wk: QWeight  # (kv_dim, dim)
    wv: QWeight  # (kv_dim, dim)
    wo: QWeight  # (dim, q_dim)
    ffn_norm: np.ndarray  # (dim,)
    w_gate: QWeight  # (ffn_dim, dim)
    w_up: QWeight  # (ffn_dim, dim)
    w_down: QWeight  # (dim, ffn_dim)
    bq: object = None  # (q_dim,), bk, bv (kv_dim,): qwen2's Q/K/V biases
    bk: object = None
    bv: object = None
    q_norm: object = None  # (head_dim,): qwen3's RMSNorm of each q / k head
    k_norm: object = None


def _whole_pass(method):
    """The forward pass runs on the compute thread when a CPU backend takes part in it."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self._compute is None:
            return method(self, *args, **kwargs)
        return self._compute.on_compute_thread(method, self, *args, **kwargs)
    return run


class LlamaModel:
    """Weights and forward pass of one LLaMA model. Stateless apart from the KV cache passed in."""

    def __init__(self, gguf: GGUFFile, config: LlamaConfig, backends: Sequence[Backend], head_backend: Backend):
        """`config` is LlamaConfig.from_metadata(gguf.metadata); `backends[i]` runs layer i;
        `head_backend` runs the embedding lookup, final norm and output."""
        self.file = gguf
        self.config = cfg = config
        if len(backends) != cfg.n_layers:
            raise ValueError(f"{len(backends)} backends for {cfg.n_layers} layers")
        self.head_backend = head_backend
        # Token embeddings are gathered a few rows at a time on the CPU side of the head backend; the
        # model multiplies by them only when they are also the output head (tied).
        tied = TensorNames.OUTPUT not in gguf.tensors
        self.tok_embd = self._matrix(head_backend, TensorNames.TOKEN_EMBD, (cfg.n_vocab, cfg.dim), products=tied)
        self.output_norm = head_backend.load_vector(self._vector(TensorNames.OUTPUT_NORM, cfg.dim))
        if tied:
            self.output = self.tok_embd
        else:
            self.output = self._matrix(head_backend, TensorNames.OUTPUT, (cfg.n_vocab, cfg.dim))
        self.arch = cfg.architecture
        self._neox = archs.neox_order(1, cfg.head_dim, cfg.rope_dim) if self.arch.rope_neox else None
        self.layers = [self._layer(i, b) for i, b in enumerate(backends)]
        # a CPU backend starts its kernels on one thread (kernels/compute.py): whole passes are handed to it
        self._compute = next((b for b in (*backends, head_backend) if hasattr(b, "on_compute_thread")), None)
        # one token may run as one fused step of a backend when every layer is there and it runs this block
        self._all_on_head = all(b is head_backend for b in backends) and self._fused_step(head_backend) is not None
        self.inv_freq = self._rope_frequencies()  # (rope_dim/2,)
        self._check_no_unused_tensors()

    # --------------------------------------------------------------------------- weights
    def _rope_frequencies(self) -> np.ndarray:
        """theta_i = base^(-2i / rope_dim), divided by rope.scaling.factor (linear) and by the file's
        rope_freqs.weight factors (Llama 3.1+) where it has them."""
        cfg = self.config
        half = np.arange(cfg.rope_dim // 2, dtype=np.float64)
        inv_freq = cfg.rope_freq_base ** (-2.0 * half / cfg.rope_dim) / cfg.rope_linear_factor
        if TensorNames.ROPE_FREQS in self.file.tensors:
            if not self.arch.rope_freqs:
                raise ModelError(f"{self.file.path}: tensor {TensorNames.ROPE_FREQS!r} is not used by {self.arch.name}")
            factors = self._vector(TensorNames.ROPE_FREQS, cfg.rope_dim // 2).astype(np.float64)
            if not (np.isfinite(factors).all() and (factors > 0).all()):
                raise ModelError(f"{self.file.path}: tensor {TensorNames.ROPE_FREQS!r} holds non-positive or non-finite factors")
            inv_freq = inv_freq / factors
        return inv_freq

    def _check_no_unused_tensors(self) -> None:
        cfg = self.config
        used = {TensorNames.TOKEN_EMBD, TensorNames.OUTPUT_NORM, TensorNames.OUTPUT, TensorNames.ROPE_FREQS}
        used |= {t.format(i=i) for i in range(cfg.n_layers) for t in self.arch.block_tensors()}
        unused = sorted(set(self.file.tensors) - used)
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise ModelError(f"{self.file.path}: tensor {unused[0]!r}{more} is not used by architecture {self.arch.name!r}; "
                             f"running without it would compute something else")

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.file.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.file.path}: tensor {name!r} is missing")
        if info.shape != shape:
            raise ModelError(f"{self.file.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def _matrix(self, b: Backend, name: str, shape: tuple[int, int], products: bool = True, heads: int = 0) -> QWeight:
        """The weight as backend b holds it. products: the model multiplies by it (then the backend
        reads all of it now: its pages are mapped in one call). heads: a NeoX file's q or k projection
        of that many heads, whose rows are put in adjacent-pair order (a copy)."""
        info = self._info(name, shape)
        check_computable(f"{self.file.path}: tensor {name!r}", info.ggml_type)
        if products:
            self.file.populate(name)
        raw = self.file.tensor(name)
        if heads and self._neox is not None:
            raw = np.ascontiguousarray(raw[self._head_order(heads)])
        w = b.load_weight(QWeight(name, raw, info.ggml_type, shape), products=products)
        if w.packed is not None or w.raw is not raw:
            # the products read the backend's copy (packed rows, GPU memory): the file's pages leave this
            # process, so resident memory holds the weights once; anything that reads them later (a last
            # partial row group, embedding rows) faults back in just those pages
            self.file.release(name)
        return w

    def _head_order(self, heads: int) -> np.ndarray:
        return (np.arange(heads)[:, None] * self.config.head_dim + self._neox[None, :]).reshape(-1)

    def _optional_vector(self, b: Backend, name: str, n: int, heads: int = 0):
        """A bias or per-head norm weight on backend b (permuted like its projection in a NeoX file)."""
        v = self._vector(name, n)
        if self._neox is not None:
            v = v[self._head_order(heads)] if heads else v[self._neox]
        return b.load_vector(v)

    def _vector(self, name: str, n: int) -> np.ndarray:
        info = self._info(name, (n,))
        if info.ggml_type not in (GGMLType.F32, GGMLType.F16):
            raise ModelError(f"{self.file.path}: tensor {name!r} is {info.ggml_type.name}, expected F32 or F16")
        return self.file.tensor(name).astype(np.float32)

    def _layer(self, i: int, b: Backend) -> Layer:
        cfg, arch = self.config, self.arch
        n = lambda t: t.format(i=i)  # noqa: E731
        m = lambda t, shape, heads=0: self._matrix(b, n(t), shape, heads=heads)  # noqa: E731
        layer = Layer(
            backend=b,
            attn_norm=b.load_vector(self._vector(n(TensorNames.ATTN_NORM), cfg.dim)),
            wq=m(TensorNames.ATTN_Q, (cfg.q_dim, cfg.dim), cfg.n_heads),
            wk=m(TensorNames.ATTN_K, (cfg.kv_dim, cfg.dim), cfg.n_kv_heads),
            wv=m(TensorNames.ATTN_V, (cfg.kv_dim, cfg.dim)),
            wo=m(TensorNames.ATTN_OUTPUT, (cfg.dim, cfg.q_dim)),
            ffn_norm=b.load_vector(self._vector(n(TensorNames.FFN_NORM), cfg.dim)),
            w_gate=m(TensorNames.FFN_GATE, (cfg.ffn_dim, cfg.dim)),
            w_up=m(TensorNames.FFN_UP, (cfg.ffn_dim, cfg.dim)),
            w_down=m(TensorNames.FFN_DOWN, (cfg.dim, cfg.ffn_dim)),
        )
        if arch.qkv_bias:
            layer.bq = self._optional_vector(b, n(TensorNames.ATTN_Q_BIAS), cfg.q_dim, cfg.n_heads)
            layer.bk = self._optional_vector(b, n(TensorNames.ATTN_K_BIAS), cfg.kv_dim, cfg.n_kv_heads)
            layer.bv = b.load_vector(self._vector(n(TensorNames.ATTN_V_BIAS), cfg.kv_dim))
        if arch.qk_norm:
            layer.q_norm = self._optional_vector(b, n(TensorNames.ATTN_Q_NORM), cfg.head_dim)
            layer.k_norm = self._optional_vector(b, n(TensorNames.ATTN_K_NORM), cfg.head_dim)
        return layer

    # ------------------------------------------------------------------------ forward
    def _layer_forward(self, layer: Layer, li: int, x, single: Run | None, cache: KVCache, index):
        """x: (n_tok, dim) on the layer's backend -> same, after attention and FFN residuals. single: the
        batch's one run when it is one sequence's tokens, else None; index(b): the batch's (sequence ids,
        positions) on backend b."""
        cfg, b = self.config, layer.backend
        n_tok = x.shape[0]
        h = b.rmsnorm(x, layer.attn_norm, cfg.rms_eps)
        q, k, v = b.matmuls((layer.wq, layer.wk, layer.wv), h)
        if layer.bq is not None:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        if layer.q_norm is not None:  # each head of q and k by itself
            q = b.rmsnorm(q.reshape(-1, cfg.head_dim), layer.q_norm, cfg.rms_eps)
            k = b.rmsnorm(k.reshape(-1, cfg.head_dim), layer.k_norm, cfg.rms_eps)
        q = q.reshape(n_tok, cfg.n_heads, cfg.head_dim)
        k = k.reshape(n_tok, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(n_tok, cfg.n_kv_heads, cfg.head_dim)
        seqs, pos = index(b)  # on the backend, once a forward pass (not once an op)
        b.rope(q, pos, self.inv_freq)
        b.rope(k, pos, self.inv_freq)
        cache.write_tokens(li, seqs, pos, k, v)  # encoded as the cache stores them
        if single is not None:
            att = b.attention(q, *cache.layer(li, single.seq), single.start, *cache.types)
        else:  # several sequences: each token attends to its own slot
            att = b.attention_seqs(q, *cache.slots(li), seqs, pos, *cache.types)
        x = x + b.matmul(layer.wo, att.reshape(n_tok, cfg.q_dim))
        h = b.rmsnorm(x, layer.ffn_norm, cfg.rms_eps)
        a = b.silu_mul(*b.matmuls((layer.w_gate, layer.w_up), h))
        return x + b.matmul(layer.w_down, a)

    def _batch(self, tokens, positions, seqs, cache: KVCache) -> tuple[np.ndarray, np.ndarray, list[Run]]:
        """The batch checked against the vocabulary and the cache: (tokens, positions, runs)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        seqs = np.asarray(seqs, dtype=np.int64)
        n_tok = len(tokens)
        if n_tok == 0:
            raise ValueError("no tokens to evaluate")
        if positions.shape != tokens.shape or seqs.shape != tokens.shape:
            raise ValueError(f"{n_tok} tokens need as many positions and sequence ids ({len(positions)}, {len(seqs)} given)")
        if n_tok == 1:  # a decode step: no numpy reductions
            low = high = int(tokens[0])
        else:
            low, high = tokens.min(), tokens.max()
        if low < 0 or high >= self.config.n_vocab:
            raise ValueError(f"token id out of range [0, {self.config.n_vocab})")
        runs = batch_runs(positions, seqs)
        seen = set()
        for r in runs:
            if not 0 <= r.seq < cache.n_seq:
                raise ValueError(f"sequence {r.seq} out of range [0, {cache.n_seq})")
            if r.start < 0 or r.start + r.t1 - r.t0 > cache.n_ctx:
                raise ValueError(f"positions {r.start}..{r.start + r.t1 - r.t0 - 1} do not fit the context of {cache.n_ctx} tokens")
            if r.seq in seen:
                raise ValueError(f"the tokens of sequence {r.seq} must be consecutive in the batch, at consecutive positions")
            seen.add(r.seq)
        return tokens, positions, runs

    def segments(self) -> list[tuple[Backend, list[int]]]:
        """Runs of consecutive layers on one backend, in order."""
        runs: list[tuple[Backend, list[int]]] = []
        for i, layer in enumerate(self.layers):
            if runs and runs[-1][0] is layer.backend:
                runs[-1][1].append(i)
            else:
                runs.append((layer.backend, [i]))
        return runs

    def _fused_step(self, backend: Backend):
        """The backend's captured decode step (decode_layers), if it has one that runs this block's ops."""
        step = getattr(backend, "decode_layers", None)
        return step if self.arch.block_extras <= getattr(backend, "decode_step_extras", frozenset()) else None

    @_whole_pass
    def hidden_states(self, tokens: np.ndarray, start_pos: int, cache: KVCache) -> tuple[object, Backend]:
        """Run the layers on tokens at positions start_pos.. of sequence 0; returns the final-normed (n_tok, dim)."""
        n = len(tokens)
        return self._hidden(*self._batch(tokens, np.arange(start_pos, start_pos + n), np.zeros(n, np.int64), cache), cache)

    def _hidden(self, tokens: np.ndarray, positions: np.ndarray, runs: list[Run], cache: KVCache) -> tuple[object, Backend]:
        x = self.head_backend.embed(self.tok_embd, tokens)
        on = self.head_backend
        seqs = np.array([r.seq for r in runs for _ in range(r.t1 - r.t0)], dtype=np.int64)
        placed: dict[int, tuple] = {}

        def index(b: Backend) -> tuple:
            if id(b) not in placed:
                placed[id(b)] = (b.indices(seqs), b.indices(positions))
            return placed[id(b)]

        for backend, ids in self.segments():
            if backend is not on:  # the hidden state crosses once per device boundary
                x = backend.to_device(on.to_host(x))
                on = backend
            fused = self._fused_step(backend) if len(tokens) == 1 else None
            if fused is not None:  # one token: the backend runs its layers as one captured step
                x = fused(self, ids, x, runs[0].start, cache, runs[0].seq)
                continue
            for li in ids:
                x = self._layer_forward(self.layers[li], li, x, runs[0] if len(runs) == 1 else None, cache, index)
        if on is not self.head_backend:
            x = self.head_backend.to_device(on.to_host(x))
        return self.head_backend.rmsnorm(x, self.output_norm, self.config.rms_eps), self.head_backend

    @_whole_pass
    def forward_batch(self, tokens, positions, seqs, cache: KVCache, rows=None) -> np.ndarray:
        """Logits (len(rows), n_vocab) float32 of the batch's tokens `rows` (default: every token);
        token t is at position positions[t] of sequence seqs[t]. A sequence's tokens in one batch are
        consecutive, at consecutive positions; each attends to its own slot's earlier positions."""
        tokens, positions, runs = self._batch(tokens, positions, seqs, cache)
        whole = getattr(self.head_backend, "decode_forward", None)
        if whole is not None and len(tokens) == 1 and self._all_on_head:
            logits = whole(self, int(tokens[0]), runs[0].start, cache, runs[0].seq)
            return logits.reshape(1, -1)
        batch = getattr(self.head_backend, "decode_batch", None)
        if batch is not None and self._all_on_head and len(runs) == len(tokens) <= self.head_backend.decode_batch_max:
            logits = batch(self, tokens, positions, np.array([r.seq for r in runs], np.int64), cache)
            rows = None if rows is None else [int(r) for r in rows]
            return logits if rows is None or rows == list(range(len(tokens))) else logits[rows]
        h, b = self._hidden(tokens, positions, runs, cache)
        if rows is not None:
            rows = [int(r) for r in rows]
            contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
            h = h[rows[0] : rows[0] + len(rows)] if contiguous else h[rows]  # a list index: numpy and cupy alike
        return b.to_host(b.matmul(self.output, h))

    def warm_up_batches(self, cache: KVCache, token: int) -> list[int]:
        """Run one decode batch of each size the head backend captures a step for (a GPU's 2, 4 ... 64),
        as a server starts: a size's first batch runs eagerly and is captured, which would otherwise stall
        the first requests that bring that many sequences together. Writes `token` at position 0 of the
        first slots (a server's slots are empty then). The sizes run; none where every layer is not on a
        backend with captured batches."""
        sizes = [n for n in getattr(self.head_backend, "batch_sizes", ()) if n <= cache.n_seq] if self._all_on_head else []
        for n in sizes:
            self.forward_batch(np.full(n, token, np.int64), np.zeros(n, np.int64), np.arange(n, dtype=np.int64), cache)
        return sizes

    def decode_batch_logits(self, tokens, seqs, positions, cache: KVCache):
        """Logits (n_tok, n_vocab), on the head backend, of a batch of single tokens of distinct sequences
        (a decode step of several), every layer on the head backend, the batch given as index arrays on
        it. No host copies and no synchronisation: what a backend captures and replays (decode_batch)."""
        b = self.head_backend
        x = b.embed(self.tok_embd, tokens)
        for li, layer in enumerate(self.layers):
            x = self._layer_forward(layer, li, x, None, cache, lambda _: (seqs, positions))
        return b.matmul(self.output, b.rmsnorm(x, self.output_norm, self.config.rms_eps))

    def forward(self, tokens: np.ndarray, start_pos: int, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits (float32) for the last token (n_vocab,), or for every token (n_tok, n_vocab), of
        tokens at positions start_pos.. of sequence 0."""
        n = len(tokens)
        positions = np.arange(start_pos, start_pos + n, dtype=np.int64)
        logits = self.forward_batch(tokens, positions, np.zeros(n, np.int64), cache, None if all_logits else [n - 1])
        return logits if all_logits else logits[0]
