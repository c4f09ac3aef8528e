"""Perplexity of a GGUF model over a text, or its KL divergence from a base model (as llama.cpp's
perplexity tool measures them).

    python tools/perplexity.py -m stories260K-q4_0.gguf -f tests/data/ppl_text.txt -c 128
    python tools/perplexity.py -m stories260K-q4_0.gguf --kl-base stories260K-f16.gguf -f tests/data/ppl_text.txt -c 128
Same as `pyggml perplexity`.
"""
import sys

from pyggml.cli import main

if __name__ == "__main__":
    sys.exit(main(["perplexity", *sys.argv[1:]]))
