"""The decode product (matvec.cu's mmv, in the instance the backend launches for each weight type: the
chunked path of Q4_0 / Q8_0 over the arranged activations, the group path, the wide path, the general
one) and its input's int8 blocks (ops.cu's quantize_q8) compiled for the CPU with g++ and run whole on
the threaded emulation of CUDA (tests/data/cuda_threads.h), every typed load checked for the alignment
the GPU needs, against the exact int8-activation reference over the `gguf` package's dequantization
(float types: the float product). It runs where no GPU is, so CI checks the kernel's arithmetic and a
rewrite of the product can be proven before a GPU run; test_cuda.py checks the real thing. Skipped
without g++ 11+ (C++20 barriers)."""
import subprocess

import numpy as np
import pytest

from cuda_emulation import GXX, build
from test_kpack import F16_FIELDS, random_rows
from pyggml.cuda.module import (INT8_INPUT_TYPES, MODE_ADD, MODE_QKV, MODE_SILU, MODE_STORE, PATH_CHUNK, MmvLaunch,
                                cuda_source, generated_constants, kernel_names, mmv_launch)
from pyggml.gguf.constants import GGMLType
from pyggml.kernels import reference as ref
from pyggml.quant.registry import COMPUTABLE_TYPES, TYPE_TRAITS

gguf_quants = pytest.importorskip("gguf.quants")
pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ to compile the device code for the CPU")

SHIM = r"""
#define NEG_INF (-INFINITY)
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(4) __half2 { __half x, y; };
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline int __dp4a(int a, int b, int c) { for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8*i)) * (int)(signed char)(b >> (8*i)); return c; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
"""

DRIVER = r"""
template <int T, int MODE, int U, int PATH, int KS> void run(const std::string& D, int rows, int cols, long ld, unsigned blocks, unsigned threads) {
  auto w = read_file(D + "/w.bin"), xb = read_file(D + "/x.bin");
  const float* x = (const float*)xb.data();
  const int nb = (cols + 31) / 32;
  const long plane = 16 * ((18L * nb + 15) / 16);
  std::vector<signed char> q(32 * nb);
  std::vector<float> d(nb), out(rows, NAN);
  std::vector<u8> a4(2 * plane), a8(16 * ((34L * nb + 15) / 16));
  if (cols %% 32 == 0)
    launch({(unsigned)((cols + 255) / 256), 1, 1}, {256, 1, 1}, [&] { quantize_q8(x, cols, q.data(), d.data(), a4.data(), plane, a8.data()); });
  const bool arranged = PATH == %(PATH_CHUNK)d;
  const u8* xa = arranged ? (T == T_Q4_0 ? a4.data() : a8.data()) : nullptr;
  launch({blocks, 1, 1}, {threads, 1, 1}, [&] {
    mmv<T, MODE, U, PATH, KS>(w.data(), nullptr, nullptr, ld, rows, 0, cols, 0, 0, (const int*)q.data(), d.data(), x, xa,
                                  arranged ? plane : 0, nullptr, 0.f, out.data(), nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0,
                                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr);
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
}
int main(int argc, char** argv) {
  const std::string D = argv[1], name = argv[2];
  const int rows = atoi(argv[3]), cols = atoi(argv[4]); const long ld = atol(argv[5]);
  const unsigned blocks = atoi(argv[6]), threads = atoi(argv[7]);
%(CASES)s
  fprintf(stderr, "no instance %%s\n", name.c_str());
  return 2;
}
"""

ROWS = 70  # 35 row pairs: blocks of 8 pairs (or of 2 with four warps a pair), the last one partly past the end


