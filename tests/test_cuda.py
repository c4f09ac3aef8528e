"""The GPU backend against the references: each weight type's products against the numpy kernels,
whole-model logits against the CPU backend (full and partial offload, prompt batches and captured
decode steps), and the stories260K greedy reference. Skipped without cupy and a CUDA GPU; run on
the GPU machine (see README, "GPU").

Stated tolerances, as max |gpu - reference| / max |reference|:
- decode products (int8 or float activations, as the CPU kernels), and the int8 types' batches of up to
  MMQ_MAX_TOKENS tokens on the int8 tensor cores (mmq): 1e-4 (float summation order);
- other batch products (fp16 tensor-core GEMM, fp32 accumulate): 5e-3 (fp16 rounding of W and x);
- whole-model logits vs the CPU backend, float weights: 2e-3.
- quantized weights, decode steps alone: 2e-2. Both backends round activations to int8 blocks the
  same way, but a 1e-7 float difference (summation order) now and then moves a value across a
  rounding boundary; one such flip shifts logits by ~1e-3..1e-2 and carries to later positions.
- quantized weights, prompt logits and the decode steps that follow them: 5e-2 (the CPU prompt path
  rounds activations to int8, the GPU one multiplies in fp16, so the KV caches differ by that).
- in every case the same top token wherever the reference's top two logits are further apart than
  twice the largest measured difference (closer ones may go either way), and at half the positions.
"""
import numpy as np
import pytest

from conftest import random_q6_k
from kvdata import decode_step_cache, kv_rows, rel_err, stored
from test_model import ARCH_SHAPES
from pyggml import Llama
from pyggml.gguf import GGMLType
from pyggml.kernels import reference
from pyggml.quant import codecs
from pyggml.synthetic import Shape, write_random_model
from pyggml.tensor import QWeight

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no device")
except Exception as e:  # noqa: BLE001 - any failure to reach a GPU means: skip
    pytest.skip(f"no CUDA GPU: {e}", allow_module_level=True)

from pyggml.cuda.backend import INT8_INPUT_TYPES, CUDABackend  # noqa: E402
from pyggml.cuda.module import MMQ_MAX_TOKENS, MMQ_TYPES  # noqa: E402
from pyggml.quant.registry import COMPUTABLE_TYPES  # noqa: E402

FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
INT8 = tuple(t for t in COMPUTABLE_TYPES if t in INT8_INPUT_TYPES)  # products of int8 activations
K_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_XS)
SHAPES = {  # head_dim 64 (fused attention quantization) and head_dim 8 with GQA 4:1
    "hd64": Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=300, ctx=64),
    "hd8": Shape(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64, rope_base=500000.0),
}


@pytest.fixture(scope="module")
def gpu():
    return CUDABackend()


