"""N concurrent streaming clients against a running `pyggml serve` (or llama-server): requests/s,
aggregate generated tokens/s, time to first token and inter-token latency percentiles.

    pyggml serve -m model.gguf -t 2 &
    python tools/bench_serve.py --url http://127.0.0.1:8080 -c 1 -c 4 -n 16 --max-tokens 128

Each client sends streamed /v1/completions requests (stream_options.include_usage, so the token counts
are the server's own) one after another until the run has sent --requests of them. TTFT is from sending
the request to the first chunk with text; inter-token latency is the gap between successive text chunks.
Only loopback addresses are accepted: the tool is for measuring a local server.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Result:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def loopback_only(host: str) -> None:
    """Refuse any host that does not resolve to loopback addresses only."""
    addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        sys.exit(f"bench_serve: {host} is not a loopback address ({', '.join(sorted(addrs))}): local servers only")


def one_request(host: str, port: int, body: bytes, headers: dict[str, str], timeout: float) -> Result:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return Result(False, start, time.perf_counter(), error=f"HTTP {resp.status}: {resp.read()[:200]!r}")
        r = Result(True, start, 0.0)
        last = None
        for raw in resp:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                r.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if last is None:
                    r.ttft = now - start
                else:
                    r.gaps.append(now - last)
                last = now
        r.end = time.perf_counter()
        return r
    except OSError as e:
        return Result(False, start, time.perf_counter(), error=str(e))
    finally:
        conn.close()


def run(host: str, port: int, concurrency: int, n_requests: int, body: bytes, headers: dict[str, str],
        timeout: float) -> list[Result]:
    results: list[Result] = []
    lock = threading.Lock()
    left = [n_requests]

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            r = one_request(host, port, body, headers, timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def report(concurrency: int, results: list[Result]) -> str:
    ok = [r for r in results if r.ok]
    if not ok:
        return f"| {concurrency} | all {len(results)} requests failed: {results[0].error if results else ''} |"
    wall = max(r.end for r in ok) - min(r.start for r in ok)
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    failed = f" ({len(results) - len(ok)} failed)" if len(ok) < len(results) else ""
    return (f"| {concurrency} | {len(ok)}{failed} | {len(ok) / wall:.2f} | {tokens / wall:.1f} | "
            f"{pct(ttft, 50):.1f} / {pct(ttft, 90):.1f} / {pct(ttft, 99):.1f} | "
            f"{pct(gaps, 50):.2f} / {pct(gaps, 90):.2f} / {pct(gaps, 99):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="The server (loopback only).")
    ap.add_argument("-c", "--concurrency", type=int, action="append", help="Concurrent clients (repeatable; default 1 and 4).")
    ap.add_argument("-n", "--requests", type=int, default=16, help="Requests per concurrency level.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    args = ap.parse_args()

    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        sys.exit("bench_serve: --url must be http://HOST:PORT")
    loopback_only(url.hostname)
    port = url.port or 80
    body = json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"

    warm = one_request(url.hostname, port, body, headers, args.timeout)  # compiles, fills caches
    if not warm.ok:
        sys.exit(f"bench_serve: the warm-up request failed: {warm.error}")
    print(f"{args.url}: prompt {args.prompt!r}, {args.max_tokens} tokens each, temperature {args.temperature}, "
          f"{args.requests} requests per row\n")
    print("| clients | requests | requests/s | generated tokens/s | TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency or [1, 4]:
        print(report(c, run(url.hostname, port, c, args.requests, body, headers, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
