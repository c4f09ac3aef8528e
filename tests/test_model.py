"""Whole-model behaviour: logits against a plain numpy LLaMA, prefill vs single steps, the real
stories260K greedy reference, sessions, embeddings and the OpenAI-shaped API."""
import numpy as np
import pytest

import functools

from pyggml import Llama as _Llama

# compared with float64 numpy forwards: the KV cache in f32 (the default f16 adds its own rounding,
# covered by tests/test_kvtypes.py)
Llama = functools.partial(_Llama, type_k="f32", type_v="f32")
from pyggml.convert import convert_hf_to_gguf
from pyggml.gguf import GGMLType, GGUFFile
from pyggml.model.config import ModelError
from pyggml.quant import codecs
from pyggml.quantize import quantize_file
from pyggml.sampling import SamplingParams
from pyggml.session import SessionError
from pyggml.synthetic import Shape, write_random_model

GQA_SHAPE = Shape(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64, rope_base=500000.0)


# ------------------------------------------------------------------ plain numpy LLaMA (float64)
from pyggml.kernels.cpu import INT8_ACTIVATION_TYPES  # noqa: E402  (the types whose products round x to int8 blocks)


def int8_blocks(x):
    """x rounded to int8 blocks of 32 (d = amax/127, half away from zero): what the CPU kernels feed
    Q4_0/Q5_0/Q8_0 weights, as llama.cpp does."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        v = b * np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    return (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)) * d).astype(np.float64).reshape(x.shape)


def numpy_llama_logits(path, tokens, int8_activations=True):
    """The LLaMA-family forward pass written out plainly from the GGUF tensors: every position's logits.
    With int8_activations, inputs of the int8-activation types' matrices are rounded as the kernels
    round them. llama, qwen2 (Q/K/V biases, NeoX RoPE) and qwen3 (per-head Q/K RMSNorm, NeoX RoPE,
    key_length); rope_freqs and linear rope scaling. NeoX RoPE is computed here on the halves
    directly (pyggml permutes rows instead)."""
    f = GGUFFile(path)
    m = f.metadata
    a = m["general.architecture"]
    dim, n_layers = m[f"{a}.embedding_length"], m[f"{a}.block_count"]
    n_head, n_kv = m[f"{a}.attention.head_count"], m[f"{a}.attention.head_count_kv"]
    eps, base = m[f"{a}.attention.layer_norm_rms_epsilon"], m[f"{a}.rope.freq_base"]
    hd = m.get(f"{a}.attention.key_length", dim // n_head)
    neox = a in ("qwen2", "qwen3")
    scale = m[f"{a}.rope.scaling.factor"] if m.get(f"{a}.rope.scaling.type") == "linear" else 1.0

    def W(name):
        t = f.tensors[name]
        raw = f.tensor(name)
        return (raw.astype(np.float64) if t.ggml_type is GGMLType.F32 else codecs.dequantize(raw, t.ggml_type).astype(np.float64))

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def mm(x, name):  # x @ W.T
        quantized = int8_activations and f.tensors[name].ggml_type in INT8_ACTIVATION_TYPES
        return (int8_blocks(x) if quantized else x) @ W(name).T

    freqs = base ** (-np.arange(0, hd, 2) / hd) / scale
    if "rope_freqs.weight" in f.tensors:
        freqs = freqs / W("rope_freqs.weight")

    def rope(x):  # x (T, heads, hd): rotate pairs (2i, 2i+1), or NeoX (i, i + hd/2), by pos * freq_i
        T = x.shape[0]
        ang = np.arange(T)[:, None] * freqs
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        out = x.copy()
        a0, a1 = (slice(0, hd // 2), slice(hd // 2, hd)) if neox else (slice(0, hd, 2), slice(1, hd, 2))
        out[..., a0] = x[..., a0] * c - x[..., a1] * s
        out[..., a1] = x[..., a0] * s + x[..., a1] * c
        return out

    def proj(h, i, which, heads):
        y = mm(h, f"blk.{i}.attn_{which}.weight")
        if f"blk.{i}.attn_{which}.bias" in f.tensors:
            y = y + W(f"blk.{i}.attn_{which}.bias")
        y = y.reshape(len(h), heads, hd)
        if f"blk.{i}.attn_{which}_norm.weight" in f.tensors:
            y = norm(y, W(f"blk.{i}.attn_{which}_norm.weight"))
        return y

    T = len(tokens)
    x = W("token_embd.weight")[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        h = norm(x, W(f"blk.{i}.attn_norm.weight"))
        q = rope(proj(h, i, "q", n_head))
        k = rope(proj(h, i, "k", n_kv))
        v = proj(h, i, "v", n_kv)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + mm(np.einsum("htu,uhd->thd", p, v).reshape(T, n_head * hd), f"blk.{i}.attn_output.weight")
        h = norm(x, W(f"blk.{i}.ffn_norm.weight"))
        g, u = mm(h, f"blk.{i}.ffn_gate.weight"), mm(h, f"blk.{i}.ffn_up.weight")
        x = x + mm(g / (1 + np.exp(-g)) * u, f"blk.{i}.ffn_down.weight")
    x = norm(x, W("output_norm.weight"))
    return mm(x, "output.weight" if "output.weight" in f.tensors else "token_embd.weight")


# The K-quants and IQ4_XS need rows of 256: a wider shape, with GQA 4:1 and a vocabulary of 300
# (rows past the last group of 8 in the output head).
K_SHAPE = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=512, vocab=300, ctx=64)
MODEL_TYPES = [(GQA_SHAPE, t) for t in (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.BF16)]
MODEL_TYPES += [(K_SHAPE, t) for t in (GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K,
                                       GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS)]
# The architectures of model/archs.py, each with its own features: Llama 3.1 (rope_freqs, GQA 4:1),
# linear rope scaling, Qwen2 (biases, NeoX), Qwen3 (Q/K norms, NeoX, head_dim 32 != dim / heads).
ARCH_SHAPES = {
    "llama3": Shape(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64, rope_base=500000.0,
                    rope_freqs=True),
    "qwen2": Shape(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64, rope_base=1e6, arch="qwen2"),
    "qwen3": Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64, rope_base=1e6, arch="qwen3",
                   head_dim=32),
}
ARCH_MODELS = [(name, t) for name in ARCH_SHAPES for t in (GGMLType.F32, GGMLType.Q8_0)]


# llama.cpp's most downloaded mixes: Q4_K with Q6_K for the output head and some attn_v / ffn_down
# (4 layers: llama.cpp's use_more_bits picks layers 0, 2 and 3, so layer 1 keeps Q4_K), Q5_K with Q6_K.
# More layers carry a rounding flip of one int8 activation (see below) into every later position.
MIX_SHAPE = Shape(dim=256, n_layers=4, n_heads=4, n_kv_heads=1, ffn_dim=512, vocab=300, ctx=64)
MIXES = [(MIX_SHAPE, m) for m in ("q4_k_m", "q5_k_m")]


def _name(t) -> str:
    return t if isinstance(t, str) else t.name


@pytest.fixture(scope="module", params=MODEL_TYPES + MIXES, ids=lambda p: _name(p[1]))
def random_model(request, tmp_path_factory):
    shape, t = request.param
    path = tmp_path_factory.mktemp("rand") / f"gqa-{_name(t)}.gguf"
    write_random_model(path, shape, t, seed=7)
    return path


def test_every_computable_type_has_a_model_test():
    from pyggml.quant.registry import COMPUTABLE_TYPES

    assert {t for _, t in MODEL_TYPES} == set(COMPUTABLE_TYPES)


def test_logits_equal_numpy_llama(random_model):
    tokens = [1, 17, 299, 5, 42, 42, 100, 3, 250, 7, 8]
    want = numpy_llama_logits(random_model, tokens)
    llm = Llama(random_model, n_ctx=32)
    got = llm.model.forward(np.array(tokens), 0, llm.kv_cache, all_logits=True)
    assert got.shape == want.shape
    # Float rounding only, until a last-bit difference moves one activation across an int8 rounding
    # boundary (the numpy forward rounds float64 values, the kernels float32 ones): from there that
    # position's logits, and through attention later ones', move by about one int8 step (stated:
    # within 2e-2 of the largest logit, as the GPU tests state it). BOS (position 0) never flips here.
    close = np.all(np.abs(got - want) <= 2e-4 * np.abs(want).max(), axis=1)
    assert close[0], np.flatnonzero(~close)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    # Stated tolerance of the int8-activation path against an all-float forward on these weights:
    # within 5% of the largest logit, and the same top token at >= 90% of positions.
    exact = numpy_llama_logits(random_model, tokens, int8_activations=False)
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()
    assert (got.argmax(1) == exact.argmax(1)).mean() >= 0.9


def _assert_same_forward(got, want, int8: bool):
    """A prompt's attention sums in another order than a single token's (kvattn.py's blocks of keys):
    float rounding only (1e-5 of the largest logit), unless the weights multiply int8 activations, where
    a last-bit difference may move one activation across an int8 rounding boundary and that position's
    logits, and through attention later ones', by about one int8 step (stated, as against the numpy
    forward: within 2e-2 of the largest logit; position 0, which attends to itself alone, exact)."""
    scale = np.abs(want).max()
    if not int8:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
        return
    np.testing.assert_allclose(got[:1], want[:1], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * scale)


def test_prefill_equals_single_steps(random_model):
    tokens = np.array([1, 9, 8, 7, 6, 5, 4, 3, 2, 150, 151, 152, 153])
    llm = Llama(random_model, n_ctx=32)
    int8 = any(w.ggml_type in INT8_ACTIVATION_TYPES for w in (llm.model.layers[0].wq, llm.model.layers[0].w_down))
    batch = llm.model.forward(tokens, 0, llm.kv_cache, all_logits=True)
    steps = np.stack([llm.model.forward(tokens[i : i + 1], i, llm.kv_cache) for i in range(len(tokens))])
    _assert_same_forward(steps.reshape(batch.shape), batch, int8)
    # in chunks through the API (n_batch=4) too
    llm2 = Llama(random_model, n_ctx=32, n_batch=4)
    tol = (2e-2 if int8 else 1e-5) * np.abs(batch).max()
    np.testing.assert_allclose(llm2.eval(tokens.tolist()), batch[-1], rtol=0, atol=tol)


# ------------------------------------------------------------------------------ stories260K
@pytest.fixture(scope="module")
def stories(stories_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("stories")
    files = {"f32": convert_hf_to_gguf(stories_dir, d / "s-f32.gguf", outtype="f32")}
    files["f16"] = convert_hf_to_gguf(stories_dir, d / "s-f16.gguf", outtype="f16")
    for t in ("q8_0", "q5_0", "q4_0"):
        files[t] = quantize_file(files["f16"], t, d / f"s-{t}.gguf").out_path
    ref = (stories_dir / "reference_greedy.txt").read_text(encoding="utf-8")
    return files, ref


GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
PROMPT = "Once upon a time"


def _greedy_ids(path, n=252):
    llm = Llama(path, n_ctx=512)
    prompt = llm.tokenize(PROMPT)
    return llm, prompt, list(llm.generate_tokens(prompt, GREEDY, n))


def test_f32_reproduces_reference_greedy_exactly(stories):
    files, ref = stories
    llm, prompt, ids = _greedy_ids(files["f32"])
    assert len(prompt) + len(ids) == 257  # run.c: 256 positions after BOS
    # run.c prints a newline after the generation
    assert llm.tokenizer.decode(prompt + ids) + "\n" == ref
    assert llm.generate_text(PROMPT, max_tokens=252, temperature=0, repeat_penalty=1.0) + "\n" == ref[len(PROMPT):]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_f16_and_q8_0_follow_reference_for_50_tokens(stories, kind):
    files, _ = stories
    _, _, want = _greedy_ids(files["f32"], 50)
    _, _, got = _greedy_ids(files[kind], 50)
    assert got == want


def test_q4_0_output_is_fluent(stories):
    """Scored by the f32 model, q4_0's greedy text is about as likely as f32's own greedy text."""
    files, _ = stories
    f32, prompt, ref_ids = _greedy_ids(files["f32"], 120)
    q4, _, q4_ids = _greedy_ids(files["q4_0"], 120)
    text = q4.tokenizer.decode(prompt + q4_ids)
    assert text.startswith(PROMPT) and text.isascii() and len(text.split()) > 60

    def nll(ids):
        seq = np.array(prompt + ids)
        logits = f32.model.forward(seq, 0, f32.kv_cache, all_logits=True).astype(np.float64)[len(prompt) - 1 : -1]
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        return -logp[np.arange(len(ids)), seq[len(prompt):]].mean()

    assert nll(q4_ids) < nll(ref_ids) + 0.5  # greedy f32 text is the most likely; q4_0 stays close


def test_session_round_trip_gives_identical_logits(stories, tmp_path):
    files, _ = stories
    llm = Llama(files["q8_0"], n_ctx=128)
    llm.eval(llm.tokenize(PROMPT + ", there was"))
    path = tmp_path / "s.session"
    llm.save_state(path, extra={"note": "x"})
    next_logits = llm.eval([100]).copy()

    fresh = Llama(files["q8_0"], n_ctx=128)
    assert fresh.load_state(path) == {"note": "x"}
    assert fresh.tokens == llm.tokens[:-1]
    assert np.array_equal(fresh.eval([100]), next_logits)

    with pytest.raises(SessionError, match="context of 128"):
        Llama(files["q8_0"], n_ctx=64).load_state(path)
    with pytest.raises(SessionError, match="another model"):
        Llama(files["q4_0"], n_ctx=128).load_state(path)
    bad = tmp_path / "bad.session"
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SessionError, match="truncated"):
        Llama(files["q8_0"], n_ctx=128).load_state(bad)


def test_named_kv_file_holds_the_cache(stories, tmp_path):
    from pyggml.kvfile import HEADER_BYTES

    files, _ = stories
    kv = tmp_path / "kv.bin"
    llm = Llama(files["f32"], n_ctx=64, kv_path=kv)
    assert kv.stat().st_size == HEADER_BYTES + llm.kv_cache.nbytes
    a = llm.generate_text(PROMPT, max_tokens=20, temperature=0)
    b = Llama(files["f32"], n_ctx=64).generate_text(PROMPT, max_tokens=20, temperature=0)
    assert a == b and np.abs(np.fromfile(kv, np.float32, offset=HEADER_BYTES)).max() > 0


def test_api_shapes_stop_strings_and_context_full(stories):
    files, _ = stories
    llm = Llama(files["f32"], n_ctx=40)
    pieces = list(llm.generate_text(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert len(pieces) > 3 and "".join(pieces) == llm.generate_text(PROMPT, max_tokens=12, temperature=0)
    full = llm.generate_text(PROMPT, max_tokens=30, temperature=0, repeat_penalty=1.0)
    cut = llm.generate_text(PROMPT, max_tokens=30, temperature=0, repeat_penalty=1.0, stop="Lily")
    assert "Lily" in full and cut == full[: full.index("Lily")]

    c = llm.create_completion(PROMPT, max_tokens=5, temperature=0)
    assert c["object"] == "text_completion" and c["choices"][0]["finish_reason"] == "length"
    assert c["usage"]["completion_tokens"] == 5 and c["usage"]["prompt_tokens"] == len(llm.tokenize(PROMPT))

    long = llm.generate_text(PROMPT, max_tokens=1000, temperature=0)  # context of 40 fills up
    assert llm.context_full and len(llm.tokens) == 40 and long
    chat = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == chat["choices"][0]["message"]["content"]
    from pyggml.api import ContextFullError
    with pytest.raises(ContextFullError):
        llm.generate_text("word " * 100, max_tokens=1)


def test_embed_is_mean_pooled_hidden_state(stories):
    files, _ = stories
    llm = Llama(files["f32"], n_ctx=64)
    llm.eval(llm.tokenize(PROMPT))
    before = list(llm.tokens)
    e = np.array(llm.embed("a little girl"))
    assert e.shape == (64,) and np.isfinite(e).all()
    assert llm.tokens == before  # the generation context is untouched
    n = np.array(llm.embed("a little girl", normalize=True))
    np.testing.assert_allclose(n, e / np.linalg.norm(e), rtol=1e-5)
    two = llm.embed(["a little girl", "a big dog"])
    assert np.allclose(two[0], e) and not np.allclose(two[1], e)


def test_tokenize_detokenize_round_trip(stories):
    files, _ = stories
    llm = Llama(files["q4_0"], n_ctx=32)
    ids = llm.tokenize("Hello world")
    assert ids[0] == llm.token_bos() and llm.detokenize(ids) == b"Hello world"
    assert llm.tokenize(b"<s>Hi", special=True)[:2] == [1, 1]


@pytest.fixture(scope="module", params=ARCH_MODELS, ids=lambda p: f"{p[0]}-{p[1].name}")
def arch_model(request, tmp_path_factory):
    name, t = request.param
    path = tmp_path_factory.mktemp("arch") / f"{name}-{t.name}.gguf"
    write_random_model(path, ARCH_SHAPES[name], t, seed=5)
    return path


def test_architectures_equal_numpy_forward(arch_model):
    """Each architecture's features against the plain numpy forward (NeoX RoPE computed on halves
    there, by a row permutation in pyggml); prefill equals steps."""
    tokens = np.array([1, 17, 299, 5, 42, 42, 100, 3, 250, 7, 8])
    want = numpy_llama_logits(arch_model, tokens)
    llm = Llama(arch_model, n_ctx=32)
    got = llm.model.forward(tokens, 0, llm.kv_cache, all_logits=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    llm2 = Llama(arch_model, n_ctx=32)
    steps = np.stack([llm2.model.forward(tokens[i : i + 1], i, llm2.kv_cache) for i in range(len(tokens))])
    np.testing.assert_allclose(steps, got, rtol=0, atol=1e-5 * np.abs(got).max())


def _write_f32(path, shape, drop=(), add=(), keys=None):
    from pyggml.gguf.writer import TensorPlan, write_gguf
    from pyggml.synthetic import llama_metadata, random_weight, synthetic_vocab, tensor_shapes

    meta = llama_metadata(shape, "t", GGMLType.F32)
    meta.update(synthetic_vocab(shape.vocab))
    meta.update(keys or {})
    shapes = {n: s for n, s in tensor_shapes(shape).items() if n not in drop}
    shapes.update(add)
    write_gguf(path, meta, [TensorPlan(n, s, GGMLType.F32, lambda n=n, s=s: random_weight(n, s, 1)) for n, s in shapes.items()])
    return path


def test_linear_rope_scaling_divides_positions(tmp_path):
    shape = ARCH_SHAPES["qwen2"]
    path = _write_f32(tmp_path / "lin.gguf", shape, keys={"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 4.0})
    tokens = np.array([1, 17, 299, 5, 42, 42, 100, 3])
    llm = Llama(path, n_ctx=32)
    assert llm.model.config.rope_linear_factor == 4.0
    got = llm.model.forward(tokens, 0, llm.kv_cache, all_logits=True)
    want = numpy_llama_logits(path, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    plain = numpy_llama_logits(_write_f32(tmp_path / "plain.gguf", shape), tokens)
    assert np.abs(plain - want).max() > 100 * 2e-4 * np.abs(want).max()  # the factor matters
    from pyggml.model import ModelError
    with pytest.raises(ModelError, match="yarn"):
        Llama(_write_f32(tmp_path / "yarn.gguf", shape, keys={"qwen2.rope.scaling.type": "yarn"}), n_ctx=16)


def test_unused_or_missing_arch_tensor_is_an_error(tmp_path):
    """A qwen2 file without its biases, or a llama file carrying qwen3's Q/K norms, is refused by name."""
    from pyggml.model import ModelError

    write = _write_f32
    qwen2 = ARCH_SHAPES["qwen2"]
    with pytest.raises(ModelError, match=r"blk\.1\.attn_k\.bias.*missing"):
        Llama(write(tmp_path / "a.gguf", qwen2, drop=("blk.1.attn_k.bias",)), n_ctx=16)
    llama = ARCH_SHAPES["llama3"]
    with pytest.raises(ModelError, match=r"blk\.0\.attn_q_norm\.weight.*not used by architecture 'llama'"):
        Llama(write(tmp_path / "b.gguf", llama, add={"blk.0.attn_q_norm.weight": (8,)}), n_ctx=16)


