"""Benchmarks in the spirit of llama-bench: prompt processing (pp) and token generation (tg)
in tokens/s, with tg's achieved weight-read bandwidth as a share of the bandwidth measured in
the same run: this machine's streaming read with the same threads, or, with every layer on the
GPU (-ngl), the GPU's device-to-device copy bandwidth (bytes read + written per second).

Like llama-bench, every combination of the lists given runs (-p 128,512 -n 64 -d 0,1024 -t 1,2), and
the figures come out as a markdown table, JSON or CSV with llama-bench's field names."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

BANDWIDTH_BYTES = 1 << 30  # buffer for the streaming-read measurement: well past the caches


@dataclass
class BenchResult:
    """One llama-bench test: pp (n_prompt tokens in one go) or tg (n_gen tokens one at a time),
    after `depth` tokens already in the context."""

    kind: str  # "pp" or "tg"
    n_tokens: int
    seconds: list[float]
    depth: int = 0

    @property
    def test(self) -> str:
        """The test as llama-bench names it: "pp128", "tg64", "pp512 @ d1024"."""
        return f"{self.kind}{self.n_tokens}" + (f" @ d{self.depth}" if self.depth else "")

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


def _random_tokens(llm, n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(3, llm.n_vocab(), n).tolist()


def run_pp(llm, n_prompt: int, repetitions: int, rng: np.random.Generator, depth: int = 0) -> BenchResult:
    """Time evaluating n_prompt tokens at once, after `depth` tokens (untimed) in the context."""
    times = []
    for _ in range(repetitions + 1):  # the first run warms up (and compiles) and is dropped
        llm.reset()
        if depth:
            llm.eval(_random_tokens(llm, depth, rng))
        tokens = _random_tokens(llm, n_prompt, rng)
        t = time.perf_counter()
        llm.eval(tokens)
        times.append(time.perf_counter() - t)
    return BenchResult("pp", n_prompt, times[1:], depth)


def run_tg(llm, n_gen: int, repetitions: int, rng: np.random.Generator, depth: int = 0) -> BenchResult:
    """Time generating n_gen tokens one at a time, after `depth` tokens (untimed; at least one, as
    llama-bench's tg starts from one token in the context)."""
    times = []
    for _ in range(repetitions + 1):
        llm.reset()
        llm.eval(_random_tokens(llm, max(depth, 1), rng))
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([int(rng.integers(3, llm.n_vocab()))])
        times.append(time.perf_counter() - t)
    return BenchResult("tg", n_gen, times[1:], depth)


def _ints(v: int | Sequence[int]) -> list[int]:
    return [v] if isinstance(v, int) else list(v)


def bench_model(model_path: str, n_prompt: int | Sequence[int] = 128, n_gen: int | Sequence[int] = 64,
                repetitions: int = 3, n_threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0,
                depth: int | Sequence[int] = 0, read_bw: dict | None = None, type_k: str | None = None,
                type_v: str | None = None) -> dict:
    """Run every pp test (one per n_prompt > 0) and tg test (one per n_gen > 0) at every depth on one
    model; returns the figures a table needs. `read_bw` caches bandwidth measurements between calls
    (keyed by placement and threads)."""
    from .api import Llama

    prompts, gens, depths = [n for n in _ints(n_prompt) if n > 0], [n for n in _ints(n_gen) if n > 0], _ints(depth)
    if any(d < 0 for d in depths):
        raise ValueError(f"depth {min(depths)}: expected a number of tokens >= 0")
    n_ctx = max([16] + [d + n for d in depths for n in prompts] + [max(d, 1) + n for d in depths for n in gens])
    llm = Llama(model_path, n_ctx=n_ctx, n_batch=max(prompts, default=1), n_threads=n_threads,
                n_gpu_layers=n_gpu_layers, type_k=type_k, type_v=type_v)
    import numba

    cpu = llm.model._compute  # the CPU backend, when the model has a part there
    threads = cpu.n_threads if cpu is not None else (n_threads or numba.config.NUMBA_NUM_THREADS)
    rng = np.random.default_rng(seed)
    results = [run_pp(llm, n, repetitions, rng, d) for d in depths for n in prompts]
    results += [run_tg(llm, n, repetitions, rng, d) for d in depths for n in gens]
    all_on_gpu = llm.model.head_backend.name == "cuda"
    n_gpu = sum(layer.backend.name == "cuda" for layer in llm.model.layers)
    read_bw = {} if read_bw is None else read_bw
    key = "gpu" if all_on_gpu else f"cpu{threads}"
    if key not in read_bw:
        read_bw[key] = measure_device_copy_bandwidth() if all_on_gpu else cpu.on_compute_thread(measure_read_bandwidth)
    row = {
        "model": Path(model_path).name,
        "size": Path(model_path).stat().st_size,
        "params": sum(t.n_elements for t in llm.file),
        "backend": f"cuda ngl={n_gpu}" + ("" if all_on_gpu else f" + cpu {threads} thr") if n_gpu else f"cpu {threads} thr",
        "threads": threads,
        "n_gpu_layers": n_gpu,
        "bytes_per_token": weight_bytes_per_token(llm, None if all_on_gpu or not n_gpu else "cpu"),
        "read_bw": read_bw[key],
        "bw_kind": "GPU copy" if all_on_gpu else ("CPU read, CPU layers' weights" if n_gpu else "CPU read"),
        "type_k": llm.kv_cache.type_k.name,
        "type_v": llm.kv_cache.type_v.name,
        "kv_bytes_per_token": llm.kv_cache.nbytes / (llm.kv_cache.n_ctx * llm.kv_cache.n_seq),  # of the arrays made
        "results": results,
    }
    llm.close()
    return row


def _bandwidth(r: dict, res: BenchResult) -> tuple[float, float] | None:
    """tg's achieved weight-read bandwidth in bytes/s and its share of the measured bandwidth."""
    if res.kind != "tg":
        return None
    achieved = r["bytes_per_token"] * res.mean
    return achieved, achieved / r["read_bw"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | size | params | backend | KV (bytes/token) | test | t/s | weights GB/s | share of measured bw |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for res in r["results"]:
            gbs = share = ""
            bw = _bandwidth(r, res)
            if bw is not None:
                gbs = f"{bw[0] / 1e9:.1f}"
                share = f"{100 * bw[1]:.0f}% of {r['bw_kind']} {r['read_bw'] / 1e9:.1f}"
            kv = f"{r['type_k']}/{r['type_v']} ({r['kv_bytes_per_token']:,.0f})"
            lines.append(f"| {r['model']} | {r['size'] / 2**20:.0f} MiB | {r['params'] / 1e9:.2f} B | {r['backend']} "
                         f"| {kv} | {res.test} | {res.mean:.2f} ± {res.std:.2f} | {gbs} | {share} |")
    return "\n".join(lines)


# llama-bench's field names where it has the figure; weights_gbs / bw_share are pyggml's (tg only).
RECORD_FIELDS = ("model_filename", "model_size", "model_n_params", "backends", "n_threads", "n_gpu_layers",
                 "type_k", "type_v", "kv_bytes_per_token", "n_prompt", "n_gen", "n_depth", "test", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
                 "weights_gbs", "measured_gbs", "bw_kind", "bw_share")


def records(rows: list[dict]) -> list[dict]:
    """One flat record per test, as llama-bench's -o json gives them (plus samples_ns / samples_ts)."""
    out = []
    for r in rows:
        for res in r["results"]:
            ns = [s * 1e9 for s in res.seconds]
            bw = _bandwidth(r, res)
            out.append({
                "model_filename": r["model"], "model_size": r["size"], "model_n_params": r["params"],
                "backends": r["backend"], "n_threads": r["threads"], "n_gpu_layers": r["n_gpu_layers"],
                "type_k": r["type_k"], "type_v": r["type_v"], "kv_bytes_per_token": r["kv_bytes_per_token"],
                "n_prompt": res.n_tokens if res.kind == "pp" else 0, "n_gen": res.n_tokens if res.kind == "tg" else 0,
                "n_depth": res.depth, "test": res.test,
                "avg_ns": round(statistics.fmean(ns)), "stddev_ns": round(statistics.stdev(ns)) if len(ns) > 1 else 0,
                "avg_ts": res.mean, "stddev_ts": res.std,
                "weights_gbs": None if bw is None else bw[0] / 1e9, "measured_gbs": r["read_bw"] / 1e9,
                "bw_kind": r["bw_kind"], "bw_share": None if bw is None else bw[1],
                "samples_ns": [round(x) for x in ns], "samples_ts": res.tps,
            })
    return out


def json_text(rows: list[dict]) -> str:
    return json.dumps(records(rows), indent=2)


def csv_text(rows: list[dict]) -> str:
    """CSV with a header line of RECORD_FIELDS (the per-repetition samples left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, RECORD_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(records(rows))
    return buf.getvalue().rstrip("\n")


FORMATS = {"md": markdown_table, "json": json_text, "csv": csv_text}
