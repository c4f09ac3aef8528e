"""Building a kernel test's program on the threaded CPU emulation of CUDA (tests/data/cuda_threads.h)
with g++ 11+ (C++20 barriers); the tests that use it skip without one."""
import shutil
import subprocess
from pathlib import Path

import pytest

GXX = shutil.which("g++")
DATA = Path(__file__).resolve().parent / "data"


def build(d: Path, code: str) -> Path:
    """Compile cuda_threads.h + `code` into d/emu; skips the test where this g++ has no <barrier>."""
    (d / "emu.cpp").write_text('#include "cuda_threads.h"\n' + code)
    r = subprocess.run([GXX, "-std=c++20", "-O1", "-pthread", "-I", str(DATA), "-o", str(d / "emu"), str(d / "emu.cpp")],
                       capture_output=True, text=True)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "emu"