def same_top(got, want) -> bool:
    """Every position whose top token differs is a near-tie: the reference's top two logits there are
    closer than twice the largest difference measured between the two computations. And the top
    token is the same at at least half the positions."""
    got, want = np.atleast_2d(got), np.atleast_2d(want)
    top2 = np.sort(want, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * np.abs(np.asarray(got, np.float64) - want).max()
    agree = got.argmax(1) == want.argmax(1)
    return bool(np.all(agree | near_tie)) and agree.mean() >= 0.5


def random_weight(t: GGMLType, rows: int, cols: int, rng) -> np.ndarray:
    if t is GGMLType.Q6_K:  # random blocks with sane fp16 scales: every code and scale bit pattern
        return random_q6_k(rng, rows, cols, 1e-3, 1.1e-2)
    return codecs.quantize(rng.standard_normal((rows, cols), dtype=np.float32), t, approximate=True)


def _cols(t: GGMLType) -> tuple:
    if t in FLOATS:
        return (256, 100)
    return (512,) if t in K_TYPES else (256, 96)


CASES = [(t, c) for t in COMPUTABLE_TYPES for c in _cols(t)]


def test_every_computable_type_has_a_gpu_case():
    assert {t for t, _ in CASES} == set(COMPUTABLE_TYPES)


@pytest.mark.parametrize("t, cols", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_decode_product_matches_reference(gpu, t, cols):
    rng = np.random.default_rng(cols)
    rows = 37  # odd: the last warp's pair has one row
    raw = random_weight(t, rows, cols, rng)
    w = gpu.load_weight(QWeight("w", raw, t, (rows, cols)))
    x = rng.standard_normal((1, cols), dtype=np.float32)
    got = gpu.matmul(w, gpu.to_device(x)).get()
    want = (reference.matmul_int8_activations if t in INT8 else reference.matmul)(raw, t, x)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("n_tok", [2, 9, 64, MMQ_MAX_TOKENS + 13])
@pytest.mark.parametrize("t", COMPUTABLE_TYPES, ids=lambda t: t.name)
def test_batch_product_matches_reference(gpu, t, n_tok):
    """Batches of the int8 types on the tensor cores (mmq: int8 activations, exact but for float
    summation order) against the int8-activation reference; the rest (cuBLAS on fp16) against the float one."""
    rng = np.random.default_rng(3)
    rows, cols = 70, 512
    raw = random_weight(t, rows, cols, rng)
    w = gpu.load_weight(QWeight("w", raw, t, (rows, cols)))
    x = rng.standard_normal((n_tok, cols), dtype=np.float32)
    got = gpu.matmul(w, gpu.to_device(x)).get()
    if gpu.mma and t in MMQ_TYPES and n_tok <= MMQ_MAX_TOKENS:
        assert rel_err(got, reference.matmul_int8_activations(raw, t, x)) < 1e-4
    else:
        assert rel_err(got, reference.matmul(raw, t, x)) < 5e-3


def test_batch_products_of_several_weights(gpu):
    """matmuls: several weights of one batch (Q/K/V, gate/up), three of one type in one launch (rows of a
    tile shared by two matrices), the others each by itself, each against its reference."""
    rng = np.random.default_rng(8)
    specs = ((GGMLType.Q4_0, 40), (GGMLType.Q4_0, 50), (GGMLType.Q4_0, 30), (GGMLType.Q6_K, 32), (GGMLType.F16, 48))
    raws = [random_weight(t, r, 256, rng) for t, r in specs]
    ws = [gpu.load_weight(QWeight("w", raw, t, (r, 256))) for raw, (t, r) in zip(raws, specs)]
    x = rng.standard_normal((5, 256), dtype=np.float32)
    for got, raw, (t, _) in zip(gpu.matmuls(ws, gpu.to_device(x)), raws, specs):
        if gpu.mma and t in MMQ_TYPES:
            assert rel_err(got.get(), reference.matmul_int8_activations(raw, t, x)) < 1e-4
        else:
            assert rel_err(got.get(), reference.matmul(raw, t, x)) < 5e-3


def test_embedding_rows_match_codecs(gpu):
    rng = np.random.default_rng(5)
    for t in COMPUTABLE_TYPES:
        raw = random_weight(t, 20, 256, rng)
        w = gpu.load_weight(QWeight("w", raw, t, (20, 256)))
        ids = np.array([3, 0, 19, 3])
        np.testing.assert_array_equal(gpu.embed(w, ids).get(), codecs.dequantize(raw, t)[ids].astype(np.float32))


MODEL_TYPES = [(s, t) for s in SHAPES for t in (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.F16, GGMLType.F32,
                                                GGMLType.BF16)]
MODEL_TYPES += [("hd64", t) for t in COMPUTABLE_TYPES if t not in {m for _, m in MODEL_TYPES}]
# the architectures of model/archs.py (biases, Q/K norms, NeoX RoPE, rope_freqs), in the captured decode step too
SHAPES.update(ARCH_SHAPES)
MODEL_TYPES += [(a, t) for a in ARCH_SHAPES for t in (GGMLType.F32, GGMLType.Q8_0)]


@pytest.fixture(scope="module", params=MODEL_TYPES, ids=lambda p: f"{p[0]}-{p[1].name}")
def random_model(request, tmp_path_factory):
    shape, t = request.param
    path = tmp_path_factory.mktemp("gpu") / f"{shape}-{t.name}.gguf"
    write_random_model(path, SHAPES[shape], t, seed=11)
    return path


def run(path, n_gpu_layers):
    """Prompt logits (all positions) and six decode steps' logits, with an f32 KV cache: the weights'
    paths are compared here (the cache types GPU against CPU: test_kv_types_gpu_matches_cpu)."""
    llm = Llama(path, n_ctx=40, n_gpu_layers=n_gpu_layers, type_k="f32", type_v="f32")
    prompt = np.array([1, 17, 299, 5, 42, 42, 100, 3, 250, 7, 8])
    batch = llm.model.forward(prompt, 0, llm.kv_cache, all_logits=True)
    steps = [llm.model.forward(np.array([t]), len(prompt) + i, llm.kv_cache) for i, t in enumerate([9, 4, 4, 200, 13, 1])]
    return batch, np.stack(steps)


@pytest.mark.parametrize("n_gpu_layers", [-1, 1], ids=["all", "one-layer"])
def test_model_on_gpu_matches_cpu(random_model, n_gpu_layers):
    cpu_batch, cpu_steps = run(random_model, 0)
    gpu_batch, gpu_steps = run(random_model, n_gpu_layers)
    print(f"{random_model.name} ngl={n_gpu_layers}: prompt {rel_err(gpu_batch, cpu_batch):.2e}, "
          f"decode {rel_err(gpu_steps, cpu_steps):.2e}")
    tol = 2e-3 if GGMLType[random_model.stem.split("-")[1]] in FLOATS else 5e-2
    assert rel_err(gpu_steps, cpu_steps) < tol
    assert rel_err(gpu_batch, cpu_batch) < tol
    assert same_top(gpu_batch, cpu_batch) and same_top(gpu_steps, cpu_steps)


def test_decode_graph_replays_at_every_position(random_model):
    """The captured step reads its position from the device: 30 steps match 30 fresh prefills' last logits."""
    llm = Llama(random_model, n_ctx=40, n_gpu_layers=-1)
    ref = Llama(random_model, n_ctx=40, n_gpu_layers=0)
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 300, 29)]
    got = [llm.model.forward(np.array([t]), i, llm.kv_cache) for i, t in enumerate(tokens)]
    want = [ref.model.forward(np.array([t]), i, ref.kv_cache) for i, t in enumerate(tokens)]
    print(f"{random_model.name}: 30 decode steps {rel_err(np.stack(got), np.stack(want)):.2e}")
    # quantized: a 1-ulp float difference (GPU vs CPU norms, sums) flips an int8 activation code now and
    # then, and random weights amplify it (qwen3's Q/K norms most: 2.05e-2 on the H100); the same bound as
    # the whole-model comparison above
    tol = 2e-3 if GGMLType[random_model.stem.split("-")[1]] in FLOATS else 5e-2
    assert rel_err(np.stack(got), np.stack(want)) < tol
    assert same_top(np.stack(got), np.stack(want))


