"""Write a random-weight LLaMA GGUF of a real shape, for benchmarks.

    python tools/make_random_gguf.py tinyllama-1.1b f16 -o tinyllama-f16.gguf
    python tools/make_random_gguf.py llama-2-7b q4_0 -o llama-2-7b-q4_0.gguf
    python tools/make_random_gguf.py tiny q4_k -o tiny-q4_k.gguf   (k-quants/IQ4: pyggml's approximate encoders)
    python tools/make_random_gguf.py llama-2-7b q4_k_m -o llama-2-7b-q4_k_m.gguf   (a llama.cpp K-quant mix)

q2_k is the single type (every matrix Q2_K); llama.cpp's Q2_K mix is spelled q2_k_mix here.
"""
from __future__ import annotations

import argparse
import sys
import time

from pyggml.quant.codecs import ENCODABLE_TYPES
from pyggml.quant.mixes import MIXES
from pyggml.synthetic import SHAPES, write_random_model


TYPES = {t.name.lower(): t for t in ENCODABLE_TYPES}
# mix names as typed here -> pyggml.quant.mixes names; a mix named like a single type gets "_mix" added
MIX_NAMES = {(f"{m}_mix" if m in TYPES else m): m for m in MIXES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("type", choices=sorted(TYPES) + list(MIX_NAMES), help="one weight type, or a K-quant mix")
    p.add_argument("-o", "--outfile", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    weight_type = TYPES[args.type] if args.type in TYPES else MIX_NAMES[args.type]
    write_random_model(args.outfile, args.shape, weight_type, seed=args.seed)
    print(f"wrote {args.outfile} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
