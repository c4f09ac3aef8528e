"""Time the GPU decode product (mmv in pyggml/cuda/matvec.cu) alone on Llama-2-7B-sized matrices:
achieved weight GB/s against two ceilings measured in the same run, per type and unroll factor:
the device copy bandwidth (read + write) and the read ceiling, the best of a plain streaming read
at a few occupancies. Needs cupy and an NVIDIA GPU.

    python tools/bench_gpu_kernels.py
"""
from __future__ import annotations

import statistics
import sys

import cupy as cp
import numpy as np

from pyggml.bench import measure_device_copy_bandwidth
from pyggml.cuda.layout import to_gpu_layout
from pyggml.cuda.module import (ADD_WARPS, CHUNK_TYPES, MODE_ADD, MODE_SILU, MODE_STORE, NO_FOLD, PATH_CHUNK, PATH_GROUP,
                                TYPE_CODES, UNROLL, WARPS, cuda_source, generated_constants)
from pyggml.gguf.constants import GGMLType
from pyggml.synthetic import random_block_rows

TYPES = (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F16)
VARIANTS = [(PATH_GROUP, 4, 1), (PATH_GROUP, 4, 4), (PATH_CHUNK, 1, 1), (PATH_CHUNK, 2, 1), (PATH_CHUNK, 3, 1),
            (PATH_CHUNK, 4, 1), (PATH_CHUNK, 2, 2)]  # (path, unroll, warps per row pair)
# (label, rows, cols, mode): the matrices of one 7B layer and the output head
MATRICES = [("wq 4096x4096", 4096, 4096, MODE_STORE), ("gate+up 2x11008x4096", 11008, 4096, MODE_SILU),
            ("down 4096x11008", 4096, 11008, MODE_ADD), ("output 32000x4096", 32000, 4096, MODE_STORE)]
BURST = 40
COPIES = 4  # rotate among weight copies so the 60 MB L2 does not serve repeats
READ_BYTES = 4 << 30
# The read ceiling: every thread streams 16-byte loads through a grid-stride loop, 8 in flight. Only
# a near-full SM (2048 threads: 256 KB in flight) reaches the peak; half that reaches ~12% less.
READ_SRC = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ p, long long n, unsigned* out) {
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
#pragma unroll 8
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads
}
"""


def measure_read_ceiling(n_bytes: int = READ_BYTES) -> tuple[float, str]:
    """(bytes/s, launch shape) of the best plain streaming read of n_bytes over blocks of 256 threads,
    1 to 8 blocks per SM."""
    fn = cp.RawModule(code=READ_SRC).get_function("stream_read")
    buf = cp.ones(n_bytes // 16 * 4, cp.uint32)
    out = cp.zeros(1, cp.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    best = (0.0, "")
    for per_sm in (1, 2, 4, 8):
        grid = (sms * per_sm,)
        fn(grid, (256,), (buf, np.int64(buf.nbytes // 16), out))
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        for _ in range(5):
            fn(grid, (256,), (buf, np.int64(buf.nbytes // 16), out))
        b.record()
        b.synchronize()
        rate = 5 * buf.nbytes / (cp.cuda.get_elapsed_time(a, b) / 1e3)
        best = max(best, (rate, f"{per_sm} blocks of 256 per SM"))
    return best


def main() -> int:
    src = generated_constants() + cuda_source()
    variants = {t: [v for v in VARIANTS if (t in UNROLL if v[0] == PATH_GROUP else t in CHUNK_TYPES)] for t in TYPES}
    names = [f"mmv<{TYPE_CODES[t]}, {m}, {u}, {p}, {k}>" for t in TYPES for p, u, k in variants[t] for m in (MODE_STORE, MODE_ADD, MODE_SILU)]
    mod = cp.RawModule(code=src, options=("-std=c++17",), name_expressions=names)
    copy_bw = measure_device_copy_bandwidth()
    read_bw, shape = measure_read_ceiling()
    print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s; read ceiling: {read_bw / 1e9:.0f} GB/s ({shape})")
    print("| type | matrix | variant | us | weight GB/s | share of copy bw | share of read ceiling |")
    print("|---|---|---|---|---|---|---|")
    for t in TYPES:
        for label, rows, cols, mode in MATRICES:
            n_mat = 2 if mode == MODE_SILU else 1
            ws = [[to_gpu_layout(cp, t, cp.asarray(random_block_rows(t, rows, cols, COPIES * m + c))) for m in range(n_mat)]
                  for c in range(COPIES)]
            xf = cp.random.standard_normal(cols, dtype=cp.float32)
            xq = cp.random.randint(-127, 128, cols, dtype=cp.int8)
            xd = cp.full(cols // 32, 0.01, cp.float32)
            out = cp.zeros(rows, cp.float32)
            pairs = rows if mode == MODE_SILU else rows // 2
            nbytes = sum(w.nbytes for w in ws[0])
            for p, u, k in variants[t]:
                fn = mod.get_function(f"mmv<{TYPE_CODES[t]}, {mode}, {u}, {p}, {k}>")
                warps = ADD_WARPS if mode == MODE_ADD and k == 1 else WARPS  # as matvec.cu's mmv

                def launch(i: int) -> None:
                    w = ws[i % COPIES]
                    w1 = w[1] if n_mat == 2 else w[0]
                    fn(((pairs + warps // k - 1) // (warps // k),), (32 * warps,),
                       (w[0], w1, w1, np.int64(w[0].shape[1]), np.int32(rows), np.int32(0), np.int32(cols),
                        np.int32(0), np.int32(0), xq, xd, xf, np.uint64(0), np.float32(0), out,
                        np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0), np.int32(0), np.int32(0), np.int32(0), *NO_FOLD))

                stream = cp.cuda.Stream(non_blocking=True)
                with stream:  # a captured burst, as the decode graph runs them: no host launch gaps in the time
                    launch(0)
                    stream.begin_capture()
                    for i in range(BURST):
                        launch(i)
                    graph = stream.end_capture()
                    graph.launch(stream)
                    times = []
                    for _ in range(7):
                        a, b = cp.cuda.Event(), cp.cuda.Event()
                        a.record(stream)
                        graph.launch(stream)
                        b.record(stream)
                        b.synchronize()
                        times.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / BURST)
                us = statistics.median(times)
                gbs = nbytes / us / 1e3
                print(f"| {t.name} | {label} | {'chunk' if p == PATH_CHUNK else 'group'} U={u} KS={k} | {us:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / copy_bw:.0f}% | {100 * gbs * 1e9 / read_bw:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