def run_batched(path, n_gpu_layers):
    """Logits of a batch of three sequences' prompts (slots 2, 0, 1), three steps of three decode tokens,
    then one token of slot 2 alone (the captured step of that slot)."""
    llm = Llama(path, n_ctx=40, n_gpu_layers=n_gpu_layers, n_seq_max=3)
    m, cache = llm.model, llm.kv_cache
    prompts = [[1, 17, 299, 5, 42], [1, 8, 9], [1, 250, 7, 3, 3, 60, 61]]
    slots = [2, 0, 1]
    ends = list(np.cumsum([len(p) for p in prompts]) - 1)
    out = [m.forward_batch(np.concatenate(prompts), np.concatenate([np.arange(len(p)) for p in prompts]),
                           np.concatenate([[s] * len(p) for p, s in zip(prompts, slots)]), cache, ends)]
    for i, toks in enumerate([[9, 4, 4], [200, 13, 1], [5, 6, 7]]):
        out.append(m.forward_batch(np.array(toks), np.array([len(p) + i for p in prompts]), np.array(slots), cache))
    out.append(m.forward_batch(np.array([11]), np.array([len(prompts[0]) + 3]), np.array([2]), cache))
    return np.concatenate(out)


@pytest.mark.parametrize("n_gpu_layers", [-1, 1], ids=["all", "one-layer"])
def test_batched_sequences_on_gpu_match_cpu(random_model, n_gpu_layers):
    want, got = run_batched(random_model, 0), run_batched(random_model, n_gpu_layers)
    print(f"{random_model.name} ngl={n_gpu_layers}: batched sequences {rel_err(got, want):.2e}")
    tol = 2e-3 if GGMLType[random_model.stem.split("-")[1]] in FLOATS else 5e-2
    assert rel_err(got, want) < tol and same_top(got, want)


