"""The kernels' capped instruction-set paths on this host: PYGGML_SIMD=avx2 (no VNNI) and =portable
(plain LLVM vector IR; f16 KV rows widened through a table) run the packed-product and KV-cache tests in a fresh process each, with its own numba
cache (the on-disk cache does not know the setting). The default (native) path is what the rest of
the suite runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyggml.kernels import simd

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_capped_simd_paths_pass_the_kernel_tests(level, tmp_path):
    if level == "avx2" and not simd.HAS_AVX2:
        pytest.skip("this host has no AVX2")
    env = dict(os.environ, PYGGML_SIMD=level, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    code = (f"from pyggml.kernels import simd; assert simd.SIMD_LEVEL == {level!r} and not simd.HAS_VNNI "
            f"and simd.HAS_AVX2 == {level == 'avx2'}")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kpack.py",
                        "tests/test_kernels.py", "tests/test_f16tile.py", "tests/test_kvtypes.py"], env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_unknown_level_is_refused(tmp_path):
    env = dict(os.environ, PYGGML_SIMD="avx9000", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    r = subprocess.run([sys.executable, "-c", "import pyggml.kernels.simd"], env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "PYGGML_SIMD='avx9000'" in r.stderr
