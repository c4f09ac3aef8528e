"""Benchmarks in the spirit of llama-bench: prompt processing (pp) and token generation (tg)
in tokens/s, with tg's achieved weight-read bandwidth as a share of the bandwidth measured in
the same run: this machine's streaming read with the same threads, or, with every layer on the
GPU (-ngl), the GPU's device-to-device copy bandwidth (bytes read + written per second)."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BANDWIDTH_BYTES = 1 << 30  # buffer for the streaming-read measurement: well past the caches


@dataclass
class BenchResult:
    test: str  # "pp128", "tg64"
    n_tokens: int
    seconds: list[float]

    @property
    def tps(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tps)

    @property
    def std(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0


def _read_kernel():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True)
    def read_rows(a, out):
        for t in prange(a.shape[0]):
            s = np.float32(0.0)
            row = a[t]
            for i in range(row.size):
                s += row[i]
            out[t] = s

    return read_rows


def measure_read_bandwidth(n_bytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Best-of-N streaming read of a large float32 buffer with the current numba threads, in bytes/s."""
    read_rows = _read_kernel()
    a = np.ones((256, n_bytes // 4 // 256), np.float32)
    out = np.empty(a.shape[0], np.float32)
    read_rows(a, out)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        read_rows(a, out)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def measure_device_copy_bandwidth(n_bytes: int = BANDWIDTH_BYTES, repeats: int = 10) -> float:
    """Best-of-N device-to-device copy of a large buffer on the GPU, counting bytes read plus written, in bytes/s."""
    import cupy as cp

    a = cp.ones(n_bytes // 4, cp.float32)
    b = cp.empty_like(a)
    b[...] = a
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    best = math.inf
    for _ in range(repeats):
        start.record()
        b[...] = a
        stop.record()
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * a.nbytes / best


def weight_bytes_per_token(llm, backend: str | None = None) -> int:
    """Bytes of weights one decode step reads: every layer matrix, the output head, one embedding row;
    with `backend` ("cpu", "cuda"), only what that backend reads."""
    m = llm.model
    total = sum(w.nbytes for layer in m.layers if backend in (None, layer.backend.name)
                for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down))
    if backend in (None, m.head_backend.name):
        total += m.output.nbytes + m.tok_embd.nbytes // m.tok_embd.rows
    return total


def run_pp(llm, n_prompt: int, repetitions: int, rng: np.random.Generator) -> BenchResult:
    times = []
    for _ in range(repetitions + 1):  # the first run warms up (and compiles) and is dropped
        tokens = rng.integers(3, llm.n_vocab(), n_prompt).tolist()
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        times.append(time.perf_counter() - t)
    return BenchResult(f"pp{n_prompt}", n_prompt, times[1:])


def run_tg(llm, n_gen: int, repetitions: int, rng: np.random.Generator) -> BenchResult:
    times = []
    for _ in range(repetitions + 1):
        llm.reset()
        llm.eval([int(rng.integers(3, llm.n_vocab()))])  # llama-bench's tg starts from one token in the context
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([int(rng.integers(3, llm.n_vocab()))])
        times.append(time.perf_counter() - t)
    return BenchResult(f"tg{n_gen}", n_gen, times[1:])


def bench_model(model_path: str, n_prompt: int = 128, n_gen: int = 64, repetitions: int = 3,
                n_threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0) -> dict:
    """Run pp and tg on one model; returns the figures a table needs."""
    from .api import Llama

    llm = Llama(model_path, n_ctx=max(n_prompt, n_gen + 1, 16), n_batch=max(n_prompt, 1), n_threads=n_threads,
                n_gpu_layers=n_gpu_layers)
    import numba

    threads = numba.get_num_threads()
    rng = np.random.default_rng(seed)
    results = []
    if n_prompt > 0:
        results.append(run_pp(llm, n_prompt, repetitions, rng))
    if n_gen > 0:
        results.append(run_tg(llm, n_gen, repetitions, rng))
    all_on_gpu = llm.model.head_backend.name == "cuda"
    n_gpu = sum(layer.backend.name == "cuda" for layer in llm.model.layers)
    bw = measure_device_copy_bandwidth() if all_on_gpu else measure_read_bandwidth()
    return {
        "model": Path(model_path).name,
        "size": Path(model_path).stat().st_size,
        "params": sum(t.n_elements for t in llm.file),
        "backend": f"cuda ngl={n_gpu}" + ("" if all_on_gpu else f" + cpu {threads} thr") if n_gpu else f"cpu {threads} thr",
        "threads": threads,
        "bytes_per_token": weight_bytes_per_token(llm, None if all_on_gpu or not n_gpu else "cpu"),
        "read_bw": bw,
        "bw_kind": "GPU copy" if all_on_gpu else ("CPU read, CPU layers' weights" if n_gpu else "CPU read"),
        "results": results,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | size | params | backend | test | t/s | weights GB/s | share of measured bw |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for res in r["results"]:
            gbs = share = ""
            if res.test.startswith("tg"):
                achieved = r["bytes_per_token"] * res.mean
                gbs = f"{achieved / 1e9:.1f}"
                share = f"{100 * achieved / r['read_bw']:.0f}% of {r['bw_kind']} {r['read_bw'] / 1e9:.1f}"
            lines.append(f"| {r['model']} | {r['size'] / 2**20:.0f} MiB | {r['params'] / 1e9:.2f} B | {r['backend']} "
                         f"| {res.test} | {res.mean:.2f} ± {res.std:.2f} | {gbs} | {share} |")
    return "\n".join(lines)
