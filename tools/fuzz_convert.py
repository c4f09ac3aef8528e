"""A mutation campaign over small HF checkpoints through `pyggml convert` (issue 23).

Every broken checkpoint must end in success (a GGUF file pyggml reads back) or in one typed line:
exit status 1 and a single `Error: ...` on stderr, with nothing left under the output's name. Anything
else is a failure: a traceback, an "unexpected" (untyped) error, running out of the 1 GiB memory cap,
a hang past 20 s, a signal, or an output file left behind.

    python tools/fuzz_convert.py -n 500                      # the campaign of issue 23
    python tools/fuzz_convert.py --seed 3 --case 17 --keep /tmp/k   # one case again, kept for a look

Base checkpoints (built here, tiny): a sharded LLaMA with a SentencePiece tokenizer.model (stories260K's,
from PYGGML_TEST_MODELS or the repository), a single-file LLaMA 3 style one with a byte-level BPE
tokenizer.json, and a Qwen2 one (biases, tied embeddings), built by hf_checkpoints.py. Mutations:
convert_mutations.py. Case i of seed s is rebuilt from np.random.default_rng([s, i]) alone, so any case
can be rerun by its number.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_checkpoints import build_bases
from hf_checkpoints import (  # noqa: F401 - re-exported: tests/test_fuzz_convert.py builds its cases with them
    read_safetensors, read_tensors, spm_source, write_raw_safetensors, write_safetensors)
from convert_mutations import MUTATORS, pick

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20.0
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of each conversion
OUTTYPES = ("f16", "f32", "bf16", "q8_0")
FAILURES = ("traceback", "untyped", "oom", "hang", "crash", "partial", "litter", "bad-output", "bad-stderr", "exit")
LOG_LINE = re.compile(r"(WARNING|INFO|DEBUG) [\w.]+: ")  # what logging.basicConfig in the CLI prints


# ------------------------------------------------------------------------------ running one case
@dataclass
class Result:
    case: int
    mutator: str
    description: str
    outcome: str  # 'ok', 'typed', or one of FAILURES
    detail: str  # why it failed; the stderr tail
    seconds: float


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_convert(model_dir: Path, out: Path, outtype: str, timeout: float = TIMEOUT_S):
    """`python -m pyggml convert` in its own process (session, memory cap); (exit status or None on
    timeout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PYGGML_DEBUG"}
    cmd = [sys.executable, "-m", "pyggml", "convert", str(model_dir), "-o", str(out), "--outtype", outtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
                            env=env, preexec_fn=_limit_memory, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err.decode("utf-8", "replace")


def classify(rc: int | None, stderr: str, out: Path) -> tuple[str, str]:
    """(outcome, detail) of one conversion; see the module docstring."""
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    if rc is None:
        return "hang", f"no exit within {TIMEOUT_S:g} s"
    if rc < 0:
        return "crash", f"killed by signal {-rc}"
    if leftovers:
        return "litter", f"temp file(s) left beside the output: {leftovers}"
    if "Traceback (most recent call last)" in stderr:
        return "traceback", ""
    if rc == 0:
        if not out.is_file():
            return "bad-output", "exit 0 but no output file"
        from pyggml.gguf import GGUFError, GGUFFile

        try:
            with GGUFFile(out) as f:
                for t in f:
                    f.tensor(t.name)
                if not f.tensors:
                    return "bad-output", "no tensors"
        except (GGUFError, ValueError) as e:
            return "bad-output", f"pyggml cannot read it back: {e}"
        return "ok", ""
    if out.exists():
        return "partial", f"exit {rc} and {out.name} exists ({out.stat().st_size} bytes)"
    if rc != 1:
        return "exit", f"exit status {rc}"
    errors = [line for line in lines if line.startswith("Error: ")]
    if errors and errors[0].startswith("Error: unexpected "):
        return "untyped", ""
    if errors == ["Error: out of memory"]:
        return "oom", f"needed more than {MEMORY_LIMIT >> 20} MiB"
    if len(errors) != 1 or lines[-1] != errors[0] or not all(LOG_LINE.match(line) for line in lines[:-1]):
        return "bad-stderr", "not one 'Error: ' line (after log lines)"
    return "typed", errors[0]


def make_case(bases: list[Path], seed: int, case: int, folder: Path) -> tuple[Path, str, str]:
    """Case `case` of campaign `seed` built under `folder`: (model directory, description, outtype)."""
    rng = np.random.default_rng([seed, case])
    base = pick(rng, bases)
    mutator = MUTATORS[case % len(MUTATORS)]
    model = folder / "model"
    shutil.copytree(base, model, symlinks=True)
    what = mutator(model, rng)
    if rng.integers(4) == 0:  # now and then two mutations at once
        second = pick(rng, MUTATORS)
        try:
            what += f"; {second.__name__}: {second(model, rng)}"
        except Exception as e:  # noqa: BLE001 - a mutator that does not fit what the first one left
            what += f"; {second.__name__}: not applicable ({type(e).__name__})"
    outtype = pick(rng, OUTTYPES)
    return model, f"{base.name} {mutator.__name__}: {what}", outtype


def run_case(bases: list[Path], seed: int, case: int, work: Path, keep: Path | None) -> Result:
    folder = work / f"case-{case}"
    folder.mkdir()
    start = time.perf_counter()
    try:
        model, description, outtype = make_case(bases, seed, case, folder)
    except Exception as e:  # noqa: BLE001 - a mutator that does not fit this base (e.g. no shards left)
        shutil.rmtree(folder, ignore_errors=True)
        return Result(case, MUTATORS[case % len(MUTATORS)].__name__, f"(mutation not applicable: {type(e).__name__}: {e})", "skipped", "", 0.0)
    out = folder / "out.gguf"
    rc, stderr = run_convert(model, out, outtype)
    outcome, detail = classify(rc, stderr, out)
    if outcome == "typed":
        detail = stderr.strip().splitlines()[-1]
    elif outcome != "ok":
        detail = (detail + "\n" + "\n".join(stderr.strip().splitlines()[-12:])).strip()
    result = Result(case, MUTATORS[case % len(MUTATORS)].__name__, f"{description} [--outtype {outtype}]", outcome, detail, time.perf_counter() - start)
    if outcome in FAILURES and keep is not None:
        dest = keep / f"seed{seed}-case{case}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(model, dest / "model", symlinks=True, ignore_dangling_symlinks=True,
                        copy_function=_copy_regular)
        (dest / "README.txt").write_text(f"{result.description}\noutcome: {outcome}\n{detail}\n\n"
                                         f"python -m pyggml convert {dest / 'model'} -o /tmp/out.gguf --outtype {outtype}\n")
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _copy_regular(src: str, dst: str) -> None:
    if os.path.isfile(src):
        shutil.copy2(src, dst)


def campaign(n: int, seed: int, jobs: int = 2, keep: Path | None = None, cases: list[int] | None = None,
             report=None) -> list[Result]:
    """Run cases 0..n-1 (or `cases`) of campaign `seed`, `jobs` at a time; every Result, in case order."""
    with tempfile.TemporaryDirectory(prefix="fuzz_convert.") as tmp:
        tmp = Path(tmp)
        bases = build_bases(tmp / "bases")
        for base in bases:  # a base that does not convert would make every verdict meaningless
            rc, stderr = run_convert(base, tmp / f"{base.name}.gguf", "f16")
            outcome, _ = classify(rc, stderr, tmp / f"{base.name}.gguf")
            if outcome != "ok":
                raise RuntimeError(f"base checkpoint {base.name} does not convert: {outcome}\n{stderr}")
        work = tmp / "work"
        work.mkdir()
        todo = cases if cases is not None else list(range(n))
        lock, done = threading.Lock(), [0]

        def one(case: int) -> Result:
            result = run_case(bases, seed, case, work, keep)
            with lock:
                done[0] += 1
                if report is not None:
                    report(result, done[0], len(todo))
            return result

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, todo))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=500, help="number of mutants (default 500)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="conversions at a time (default 2)")
    p.add_argument("--keep", type=Path, help="copy each failing case's checkpoint here, with a README")
    p.add_argument("--case", type=int, action="append", help="run only this case number (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    args = p.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)

    def report(r: Result, done: int, total: int) -> None:
        if args.verbose or r.outcome in FAILURES:
            print(f"[{done}/{total}] case {r.case}: {r.outcome}: {r.description}" +
                  (f"\n    {r.detail[:300]}" if args.verbose and r.detail else ""), flush=True)
        elif done % 50 == 0:
            print(f"[{done}/{total}]", flush=True)

    start = time.perf_counter()
    results = campaign(args.n, args.seed, args.jobs, args.keep, args.case, report)
    wall = time.perf_counter() - start
    tally = collections.Counter(r.outcome for r in results)
    by_mutator = collections.defaultdict(collections.Counter)
    for r in results:
        by_mutator[r.mutator][r.outcome] += 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10
    slowest = max(results, key=lambda r: r.seconds, default=None)
    print(f"\n{len(results)} mutants (seed {args.seed}) in {wall:.0f} s; largest conversion RSS {peak} MiB; "
          f"slowest case {slowest.case if slowest else '-'} ({slowest.seconds if slowest else 0:.1f} s)")
    print("tally: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    for name, counts in sorted(by_mutator.items()):
        print(f"  {name:<18} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    failures = [r for r in results if r.outcome in FAILURES]
    for r in failures:
        print(f"\nFAILURE {r.outcome}: seed {args.seed} case {r.case}: {r.description}\n"
              f"  rerun: python tools/fuzz_convert.py --seed {args.seed} --case {r.case} --keep DIR\n"
              + "\n".join("  | " + line for line in r.detail.splitlines()))
    print(f"\n{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