def batch_steps(path, captured: bool, warm: bool = False):
    """Decode steps of 5, 3, 5, 2 and 5 sequences (slots in changing order; batch size buckets 8, 4 and 2,
    padded), each slot first given its own prompt: the logits of every step, from the GPU. warm: after
    a server's warm-up (a batch of each captured size up to the 6 slots, at position 0)."""
    llm = Llama(path, n_ctx=40, n_gpu_layers=-1, n_seq_max=6)
    m, cache = llm.model, llm.kv_cache
    m.head_backend.capture_batches = captured  # this instance: replayed graphs, or the same padded batches eagerly
    if warm:
        assert m.warm_up_batches(cache, 1) == [2, 4]
    rng = np.random.default_rng(12)
    for s in range(6):
        m.forward_batch(rng.integers(3, 300, 4 + s), np.arange(4 + s), np.full(4 + s, s), cache, [3 + s])
    pos = np.array([4 + s for s in range(6)])
    out = []
    for slots in ([0, 1, 2, 3, 4], [5, 2, 0], [4, 3, 2, 1, 0], [1, 5], [2, 0, 4, 1, 3]):
        slots = np.array(slots)
        out.append(m.forward_batch(rng.integers(3, 300, len(slots)), pos[slots], slots, cache))
        pos[slots] += 1
    return np.concatenate(out)


def test_captured_batch_steps_equal_eager_ones(random_model):
    """decode_batch's graphs (the batch forward captured per bucket, ids from the device, padded with
    copies of the last token) give the bits of the same padded batches run eagerly (against the CPU:
    test_batched_sequences_on_gpu_match_cpu)."""
    np.testing.assert_array_equal(batch_steps(random_model, True), batch_steps(random_model, False))


def test_warm_up_batches_change_nothing(random_model):
    """A server's warm-up (pyggml serve: LlamaModel.warm_up_batches) captures its steps before the first
    requests; the prompts then overwrite what it wrote, and every step gives the bits it gives without it."""
    np.testing.assert_array_equal(batch_steps(random_model, True, warm=True), batch_steps(random_model, True))