def launch_for(t: GGMLType, cols: int) -> MmvLaunch:
    """The instance the backend launches for one token with this weight (backend._mmv): int8 input
    for the int8 types, arranged where the type reads it so."""
    ld = cols // TYPE_TRAITS[t].block_size * TYPE_TRAITS[t].type_size
    int8 = t in INT8_INPUT_TYPES and cols % 32 == 0
    return mmv_launch(t, MODE_STORE, ld, cols, (ROWS + 1) // 2, int8, int8)


def weight_rows(rng, t: GGMLType, cols: int) -> np.ndarray:
    """ROWS rows of type t as stored: random blocks with sane scales (the first block of each row zero),
    or random floats."""
    if t not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return random_rows(rng, t, ROWS, cols, zero_first=True, fields={**F16_FIELDS, t: F16_FIELDS.get(t, (0,))})
    x = rng.standard_normal((ROWS, cols)).astype(np.float32)
    if t is GGMLType.F32:
        return x.view(np.uint8)
    if t is GGMLType.F16:
        return x.astype(np.float16).view(np.uint8)
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def floats_of(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    """The stored rows' values: the `gguf` package's dequantization, or the floats themselves."""
    if t is GGMLType.F32:
        return raw.view(np.float32)
    if t is GGMLType.F16:
        return raw.view(np.float16)
    if t is GGMLType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf_quants.dequantize(raw, t.value)


# (type, columns): every computable type at 512 columns (256-column blocks twice), the float types also
# at a width that is not a multiple of 8 (the general path)
CASES = [(t, 512) for t in sorted(COMPUTABLE_TYPES, key=lambda t: t.value)] + [(GGMLType.F16, 36), (GGMLType.F32, 20)]


def test_every_launch_is_a_compiled_instance():
    """mmv_launch picks only instances kernel_names compiles, for every type, mode and input form."""
    compiled = set(kernel_names())
    for t in COMPUTABLE_TYPES:
        tr = TYPE_TRAITS[t]
        for cols in (tr.block_size * 8, tr.block_size * 9 if tr.block_size > 1 else 36):
            ld = cols // tr.block_size * tr.type_size
            for mode in (MODE_STORE, MODE_ADD, MODE_SILU, MODE_QKV):
                for pairs in (16, 5000):
                    for int8, arranged in ((False, False), (True, False), (True, True)):
                        if int8 and t not in INT8_INPUT_TYPES:
                            continue
                        assert mmv_launch(t, mode, ld, cols, pairs, int8, arranged).name in compiled


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    src = cuda_source()
    device = (src[src.index("enum { MODE_STORE"):src.index("// The small kernels of a step")]
              + src[src.index('extern "C" __global__ void quantize_q8'):src.index("// The rest of a decode step's QKV product")])
    consts = generated_constants().replace("__device__ __constant__ __align__(16)", "alignas(16)")
    names = sorted({launch_for(t, cols).name for t, cols in CASES})
    cases = "\n".join(
        f'  if (name == "{n}") {{ run<{n[len("mmv<"):-1]}>(D, rows, cols, ld, blocks, threads); return 0; }}' for n in names)
    d = tmp_path_factory.mktemp("mmv")
    build(d, SHIM + consts + device + DRIVER % {"PATH_CHUNK": PATH_CHUNK, "CASES": cases}, check_alignment=True)
    return d


@pytest.mark.parametrize("t, cols", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_decode_product_equals_reference(emulator, t, cols):
    rng = np.random.default_rng(int(t) * 100 + cols)
    raw = weight_rows(rng, t, cols)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x.tofile(emulator / "x.bin")
    raw.tofile(emulator / "w.bin")
    launch = launch_for(t, cols)
    subprocess.run([str(emulator / "emu"), str(emulator), launch.name, str(ROWS), str(cols), str(raw.shape[1] * raw.itemsize),
                    str(launch.blocks), str(launch.threads)], check=True, timeout=300)
    got = np.fromfile(emulator / "out.bin", np.float32)
    W = floats_of(raw, t).astype(np.float64).reshape(ROWS, cols)
    xin = ref.quantize_activations(x) if t in INT8_INPUT_TYPES else x.astype(np.float64)
    exact = (xin @ W.T)[0]
    bound = 2e-6 * (np.abs(xin) @ np.abs(W).T)[0] + 1e-30  # float32 rounding of the scaled sums
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) / bound))
