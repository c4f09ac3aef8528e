"""SIGTERM and SIGKILL during `pyggml quantize`: no partial file under the final name, and after the
next run that writes the same target no temp file is left."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyggml.gguf import GGMLType
from pyggml.synthetic import Shape, write_random_model

REPO = Path(__file__).resolve().parent.parent
SHAPE = Shape(dim=1024, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=2816, vocab=2000, ctx=64)


@pytest.fixture(scope="module")
def big_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("sig") / "m.gguf"
    write_random_model(path, SHAPE, GGMLType.F32, seed=2)
    return path


def _start_quantize(src: Path, out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "pyggml", "quantize", str(src), "q4_0", "-o", str(out)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.parent.glob(f".{out.name}.*.tmp")):  # writing has started
        if p.poll() is not None:
            break
        time.sleep(0.02)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_quantize_leaves_no_partial_file(big_f32, tmp_path, sig):
    out = tmp_path / "q.gguf"
    p = _start_quantize(big_f32, out)
    if p.poll() is not None:
        pytest.skip("quantize finished before it could be signalled")
    p.send_signal(sig)
    p.wait(timeout=60)
    assert not out.exists()
    temps = list(tmp_path.glob(".q.gguf.*.tmp"))
    assert len(temps) == (0 if sig == signal.SIGTERM else 1)  # SIGKILL cannot be caught: the next run cleans up
    r = subprocess.run([sys.executable, "-m", "pyggml", "quantize", str(big_f32), "q4_0", "-o", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and list(tmp_path.glob(".q.gguf.*.tmp")) == []
