"""Benchmark pyggml on GGUF files (pp and tg tokens/s, tg's share of the read bandwidth).

    python tools/bench.py -m tinyllama-q4_0.gguf -m tinyllama-q8_0.gguf -t 2
Same as `pyggml bench`.
"""
import sys

from pyggml.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
