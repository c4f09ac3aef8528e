"""CUDABackend: the Backend protocol on an NVIDIA GPU through cupy.

- Weights are uploaded once, as the file's blocks, and never dequantized into a float copy: decode
  products read the blocks directly (matvec.cu, `mmv`). Q4_0 and Q8_0 rows are regrouped on the way
  (layout.py: blocks in groups of 8, scales first, so that every block's codes are aligned).
- One token (decode) runs as a CUDA graph: the layers of this backend (and the embedding lookup
  and output head when they are here too) are captured once per KV cache and replayed; the token
  and position travel in one 16-byte copy, the logits (or the hidden state) come back in one.
  On compute capability 9.0+ the kernels of the graph are launched programmatically (each may
  start while the one before it finishes; common.cu's pdl_wait keeps the order of their data).
- A batch of tokens (a prompt, or the decode steps of several sequences) multiplies the quantized
  types on the int8 tensor cores straight from the blocks (mmq.cu, compute capability 8.0+); the
  float types (and older GPUs) dequantize one weight matrix at a time into a reused fp16 scratch
  tile for cuBLAS (fp32 accumulate and output). A prompt's attention is one flash-attention-style
  kernel (attn_prompt) over the stored cache rows; several sequences' tokens take attn_seqs.
- A decode batch of several sequences, one token each, with every layer here, runs as a CUDA graph
  too (decode_batch): LlamaModel's batch forward captured once per batch size bucket (2, 4 ... 64;
  a batch is padded with copies of its last token), its temporaries in a memory pool of its own.
- The KV cache stores its rows as the cache's KV types (model/kvtypes.py: f32, f16, q8_0, q4_0):
  every attention kernel reads the stored rows and decodes them in registers; writes encode with
  ggml's rounding (kv_write, and in the decode step the QKV product and attn_partial). The
  attention kernels of a (key type, value type) pair are compiled on first use (attn_module).
"""
from __future__ import annotations

import ctypes
import logging
import math
import sys
from typing import Sequence

import numpy as np

from ..model.archs import BLOCK_EXTRAS
from ..model.kvtypes import KV_TYPES, KVType, kv_type
from ..tensor import QWeight
from .batch import BatchedDecode
from .layout import to_gpu_layout
from .products import BatchProducts
from .module import (MMQ_MIN_CC, ATT_MAX_HEAD_DIM, ATT_SPLITS, ATT_THREADS, INT8_INPUT_TYPES, MODE_ADD, MODE_QKV, MODE_SILU,
                     MODE_STORE, NO_FOLD, NO_INT8, PATH_ANY, PROMPT_KEYS, PROMPT_QUERIES,
                     PROMPT_THREADS, SUPPORTED_TYPES, TYPE_CODES, WARPS, Int8Input, ProgrammaticLauncher,
                     attn_kernel_names, attn_module, kernel_names, compiled_module, dev_ptr, attn_per_lane, attn_splits,
                     mmv_launch)

log = logging.getLogger(__name__)

SHARED_DEFAULT = 48 << 10  # dynamic shared memory a kernel gets without opting in


