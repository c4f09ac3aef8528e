"""The serving engine without HTTP: N streamed greedy completions at once through `LlamaEngine` (the
batcher, the slots' threads, the event loop that reads their chunks), aggregate tokens/s per round. Beside
tools/bench_serve.py (the same over HTTP), it shows what the engine's threads cost: with a model whose
forward pass is cheap (a 64-dim model with a full 32000-token vocabulary), almost all of it.

    python tools/bench_engine.py MODEL.gguf 1,8,32 [--rounds 3] [--max-tokens 128] [-ngl N] [-t N]

After each size: the batcher's steps, tokens and largest batch.
"""
import argparse
import asyncio
import sys
import time

from pyggml import Llama
from pyggml.server.engine import LlamaEngine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("slots", help="comma-separated numbers of concurrent streams")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    sys.setswitchinterval(0.0005)  # as `pyggml serve` sets it
    for n in [int(v) for v in a.slots.split(",")]:
        llm = Llama(a.model, n_ctx=a.max_tokens + 64, n_seq_max=n, n_gpu_layers=a.n_gpu_layers,
                    n_threads=a.threads, verbose=False, seed=-1)
        engine = LlamaEngine(llm, n_parallel=n)

        async def one() -> int:
            job = engine.submit("completion", dict(prompt=a.prompt, max_tokens=a.max_tokens, temperature=0.0, stream=True))
            return sum([1 async for _ in job])

        async def rounds() -> None:
            for r in range(a.rounds):
                t = time.perf_counter()
                chunks = sum(await asyncio.gather(*[one() for _ in range(n)]))
                dt = time.perf_counter() - t
                print(f"{n:3d} streams, round {r + 1}: {chunks} chunks in {dt:.2f} s: {chunks / dt:8.1f} tokens/s", flush=True)

        try:
            asyncio.run(rounds())
            if engine.batcher is not None:
                st = engine.batcher.stats
                print(f"    batcher: {st['steps']} steps, {st['tokens']} tokens, largest batch {st['max_batch']}")
        finally:
            engine.close()
            llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
