"""matvec.cu's wide-path device functions (load_xw, load_ww, dot_ww: the decode products of Q4_1,
Q5_1, Q2_K-Q6_K, IQ4_NL, IQ4_XS) compiled for the CPU with g++ through a small shim of CUDA's
intrinsics (tests/data/cuda_shim.h), against the exact int8-activation reference over the `gguf`
package's dequantization. It runs where no GPU is, so CI checks the device code's arithmetic; the
GPU tests (test_cuda.py) check the real thing. Skipped without g++."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pyggml.cuda.module import WIDE_UNROLL, cuda_source, generated_constants
from pyggml.kernels import cpu, reference as ref
from pyggml.quant.registry import KERNEL_TYPE_CODES

from test_kpack import random_rows

gguf_quants = pytest.importorskip("gguf.quants")
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ to compile the device code for the CPU")
REPO = Path(__file__).resolve().parent.parent

DRIVER = r"""
#include <vector>
#include <cstdlib>
template <int T> void run(FILE* w_in, int rows, int cols, long ld, FILE* x_in, FILE* out) {
  std::vector<u8> w(rows * ld); fread(w.data(), 1, w.size(), w_in);
  std::vector<int> xq(cols / 4); fread(xq.data(), 1, cols, x_in);
  std::vector<float> xd(cols / 32); fread(xd.data(), 4, xd.size(), x_in);
  Input in{xq.data(), xd.data(), nullptr};
  for (int r = 0; r < rows; r++) {
    float a = 0;
    for (int u = 0; u < cols / 32; u++) a += dot_ww<T>(load_ww<T>(w.data() + r * ld, u), load_xw<T>(in, u), u);
    fwrite(&a, 4, 1, out);
  }
}
int main(int argc, char** argv) {
  const int t = atoi(argv[1]), rows = atoi(argv[2]), cols = atoi(argv[3]); const long ld = atol(argv[4]);
  FILE* w = fopen(argv[5], "rb"); FILE* x = fopen(argv[6], "rb"); FILE* o = fopen(argv[7], "wb");
  switch (t) {
%s
    default: return 2;
  }
  fclose(o);
  return 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    src = cuda_source()
    wide = src[src.index("// 4-bit indices (one per byte of q"):src.index("// The general path")]
    consts = generated_constants().replace("__device__ __constant__ __align__(16)", "alignas(16)")
    cases = "\n".join(f"    case T_{t.name}: run<T_{t.name}>(w, rows, cols, ld, x, o); break;" for t in WIDE_UNROLL)
    d = tmp_path_factory.mktemp("emu")
    (d / "emu.cpp").write_text('#include "cuda_shim.h"\n' + consts + wide + DRIVER % cases)
    subprocess.run([GXX, "-std=c++17", "-O1", "-I", str(REPO / "tests" / "data"), "-o", str(d / "emu"), str(d / "emu.cpp")],
                   check=True, capture_output=True)
    return d


@pytest.mark.parametrize("t", sorted(WIDE_UNROLL, key=lambda t: t.value), ids=lambda t: t.name)
def test_wide_path_device_code_equals_reference(emulator, t):
    rng = np.random.default_rng(int(t))
    rows, cols = 5, 768
    raw = random_rows(rng, t, rows, cols, zero_first=True)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xq, xd, *_ = cpu.quantize_activations(x)
    raw.tofile(emulator / "w.bin")
    with open(emulator / "x.bin", "wb") as f:
        f.write(xq.tobytes() + xd.tobytes())
    subprocess.run([str(emulator / "emu"), str(KERNEL_TYPE_CODES[t]), str(rows), str(cols), str(raw.shape[1]),
                    str(emulator / "w.bin"), str(emulator / "x.bin"), str(emulator / "out.bin")], check=True)
    got = np.fromfile(emulator / "out.bin", np.float32)
    W = gguf_quants.dequantize(raw, t.value).astype(np.float64)
    exact = (ref.quantize_activations(x) @ W.T)[0]
    bound = 1e-6 * (np.abs(ref.quantize_activations(x)) @ np.abs(W).T)[0]  # float32 rounding of the sums
    assert np.all(np.abs(got - exact) <= bound), np.abs(got - exact).max()
