"""A mutation campaign over small GGUF files: every mutant goes through `inspect` and load + 8
generated tokens, and must end in success or in one of pyggml's typed errors: no traceback of any
other exception, no hang, no crash, bounded memory.

    python tools/fuzz_gguf.py -n 5000                 # each mutant in its own process (timeouts, memory cap)
    python tools/fuzz_gguf.py -n 500 --in-process     # fast, as the test suite runs it

Mutants: byte flips and boundary integers (0, 1, 2^31-1, 2^32-1, 2^63, 2^64-1, +-inf bit patterns) in
the header, metadata and tensor infos; truncations; and metadata-level changes written back as valid
GGUF (keys deleted, values of the wrong type or out of range, arrays cut or doubled). Base files:
random q4_0, q8_0 and Q4_K models with a SentencePiece vocabulary.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from pyggml import Llama
from pyggml.gguf import GGMLType, GGUFError, GGUFFile
from pyggml.gguf.constants import ValueType
from pyggml.gguf.values import Typed
from pyggml.gguf.writer import TensorPlan, write_gguf
from pyggml.inspect import metadata_lines, summary_lines, tensor_lines
from pyggml.kvfile import KVFileError
from pyggml.model import ModelError
from pyggml.quant.registry import UnsupportedWeightType
from pyggml.sampling import SamplingParams
from pyggml.synthetic import Shape, write_random_model
from pyggml.tokenizer import TokenizerError

TYPED_ERRORS = (GGUFError, ModelError, TokenizerError, UnsupportedWeightType, KVFileError)
SHAPE = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=300, ctx=64)
BASE_TYPES = (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K)
BOUNDARY = (0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 0x7F800000, 0xFF800000)
VALUES = (Typed(ValueType.UINT32, 0), Typed(ValueType.UINT32, 2**32 - 1), Typed(ValueType.INT32, -1),
          Typed(ValueType.FLOAT32, float("inf")), Typed(ValueType.FLOAT32, float("nan")), Typed(ValueType.FLOAT64, -1e300),
          Typed(ValueType.STRING, "x"), Typed(ValueType.STRING, ""), Typed(ValueType.BOOL, True),
          Typed(ValueType.ARRAY, [], ValueType.INT32), Typed(ValueType.ARRAY, ["a", "b"], ValueType.STRING),
          Typed(ValueType.ARRAY, np.array([1, 2, 3], np.int32), ValueType.INT32), Typed(ValueType.UINT64, 2**63),
          Typed(ValueType.UINT32, 3), Typed(ValueType.FLOAT32, 1e-30))


def base_files(folder: Path) -> list[Path]:
    out = []
    for t in BASE_TYPES:
        p = folder / f"base-{t.name}.gguf"
        if not p.exists():
            write_random_model(p, SHAPE, t, seed=1)
        out.append(p)
    return out


def byte_mutant(data: bytes, header_end: int, rng) -> bytes:
    m = bytearray(data)
    kind = rng.integers(0, 3)
    if kind == 0:
        for _ in range(rng.integers(1, 8)):
            m[rng.integers(0, header_end)] = rng.integers(0, 256)
    elif kind == 1:
        at = int(rng.integers(0, header_end - 8))
        m[at : at + 8] = BOUNDARY[rng.integers(0, len(BOUNDARY))].to_bytes(8, "little")
    else:
        m = m[: rng.integers(0, len(m))]
    return bytes(m)


def metadata_mutant(src: GGUFFile, path: Path, rng) -> bool:
    """Write a valid GGUF whose metadata is changed; False when the writer itself refuses the change."""
    fields = dict(src.fields)
    keys = list(fields)
    for _ in range(rng.integers(1, 3)):
        k = keys[rng.integers(0, len(keys))]
        r, v = rng.integers(0, 4), fields.get(k)
        if v is None:  # deleted by the previous change of this mutant
            continue
        if r == 0:
            fields.pop(k, None)
        elif r == 1 and v.type is ValueType.ARRAY and len(v.value):
            cut = rng.integers(0, len(v.value) + 1)
            value = v.value[:cut] if rng.integers(0, 2) else (
                np.concatenate([v.value, v.value[:cut]]) if isinstance(v.value, np.ndarray) else list(v.value) + list(v.value[:cut]))
            fields[k] = Typed(ValueType.ARRAY, value, v.elem_type)
        else:
            fields[k] = VALUES[rng.integers(0, len(VALUES))]
    plans = [TensorPlan(t.name, t.shape, t.ggml_type, lambda n=t.name: np.ascontiguousarray(src.tensor(n))) for t in src]
    try:
        write_gguf(path, fields, plans)
    except (TypeError, ValueError):
        return False
    return True


def exercise(path: Path) -> str:
    """inspect + load + 8 tokens: 'ok', 'typed' (a pyggml error), or raises whatever else escaped."""
    try:
        f = GGUFFile(path)
        metadata_lines(f), tensor_lines(f), summary_lines(f)
        f.close()
        llm = Llama(path, n_ctx=32)
        tokens = llm.tokenize("Hello world")
        for t in llm.generate_tokens(tokens, SamplingParams(temperature=0.8, seed=1), 8):
            llm.detokenize([t])
    except TYPED_ERRORS:
        return "typed"
    return "ok"


def campaign(n: int, seed: int, folder: Path, in_process: bool, timeout: float = 20.0):
    """Run n mutants; returns (Counter of outcomes, {escape: example})."""
    rng = np.random.default_rng(seed)
    bases = [(p, p.read_bytes(), GGUFFile(p)) for p in base_files(folder)]
    outcomes, escapes = collections.Counter(), {}
    if not in_process:  # numba compiles the kernels on the first model load (~20 s into a fresh cache):
        _in_subprocess(bases[0][0], timeout=600)  # not a mutant's time (seed 15's mutant 9 was "hang" so)
    for i in range(n):
        base, data, src = bases[i % len(bases)]
        path = folder / f"mutant-{i % 8}.gguf"
        if rng.integers(0, 2):
            path.write_bytes(byte_mutant(data, src.data_offset, rng))
        elif not metadata_mutant(src, path, rng):
            outcomes["unwritable"] += 1
            continue
        if in_process:
            try:
                outcomes[exercise(path)] += 1
            except Exception as e:  # noqa: BLE001 - an escape is what the campaign looks for
                tb = traceback.extract_tb(e.__traceback__)[-1]
                key = f"{type(e).__name__} at {Path(tb.filename).name}:{tb.lineno}"
                outcomes["escape"] += 1
                escapes.setdefault(key, f"mutant {i}: {e}"[:200])
            continue
        outcome = _in_subprocess(path, timeout)
        outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith(("escape", "hang", "crash")):
            escapes.setdefault(outcome, f"mutant {i}")
    return outcomes, escapes


def _in_subprocess(path: Path, timeout: float) -> str:
    code = ("import sys, resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
            "sys.path.insert(0, 'tools'); import fuzz_gguf, pathlib;"
            f"print(fuzz_gguf.exercise(pathlib.Path({str(path)!r})))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return "hang"
    if r.returncode < 0:
        return f"crash: signal {-r.returncode}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"escape: {last[:160]}"
    return r.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true")
    args = p.parse_args(argv)
    logging.disable(logging.CRITICAL)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        outcomes, escapes = campaign(args.n, args.seed, Path(d), args.in_process)
        print(f"{args.n} mutants in {time.perf_counter() - start:.0f} s: {dict(outcomes)}")
        for key, example in escapes.items():
            print(f"  {key}: {example}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
