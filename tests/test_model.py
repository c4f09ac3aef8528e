"""Whole-model behaviour: logits against a plain numpy LLaMA, prefill vs single steps, the real
stories260K greedy reference, sessions, embeddings and the OpenAI-shaped API."""
import numpy as np
import pytest

from pyggml import Llama
from pyggml.convert import convert_hf_to_gguf
from pyggml.gguf import GGMLType, GGUFFile
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
    """The LLaMA forward pass written out plainly from the GGUF tensors: every position's logits.
    With int8_activations, inputs of Q4_0/Q5_0/Q8_0 matrices are rounded as the kernels round them."""
    f = GGUFFile(path)
    m = f.metadata
    dim, n_layers = m["llama.embedding_length"], m["llama.block_count"]
    n_head, n_kv = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    eps, base = m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"]
    hd = dim // n_head

    def W(name):
        t = f.tensors[name]
        raw = f.tensor(name)
        return (raw.astype(np.float64) if t.ggml_type is GGMLType.F32 else codecs.dequantize(raw, t.ggml_type).astype(np.float64))

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def mm(x, name):  # x @ W.T
        quantized = int8_activations and f.tensors[name].ggml_type in INT8_ACTIVATION_TYPES
        return (int8_blocks(x) if quantized else x) @ W(name).T

    def rope(x):  # x (T, heads, hd): rotate pairs (2i, 2i+1) by pos * base^(-2i/hd)
        T = x.shape[0]
        ang = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        out = x.copy()
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    T = len(tokens)
    x = W("token_embd.weight")[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        h = norm(x, W(f"blk.{i}.attn_norm.weight"))
        q = rope(mm(h, f"blk.{i}.attn_q.weight").reshape(T, n_head, hd))
        k = rope(mm(h, f"blk.{i}.attn_k.weight").reshape(T, n_kv, hd))
        v = mm(h, f"blk.{i}.attn_v.weight").reshape(T, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + mm(np.einsum("htu,uhd->thd", p, v).reshape(T, dim), f"blk.{i}.attn_output.weight")
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


@pytest.fixture(scope="module", params=MODEL_TYPES, ids=lambda p: p[1].name)
def random_model(request, tmp_path_factory):
    shape, t = request.param
    path = tmp_path_factory.mktemp("rand") / f"gqa-{t.name}.gguf"
    write_random_model(path, shape, t, seed=7)
    return path


def test_every_computable_type_has_a_model_test():
    from pyggml.quant.registry import COMPUTABLE_TYPES

    assert {t for _, t in MODEL_TYPES} == set(COMPUTABLE_TYPES)


def test_logits_equal_numpy_llama(random_model):
    tokens = [1, 17, 299, 5, 42, 42, 100, 3, 250, 7, 8]
    want = numpy_llama_logits(random_model, tokens)
    llm = Llama(random_model, n_ctx=32)
    got = llm.model.forward(np.array(tokens), 0, llm.cache, all_logits=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    # Stated tolerance of the int8-activation path against an all-float forward on these weights:
    # within 5% of the largest logit, and the same top token at >= 90% of positions.
    exact = numpy_llama_logits(random_model, tokens, int8_activations=False)
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()
    assert (got.argmax(1) == exact.argmax(1)).mean() >= 0.9


def test_prefill_equals_single_steps(random_model):
    tokens = np.array([1, 9, 8, 7, 6, 5, 4, 3, 2, 150, 151, 152, 153])
    llm = Llama(random_model, n_ctx=32)
    batch = llm.model.forward(tokens, 0, llm.cache, all_logits=True)
    steps = np.stack([llm.model.forward(tokens[i : i + 1], i, llm.cache) for i in range(len(tokens))])
    np.testing.assert_allclose(steps, batch, rtol=0, atol=1e-5 * np.abs(batch).max())
    # in chunks through the API (n_batch=4) too
    llm2 = Llama(random_model, n_ctx=32, n_batch=4)
    np.testing.assert_allclose(llm2.eval(tokens.tolist()), batch[-1], rtol=0, atol=1e-5 * np.abs(batch).max())


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
    assert llm.generate(PROMPT, max_tokens=252, temperature=0, repeat_penalty=1.0) + "\n" == ref[len(PROMPT):]


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
        logits = f32.model.forward(seq, 0, f32.cache, all_logits=True).astype(np.float64)[len(prompt) - 1 : -1]
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
    next_logits = llm.eval(llm.tokens + [100]).copy()

    fresh = Llama(files["q8_0"], n_ctx=128)
    assert fresh.load_state(path) == {"note": "x"}
    assert fresh.tokens == llm.tokens[:-1]
    assert np.array_equal(fresh.eval(fresh.tokens + [100]), next_logits)

    with pytest.raises(SessionError, match="context of 128"):
        Llama(files["q8_0"], n_ctx=64).load_state(path)
    with pytest.raises(SessionError, match="another model"):
        Llama(files["q4_0"], n_ctx=128).load_state(path)
    bad = tmp_path / "bad.session"
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SessionError, match="truncated"):
        Llama(files["q8_0"], n_ctx=128).load_state(bad)


def test_named_kv_file_holds_the_cache(stories, tmp_path):
    files, _ = stories
    kv = tmp_path / "kv.bin"
    llm = Llama(files["f32"], n_ctx=64, kv_path=kv)
    assert kv.stat().st_size == llm.cache.nbytes
    a = llm.generate(PROMPT, max_tokens=20, temperature=0)
    b = Llama(files["f32"], n_ctx=64).generate(PROMPT, max_tokens=20, temperature=0)
    assert a == b and np.abs(np.fromfile(kv, np.float32)).max() > 0


def test_api_shapes_stop_strings_and_context_full(stories):
    files, _ = stories
    llm = Llama(files["f32"], n_ctx=40)
    pieces = list(llm.generate(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert len(pieces) > 3 and "".join(pieces) == llm.generate(PROMPT, max_tokens=12, temperature=0)
    full = llm.generate(PROMPT, max_tokens=30, temperature=0, repeat_penalty=1.0)
    cut = llm.generate(PROMPT, max_tokens=30, temperature=0, repeat_penalty=1.0, stop="Lily")
    assert "Lily" in full and cut == full[: full.index("Lily")]

    c = llm.create_completion(PROMPT, max_tokens=5, temperature=0)
    assert c["object"] == "text_completion" and c["choices"][0]["finish_reason"] == "length"
    assert c["usage"]["completion_tokens"] == 5 and c["usage"]["prompt_tokens"] == len(llm.tokenize(PROMPT))

    long = llm.generate(PROMPT, max_tokens=1000, temperature=0)  # context of 40 fills up
    assert llm.context_full and len(llm.tokens) == 40 and long
    chat = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == chat["choices"][0]["message"]["content"]
    from pyggml.api import ContextFullError
    with pytest.raises(ContextFullError):
        llm.generate("word " * 100, max_tokens=1)


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
