"""Building a kernel test's program on the threaded CPU emulation of CUDA (tests/data/cuda_threads.h)
with g++ 11+ (C++20 barriers); the tests that use it skip without one."""
import shutil
import subprocess
from pathlib import Path

import pytest

GXX = shutil.which("g++")
DATA = Path(__file__).resolve().parent / "data"


def build(d: Path, code: str, check_alignment: bool = False) -> Path:
    """Compile cuda_threads.h + `code` into d/emu; skips the test where this g++ has no <barrier>.
    check_alignment: every load and store through a typed pointer must be aligned as the GPU needs it
    (a uint4 to 16 bytes: the emulation's types carry CUDA's alignments), else the program stops."""
    (d / "emu.cpp").write_text('#include "cuda_threads.h"\n' + code)
    checks = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"] if check_alignment else []
    r = subprocess.run([GXX, "-std=c++20", "-O1", "-pthread", *checks, "-I", str(DATA), "-o", str(d / "emu"), str(d / "emu.cpp")],
                       capture_output=True, text=True)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "emu"
