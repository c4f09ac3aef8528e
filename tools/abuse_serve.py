"""Abuse a running `pyggml serve` (or llama-server) and check that it keeps serving and loses nothing.

    pyggml serve -m model.gguf -c 1024 -np 4 --max-queue 256 &
    python tools/abuse_serve.py --url http://127.0.0.1:8080 -n 500 --clients 120 --pid $!

Sends -n requests from --clients concurrent connections (more than the slots, so many wait in the
queue), each drawn at random from: streams the client drops after a few chunks or before the first,
malformed JSON, wrong types, unknown fields' values the API refuses, prompts longer than the context,
max_tokens of 10^9 (dropped mid-stream), and ordinary greedy completions and chats. Before and after,
the same greedy request is sent; afterwards `/health` must show every slot idle and nothing queued, the
greedy text must be unchanged, and (with --pid) the server's resident memory must be back within
--rss-slack MiB of its level after the first request. Exit status 1 when a check fails.
Only loopback addresses are accepted: the tool is for a local server.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

from bench_serve import loopback_only

GREEDY = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
KINDS = ("drop_stream", "drop_before_reply", "malformed_json", "wrong_types", "too_long", "huge_max_tokens",
         "greedy", "chat")


def _post(host, port, path, body, headers, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _drop_stream(host, port, body, headers, chunks, timeout):
    """Send a streamed request, read `chunks` SSE lines (0: none, not even the status), then vanish."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        seen = b""
        while chunks and seen.count(b"data: ") < chunks:
            got = sock.recv(4096)
            if not got:
                break
            seen += got
        return 200 if (b" 200 " in seen[:20] or not chunks) else int(seen[9:12] or 0)
    finally:
        sock.close()


def one(kind: str, rng: random.Random, host: str, port: int, headers: dict, n_ctx: int, timeout: float) -> str:
    """Run one abusive request; returns what happened, for the tally."""
    if kind == "drop_stream":
        return f"dropped:{_drop_stream(host, port, {**GREEDY, 'max_tokens': 200, 'stream': True}, headers, rng.randint(1, 6), timeout)}"
    if kind == "drop_before_reply":
        return f"dropped:{_drop_stream(host, port, {**GREEDY, 'stream': rng.random() < 0.5}, headers, 0, timeout)}"
    if kind == "huge_max_tokens":
        return f"dropped:{_drop_stream(host, port, {**GREEDY, 'max_tokens': 10**9, 'stream': True}, headers, rng.randint(1, 10), timeout)}"
    if kind == "malformed_json":
        body = rng.choice([b"{", b"not json", b'{"prompt": "a", }', b"\xff\xfe", b'[1, 2', b'{"prompt": "a"' * 50])
        return str(_post(host, port, "/v1/completions", body, headers, timeout)[0])
    if kind == "wrong_types":
        body = rng.choice([{"prompt": 5}, {"prompt": "a", "max_tokens": "x"}, {"prompt": "a", "temperature": "hot"},
                           {"messages": 5}, {"messages": [{"role": 1}]}, {"prompt": "a", "stop": 3},
                           {"prompt": "a", "top_p": "x"}, [], {"prompt": "a", "logit_bias": "x"}])
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        return str(_post(host, port, path, body, headers, timeout)[0])
    if kind == "too_long":
        return str(_post(host, port, "/v1/completions", {"prompt": "word " * (2 * n_ctx), "max_tokens": 4}, headers, timeout)[0])
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": "Tell me about a dog."}], "max_tokens": 16, "temperature": 0}
        return str(_post(host, port, "/v1/chat/completions", body, headers, timeout)[0])
    return str(_post(host, port, "/v1/completions", {**GREEDY, "max_tokens": 16}, headers, timeout)[0])


def health(host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def campaign(host: str, port: int, n: int, clients: int, n_ctx: int, seed: int = 0, api_key: str | None = None,
             timeout: float = 120.0) -> dict:
    """Run the abuse; returns {"tally", "greedy_before", "greedy_after", "health"} (waits for idle slots)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    status, raw = _post(host, port, "/v1/completions", GREEDY, headers, timeout)
    before = json.loads(raw)["choices"][0]["text"] if status == 200 else f"HTTP {status}"
    rng = random.Random(seed)
    plan = [rng.choice(KINDS) for _ in range(n)]
    tally: Counter = Counter()
    lock = threading.Lock()

    def worker(wid: int) -> None:
        r = random.Random(seed * 1000 + wid)
        while True:
            with lock:
                if not plan:
                    return
                kind = plan.pop()
            try:
                outcome = one(kind, r, host, port, headers, n_ctx, timeout)
            except OSError as e:  # refused or reset connections are the server failing to serve
                outcome = f"error:{type(e).__name__}"
            with lock:
                tally[f"{kind} -> {outcome}"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 60
    h = health(host, port)
    while h.get("slots_processing", 0) or h.get("requests_queued", 0):  # dropped streams finish their current token
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        h = health(host, port)
    status, raw = _post(host, port, "/v1/completions", GREEDY, headers, timeout)
    after = json.loads(raw)["choices"][0]["text"] if status == 200 else f"HTTP {status}"
    return {"tally": dict(tally), "greedy_before": before, "greedy_after": after, "health": h}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("-n", "--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=120, help="Concurrent connections (more than the slots: a queue forms).")
    ap.add_argument("--n-ctx", type=int, default=512, help="A slot's context, to make over-long prompts.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--pid", type=int, default=None, help="The server's process id, to compare its resident memory.")
    ap.add_argument("--rss-slack", type=float, default=64.0, help="MiB the resident memory may grow by.")
    args = ap.parse_args()
    u = urlsplit(args.url)
    loopback_only(u.hostname or "127.0.0.1")
    host, port = u.hostname or "127.0.0.1", u.port or 80
    _post(host, port, "/v1/completions", GREEDY, {"Content-Type": "application/json",
          **({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})}, 120)
    rss0 = rss_mib(args.pid) if args.pid else None
    t0 = time.perf_counter()
    out = campaign(host, port, args.requests, args.clients, args.n_ctx, args.seed, args.api_key)
    print(f"{args.requests} requests from {args.clients} connections in {time.perf_counter() - t0:.1f} s")
    for k, v in sorted(out["tally"].items()):
        print(f"  {v:5d}  {k}")
    failures = []
    h = out["health"]
    print(f"health afterwards: {h}")
    if h.get("slots_processing", 0) or h.get("requests_queued", 0):
        failures.append("slots still busy or requests still queued")
    if any("error:" in k or "-> 5" in k for k in out["tally"]):
        failures.append("connections failed or 5xx answers")
    print(f"greedy text before: {out['greedy_before']!r}\ngreedy text after:  {out['greedy_after']!r}")
    if out["greedy_before"] != out["greedy_after"]:
        failures.append("the greedy text changed")
    if rss0 is not None:
        rss1 = rss_mib(args.pid)
        print(f"server RSS: {rss0:.0f} MiB after the first request, {rss1:.0f} MiB afterwards")
        if rss1 > rss0 + args.rss_slack:
            failures.append(f"resident memory grew by {rss1 - rss0:.0f} MiB")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("OK")


if __name__ == "__main__":
    main()
