"""Write a random-weight LLaMA GGUF of a real shape, for benchmarks.

    python tools/make_random_gguf.py tinyllama-1.1b f16 -o tinyllama-f16.gguf
    python tools/make_random_gguf.py llama-2-7b q4_0 -o llama-2-7b-q4_0.gguf
    python tools/make_random_gguf.py tiny q4_k -o tiny-q4_k.gguf   (k-quants/IQ4: pyggml's approximate encoders)
"""
from __future__ import annotations

import argparse
import sys
import time

from pyggml.quant.codecs import ENCODABLE_TYPES
from pyggml.synthetic import SHAPES, write_random_model


TYPES = {t.name.lower(): t for t in ENCODABLE_TYPES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("type", choices=sorted(TYPES))
    p.add_argument("-o", "--outfile", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    write_random_model(args.outfile, args.shape, TYPES[args.type], seed=args.seed)
    print(f"wrote {args.outfile} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
