"""attention.cu's kernels compiled for the CPU with g++ and run whole on the threaded emulation of CUDA
(tests/data/cuda_threads.h: a thread per CUDA thread, warp shuffles through a barrier), every typed load
checked for the alignment the GPU needs, against the float64 reference over the decoded cache: the
decode step (attn_partial: key ranges, batches of keys, the range's end, position n-1 encoded from the
staged floats for q8_0 / q4_0 caches and stored by one block, blocks in reverse order so that other
heads read that row before it is stored, the warps' and the ranges' merges), a server's decode step
over several slots (attn_seqs) and a prompt (attn_prompt). It runs where no GPU is, so CI checks the
kernels' index arithmetic and a rewrite can be proven before a GPU run; test_cuda.py checks the real
thing. Skipped without g++ 11+ (C++20 barriers)."""
import subprocess

import numpy as np
import pytest

from cuda_emulation import GXX, build
from kvdata import decode_step_cache, rel_err, stored
from pyggml.cuda.module import (ATT_SPLITS, ATT_THREADS, PROMPT_KEYS, PROMPT_QUERIES, PROMPT_THREADS, attn_per_lane,
                                cuda_source, generated_constants)
from pyggml.kernels import reference
from pyggml.model.kvtypes import KV_TYPES

pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ to compile the device code for the CPU")

# What cuda_threads.h leaves out and the attention kernels use: -inf, halves, funnel shifts, rounding modes.
SHIM = r"""
#define NEG_INF (-INFINITY)
inline u16 __half_as_ushort(__half h) { return bit_as<u16>(h); }
inline float2 h2f(u32 bits) { return {__half2float(__ushort_as_half((u16)bits)), __half2float(__ushort_as_half((u16)(bits >> 16)))}; }
inline u32 __funnelshift_r(u32 lo, u32 hi, u32 sh) { sh &= 31; return sh ? (lo >> sh) | (hi << (32 - sh)) : lo; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return shfl(v, src); }
float* emu_dynamic_smem;  // a launch's dynamic shared memory (extern __shared__)
"""

DRIVER = r"""
template <int PER, int TK, int TV> void run_partial(const std::string& D, char** a) {
  const int n_heads = atoi(a[0]), n_ctx = atoi(a[1]), hd = atoi(a[2]), group = atoi(a[3]), n = atoi(a[4]), n_split = atoi(a[5]);
  auto q = read_file(D + "/q.bin"), k = read_file(D + "/k.bin"), v = read_file(D + "/v.bin"), staged = read_file(D + "/staged.bin");
  const i64 io[2] = {0, n - 1};
  std::vector<float> part((size_t)n_heads * %(SPLITS)d * (hd + 2)), out((size_t)n_heads * hd);
  std::vector<int> cnt(n_heads);
  blocks_in_reverse = true;  // the heads that read position n-1 before the KV group's first head stores it
  launch({(unsigned)n_heads, %(SPLITS)d, 1}, {%(THREADS)d, 1, 1}, [&] {
    attn_partial<PER, TK, TV>((const float*)q.data(), k.data(), v.data(), (const float*)staged.data(), io, n_ctx, hd, group,
                              1.f / sqrtf((float)hd), part.data(), cnt.data(), out.data(), nullptr, nullptr, n_split);
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
  write_file(D + "/k.bin", k.data(), k.size());
  write_file(D + "/v.bin", v.data(), v.size());
}
template <int PER, int TK, int TV> void run_seqs(const std::string& D, char** a) {
  const int n_tok = atoi(a[0]), n_heads = atoi(a[1]), n_kv = atoi(a[2]), n_ctx = atoi(a[3]), hd = atoi(a[4]);
  auto q = read_file(D + "/q.bin"), k = read_file(D + "/k.bin"), v = read_file(D + "/v.bin");
  auto seq = read_file(D + "/seq.bin"), pos = read_file(D + "/pos.bin");
  std::vector<float> out((size_t)n_tok * n_heads * hd);
  launch({(unsigned)n_heads, (unsigned)n_tok, 1}, {32 * SEQ_WARPS, 1, 1}, [&] {
    attn_seqs<PER, TK, TV>((const float*)q.data(), k.data(), v.data(), (const i64*)seq.data(), (const i64*)pos.data(), n_heads, n_kv,
                           n_ctx, hd, 1.f / sqrtf((float)hd), out.data());
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
}
template <int PER, int TK, int TV> void run_prompt(const std::string& D, char** a) {
  const int n_tok = atoi(a[0]), start = atoi(a[1]), n_heads = atoi(a[2]), n_kv = atoi(a[3]), n_ctx = atoi(a[4]), hd = atoi(a[5]);
  auto q = read_file(D + "/q.bin"), k = read_file(D + "/k.bin"), v = read_file(D + "/v.bin");
  std::vector<float> out((size_t)n_tok * n_heads * hd, NAN), smem(%(PQ)d * hd + %(PK)d * (2 * hd + 1));
  emu_dynamic_smem = smem.data();
  launch({(unsigned)((n_tok + %(PQ)d - 1) / %(PQ)d), (unsigned)n_heads, 1}, {%(PT)d, 1, 1}, [&] {
    attn_prompt<PER, TK, TV>((const float*)q.data(), k.data(), v.data(), n_tok, start, n_heads, n_kv, n_ctx, hd,
                             1.f / sqrtf((float)hd), out.data());
  });
  write_file(D + "/out.bin", out.data(), 4 * out.size());
}
int main(int argc, char** argv) {  // emu DIR KERNEL PER TK TV ARGS...
  const std::string D = argv[1], kernel = argv[2];
  const int key = atoi(argv[3]) * 10000 + atoi(argv[4]) * 100 + atoi(argv[5]);
%(CASES)s
  fprintf(stderr, "no instance\n");
  return 2;
}
"""

