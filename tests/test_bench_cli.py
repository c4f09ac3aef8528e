"""`pyggml bench` as llama-bench is used (comma lists, -d depth, -o md|json|csv), clean one-line errors
for bad inputs to bench and perplexity, and the first-run notice while numba compiles the kernels."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pyggml.bench import RECORD_FIELDS
from pyggml.cli import main
from pyggml.console import FIRST_RUN_NOTICE, FirstRunNotice

PYGGML = [sys.executable, "-m", "pyggml"]


def _pyggml(args, env=None, timeout=300):
    return subprocess.run(PYGGML + args, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def model(stories_f32):
    return str(stories_f32)


def test_bench_lists_depth_and_json(model):
    r = _pyggml(["bench", "-m", model, "-p", "8,16", "-n", "4", "-d", "0,24", "-t", "1,2", "-r", "1", "-o", "json"])
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    tests = [(x["n_threads"], x["test"]) for x in recs]
    assert tests == [(t, name) for t in (1, 2) for name in ("pp8", "pp16", "pp8 @ d24", "pp16 @ d24", "tg4", "tg4 @ d24")]
    deep = next(x for x in recs if x["test"] == "tg4 @ d24")
    assert deep["n_depth"] == 24 and deep["n_gen"] == 4 and deep["n_prompt"] == 0
    assert deep["avg_ts"] > 0 and len(deep["samples_ns"]) == 1 and deep["weights_gbs"] > 0
    assert {k for k in recs[0]} >= set(RECORD_FIELDS)


def test_bench_csv_and_markdown(model):
    r = _pyggml(["bench", "-m", model, "-p", "8", "-n", "4", "-d", "16", "-r", "2", "-o", "csv"])
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == list(RECORD_FIELDS)
    by_test = {row[RECORD_FIELDS.index("test")]: row for row in rows[1:]}
    assert sorted(by_test) == ["pp8 @ d16", "tg4 @ d16"]
    assert float(by_test["pp8 @ d16"][RECORD_FIELDS.index("avg_ts")]) > 0
    r = _pyggml(["bench", "-m", model, "-p", "8", "-n", "0", "-r", "1"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 3 and "| pp8 |" in lines[2]
    assert FIRST_RUN_NOTICE not in r.stderr  # the kernels were compiled by the runs before: silent


def _one_line_error(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [s for s in r.stderr.splitlines() if s != FIRST_RUN_NOTICE]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_bench_bad_files_are_one_line_errors(tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello, this is not a model at all\n" * 4)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    for path, expect in ((not_gguf, "bad magic"), (short, "too short"), (tmp_path / "missing.gguf", "No such file"),
                         (tmp_path, "cannot open")):
        assert expect in _one_line_error(_pyggml(["bench", "-m", str(path), "-p", "8", "-n", "4"]))


def test_perplexity_binary_or_non_utf8_text_is_one_line_error(model, tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un café crème ".encode("latin-1") * 50)
    assert "binary file" in _one_line_error(_pyggml(["perplexity", "-m", model, "-f", str(binary)]))
    line = _one_line_error(_pyggml(["perplexity", "-m", model, "-f", str(latin1)]))
    assert "not UTF-8" in line and "0xe9 at offset 6" in line


def test_cold_kernel_cache_is_detected(tmp_path):
    """An empty numba cache (a fresh install) reads as cold; the cache the test runs have filled does not."""
    code = "from pyggml.kernels.jitcache import kernels_cold; print(kernels_cold())"
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert cold.stdout.strip() == "True", cold.stderr


def test_first_run_notice_once_then_compiles_before_output(model, monkeypatch):
    """On a cold cache the CLI says so once on stderr and compiles before printing figures."""
    from pyggml.kernels import jitcache

    monkeypatch.setattr(jitcache, "kernels_cold", lambda: True)
    monkeypatch.setattr(FirstRunNotice, "shown", False)
    r = CliRunner().invoke(main, ["bench", "-m", model, "-m", model, "-p", "8", "-n", "0", "-r", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.count(FIRST_RUN_NOTICE) == 1
    assert r.output.index(FIRST_RUN_NOTICE) < r.output.index("| model |")


def test_precompile_helper_leaves_the_forward_kernels_cached(tmp_path):
    """The first run's helper process (kernels/precompile.py) compiles the kernels every forward pass
    needs into numba's cache: a process started after it finds the cache warm."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pyggml.kernels.precompile", "q8_0", "-"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    code = "from pyggml.kernels.jitcache import kernels_cold; print(kernels_cold())"
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert warm.stdout.strip() == "False", warm.stderr
    assert any("_writer" in p.name for p in tmp_path.rglob("*.nbi")), "no KV write kernel was cached"


def test_precompile_finish_kills_a_helper_that_overruns():
    from pyggml.kernels import precompile

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    precompile.finish(helper, timeout=0.2)
    assert helper.returncode is not None
    precompile.finish(None)  # no helper (it could not be started): nothing to wait for
