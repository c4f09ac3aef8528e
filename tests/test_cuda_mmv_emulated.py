"""The decode product (matvec.cu's mmv, in the instance the backend launches for each weight type: the
chunked path of Q4_0 / Q8_0 over their rows as the GPU keeps them (regrouped: cuda/layout.py), the group
path, the wide path, the general one) and its input's int8 blocks (ops.cu's quantize_q8) compiled for the CPU with g++ and run whole on
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
from pyggml.cuda.layout import gpu_row_bytes, to_gpu_layout
from pyggml.cuda.module import (INT8_INPUT_TYPES, MODE_ADD, MODE_QKV, MODE_SILU, MODE_STORE, TYPE_CODES, MmvLaunch,
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
  std::vector<signed char> q(32 * nb);
  std::vector<float> d(nb), out(rows, NAN);
  if (cols %% 32 == 0)
    launch({(unsigned)((cols + 255) / 256), 1, 1}, {256, 1, 1}, [&] { quantize_q8(x, cols, q.data(), d.data()); });
  launch({blocks, 1, 1}, {threads, 1, 1}, [&] {
    mmv<T, MODE, U, PATH, KS>(w.data(), nullptr, nullptr, ld, rows, 0, cols, 0, 0, (const int*)q.data(), d.data(), x,
                              nullptr, 0.f, out.data(), nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0,
                              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
}
template <int T> void run_rows(const std::string& D, int rows, int cols, long ld) {
  auto w = read_file(D + "/w.bin");
  std::vector<long long> ids(rows);
  for (int r = 0; r < rows; r++) ids[r] = rows - 1 - r;
  std::vector<float> out((size_t)rows * cols, NAN);
  launch({(unsigned)((cols + 255) / 256), (unsigned)rows, 1}, {256, 1, 1}, [&] {
    get_rows<T>(w.data(), ld, (const i64*)ids.data(), cols, out.data());
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
}
int main(int argc, char** argv) {
  const std::string D = argv[1], name = argv[2];
  const int rows = atoi(argv[3]), cols = atoi(argv[4]); const long ld = atol(argv[5]);
  const unsigned blocks = atoi(argv[6]), threads = atoi(argv[7]);
%(CASES)s
%(ROWS)s
  fprintf(stderr, "no instance %%s\n", name.c_str());
  return 2;
}
"""

ROWS = 70  # 35 row pairs: blocks of 8 pairs (or of 2 with four warps a pair), the last one partly past the end


def launch_for(t: GGMLType, cols: int) -> MmvLaunch:
    """The instance the backend launches for one token with this weight (backend._mmv): int8 input
    for the int8 types."""
    return mmv_launch(t, MODE_STORE, cols, (ROWS + 1) // 2, t in INT8_INPUT_TYPES and cols % 32 == 0)


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
# at a width that is not a multiple of 8 (the general path), Q4_0 and Q8_0 at 11 blocks (a padded group)
CASES = [(t, 512) for t in sorted(COMPUTABLE_TYPES, key=lambda t: t.value)] + [(GGMLType.F16, 36), (GGMLType.F32, 20),
                                                                              (GGMLType.Q4_0, 352), (GGMLType.Q8_0, 352)]


def test_every_launch_is_a_compiled_instance():
    """mmv_launch picks only instances kernel_names compiles, for every type, mode and input form."""
    compiled = set(kernel_names())
    for t in COMPUTABLE_TYPES:
        tr = TYPE_TRAITS[t]
        for cols in (tr.block_size * 8, tr.block_size * 9 if tr.block_size > 1 else 36):
            for mode in (MODE_STORE, MODE_ADD, MODE_SILU, MODE_QKV):
                for pairs in (16, 5000):
                    for int8 in (False, True) if t in INT8_INPUT_TYPES else (False,):
                        assert mmv_launch(t, mode, cols, pairs, int8).name in compiled


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    src = cuda_source()
    device = (src[src.index("enum { MODE_STORE"):src.index("// The small kernels of a step")]
              + src[src.index('extern "C" __global__ void quantize_q8'):src.index("// The rest of a decode step's QKV product")]
              + src[src.index("// out[i, :] = row ids[i] of w"):src.index("// The whole matrix as fp16")])
    consts = generated_constants().replace("__device__ __constant__ __align__(16)", "alignas(16)")
    names = sorted({launch_for(t, cols).name for t, cols in CASES})
    cases = "\n".join(
        f'  if (name == "{n}") {{ run<{n[len("mmv<"):-1]}>(D, rows, cols, ld, blocks, threads); return 0; }}' for n in names)
    d = tmp_path_factory.mktemp("mmv")
    rows = "\n".join(f'  if (name == "get_rows<{c}>") {{ run_rows<{c}>(D, rows, cols, ld); return 0; }}'
                     for c in sorted({TYPE_CODES[t] for t, _ in CASES}))
    build(d, SHIM + consts + device + DRIVER % {"CASES": cases, "ROWS": rows}, check_alignment=True)
    return d


@pytest.mark.parametrize("t, cols", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_decode_product_equals_reference(emulator, t, cols):
    rng = np.random.default_rng(int(t) * 100 + cols)
    raw = weight_rows(rng, t, cols)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x.tofile(emulator / "x.bin")
    gpu = to_gpu_layout(np, t, raw.view(np.uint8).reshape(ROWS, -1))
    assert gpu.shape[1] == gpu_row_bytes(t, raw.nbytes // ROWS)
    gpu.tofile(emulator / "w.bin")
    launch = launch_for(t, cols)
    subprocess.run([str(emulator / "emu"), str(emulator), launch.name, str(ROWS), str(cols), str(gpu.shape[1]),
                    str(launch.blocks), str(launch.threads)], check=True, timeout=300)
    got = np.fromfile(emulator / "out.bin", np.float32)
    W = floats_of(raw, t).astype(np.float64).reshape(ROWS, cols)
    xin = ref.quantize_activations(x) if t in INT8_INPUT_TYPES else x.astype(np.float64)
    exact = (xin @ W.T)[0]
    bound = 2e-6 * (np.abs(xin) @ np.abs(W).T)[0] + 1e-30  # float32 rounding of the scaled sums
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) / bound))


@pytest.mark.parametrize("t, cols", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_embedding_rows_equal_dequantization(emulator, t, cols):
    """get_rows (the embedding's lookup, dequant: what the general path and the prompt's fp16 tile read)
    over the rows as the GPU keeps them, in reverse order: the `gguf` package's values exactly."""
    rng = np.random.default_rng(int(t) * 100 + cols + 1)
    raw = weight_rows(rng, t, cols)
    gpu = to_gpu_layout(np, t, raw.view(np.uint8).reshape(ROWS, -1))
    gpu.tofile(emulator / "w.bin")
    subprocess.run([str(emulator / "emu"), str(emulator), f"get_rows<{TYPE_CODES[t]}>", str(ROWS), str(cols), str(gpu.shape[1]),
                    "0", "0"], check=True, timeout=300)
    got = np.fromfile(emulator / "out.bin", np.float32).reshape(ROWS, cols)
    want = floats_of(raw, t).astype(np.float32).reshape(ROWS, cols)[::-1]
    np.testing.assert_array_equal(got, want)