# (key type, value type, head_dim, keys, key ranges a head may use): a single key; ranges of a few
# hundred keys; ranges over 256 keys; one range of 512 (whole batches of 256 keys, position n-1 in the
# last) and one of 600; head sizes that are not powers of two (80, 96); ranges of several whole batches
# (4100 keys in 4, 2100 in 8); GQA groups of 2 throughout.
CASES = [("f16", "f16", 128, 1, 4), ("f16", "f16", 128, 600, 4), ("f16", "f16", 128, 1100, 4), ("f16", "f16", 128, 512, 1),
         ("q8_0", "q8_0", 128, 600, 1), ("q8_0", "q8_0", 128, 1100, 4), ("q4_0", "q4_0", 128, 512, 1), ("q8_0", "q4_0", 64, 300, 4),
         ("f32", "q8_0", 96, 700, 4), ("q4_0", "f16", 256, 300, 1), ("f16", "f32", 80, 130, 4), ("f32", "f32", 8, 130, 1),
         ("f16", "f16", 64, 1030, 4), ("f16", "f16", 32, 257, 4), ("f16", "f16", 128, 4100, 4), ("q8_0", "q8_0", 128, 2100, 8)]
# (key type, value type, head_dim, each token's position): tokens of 3 sequences, one of them twice (two
# consecutive positions); positions from the first to past two batches of keys
SEQ_CASES = [("f16", "f16", 128, (0, 5, 6, 300, 700)), ("q8_0", "q8_0", 128, (1, 64, 65, 257, 520)),
             ("q4_0", "f16", 64, (0, 3, 4, 129, 600)), ("f32", "q8_0", 96, (2, 31, 32, 100, 401)),
             ("f16", "f32", 80, (0, 17, 18, 90, 333)), ("f32", "f32", 8, (0, 1, 2, 40, 130))]
# (key type, value type, head_dim, position of the first query, queries): one block of 32 queries or
# several, the last partly past the end; keys from several tiles of 32 before the first query
PROMPT_CASES = [("f16", "f16", 128, 0, 40), ("q8_0", "q8_0", 64, 100, 33), ("q4_0", "f32", 128, 31, 70),
                ("f32", "f32", 8, 5, 9), ("f16", "q4_0", 96, 0, 1), ("q8_0", "f16", 96, 64, 64)]


def instances(cases) -> list[tuple[int, int, int]]:
    """The (PER, key type code, value type code) instances the cases (key type, value type, head_dim, ...) need."""
    return sorted({(attn_per_lane(c[2]), KV_TYPES[c[0]].code, KV_TYPES[c[1]].code) for c in cases})


def _device_source() -> str:
    """The parts of the CUDA source the attention kernels use: the small helpers, the int8 output blocks, the
    KV rows, then attention.cu (its dynamic shared memory the emulation's buffer)."""
    src = cuda_source()

    def cut(a, b):
        return src[src.index(a):src.index(b)]

    return "".join([
        cut("__device__ __forceinline__ float f16(u16 bits)", "// Bit k (k < 4) of t moves"),
        cut("// x (n) -> int8 blocks of 32", "// One launch = one product and its epilogue."),
        cut("// ------------------------------------------------------------------------------ KV cache rows",
            "// Products of a batch of tokens on the int8 tensor cores").replace(
                "extern __shared__ float smem[];", "float* smem = emu_dynamic_smem;"),
    ])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    consts = generated_constants().replace("__device__ __constant__ __align__(16)", "alignas(16)")
    cases = "\n".join(f'  if (kernel == "{kernel}" && key == {per * 10000 + tk * 100 + tv}) '
                      f'{{ run_{kernel}<{per}, {tk}, {tv}>(D, argv + 6); return 0; }}'
                      for kernel, cs in (("partial", CASES), ("seqs", SEQ_CASES), ("prompt", PROMPT_CASES))
                      for per, tk, tv in instances(cs))
    driver = DRIVER % {"SPLITS": ATT_SPLITS, "THREADS": ATT_THREADS, "CASES": cases, "PQ": PROMPT_QUERIES, "PK": PROMPT_KEYS,
                       "PT": PROMPT_THREADS}
    d = tmp_path_factory.mktemp("attn")
    build(d, SHIM + consts + _device_source() + driver, check_alignment=True)
    return d


