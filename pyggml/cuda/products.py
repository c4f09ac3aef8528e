"""The products of a batch of tokens on the GPU (a prompt, or the decode steps of several sequences):
the int8 weight types on the int8 tensor cores straight from their blocks (mmq.cu, compute capability
8.0+, up to MMQ_MAX_TOKENS tokens; consecutive weights of one type in one launch), the float types (and
older GPUs, and larger batches) dequantized one matrix at a time to an fp16 scratch tile for cuBLAS.
One token takes the decode product (mmv in matvec.cu). A mixin of CUDABackend (backend.py), which
owns the kernels (fn, _call), the stream and the scratch tile."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..gguf.constants import GGMLType
from ..tensor import QWeight
from .module import (INT8_INPUT_TYPES, MMQ_MAX_TOKENS, MMQ_THREADS, MMQ_TYPES, MODE_STORE, TYPE_CODES, dev_ptr,
                     mmq_fragment_layout, mmq_kernel_name, mmq_rows, mmq_splits, mmq_tiles)

CUBLAS_COMPUTE_32F, CUDA_R_16F, CUDA_R_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_GEMM_DEFAULT = 68, 2, 0, 0, 1, -1


class BatchProducts:
    """matmul / matmuls of the Backend protocol on the GPU."""

    def matmul(self, w: QWeight, x, out=None):
        return self.matmuls((w,), x, [out])[0]

    def matmuls(self, weights: Sequence[QWeight], x, outs=None) -> list:
        """x (n_tok, cols) times each weight. A batch's int8 blocks are made once for all of them, and
        consecutive weights of one type (Q, K, V; gate, up) multiply in one mmq launch."""
        cp = self.cp
        n_tok = x.shape[0]
        outs = [o if o is not None else cp.empty((n_tok, w.rows), np.float32) for w, o in zip(weights, outs or [None] * len(weights))]
        fused: list[list[int]] = []  # runs of weights for mmq
        for i, w in enumerate(weights):
            if n_tok == 1:
                self._matvec(w, x, outs[i])
            elif self.mma and w.ggml_type in MMQ_TYPES and n_tok <= MMQ_MAX_TOKENS:
                if fused and len(fused[-1]) < 3 and weights[fused[-1][-1]].ggml_type == w.ggml_type and fused[-1][-1] == i - 1:
                    fused[-1].append(i)
                else:
                    fused.append([i])
            else:
                self._gemm(w, x, outs[i])
        if fused:
            xi = self._quantize_batch(x)
            for run in fused:
                self._mmq([weights[i] for i in run], xi, [outs[i] for i in run])
        return outs

    def _matvec(self, w: QWeight, x, out) -> None:
        """One token: a matrix-vector product straight from the blocks."""
        cp = self.cp
        xf = cp.ascontiguousarray(x[0])
        xq = xd = None
        if w.ggml_type in INT8_INPUT_TYPES:
            xq, xd = cp.empty(w.cols, np.int8), cp.empty(w.cols // 32, np.float32)
            self._quantize(xf, xq, xd)
        self._mmv(MODE_STORE, w, w.rows, w.cols, xq, xd, xf, out)

    def _quantize_batch(self, x) -> tuple:
        """x (n_tok, cols), cols % 32 == 0 -> int8 blocks (n_tok, cols), scales and half-block sums, laid
        out as mmq of this many tokens reads them (mmq.cu, MQX): (cols / 32, n_tok rounded up to 8) for
        the fragments' layout, else (n_tok, cols / 32)."""
        cp = self.cp
        x = cp.ascontiguousarray(x, dtype=np.float32)
        n_tok, cols = x.shape
        frag = mmq_fragment_layout(mmq_tiles(n_tok))
        shape = (cols // 32, -(-n_tok // 8) * 8) if frag else (n_tok, cols // 32)
        q, d, s = cp.empty((n_tok, cols), np.int8), cp.empty(shape, np.float32), cp.empty((*shape, 2), np.float32)
        self._call("quantize_q8s", ((x.size + 255) // 256,), (256,),
                   (x, np.int32(x.size), np.int32(cols), np.int32(frag), np.int32(shape[1] if frag else 0), q, d, s))
        return q, d, s

    def _mmq(self, ws: list[QWeight], xi: tuple, outs: list) -> None:
        """outs[i] (n_tok, rows) = the batch's int8 blocks times ws[i] (up to 3 of one type), one launch
        on the tensor cores (mmq.cu) and, when it cuts K into ranges, one that adds their sums."""
        q, d, s = xi
        t = ws[0].ggml_type
        n_tok = q.shape[0]
        nt = mmq_tiles(n_tok)
        (groups, npad) = d.shape if mmq_fragment_layout(nt) else (d.shape[1], 0)
        ld = ws[0].raw.shape[1] * ws[0].raw.itemsize
        ends = np.cumsum([w.rows for w in ws])
        rows = int(ends[-1])
        e0, e1 = (int(ends[0]), int(ends[1]) if len(ws) > 1 else rows)
        mats = [w.raw for w in ws] + [ws[-1].raw] * (3 - len(ws))
        o = list(outs) + [outs[-1]] * (3 - len(outs))
        tiles = (rows + mmq_rows(nt) - 1) // mmq_rows(nt)
        chunks = (n_tok + 63) // 64
        splits = mmq_splits(tiles * chunks, groups, self.sms, n_tok, ld)
        part = None if splits == 1 else self.cp.empty((splits, n_tok, rows), np.float32)
        bounds = (np.int32(e0), np.int32(e1), np.int32(rows))
        self._call(mmq_kernel_name(t, nt), (tiles, splits, chunks), (MMQ_THREADS,),
                   (*mats, np.int64(ld), *bounds, np.int32(groups), q, d, s, np.int32(n_tok), np.int32(npad), *o, dev_ptr(part)))
        if splits > 1:
            size = n_tok * rows
            self._call("mmq_reduce", ((size + 255) // 256,), (256,), (part, np.int32(splits), np.int32(n_tok), *bounds, *o))

    def _gemm(self, w: QWeight, x, out) -> None:
        """A batch on cuBLAS: F32 weights as they are (exact), the others dequantized to fp16 once."""
        cp = self.cp
        n_tok = x.shape[0]
        if w.ggml_type is GGMLType.F32:
            cp.matmul(x, w.raw.view(np.float32).T, out=out)
            return
        n = w.rows * w.cols
        if self._scratch is None or self._scratch.size < n:
            self._scratch = cp.empty(n, np.float16)
        w16 = self._scratch[:n]
        ld = w.raw.shape[1] * w.raw.itemsize
        self.fn[f"dequant_f16<{TYPE_CODES[w.ggml_type]}>"](((w.cols + 255) // 256, w.rows), (256,),
                                                         (w.raw, np.int64(ld), np.int32(w.cols), w16))
        x16 = cp.ascontiguousarray(x, dtype=np.float16)
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        handle = cp.cuda.device.get_cublas_handle()
        # column-major view: out^T (rows, n_tok) = W (rows, cols) @ x^T (cols, n_tok)
        cp.cuda.cublas.gemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, n_tok, w.cols,
                              one.ctypes.data, w16.data.ptr, CUDA_R_16F, w.cols, x16.data.ptr, CUDA_R_16F, w.cols,
                              zero.ctypes.data, out.data.ptr, CUDA_R_32F, w.rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
