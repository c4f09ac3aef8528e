"""mmq.cu (the batch products on the int8 tensor cores) compiled for the CPU with g++ and run whole on a
threaded emulation of CUDA (tests/data/cuda_threads.h: a thread per CUDA thread, mma.sync with the PTX
ISA's fragment layouts), against the exact int8-activation reference over the `gguf` package's
dequantization: every weight type mmq computes, batches that fill some tiles of 8 tokens and more than
one chunk of 64, one and several ranges of K (mmq_reduce), rows that end inside a warp's 16. The GPU
tests (test_cuda.py) check the real thing. Skipped without g++ 11+ (C++20 barriers)."""
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pyggml.cuda.layout import to_gpu_layout
from pyggml.cuda.module import MMQ_THREADS, MMQ_TYPES, cuda_source, generated_constants, mmq_fragment_layout, mmq_rows, mmq_tiles
from pyggml.kernels import reference as ref
from pyggml.gguf.constants import GGMLType
from pyggml.quant.registry import KERNEL_TYPE_CODES, TYPE_TRAITS

from cuda_emulation import GXX, build
from test_kpack import F16_FIELDS, random_rows as kpack_random_rows

gguf_quants = pytest.importorskip("gguf.quants")
pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ to compile the device code for the CPU")
REPO = Path(__file__).resolve().parent.parent

DRIVER = r"""
template <int T, int NT, bool FRAG> void run(const std::string& D, int rows, int groups, long ld, int n, int npad, int splits, int e0, int e1) {
  auto w = read_file(D + "/w.bin"), q = read_file(D + "/q.bin"), d = read_file(D + "/d.bin"), s = read_file(D + "/s.bin");
  std::vector<float> part((size_t)splits * n * rows), o0((size_t)n * e0), o1((size_t)n * (e1 - e0)), o2((size_t)n * (rows - e1));
  const u8* w1 = w.data() + (size_t)e0 * ld; const u8* w2 = w.data() + (size_t)e1 * ld;
  const int per = NT >= 4 ? %(ROWS4)d : %(ROWS1)d;
  const unsigned tiles = (rows + per - 1) / per, chunks = (n + 63) / 64;
  launch({tiles, (unsigned)splits, chunks}, {%(THREADS)d, 1, 1}, [&] {
    mmq<T, NT, FRAG>(w.data(), w1, w2, ld, e0, e1, rows, groups, (const int*)q.data(), (const float*)d.data(), (const float2*)s.data(), n, npad,
               o0.data(), o1.data(), o2.data(), part.data());
  });
  if (splits > 1) {
    const i64 size = (i64)n * rows;
    launch({(unsigned)((size + 255) / 256), 1, 1}, {256, 1, 1}, [&] { mmq_reduce(part.data(), splits, n, e0, e1, rows, o0.data(), o1.data(), o2.data()); });
  }
  FILE* f = fopen((D + "/out.bin").c_str(), "wb");
  fwrite(o0.data(), 4, o0.size(), f); fwrite(o1.data(), 4, o1.size(), f); fwrite(o2.data(), 4, o2.size(), f); fclose(f);
}
void quant(const std::string& D, int n, int cols, int frag, int npad) {
  auto x = read_file(D + "/x.bin");
  const size_t blocks = frag ? (size_t)cols / 32 * npad : n / 32;
  std::vector<signed char> q(n); std::vector<float> d(blocks); std::vector<float2> s(blocks);
  launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, [&] { quantize_q8s((const float*)x.data(), n, cols, frag, npad, q.data(), d.data(), s.data()); });
  write_file(D + "/q.bin", q.data(), n);
  write_file(D + "/d.bin", d.data(), 4 * d.size());
  write_file(D + "/s.bin", s.data(), 8 * s.size());
}
int main(int argc, char** argv) {
  const std::string D = argv[1], what = argv[2];
  if (what == "quant") { quant(D, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6])); return 0; }
  const int t = atoi(argv[3]), nt = atoi(argv[4]), rows = atoi(argv[5]), groups = atoi(argv[6]), n = atoi(argv[8]), splits = atoi(argv[9]);
  const int e0 = atoi(argv[10]), e1 = atoi(argv[11]), npad = atoi(argv[12]);
  const long ld = atol(argv[7]);
  switch (t * 100 + nt) {
%(CASES)s
    default: fprintf(stderr, "no instance\n"); return 2;
  }
  return 0;
}
"""


SCALES = {**F16_FIELDS, GGMLType.Q4_0: (0,), GGMLType.Q5_0: (0,), GGMLType.Q8_0: (0,)}  # fp16 fields of each block


def random_rows(rng, t: GGMLType, rows: int, cols: int) -> np.ndarray:
    """Blocks of random bits with sane fp16 scales; the first row's first block all zero (only the first row's:
    a K-quant row of 256 columns is one block)."""
    raw = kpack_random_rows(rng, t, rows, cols, fields=SCALES)
    raw.reshape(rows, -1, TYPE_TRAITS[t].type_size)[0, 0] = 0
    return raw