def emulate(emulator, kernel: str, tk: str, tv: str, hd: int, arrays: dict, *args: int) -> np.ndarray:
    """Run `kernel` (partial, seqs, prompt) of the types tk, tv for heads of hd on the emulation with these
    input arrays (written as DIR/NAME.bin) and launch arguments: its output, flat."""
    for name, a in arrays.items():
        np.ascontiguousarray(a).tofile(emulator / f"{name}.bin")
    subprocess.run([str(emulator / "emu"), str(emulator), kernel, str(attn_per_lane(hd)), str(KV_TYPES[tk].code),
                    str(KV_TYPES[tv].code), *(str(a) for a in args)], check=True, timeout=600)
    return np.fromfile(emulator / "out.bin", np.float32)


@pytest.mark.parametrize("tk, tv, hd, n, n_split", CASES, ids=lambda v: str(v))
def test_decode_attention_kernel_equals_reference(emulator, tk, tv, hd, n, n_split):
    """The token at position n-1 attends to the n rows of its head's cache: rows before it as stored;
    its own row in the cache too for f32/f16 (the QKV product stores those), else only in `staged` as
    floats, which the kernel encodes (bit-exact against KVType.encode, stored by one block) and
    attends to decoded."""
    ktk, ktv = KV_TYPES[tk], KV_TYPES[tv]
    rng = np.random.default_rng(n * 7 + hd)
    n_heads, n_kv, n_ctx = 4, 2, n + 3
    k, kf, v, vf, new = decode_step_cache(rng, tk, tv, n_kv, n_ctx, hd, n)
    q = rng.standard_normal((1, n_heads, hd), dtype=np.float32)
    got = emulate(emulator, "partial", tk, tv, hd, {"q": q, "k": k, "v": v, "staged": new}, n_heads, n_ctx, hd, n_heads // n_kv, n,
                  n_split).reshape(q.shape)
    want = reference.attention(q, kf, vf, n - 1)
    assert rel_err(got, want) < 1e-4
    for name, rows, t, x in (("k", k, ktk, new[0]), ("v", v, ktv, new[1])):
        back = np.fromfile(emulator / f"{name}.bin", np.uint8).reshape(rows.view(np.uint8).shape)
        np.testing.assert_array_equal(back[:, n - 1], t.encode(x).view(np.uint8).reshape(back[:, n - 1].shape))
        np.testing.assert_array_equal(back[:, :n - 1], rows.view(np.uint8)[:, :n - 1])  # nothing else written


@pytest.mark.parametrize("tk, tv, hd, positions", SEQ_CASES, ids=lambda v: str(v))
def test_attention_of_several_sequences_equals_reference(emulator, tk, tv, hd, positions):
    """attn_seqs, a server's decode step: token i attends to positions 0..positions[i] of its slot (test_cuda.py's
    bound for it on the GPU: rel_err < 1e-4)."""
    rng = np.random.default_rng(hd + positions[-1])
    n_seq, n_heads, n_kv, n_ctx = 3, 4, 2, max(positions) + 4
    seqs = np.array([2, 0, 0, 1, 2][:len(positions)], np.int64)  # slot 0's two tokens at consecutive positions
    k, kf = stored(rng, tk, (n_seq, n_kv, n_ctx, hd))
    v, vf = stored(rng, tv, (n_seq, n_kv, n_ctx, hd))
    q = rng.standard_normal((len(positions), n_heads, hd), dtype=np.float32)
    got = emulate(emulator, "seqs", tk, tv, hd, {"q": q, "k": k, "v": v, "seq": seqs, "pos": np.array(positions, np.int64)},
                  len(positions), n_heads, n_kv, n_ctx, hd).reshape(q.shape)
    want = np.concatenate([reference.attention(q[i:i + 1], kf[s], vf[s], p) for i, (s, p) in enumerate(zip(seqs, positions))])
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("tk, tv, hd, start, n_tok", PROMPT_CASES, ids=lambda v: str(v))
def test_prompt_attention_equals_reference(emulator, tk, tv, hd, start, n_tok):
    """attn_prompt: n_tok queries at positions start.. of one sequence attend causally to its stored rows."""
    rng = np.random.default_rng(hd * 1000 + start + n_tok)
    n_heads, n_kv, n_ctx = 4, 2, start + n_tok + 3
    k, kf = stored(rng, tk, (n_kv, n_ctx, hd))
    v, vf = stored(rng, tv, (n_kv, n_ctx, hd))
    q = rng.standard_normal((n_tok, n_heads, hd), dtype=np.float32)
    got = emulate(emulator, "prompt", tk, tv, hd, {"q": q, "k": k, "v": v}, n_tok, start, n_heads, n_kv, n_ctx, hd).reshape(q.shape)
    want = reference.attention(q, kf, vf, start)
    assert rel_err(got, want) < 1e-4