def test_decode_attention_over_many_key_ranges(tmp_path):
    """Past 128 keys the decode attention cuts the keys into ranges, and the last block of each head
    to finish merges them (attn_partial): decode steps from position 150 to 420 (1 to 4 ranges)
    against the CPU backend."""
    path = tmp_path / "long.gguf"
    write_random_model(path, Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=300, ctx=512),
                       GGMLType.F32, seed=5)
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 420)]
    logits = {}
    for ngl in (0, -1):
        llm = Llama(path, n_ctx=512, n_gpu_layers=ngl)
        llm.model.forward(np.array(tokens[:150]), 0, llm.kv_cache)
        logits[ngl] = np.stack([llm.model.forward(np.array([t]), 150 + i, llm.kv_cache) for i, t in enumerate(tokens[150:])])
    print(f"decode at 150..419: {rel_err(logits[-1], logits[0]):.2e}")
    assert rel_err(logits[-1], logits[0]) < 2e-3
    assert same_top(logits[-1], logits[0])


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.F32], ids=lambda t: t.name)
def test_decode_folds_a_norm_whose_last_group_is_partial(tmp_path, t):
    """The products that add to the residual fold the next RMSNorm over 32-row groups; with dim 40
    the second group has 8 rows (float weights: int8 ones need multiples of 32). 12 decode steps
    against the CPU backend."""
    path = tmp_path / "dim40.gguf"
    write_random_model(path, Shape(dim=40, n_layers=2, n_heads=5, n_kv_heads=5, ffn_dim=72, vocab=300, ctx=64), t, seed=9)
    tokens = [int(v) for v in np.random.default_rng(4).integers(3, 300, 12)]
    logits = {}
    for ngl in (0, -1):
        llm = Llama(path, n_ctx=64, n_gpu_layers=ngl)
        logits[ngl] = np.stack([llm.model.forward(np.array([v]), i, llm.kv_cache) for i, v in enumerate(tokens)])
    print(f"dim 40 {t.name}: {rel_err(logits[-1], logits[0]):.2e}")
    assert rel_err(logits[-1], logits[0]) < 2e-3
    assert same_top(logits[-1], logits[0])


@pytest.mark.parametrize("n_gpu_layers", [-1, 1], ids=["all", "one-layer"])
def test_programmatic_launch_changes_nothing(gpu, random_model, n_gpu_layers):
    """Decode graphs with programmatic (early) launches give the same bits as ordinary launches:
    a kernel that read or wrote before its pdl_wait would race and move the logits."""
    if not gpu.pdl:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    steps = {}
    for pdl in (False, True):
        llm = Llama(random_model, n_ctx=40, n_gpu_layers=n_gpu_layers)
        next(L.backend for L in llm.model.layers if L.backend.name == "cuda").pdl = pdl
        tokens = [int(t) for t in np.random.default_rng(1).integers(3, 300, 25)]
        steps[pdl] = np.stack([llm.model.forward(np.array([t]), i, llm.kv_cache) for i, t in enumerate(tokens)])
    np.testing.assert_array_equal(steps[True], steps[False])


def test_stories_greedy_unchanged_on_gpu(stories_dir, tmp_path):
    from pyggml.convert import convert_hf_to_gguf
    from pyggml.sampling import SamplingParams

    path = convert_hf_to_gguf(stories_dir, tmp_path / "s-f32.gguf", outtype="f32")
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    out = {}
    for ngl in (0, -1, 2):
        llm = Llama(path, n_ctx=512, n_gpu_layers=ngl)
        prompt = llm.tokenize("Once upon a time")
        out[ngl] = list(llm.generate_tokens(prompt, greedy, 252))
    ref = (stories_dir / "reference_greedy.txt").read_text(encoding="utf-8")
    assert llm.tokenizer.decode(prompt + out[-1]) + "\n" == ref  # run.c prints a newline after the generation
    assert out[-1] == out[0] == out[2]


# ------------------------------------------------------------------------------ KV cache types
# Writes are bit-exact against KVType.encode (ggml's rounding); every attention kernel reads the stored
# rows and matches reference.attention over KVType.decode of them within 1e-4 of the largest output
# (float summation order and expf; the decoded values are the same floats).
from pyggml.model.kvtypes import KV_TYPES  # noqa: E402

KV_NAMES = tuple(KV_TYPES)
KV_PAIRS = [(t, t) for t in KV_NAMES] + [("f16", "q8_0"), ("q4_0", "f32"), ("q8_0", "q4_0")]