@pytest.mark.parametrize("delta", [-3, 5])
def test_tokenizer_and_model_vocabulary_must_agree(tmp_path, delta):
    """A tokenizer with more or fewer tokens than the model's embedding rows is refused at load (else a
    prompt token or a sampled id fails mid-generation)."""
    from pyggml.synthetic import synthetic_vocab

    shape = ARCH_SHAPES["qwen2"]
    vocab = synthetic_vocab(shape.vocab + delta)
    path = _write_f32(tmp_path / "v.gguf", shape, keys=vocab)
    with pytest.raises(ModelError, match=f"the tokenizer has {shape.vocab + delta} tokens .* is {shape.vocab}"):
        Llama(path, n_ctx=16)


def test_packed_matrices_leave_the_files_pages(tmp_path, monkeypatch):
    """Matrices the CPU multiplies from a packed copy release their file pages (resident memory holds the
    weights once); float matrices, read in place, keep theirs. The model still computes the same logits."""
    path = tmp_path / "q8.gguf"
    write_random_model(path, K_SHAPE, GGMLType.Q8_0, seed=2)
    with Llama(path, n_ctx=16) as ref:
        want = ref.model.forward(np.array([1, 5, 9]), 0, ref.kv_cache)
    released = []
    monkeypatch.setattr(GGUFFile, "release", lambda self, name: released.append(name))
    llm = Llama(path, n_ctx=16)
    packed = {layer.wq.name for layer in llm.model.layers if layer.wq.packed is not None}
    assert packed and packed <= set(released)
    assert not any(n.endswith("_norm.weight") for n in released)
    monkeypatch.undo()
    llm2 = Llama(path, n_ctx=16)  # the real release: the pages come back when read
    np.testing.assert_array_equal(llm2.model.forward(np.array([1, 5, 9]), 0, llm2.kv_cache), want)