def _device_source() -> str:
    """The parts of the CUDA source mmq.cu uses, then mmq.cu without its inline-PTX mma (the shim's instead)."""
    src = cuda_source()
    mmq = (REPO / "pyggml" / "cuda" / "mmq.cu").read_text()

    def cut(text, a, b):
        return text[text.index(a):text.index(b)]

    return "".join([
        cut(src, "__device__ __forceinline__ float f16(u16 bits)", "// ------------------------------------------------------------------------------------- decode"),
        cut(src, "template <int T> struct no_decoder", "// One weight of row `row` at column i"),
        cut(src, "// 4-bit indices (one per byte of q", "// scale_min_k4 on the 12 scale bytes held in registers"),
        mmq[:mmq.index("// c += A (16 x 32")], mmq[mmq.index("// Activations of n tokens"):],
    ])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    consts = generated_constants().replace("__device__ __constant__ __align__(16)", "alignas(16)")
    cases = "\n".join(f"    case {KERNEL_TYPE_CODES[t] * 100 + nt}: run<T_{t.name}, {nt}, {str(mmq_fragment_layout(nt)).lower()}>"
                      f"(D, rows, groups, ld, n, npad, splits, e0, e1); break;"
                      for t in MMQ_TYPES for nt in (1, 2, 4, 8))
    d = tmp_path_factory.mktemp("mmq")
    driver = DRIVER % {"ROWS1": mmq_rows(1), "ROWS4": mmq_rows(4), "THREADS": MMQ_THREADS, "CASES": cases}
    build(d, consts + _device_source() + driver)
    return d


def emulated_quantize(emulator, x: np.ndarray, frag: bool = False):
    """quantize_q8s's q, d, s as written: plain, or laid out for mmq's fragments (frag: d, s (cols / 32,
    n rounded up to 8))."""
    x.astype(np.float32).tofile(emulator / "x.bin")
    n, cols = x.shape
    npad = -(-n // 8) * 8
    subprocess.run([str(emulator / "emu"), str(emulator), "quant", str(x.size), str(cols), str(int(frag)), str(npad)], check=True)
    shape = (cols // 32, npad) if frag else (n, cols // 32)
    q = np.fromfile(emulator / "q.bin", np.int8).reshape(n, cols)
    d = np.fromfile(emulator / "d.bin", np.float32).reshape(shape)
    s = np.fromfile(emulator / "s.bin", np.float32).reshape(*shape, 2)
    return q, d, s


def plain_layout(q, d, s, n):
    """The fragments' layout of quantize_q8s back to the plain one (words 0 4 1 5 2 6 3 7 of each block)."""
    words = q.reshape(n, -1, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(n, -1)
    return words, d[:, :n].T, s[:, :n].transpose(1, 0, 2)


@pytest.mark.parametrize("frag", [False, True], ids=["plain", "fragments"])
def test_batch_quantization_rounds_like_the_reference(emulator, frag):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block: scale 0, values 0
    x[2, 32:64] *= 1e4
    q, d, s = emulated_quantize(emulator, x, frag)
    if frag:
        q, d, s = plain_layout(q, d, s, 3)
    np.testing.assert_array_equal(q.astype(np.float64) * np.repeat(d, 32, axis=1), ref.quantize_activations(x))
    halves = q.reshape(3, -1, 2, 16).sum(-1).astype(np.float32) * d[..., None]
    np.testing.assert_array_equal(s, halves)


CASES = [(3, 70, 512, 1, ()), (13, 37, 1024, 2, (10, 30)), (70, 20, 256, 1, (7,)), (9, 64, 768, 3, (16, 40)),
         (30, 150, 1792, 3, (50,))]
# (tokens, rows, columns, ranges of K, where the rows of a second and third matrix of the launch begin):
# 1, 2, 8 (2 chunks) and 4 tiles of tokens (32 rows a warp, 150: a block's last warp partly past the end);
# ranges of 5 groups (one loop of 4 and a tail of 1) and 18-19; one, two and three matrices a launch


@pytest.mark.parametrize("t", sorted(MMQ_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
@pytest.mark.parametrize("n, rows, cols, splits, starts", CASES, ids=lambda v: str(v))
def test_mmq_equals_int8_reference(emulator, t, n, rows, cols, splits, starts):
    assert t in SCALES
    if cols % 256 and t.name.endswith("_K") or cols % 256 and t.name == "IQ4_XS":
        cols = 256 * (cols // 256 + 1)
    rng = np.random.default_rng(n * 1000 + rows)
    raw = random_rows(rng, t, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    nt = mmq_tiles(n)
    q, d, s = emulated_quantize(emulator, x, mmq_fragment_layout(nt))
    gpu = to_gpu_layout(np, t, raw.view(np.uint8).reshape(rows, -1))  # the rows as the GPU keeps them
    gpu.tofile(emulator / "w.bin")
    q.tofile(emulator / "q.bin"), d.tofile(emulator / "d.bin"), s.tofile(emulator / "s.bin")
    subprocess.run([str(emulator / "emu"), str(emulator), "mmq", str(KERNEL_TYPE_CODES[t]), str(nt), str(rows), str(cols // 32),
                    str(gpu.shape[1]), str(n), str(splits), *(str(e) for e in (list(starts) + [rows, rows])[:2]),
                    str(-(-n // 8) * 8)], check=True)
    flat = np.fromfile(emulator / "out.bin", np.float32)
    bounds = [0, *starts, rows] + [rows] * (2 - len(starts))
    parts, at = [], 0
    for a, b in zip(bounds, bounds[1:]):  # each matrix's output (n, its rows), one after another
        parts.append(flat[at:at + n * (b - a)].reshape(n, b - a))
        at += n * (b - a)
    assert at == flat.size
    got = np.concatenate(parts, axis=1)
    W = gguf_quants.dequantize(raw, t.value).astype(np.float64)
    xq = ref.quantize_activations(x)
    exact = xq @ W.T
    bound = 2e-6 * (np.abs(xq) @ np.abs(W).T) + 1e-30  # float32 rounding of the scaled group sums
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) / bound))
