"""Time llguidance's per-token mask against a decode step (TinyLlama shape, the Llama 2 vocabulary).

    python tools/bench_grammar_mask.py ../shared/models/llama2-tokenizer [--model tinyllama-q4_0.gguf]

Walks a JSON-schema grammar and a GBNF grammar token by token (each step: compute the mask over
the 32,000-token vocabulary, pick an allowed token, consume it) and prints the mask time per token;
with --model, also one decode step of that model, measured the same way pyggml decodes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from pyggml.convert.tokenizer import tokenizer_metadata
from pyggml.grammar import GrammarMatcher, LlamaGrammar
from pyggml.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
GBNF = 'root ::= sentence ("." ws sentence)*\nsentence ::= [A-Z] [a-z ,]*\nws ::= " "?\n'


def walk(grammar, tok, n_vocab, steps, rng) -> list[float]:
    m = GrammarMatcher(grammar, tok, n_vocab)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        allowed = m.allowed()
        times.append(time.perf_counter() - t)
        ids = np.flatnonzero(allowed)
        ids = ids[~np.isin(ids, list(tok.eog_ids))] if len(ids) > 1 else ids
        if m.done or len(ids) == 0:
            break
        m.accept(int(rng.choice(ids)))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--model", help="a GGUF to time one decode step of (e.g. a random TinyLlama q4_0)")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args(argv)
    tok = load_tokenizer(tokenizer_metadata(a.tokenizer_dir, 32000))
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    walk(LlamaGrammar.from_string('root ::= "x"'), tok, tok.n_vocab, 1, rng)
    print(f"tokenizer description for llguidance: {1000 * (time.perf_counter() - t):.0f} ms (once per model)")
    for name, g in (("json schema", LlamaGrammar.from_json_schema(json.dumps(SCHEMA))), ("gbnf", LlamaGrammar.from_string(GBNF))):
        ts = np.array(walk(g, tok, tok.n_vocab, a.steps, rng)) * 1000
        print(f"{name:12s} mask over {tok.n_vocab} tokens: median {np.median(ts):.3f} ms, p90 {np.percentile(ts, 90):.3f} ms, "
              f"max {ts.max():.3f} ms over {len(ts)} steps")
    if a.model:
        from pyggml import Llama

        llm = Llama(a.model, n_ctx=256)
        llm.eval([1, 2, 3])
        ts = []
        for i in range(20):
            t = time.perf_counter()
            llm.eval([100 + i])
            ts.append(time.perf_counter() - t)
        print(f"decode step of {a.model}: median {1000 * np.median(ts[3:]):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