@pytest.mark.parametrize("head_dim", [128, 64, 32, 8])
@pytest.mark.parametrize("t", KV_NAMES)
def test_kv_write_matches_encode(gpu, t, head_dim):
    kt = KV_TYPES[t]
    if kt.quantized and head_dim % 32:
        pytest.skip("blocks of 32")
    rng = np.random.default_rng(head_dim)
    n_seq, n_kv, n_ctx, n_tok = 3, 2, 20, 9
    x = kv_rows(rng, (n_tok, n_kv, head_dim))
    seqs = np.array([0, 2, 2, 1, 0, 2, 1, 1, 0])
    positions = np.array([0, 19, 3, 7, 1, 4, 8, 0, 18])
    slots = gpu.kv_storage([((n_seq, n_kv, n_ctx, kt.row_width(head_dim)), kt.dtype)], None)[0]
    gpu.kv_write(slots, kt, gpu.to_device(x), gpu.indices(seqs), gpu.indices(positions))
    want = np.zeros(slots.shape, kt.dtype)
    want[seqs, :, positions] = kt.encode(x)
    np.testing.assert_array_equal(slots.get().view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("tk, tv", KV_PAIRS)
@pytest.mark.parametrize("shape", [(4, 2, 64, 37, 50), (2, 2, 128, 70, 0), (8, 2, 8, 5, 33), (3, 3, 32, 1, 100)],
                         ids=["hd64-gqa", "hd128-prompt", "hd8", "hd32-one"])
def test_prompt_attention_reads_stored_rows(gpu, tk, tv, shape):
    """attn_prompt (tiles of 32 queries and 32 keys) at start positions inside and past the first tile."""
    n_heads, n_kv, hd, n_tok, start = shape
    if hd % 32 and (KV_TYPES[tk].quantized or KV_TYPES[tv].quantized):
        pytest.skip("blocks of 32")
    rng = np.random.default_rng(hd + n_tok)
    n_ctx = start + n_tok + 3
    k, kf = stored(rng, tk, (n_kv, n_ctx, hd))
    v, vf = stored(rng, tv, (n_kv, n_ctx, hd))
    q = rng.standard_normal((n_tok, n_heads, hd), dtype=np.float32)
    got = gpu.attention(gpu.to_device(q), cp.asarray(k), cp.asarray(v), start, KV_TYPES[tk], KV_TYPES[tv]).get()
    want = reference.attention(q, kf, vf, start)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("tk, tv", KV_PAIRS)
@pytest.mark.parametrize("hd", [64, 128, 8])
def test_attention_seqs_reads_stored_rows(gpu, tk, tv, hd):
    if hd % 32 and (KV_TYPES[tk].quantized or KV_TYPES[tv].quantized):
        pytest.skip("blocks of 32")
    rng = np.random.default_rng(hd)
    n_seq, n_heads, n_kv, n_ctx = 3, 4, 2, 90
    k, kf = stored(rng, tk, (n_seq, n_kv, n_ctx, hd))
    v, vf = stored(rng, tv, (n_seq, n_kv, n_ctx, hd))
    seqs, positions = np.array([2, 0, 1, 0, 2]), np.array([89, 0, 40, 3, 7])
    q = rng.standard_normal((len(seqs), n_heads, hd), dtype=np.float32)
    got = gpu.attention_seqs(gpu.to_device(q), cp.asarray(k), cp.asarray(v), gpu.indices(seqs), gpu.indices(positions),
                             KV_TYPES[tk], KV_TYPES[tv]).get()
    want = np.concatenate([reference.attention(q[i:i + 1], kf[s], vf[s], p) for i, (s, p) in enumerate(zip(seqs, positions))])
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("tk, tv", KV_PAIRS)
@pytest.mark.parametrize("hd, n, one_range", [(128, 1, False), (128, 200, False), (128, 600, False), (128, 600, True),
                                              (64, 300, False), (64, 700, True), (32, 257, False), (8, 130, False)])
def test_decode_attention_kernel_reads_stored_rows(gpu, tk, tv, hd, n, one_range):
    """attn_partial as the decode step runs it, for the token at position n-1: the rows before it are
    in the cache; its own row is in the cache too for f32/f16 (the QKV product stores those), else
    in `staged` as floats, which the kernel encodes (the first head of each KV group's block stores
    the row, bit-exact against KVType.encode) and attends to decoded. 1 to 5 key ranges; one_range:
    a single range of all the keys, so that position n-1 falls in a warp's later batch."""
    from pyggml.cuda.module import ATT_SPLITS, ATT_THREADS, NO_INT8, attn_per_lane, attn_splits

    if hd % 32 and (KV_TYPES[tk].quantized or KV_TYPES[tv].quantized):
        pytest.skip("blocks of 32")
    ktk, ktv = KV_TYPES[tk], KV_TYPES[tv]
    rng = np.random.default_rng(n)
    n_heads, n_kv, n_ctx = 8, 2, n + 5
    k, kf, v, vf, new = decode_step_cache(rng, tk, tv, n_kv, n_ctx, hd, n)
    q = rng.standard_normal((1, n_heads, hd), dtype=np.float32)
    kd, vd = cp.asarray(k), cp.asarray(v)
    out = cp.zeros(n_heads * hd, np.float32)
    name, fn = gpu._attn_fn("attn_partial", attn_per_lane(hd), ktk, ktv)
    part = cp.zeros(n_heads * ATT_SPLITS * (hd + 2), np.float32)
    fn((n_heads, ATT_SPLITS), (ATT_THREADS,),
       (gpu.to_device(q.reshape(-1)), kd, vd, gpu.to_device(new.reshape(-1)), gpu.indices(np.array([0, n - 1])),
        np.int32(n_ctx), np.int32(hd), np.int32(n_heads // n_kv), np.float32(1 / np.sqrt(hd)), part,
        cp.zeros(n_heads, np.int32), out, *NO_INT8, np.int32(1 if one_range else attn_splits(n_heads, gpu.sms))))
    assert rel_err(out.get().reshape(1, n_heads, hd), reference.attention(q, kf, vf, n - 1)) < 1e-4
    for got, t, x in ((kd, ktk, new[0]), (vd, ktv, new[1])):
        np.testing.assert_array_equal(got[:, n - 1].get().view(np.uint8), t.encode(x).view(np.uint8))


QK_SHAPES = {  # head_dim 32, so that every KV type stores them
    "qwen2": Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab=300, ctx=64, rope_base=1e6, arch="qwen2"),
    "qwen3": ARCH_SHAPES["qwen3"],
}


@pytest.mark.parametrize("t", KV_NAMES)
@pytest.mark.parametrize("arch", QK_SHAPES)
def test_arch_extras_in_the_decode_graph(tmp_path, arch, t):
    """Qwen2's Q/K/V biases (added in the QKV product's epilogue) and Qwen3's per-head Q/K RMSNorms
    (qk_norm_rope, between the QKV product and attention) run inside the captured decode step, with
    each KV type: a 10-token prompt, then 20 captured steps, against the CPU backend."""
    path = tmp_path / f"{arch}.gguf"
    write_random_model(path, QK_SHAPES[arch], GGMLType.F32, seed=17)
    tokens = [1] + [int(v) for v in np.random.default_rng(3).integers(3, 300, 29)]

    def logits(ngl):
        llm = Llama(str(path), n_ctx=64, n_gpu_layers=ngl, type_k=t, type_v=t)
        m = llm.model
        first = m.forward(np.array(tokens[:10]), 0, llm.kv_cache, all_logits=True)
        steps = [m.forward(np.array([v]), 10 + i, llm.kv_cache) for i, v in enumerate(tokens[10:])]
        return np.concatenate([first, np.stack(steps)]), m

    want, _ = logits(0)
    got, m = logits(-1)
    assert any(key[0] == id(m) for key in m.head_backend._graphs), "the decode steps did not run as a graph"
    err = rel_err(got, want)
    print(f"{arch} KV {t}: captured steps vs CPU {err:.2e}")
    assert err < (1e-2 if KV_TYPES[t].quantized else 2e-3)
    assert same_top(got, want)


KV_MODEL = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=300, ctx=160)


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "kv-f32.gguf"
    write_random_model(path, KV_MODEL, GGMLType.F32, seed=13)
    return path