class _Workspace:
    """Fixed buffers of the decode graph (their addresses are baked into it).

    Two sets of int8 inputs take turns, because an ADD product that folds the next RMSNorm (Fold in
    matvec.cu) writes the next product's int8 input while its other blocks still read theirs:
    `a` is the attention output's and the SwiGLU output's, `b` the normed residual's."""

    def __init__(self, cp, cfg):
        width = max(cfg.dim, cfg.ffn_dim, cfg.q_dim)
        self.io = cp.zeros(2, np.int64)  # token, position
        self.x = cp.zeros(cfg.dim, np.float32)  # the residual stream
        self.h = cp.zeros(width, np.float32)  # a normed input in float (deferred: times the norm weight only)
        self.a = Int8Input(cp, width)
        self.b = Int8Input(cp, width)
        self.ss = cp.zeros(width // 32 + 1, np.float32)  # a deferred norm's sums of squares per 32 rows
        self.q = cp.zeros(cfg.q_dim, np.float32)  # n_heads * head_dim (Mistral, Qwen3: not dim)
        self.att = cp.zeros(cfg.q_dim, np.float32)
        self.act = cp.zeros(cfg.ffn_dim, np.float32)
        self.up = cp.zeros(cfg.ffn_dim, np.float32)
        self.part = cp.zeros(cfg.n_heads * ATT_SPLITS * (cfg.head_dim + 2), np.float32)
        self.staged = cp.zeros(2 * cfg.kv_dim, np.float32)  # this token's q8_0 / q4_0 K and V rows as floats
        self.raw_qk = cp.zeros(cfg.q_dim + cfg.kv_dim, np.float32)  # q and k before per-head norms (qwen3)
        self.att_cnt = cp.zeros(cfg.n_heads, np.int32)  # key ranges finished per head (back to 0 after)
        self.logits = cp.zeros(cfg.n_vocab, np.float32)

    @staticmethod
    def int8_for(into: Int8Input, *consumers: QWeight) -> Int8Input | None:
        """`into` when any of these weights multiplies int8 activations, else None (float weights
        read the float input)."""
        return into if any(w.ggml_type in INT8_INPUT_TYPES for w in consumers) else None


class CUDABackend(BatchProducts, BatchedDecode):
    """cupy kernels on one GPU; activations are float32 cupy arrays. The products of batches are
    BatchProducts' (products.py), the captured decode steps of several sequences BatchedDecode's (batch.py)."""

    name = "cuda"
    decode_step_extras = frozenset(BLOCK_EXTRAS)  # the captured decode step adds biases and norms each q / k head

    def __init__(self, device: int = 0):
        import cupy as cp

        self.cp = cp
        self.device = cp.cuda.Device(device)
        self.device.use()
        self.mod = compiled_module()
        self.fn = {n: self.mod.get_function(n) for n in kernel_names()}
        for n in ("quantize_q8", "rmsnorm", "rmsnorm_row", "rope", "silu_mul", "qk_norm_rope", "quantize_q8s", "mmq_reduce"):
            self.fn[n] = self.mod.get_function(n)
        self.stream = cp.cuda.Stream(non_blocking=True)  # decode graphs are captured and replayed here
        self.io_host = cp.cuda.alloc_pinned_memory(16)
        self.io_np = np.frombuffer(self.io_host, np.int64, 2)
        self._queued, self._done = cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True)
        self._logits_host = self._logits_np = None  # pinned memory the logits come back through
        self._graphs: dict = {}
        self._batch_steps: dict = {}
        self._qkv_biases: dict[int, tuple] = {}  # id(bq): (bq, a layer's [q; k; v] biases in one array)
        self._ws: dict[int, _Workspace] = {}
        self._inv_freq: dict[bytes, object] = {}
        self._scratch = None  # fp16 tile of one dequantized matrix (prompt batches)
        # decode graphs use programmatic launches on Hopper and newer (compute capability 9.0+)
        self.pdl = int(self.device.compute_capability) >= 90
        self.sms = self.device.attributes["MultiProcessorCount"]
        self.mma = int(self.device.compute_capability) >= MMQ_MIN_CC  # batch products on the int8 tensor cores
        self._launcher = None
        # while a decode graph is captured with pdl: False until its first kernel, then True
        self._programmatic: bool | None = None
        self.uploaded = 0
        self.expected = 0

    # ---------------------------------------------------------------------- memory, upload
    def free_memory(self) -> int:
        free, _ = self.cp.cuda.runtime.memGetInfo()
        return int(free) + int(self.cp.get_default_memory_pool().free_bytes())

    def expect_upload(self, n_bytes: int) -> None:
        """Announce how many weight bytes load_weight/load_vector will upload (for the progress line)."""
        self.expected, self.uploaded = n_bytes, 0

    def _progress(self, n: int) -> None:
        self.uploaded += n
        if self.expected and sys.stderr.isatty():
            end = "\n" if self.uploaded >= self.expected else ""
            sys.stderr.write(f"\ruploading weights to the GPU: {self.uploaded / 2**20:,.0f} / {self.expected / 2**20:,.0f} MiB{end}")
            sys.stderr.flush()

    def load_weight(self, w: QWeight, products: bool = True) -> QWeight:
        if w.ggml_type not in SUPPORTED_TYPES:
            raise NotImplementedError(f"{w.name}: the CUDA backend cannot compute with {w.ggml_type.name} weights")
        raw = np.ascontiguousarray(w.raw).view(np.uint8).reshape(w.rows, -1)
        dev = to_gpu_layout(self.cp, w.ggml_type, self.cp.asarray(raw))
        self._progress(raw.nbytes)
        return QWeight(w.name, dev, w.ggml_type, w.shape)

    def load_vector(self, v: np.ndarray):
        a = self.cp.asarray(np.ascontiguousarray(v, dtype=np.float32))
        self._progress(a.nbytes)
        return a

    def to_device(self, x):
        return self.cp.ascontiguousarray(self.cp.asarray(x, dtype=np.float32))

    def to_host(self, x) -> np.ndarray:
        return self.cp.asnumpy(x)

    def empty(self, shape: tuple[int, ...]):
        return self.cp.empty(shape, np.float32)

    def kv_storage(self, parts, path) -> list:
        """Zeroed GPU arrays for parts [(shape, dtype), ...] (the cache's K and V storage)."""
        if path is not None:
            log.info("the KV cache of GPU layers lives in GPU memory; %s is not used for them", path)
        return [self.cp.zeros(shape, dtype) for shape, dtype in parts]

    def kv_write(self, slots, t: KVType, x, seqs, positions) -> None:
        """Row x[i] (x: (n_tok, n_kv, head_dim) float32) encoded as t into slots[seqs[i], :, positions[i]]
        of slots (n_seq, n_kv, n_ctx, width): one launch for the batch."""
        cp = self.cp
        n_tok, n_kv, hd = x.shape
        self._check_rows(slots, t, hd, "slots")
        if slots.shape[1] != n_kv:
            raise ValueError(f"KV rows of {n_kv} heads for a cache of {slots.shape[1]}")
        x = cp.ascontiguousarray(x, dtype=np.float32)
        seqs, positions = (cp.ascontiguousarray(cp.asarray(a), dtype=np.int64) for a in (seqs, positions))
        if n_tok:
            self.fn[f"kv_write<{t.code}>"]((n_tok * n_kv,), (32 * ((hd + 31) // 32),),
                                          (slots, x, seqs, positions, np.int32(n_kv), np.int32(slots.shape[2]), np.int32(hd)))

    @staticmethod
    def _check_rows(a, t: KVType, head_dim: int, what: str) -> None:
        if a.dtype != t.dtype or a.shape[-1] != t.row_width(head_dim) or not a.flags.c_contiguous:
            raise ValueError(f"{what}: {a.dtype}{tuple(a.shape)} (contiguous: {a.flags.c_contiguous}) does not hold "
                             f"{t.name} rows of head_dim {head_dim} ({t.dtype}, {t.row_width(head_dim)} a row)")

    @classmethod
    def _kv_types(cls, k, v, head_dim: int, tk: KVType | None, tv: KVType | None) -> tuple[KVType, KVType]:
        """The KV types of cache arrays k, v (given, or the registry's type whose storage they match)."""
        def find(a):
            for t in KV_TYPES.values():
                if a.dtype == t.dtype and (not t.quantized or head_dim % t.block == 0) and a.shape[-1] == t.row_width(head_dim):
                    return t
            raise ValueError(f"no KV type stores rows of head_dim {head_dim} as {a.dtype}{tuple(a.shape)}")

        tk, tv = kv_type(tk) if tk is not None else find(k), kv_type(tv) if tv is not None else find(v)
        cls._check_rows(k, tk, head_dim, "keys")
        cls._check_rows(v, tv, head_dim, "values")
        return tk, tv

    def _attn_fn(self, kind: str, per: int, tk: KVType, tv: KVType):
        """The attention kernel `kind` for these types (its module compiled on first use)."""
        name = f"{kind}<{per}, {tk.code}, {tv.code}>"
        fn = self.fn.get(name)
        if fn is None:
            mod = attn_module(tk, tv)
            for n in attn_kernel_names(tk, tv):
                self.fn[n] = mod.get_function(n)
            fn = self.fn[name]
        return name, fn

    # ------------------------------------------------------------------------ kernel launch
    def _call(self, name: str, grid: tuple, block: tuple, args: tuple) -> None:
        """Launch kernel `name`; in a decode graph captured with pdl, every kernel after the first
        is launched programmatically (the first follows the copy of the token and position)."""
        if self._programmatic:
            if self._launcher is None:
                self._launcher = ProgrammaticLauncher()
            self._launcher(self.fn[name], grid, block, args, self.cp.cuda.get_current_stream().ptr)
            return
        if self._programmatic is False:  # the graph's first kernel: the ones after it are programmatic
            self._programmatic = True
        self.fn[name](grid, block, args)

    def _mmv(self, mode: int, w: QWeight, n0: int, cols: int, xq, xd, xf, out, *, w1=None,
             w2=None, n1: int = 0, rb: int = 0, re: int = 0, kc=None, vc=None, io=None, inv_freq=None, head_dim: int = 0,
             n_rot: int = 0, n_ctx: int = 0, kv_codes: int = 0, staged=None, bias=None, raw_qk=None, nss=None,
             eps: float = 0.0, fold: tuple = NO_FOLD):
        """Launch the decode product `mmv` (see matvec.cu) for one weight type. nss: the input is a
        deferred RMSNorm's (its sums of squares, eps); fold: the next RMSNorm an ADD product folds (_fold);
        QKV: bias, the [q; k; v] biases to add, raw_qk, where q and k go unrotated (qk_norm_rope follows)."""
        t = w.ggml_type
        ld = w.raw.shape[1] * w.raw.itemsize
        pairs = n0 if mode == MODE_SILU else ((re - rb) // 2 if mode == MODE_QKV else (n0 + 1) // 2)
        launch = mmv_launch(t, mode, cols, pairs, xq is not None)
        if launch.path == PATH_ANY and xf is None:
            raise ValueError(f"{w.name}: the general product needs the float input")
        self._call(launch.name, (launch.blocks,), (launch.threads,),
                   (dev_ptr(w.raw), dev_ptr(w1.raw if w1 is not None else None), dev_ptr(w2.raw if w2 is not None else None),
                    np.int64(ld), np.int32(n0), np.int32(n1), np.int32(cols), np.int32(rb), np.int32(re),
                    dev_ptr(xq), dev_ptr(xd), dev_ptr(xf),
                    dev_ptr(nss), np.float32(eps), dev_ptr(out), dev_ptr(kc), dev_ptr(vc), dev_ptr(io), dev_ptr(inv_freq),
                    np.int32(head_dim), np.int32(n_rot), np.int32(n_ctx), np.int32(kv_codes), dev_ptr(staged),
                    dev_ptr(bias), dev_ptr(raw_qk), *fold))

    @staticmethod
    def _fold(ws: _Workspace, norm, into: Int8Input | None) -> tuple:
        """mmv's Fold arguments: the RMSNorm of the residual with weight `norm`, deferred, into ws.h
        and ws.ss, and with `into` its int8 blocks."""
        return (dev_ptr(norm), dev_ptr(ws.h), *(into.args() if into else NO_INT8), dev_ptr(ws.ss))

    def _quantize(self, x, q, d) -> None:
        n = x.size
        self._call("quantize_q8", ((n + 255) // 256,), (256,), (x, np.int32(n), q, d))

    def _rmsnorm(self, x, w, eps: float, out, q=None, d=None) -> None:
        """RMSNorm of each row; for one row with q given, also its int8 blocks."""
        rows, n = (1, x.size) if x.ndim == 1 else x.shape
        if rows > 1:
            self._call("rmsnorm", (rows,), (min(1024, 32 * ((n + 31) // 32)),), (x, w, np.float32(eps), np.int32(n), out))
            return
        quant = q is not None and n % 32 == 0
        self._call("rmsnorm_row", ((n + 255) // 256,), (256,),
                   (x, w, np.float32(eps), np.int32(n), out, dev_ptr(q if quant else None), dev_ptr(d if quant else None)))

    def _inv_freq_dev(self, inv_freq: np.ndarray):
        key = np.asarray(inv_freq, np.float64).tobytes()
        if key not in self._inv_freq:
            self._inv_freq[key] = self.cp.asarray(np.asarray(inv_freq, np.float64))
        return self._inv_freq[key]

    # ----------------------------------------------------------------- the Backend protocol
    def embed(self, w: QWeight, tokens):
        """Rows `tokens` (host ids, or int64 ids on this GPU) of w, dequantized."""
        ids = tokens if isinstance(tokens, self.cp.ndarray) else self.cp.asarray(np.asarray(tokens, np.int64))
        out = self.cp.empty((len(ids), w.cols), np.float32)
        self._get_rows(w, ids, out, len(ids))
        return out

    def _get_rows(self, w: QWeight, ids, out, n: int) -> None:
        ld = w.raw.shape[1] * w.raw.itemsize
        self._call(f"get_rows<{TYPE_CODES[w.ggml_type]}>", ((w.cols + 255) // 256, n), (256,),
                   (w.raw, np.int64(ld), ids, np.int32(w.cols), out))

    def rmsnorm(self, x, weight, eps: float):
        out = self.cp.empty_like(x)
        self._rmsnorm(x, weight, eps, out)
        return out

    def rope(self, x, positions: np.ndarray, inv_freq: np.ndarray):
        n_tok, n_heads, head_dim = x.shape
        pos = positions if isinstance(positions, self.cp.ndarray) else self.cp.asarray(np.asarray(positions, np.int64))
        pairs = n_tok * n_heads * head_dim // 2
        self.fn["rope"](((pairs + 255) // 256,), (256,), (x, pos, np.int32(n_tok), np.int32(n_heads), np.int32(head_dim),
                                                          self._inv_freq_dev(inv_freq), np.int32(2 * len(inv_freq))))
        return x

    def attention(self, q, k_cache, v_cache, start_pos: int, tk: KVType | None = None, tv: KVType | None = None):
        """Causal GQA for n_tok queries (n_tok, n_heads, head_dim) at start_pos.. over the cache rows
        k_cache, v_cache (n_kv, n_ctx, width) stored as tk, tv: one flash-attention kernel (attn_prompt)."""
        cp = self.cp
        n_tok, n_heads, head_dim = q.shape
        if head_dim > ATT_MAX_HEAD_DIM:
            raise ValueError(f"the CUDA attention handles head_dim up to {ATT_MAX_HEAD_DIM}, not {head_dim}")
        tk, tv = self._kv_types(k_cache, v_cache, head_dim, tk, tv)
        n_kv, n_ctx = k_cache.shape[:2]
        if start_pos + n_tok > n_ctx:
            raise ValueError(f"{n_tok} tokens at position {start_pos} do not fit a cache of {n_ctx}")
        q = cp.ascontiguousarray(q, dtype=np.float32)
        out = cp.empty_like(q)
        _, fn = self._attn_fn("attn_prompt", attn_per_lane(head_dim), tk, tv)
        smem = 4 * (PROMPT_QUERIES * head_dim + PROMPT_KEYS * (2 * head_dim + 1))
        if smem > SHARED_DEFAULT and fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        fn(((n_tok + PROMPT_QUERIES - 1) // PROMPT_QUERIES, n_heads), (PROMPT_THREADS,),
           (q, k_cache, v_cache, np.int32(n_tok), np.int32(start_pos), np.int32(n_heads), np.int32(n_kv), np.int32(n_ctx),
            np.int32(head_dim), np.float32(1.0 / math.sqrt(head_dim)), out), shared_mem=smem)
        return out

    def attention_seqs(self, q, k_slots, v_slots, seqs, positions, tk: KVType | None = None, tv: KVType | None = None):
        """Token t attends to positions 0..positions[t] of slot seqs[t] of k_slots, v_slots (n_seq, n_kv,
        n_ctx, width) stored as tk, tv: one kernel for the whole batch."""
        n_tok, n_heads, head_dim = q.shape
        if head_dim > ATT_MAX_HEAD_DIM:
            raise ValueError(f"attention over several sequences handles head_dim up to {ATT_MAX_HEAD_DIM}, not {head_dim}")
        tk, tv = self._kv_types(k_slots, v_slots, head_dim, tk, tv)
        q = self.cp.ascontiguousarray(q, dtype=np.float32)
        out = self.cp.empty_like(q)
        _, fn = self._attn_fn("attn_seqs", attn_per_lane(head_dim), tk, tv)
        fn((n_heads, n_tok), (128,), (q, k_slots, v_slots, seqs, positions, np.int32(n_heads),
           np.int32(k_slots.shape[1]), np.int32(k_slots.shape[2]), np.int32(head_dim),
           np.float32(1.0 / math.sqrt(head_dim)), out))
        return out

    def indices(self, a: np.ndarray):
        return self.cp.asarray(np.ascontiguousarray(a, dtype=np.int64))

    def silu_mul(self, gate, up):
        out = self.cp.empty_like(gate)
        self.fn["silu_mul"](((gate.size + 255) // 256,), (256,), (gate, up, np.int64(gate.size), out))
        return out

    # ------------------------------------------------------------------------ decode graphs
    def _workspace(self, model) -> _Workspace:
        ws = self._ws.get(id(model))
        if ws is None:
            ws = self._ws[id(model)] = _Workspace(self.cp, model.config)
        return ws

    def _decode_ops(self, model, layer_ids: Sequence[int], cache, seq: int, ws: _Workspace, embed: bool, head: bool) -> None:
        """Launch one token's work on the current stream, reading the token and position from ws.io.

        Per layer: the QKV product (RoPE, K and V into the cache), attention, the output projection
        (adds to the residual and folds the FFN's RMSNorm), gate and up with SwiGLU, its int8
        quantization, the down projection (adds, and folds the next RMSNorm). The graph's first
        RMSNorm is the only one run as a kernel."""
        cfg = model.config
        inv_freq = self._inv_freq_dev(model.inv_freq)
        hd = cfg.head_dim
        eps = cfg.rms_eps
        splits = np.int32(attn_splits(cfg.n_heads, self.sms))  # key ranges a head may use (the grid has ATT_SPLITS)
        if hd > ATT_MAX_HEAD_DIM:
            raise NotImplementedError(f"the CUDA decode attention handles head_dim <= {ATT_MAX_HEAD_DIM}, not {hd}")
        if embed:
            self._get_rows(model.tok_embd, ws.io, ws.x, 1)
        folded = False  # the next norm was deferred by the product before it (ws.h, ws.ss)

        def normed(weight, consumers) -> tuple:
            """(int8 input, nss) for products reading the RMSNorm of the residual with `weight`."""
            b = ws.int8_for(ws.b, *consumers)
            if folded:
                return b, ws.ss
            self._rmsnorm(ws.x, weight, eps, ws.h, *((b.q, b.d) if b else ()))
            return b, None

        def operands(x: Int8Input | None) -> tuple:
            return (x.q, x.d) if x else (None, None)

        tk, tv = cache.types
        kv_codes = tk.code | tv.code << 8  # the QKV epilogue's (matvec.cu, Epilogue)
        attn = self._attn_fn("attn_partial", attn_per_lane(hd), tk, tv)[0]
        for i, li in enumerate(layer_ids):
            L = model.layers[li]
            kc, vc = cache.layer(li, seq)
            qkv = (L.wq, L.wk, L.wv)
            b, nss = normed(L.attn_norm, qkv)
            qd = cfg.q_dim  # the q rows: n_heads * head_dim, which need not be dim
            segments = [(0, qd + 2 * cfg.kv_dim)] if len({w.ggml_type for w in qkv}) == 1 else \
                [(0, qd), (qd, qd + cfg.kv_dim), (qd + cfg.kv_dim, qd + 2 * cfg.kv_dim)]
            raw_qk = ws.raw_qk if L.q_norm is not None else None
            for rb, re in segments:
                w = L.wq if rb == 0 else (L.wk if rb == qd else L.wv)
                self._mmv(MODE_QKV, w, qd, cfg.dim, *operands(b), ws.h, ws.q, w1=L.wk, w2=L.wv,
                          n1=cfg.kv_dim, rb=rb, re=re, kc=kc, vc=vc, io=ws.io, inv_freq=inv_freq, head_dim=hd,
                          n_rot=cfg.rope_dim, n_ctx=cache.n_ctx, kv_codes=kv_codes, staged=ws.staged,
                          bias=self._qkv_biases[id(L.bq)][1] if L.bq is not None else None, raw_qk=raw_qk, nss=nss, eps=eps)
            if raw_qk is not None:  # each head of q and k normed, then RoPE, then k into the cache
                heads = cfg.n_heads + cfg.n_kv_heads
                self._call("qk_norm_rope", ((heads + WARPS - 1) // WARPS,), (32 * WARPS,),
                           (raw_qk, np.int32(cfg.n_heads), np.int32(cfg.n_kv_heads), L.q_norm, L.k_norm, np.float32(eps),
                            ws.q, kc, ws.staged, ws.io, inv_freq, np.int32(hd), np.int32(cfg.rope_dim),
                            np.int32(cache.n_ctx), np.int32(kv_codes)))
            a = ws.int8_for(ws.a, L.wo)
            fused_q = a is not None and hd % 32 == 0
            self._call(attn, (cfg.n_heads, ATT_SPLITS), (ATT_THREADS,),
                       (ws.q, kc, vc, ws.staged, ws.io, np.int32(cache.n_ctx), np.int32(hd), np.int32(cfg.n_heads // cfg.n_kv_heads),
                        np.float32(1.0 / math.sqrt(hd)), ws.part, ws.att_cnt, ws.att, *(a.args() if fused_q else NO_INT8), splits))
            if a is not None and not fused_q:
                self._quantize(ws.att, a.q, a.d)
            b = ws.int8_for(ws.b, L.w_gate, L.w_up)
            self._mmv(MODE_ADD, L.wo, cfg.dim, qd, *operands(a), ws.att, ws.x,
                      fold=self._fold(ws, L.ffn_norm, b))
            nss = ws.ss  # the FFN's RMSNorm, deferred by that fold into ws.h (and b)
            if L.w_gate.ggml_type == L.w_up.ggml_type:
                self._mmv(MODE_SILU, L.w_gate, cfg.ffn_dim, cfg.dim, *operands(b), ws.h, ws.act, w1=L.w_up, nss=nss, eps=eps)
            else:  # two products, then SwiGLU
                self._mmv(MODE_STORE, L.w_gate, cfg.ffn_dim, cfg.dim, *operands(b), ws.h, ws.act,
                          nss=nss, eps=eps)
                self._mmv(MODE_STORE, L.w_up, cfg.ffn_dim, cfg.dim, *operands(b), ws.h, ws.up,
                          nss=nss, eps=eps)
                self._call("silu_mul", ((cfg.ffn_dim + 255) // 256,), (256,), (ws.act, ws.up, np.int64(cfg.ffn_dim), ws.act))
            a = ws.int8_for(ws.a, L.w_down)
            if a is not None:
                self._quantize(ws.act, a.q, a.d)
            if i + 1 < len(layer_ids):  # the down projection folds the next RMSNorm: the next layer's ...
                N = model.layers[layer_ids[i + 1]]
                nxt = (N.attn_norm, (N.wq, N.wk, N.wv))
            else:  # ... the output's, or none when the hidden state leaves the GPU here
                nxt = (model.output_norm, (model.output,)) if head else (None, ())
            folded = nxt[0] is not None
            self._mmv(MODE_ADD, L.w_down, cfg.dim, cfg.ffn_dim, *operands(a), ws.act, ws.x,
                      fold=self._fold(ws, nxt[0], ws.int8_for(ws.b, *nxt[1])) if folded else NO_FOLD)
        if head:
            b, nss = normed(model.output_norm, (model.output,))
            self._mmv(MODE_STORE, model.output, cfg.n_vocab, cfg.dim, *operands(b), ws.h, ws.logits,
                      nss=nss, eps=eps)

    def _graph(self, model, layer_ids: Sequence[int], cache, seq: int, embed: bool, head: bool):
        """The captured decode step for these layers and this slot of this cache (captured on first use)."""
        ws = self._workspace(model)
        kv = cache.storage(layer_ids[0]) if layer_ids else None  # not cache.layer: cupy indexing costs ~10 us a token
        key = (id(model), tuple(layer_ids), None if kv is None else kv.data.ptr, cache.n_ctx, seq, embed, head)
        g = self._graphs.get(key)
        if g is None:
            s = self.stream
            self._inv_freq_dev(model.inv_freq)  # nothing may be allocated (or compiled) while capturing
            for li in layer_ids:
                L = model.layers[li]
                if L.bq is not None and id(L.bq) not in self._qkv_biases:  # holding bq keeps its id unique
                    self._qkv_biases[id(L.bq)] = (L.bq, self.cp.concatenate([L.bq, L.bk, L.bv]))
            if model.config.head_dim <= ATT_MAX_HEAD_DIM:
                self._attn_fn("attn_partial", attn_per_lane(model.config.head_dim), *cache.types)
            with s:
                s.begin_capture()
                self._programmatic = False if self.pdl else None
                try:
                    self._decode_ops(model, layer_ids, cache, seq, ws, embed, head)
                finally:
                    self._programmatic = None
                    g = s.end_capture()
            if len(self._graphs) >= 8 + 2 * cache.n_seq:  # caches come and go (embeddings use scratch ones): keep a few
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = g
        return g, ws

    def _launch(self, g, ws: _Workspace, token: int, pos: int) -> None:
        cp = self.cp
        s = self.stream
        self._queued.record(cp.cuda.get_current_stream())
        s.wait_event(self._queued)  # after whatever the caller queued
        self.io_np[0], self.io_np[1] = token, pos
        ws.io.data.copy_from_host_async(ctypes.c_void_p(self.io_host.ptr), 16, stream=s)
        g.launch(stream=s)
        self._done.record(s)
        cp.cuda.get_current_stream().wait_event(self._done)

    def decode_layers(self, model, layer_ids: Sequence[int], x, start_pos: int, cache, seq: int = 0):
        """One token of slot seq through this backend's layers: (1, dim) hidden state in -> (1, dim) out (on the GPU)."""
        g, ws = self._graph(model, layer_ids, cache, seq, embed=False, head=False)
        ws.x[...] = self.cp.asarray(x, np.float32).reshape(-1)
        self._launch(g, ws, 0, start_pos)
        return ws.x.reshape(1, -1).copy()

    def decode_forward(self, model, token: int, start_pos: int, cache, seq: int = 0) -> np.ndarray:
        """One token of slot seq through the whole model (all layers and the head here): next-token logits on the host."""
        g, ws = self._graph(model, range(len(model.layers)), cache, seq, embed=True, head=True)
        self._launch(g, ws, token, start_pos)
        n = ws.logits.size
        if self._logits_np is None or self._logits_np.size != n:
            self._logits_host = self.cp.cuda.alloc_pinned_memory(4 * n)
            self._logits_np = np.frombuffer(self._logits_host, np.float32, n)
        ws.logits.data.copy_to_host_async(ctypes.c_void_p(self._logits_host.ptr), 4 * n, stream=self.stream)
        self.stream.synchronize()
        return self._logits_np.copy()  # the pinned buffer is the next token's
