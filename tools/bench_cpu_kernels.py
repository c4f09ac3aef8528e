"""Time the CPU decode products (pyggml/kernels/packed.py, simd.py) alone, with and without software prefetch:
weight GB/s of a matrix-vector product over TinyLlama-sized matrices (5632 x 2048) taken in turn,
512 MiB of them, so that they stream from memory, not from the cache; the variants alternate in one
run, next to this machine's read bandwidth measured in the same run.

    python tools/bench_cpu_kernels.py [-t THREADS] [--prefetch 0,1024,3072,24576@2] [--types Q4_0,F16] [--shape 2048x5632]

A prefetch is DISTANCE (bytes ahead, into the L1) or DISTANCE@LEVEL (LEVEL 2: into the L2); 0: none.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from pyggml.bench import measure_read_bandwidth
from pyggml.gguf.constants import GGMLType
from pyggml.kernels import cpu, kpack, packed, simd
from pyggml.synthetic import random_block_rows
from pyggml.tensor import KERNEL_TYPE_CODES, QWeight

TOTAL_BYTES, ROUNDS = 512 << 20, 8  # weights cycled through: several times any last-level cache


def int8_product(prefetch: simd.Prefetch):
    one = {t: 1 for t in cpu.PACKED_TOKENS}
    kernel = packed.packed_kernel(one, prefetch, kpack.kpacked_emitters(one, prefetch))
    pair = simd.int8_intrinsic("paired k-packed kernel", kpack.kpacked_emitters(one, prefetch, width=2 if kpack.PAIRS else 1))

    @njit(parallel=True)
    def product(code, pw, xq, xd, xc, xs, out, table, pairs):  # cpu._packed_loops for one token
        groups, nb = pw.shape[0], xd.shape[1]
        for i in prange((groups + cpu.GROUPS_PER_TASK - 1) // cpu.GROUPS_PER_TASK):
            g, g1 = i * cpu.GROUPS_PER_TASK, min(groups, (i + 1) * cpu.GROUPS_PER_TASK)
            while g < g1:
                if pairs and g + 1 < g1:
                    pair(code, pw, g, xq, xd, xc, 0, 0, nb, out, table, xs)
                    g += 2
                else:
                    kernel(code, pw, g, xq, xd, xc, 0, 0, nb, out, table, xs)
                    g += 1
    return product


def f16_product(prefetch: simd.Prefetch, lanes: int = 8, ways: int = 4):
    dot = simd.f16_dot_kernel(prefetch, lanes, ways)

    @njit(parallel=True)
    def product(w, x, out):  # _matmul_f16 for one token
        for r in prange(w.shape[0]):
            out[0, r] = dot(w[r], x[0])
    return product


def spec(p: simd.Prefetch) -> str:
    return f"{p.distance}@{p.level}" if p.distance else "0"


def parse_spec(text: str) -> simd.Prefetch:
    distance, _, level = text.strip().partition("@")
    p = simd.Prefetch(int(distance), int(level or 1))
    if p.level not in (1, 2) or p.distance < 0:
        raise ValueError(text)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--prefetch", default=",".join(("0", spec(simd.INT8_PREFETCH), spec(simd.F16_PREFETCH))),
                    help="prefetches, DISTANCE[@LEVEL] each, 0 = none (default: none and the two in use)")
    ap.add_argument("--types", default="Q4_0,Q5_0,Q8_0,F16")
    ap.add_argument("--f16-vectors", default="8x4", help="F16 accumulators, LANESxWAYS[,..] (default 8x4: 4 of 8 floats)")
    ap.add_argument("--shape", default="5632x2048", help="rows x cols (default: TinyLlama's gate and up)")
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    numba.set_num_threads(args.threads)
    try:
        distances = list(dict.fromkeys(parse_spec(v) for v in args.prefetch.split(",")))
    except ValueError:
        ap.error(f"--prefetch {args.prefetch!r}: expected DISTANCE[@LEVEL] values, LEVEL 1 or 2")
    x = np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32)
    xq, xd, xc, xs = cpu.quantize_activations(x)
    out = np.empty((1, rows), np.float32)
    print(f"{args.threads} threads; {TOTAL_BYTES >> 20} MiB of {rows} x {cols} matrices, each variant timed over them"
          f" {ROUNDS} x 2 times")
    print("| type | prefetch bytes@level | median GB/s | best GB/s | read bandwidth GB/s |")
    print("|---|---|---|---|---|")
    for name in args.types.split(","):
        t = GGMLType[name]
        first = random_block_rows(t, rows, cols, 0)
        ws = [first] + [random_block_rows(t, rows, cols, s) for s in range(1, max(2, TOTAL_BYTES // first.nbytes))]
        if t is GGMLType.F16:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.f16_vectors.split(",")]
            kernels = {f"{spec(d)} ({lanes}x{ways})": f16_product(d, lanes, ways) for d in distances for lanes, ways in shapes}
            run = {d: (lambda w, k=k: k(w, x, out)) for d, k in kernels.items()}
        else:  # the int8 types are multiplied from their packed copy
            ws = [cpu.pack(QWeight(name, w, t, (rows, cols))) for w in ws]
            code, pairs = KERNEL_TYPE_CODES[t], kpack.PAIRS and t in kpack.K_PACKED_TYPES
            kernels = {spec(d): int8_product(d) for d in distances}
            run = {d: (lambda w, k=k: k(code, w, xq, xd, xc, xs, out, cpu.F16_TABLE, pairs)) for d, k in kernels.items()}
        for d in run:  # compile
            run[d](ws[0])
        rates = {d: [] for d in run}
        for _ in range(ROUNDS):  # the variants take turns, so the machine's drift falls on all of them
            for d in run:
                t0 = time.perf_counter()
                for w in ws * 2:
                    run[d](w)
                rates[d].append(2 * sum(w.nbytes for w in ws) / (time.perf_counter() - t0) / 1e9)
        bw = measure_read_bandwidth() / 1e9
        for d in run:
            print(f"| {name} | {d} | {statistics.median(rates[d]):.1f} | {max(rates[d]):.1f} | {bw:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