def kv_logits(path, t, split: int | None, n_gpu_layers=-1):
    """Logits of 150 tokens with K and V cached as t: all at once (split None), or the first `split`
    as a prompt and the rest as captured decode steps."""
    tokens = [1] + [int(v) for v in np.random.default_rng(7).integers(3, 300, 149)]
    llm = Llama(path, n_ctx=160, n_gpu_layers=n_gpu_layers, type_k=t, type_v=t)
    m = llm.model
    if split is None:
        return m.forward(np.array(tokens), 0, llm.kv_cache, all_logits=True)
    first = m.forward(np.array(tokens[:split]), 0, llm.kv_cache, all_logits=True)
    steps = [m.forward(np.array([v]), split + i, llm.kv_cache) for i, v in enumerate(tokens[split:])]
    return np.concatenate([first, np.stack(steps).reshape(len(steps), -1)])


@pytest.mark.parametrize("t", KV_NAMES)
def test_prefill_then_decode_equals_all_at_once(kv_model, t):
    """The captured decode steps (the QKV product's epilogue and attn_partial write and read the
    stored rows) give the logits of one prompt pass over the same tokens. f32 weights: the two paths
    differ in float summation order only, so f32/f16 caches agree to 1e-4; a q8_0 / q4_0 row may
    round one code differently from a last-bit difference of its float (one step of d), so those
    get 1e-2."""
    whole, split = kv_logits(kv_model, t, None), kv_logits(kv_model, t, 40)
    err = rel_err(split, whole)
    print(f"KV {t}: prefill 40 + 110 decode steps vs all at once {err:.2e}")
    assert err < (1e-2 if KV_TYPES[t].quantized else 1e-4)
    assert same_top(split, whole)


@pytest.mark.parametrize("t", ["f16", "q8_0", "q4_0"])
def test_kv_types_against_f32_cache(kv_model, t):
    """Whole-model logits with K and V stored as t against an f32 cache, prompt and decode steps:
    the rounding of every K and V value, carried through two layers of a random model. Measured on
    an H200: f16 5.5e-4 of the largest logit (fp16 keeps 11 bits), q8_0 1.4e-2 (8 bits a block),
    q4_0 2.1e-1 (4 bits); bounds at about twice that. Exact agreement with the CPU's encoder and
    attention is the next test's."""
    want = kv_logits(kv_model, "f32", 40)
    got = kv_logits(kv_model, t, 40)
    err = rel_err(got, want)
    print(f"KV {t} vs f32: {err:.2e}")
    assert err < {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 4e-1}[t]
    if t == "f16":
        assert same_top(got, want)


@pytest.mark.parametrize("t", KV_NAMES)
def test_kv_types_gpu_matches_cpu(kv_model, t):
    """The same cache type on the CPU backend (its own encoder and attention): the rows are encoded
    bit-exactly on both, so only float summation order (and rare code flips) separate them."""
    want = kv_logits(kv_model, t, 40, n_gpu_layers=0)
    got = kv_logits(kv_model, t, 40)
    err = rel_err(got, want)
    print(f"KV {t} GPU vs CPU: {err:.2e}")
    assert err < (1e-2 if KV_TYPES[t].quantized else 2e-3)
    assert same_top(got, want)
