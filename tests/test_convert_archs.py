"""HF -> GGUF conversion of LLaMA-family architectures (Llama 3.1, Mistral, Qwen2, Qwen3) and
byte-level BPE tokenizer.json files, on tiny random checkpoints built here.

The vocabularies come from llama.cpp's ggml-vocab-{llama-bpe,qwen2}.gguf (PYGGML_TEST_MODELS, default
../shared/models), written back out as tokenizer.json files; tests needing them skip without them.
Written files are checked with pyggml's GGUFFile and with the `gguf` package's GGUFReader, and the
tensor/key names against gguf-py's own tables, i.e. what llama.cpp's converter writes.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pyggml.convert import ARCHS, ConversionError, convert_hf_to_gguf, permute_qk
from pyggml.convert.config import RopeSpec, rope_freqs
from pyggml.convert.tokenizer_bpe import LLAMA3_RE, QWEN2_RE, TEKKEN_RE, pre_tokenizer_name
from pyggml.gguf.constants import GGMLType, Keys, LlamaFileType, TensorNames as T, TokenType, ValueType
from pyggml.gguf.reader import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from hf_checkpoints import hf_shapes  # noqa: E402  (the HF tensor set of each family, shared with tools/fuzz_convert.py)

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("PYGGML_TEST_MODELS", ROOT.parent / "shared" / "models"))
VOCABS = MODELS / "vocab"
needs_vocab = pytest.mark.skipif(not (VOCABS / "ggml-vocab-llama-bpe.gguf").is_file()
                                 or not (VOCABS / "ggml-vocab-qwen2.gguf").is_file(),
                                 reason=f"llama.cpp vocab files not found in {VOCABS} (set PYGGML_TEST_MODELS)")


# ------------------------------------------------------------------------------ tokenizer.json fixtures
@functools.lru_cache(maxsize=None)
def gguf_vocab(name: str) -> dict:
    """tokens, types, merges (and the rest of the metadata) of llama.cpp's ggml-vocab-<name>.gguf."""
    with GGUFFile(VOCABS / f"ggml-vocab-{name}.gguf") as f:
        m = dict(f.metadata)
    m[Keys.TOKEN_TYPE] = np.array(m[Keys.TOKEN_TYPE])
    return m


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# pre_tokenizer / normalizer of each family's real tokenizer.json
PRE = {
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [split(LLAMA3_RE), byte_level(False)]}, None),
    "qwen2": ({"type": "Sequence", "pretokenizers": [split(QWEN2_RE), byte_level(False)]}, {"type": "NFC"}),
    "tekken": ({"type": "Sequence", "pretokenizers": [split(TEKKEN_RE), byte_level(False)]}, None),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       byte_level(True)]}, None),
    "gpt-2": (byte_level(True), None),
}


def tokenizer_json(tokens: list[str], types, merges: list[str], pre: str, bos: str | None = None,
                   merges_as_pairs: bool = False) -> dict:
    """A HF tokenizer.json: NORMAL tokens are the BPE vocab, CONTROL / USER_DEFINED ones added tokens."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": bool(types[i] != TokenType.CONTROL), "special": bool(types[i] == TokenType.CONTROL)}
             for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)
             and not t.startswith("[PAD")]
    pre_tokenizer, normalizer = PRE[pre]
    post = byte_level(True) | {"trim_offsets": False}
    if bos is not None:
        post = {"type": "Sequence", "processors": [post, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe", "vocab": vocab,
                  "merges": [m.split(" ") for m in merges] if merges_as_pairs else list(merges)},
    }


# A small Llama-3-style vocabulary: the first N_BASE llama-bpe tokens and the merges among them,
# then added tokens (special, one non-special "looks special", one user-defined with a ▁) and holes.
N_BASE = 400
SMALL_ADDED = [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|eot_id|>", True),
               ("<|eom_id|>", True), ("<|python_tag|>", False), ("tool\u2581call", False)]
SMALL_VOCAB = N_BASE + len(SMALL_ADDED) + 2  # two [PAD] holes at the end
BOS, EOS, EOT, EOM = N_BASE, N_BASE + 1, N_BASE + 2, N_BASE + 3


@functools.lru_cache(maxsize=None)
def small_vocab() -> tuple[list[str], np.ndarray, list[str]]:
    v = gguf_vocab("llama-bpe")
    base = v[Keys.TOKENS][:N_BASE]
    have = set(base)
    merges = [m for m in v[Keys.MERGES] if (p := m.split(" ")) and p[0] in have and p[1] in have
              and p[0] + p[1] in have]
    tokens = base + [t for t, _ in SMALL_ADDED]
    types = np.array([TokenType.NORMAL] * N_BASE + [TokenType.CONTROL if s else TokenType.USER_DEFINED
                                                     for _, s in SMALL_ADDED], np.int32)
    return tokens, types, merges


def write_small_tokenizer(d: Path, pre: str = "llama-bpe", **tok_config) -> None:
    tokens, types, merges = small_vocab()
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, types, merges, pre,
                                                                bos="<|begin_of_text|>" if pre == "llama-bpe" else None)))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ bos_token }}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | tok_config))


# ------------------------------------------------------------------------------ tiny checkpoints
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu")
CONFIGS = {
    "llama31": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                    rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                    bos_token_id=BOS, eos_token_id=[EOS, EOM, EOT]),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=1000000.0,
                    head_dim=32, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False, sliding_window=4096, max_window_layers=21),
    "qwen3": dict(BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0, head_dim=32,
                  tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, sliding_window=None),
}


def build(d: Path, kind: str, seed: int = 0, tokenizer: bool = True, **overrides) -> dict[str, np.ndarray]:
    """A random HF checkpoint of CONFIGS[kind] (+ overrides; None deletes a key); returns its f32 tensors."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIGS[kind], vocab_size=SMALL_VOCAB)
    for k, v in overrides.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in hf_shapes(config, config.get(
        "tie_word_embeddings", False)).items()}
    save_file(weights, str(d / "model.safetensors"))
    if tokenizer:
        write_small_tokenizer(d, pre="tekken" if kind == "mistral" else "qwen2" if kind.startswith("qwen") else "llama-bpe")
    return weights


def convert(d: Path, outtype: str = "f32") -> Path:
    return convert_hf_to_gguf(d, d.parent / f"{d.name}-{outtype}.gguf", outtype=outtype)


def metadata(path: Path) -> dict:
    with GGUFFile(path) as f:
        return dict(f.metadata)


def rope_freqs_reference(theta: float, dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors, transcribed line by line (float64)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# ------------------------------------------------------------------------------ what each file must hold
def expected_arch_keys(kind: str, **over) -> dict:
    c = dict(CONFIGS[kind], **over)
    arch = {"llama31": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[kind]
    k = lambda key: Keys.arch(key, arch)  # noqa: E731
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    keys = {
        Keys.ARCHITECTURE: arch, k(Keys.BLOCK_COUNT): 2, k(Keys.CONTEXT_LENGTH): 256, k(Keys.EMBEDDING_LENGTH): 64,
        k(Keys.FEED_FORWARD_LENGTH): 96, k(Keys.HEAD_COUNT): 4, k(Keys.HEAD_COUNT_KV): 2,
        k(Keys.ROPE_FREQ_BASE): c["rope_theta"], k(Keys.RMS_EPS): np.float32(1e-5),
    }
    if "head_dim" in c:
        keys |= {k(Keys.KEY_LENGTH): hd, k(Keys.VALUE_LENGTH): hd}
    if arch == "llama":
        keys |= {k(Keys.VOCAB_SIZE): SMALL_VOCAB, k(Keys.ROPE_DIMENSION_COUNT): hd}
    return keys


def expected_tensors(hf: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """The GGUF tensors of an f32 conversion, from the HF ones (the name map written out longhand)."""
    c = CONFIGS[kind]
    permute = kind in ("llama31", "mistral")
    out = {T.TOKEN_EMBD: hf["model.embed_tokens.weight"], T.OUTPUT_NORM: hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out[T.OUTPUT] = hf["lm_head.weight"]
    for i in range(2):
        p = f"model.layers.{i}."
        q, kk = hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"]
        out |= {
            T.ATTN_NORM.format(i=i): hf[p + "input_layernorm.weight"],
            T.ATTN_Q.format(i=i): permute_qk(q, c["num_attention_heads"]) if permute else q,
            T.ATTN_K.format(i=i): permute_qk(kk, c["num_key_value_heads"]) if permute else kk,
            T.ATTN_V.format(i=i): hf[p + "self_attn.v_proj.weight"],
            T.ATTN_OUTPUT.format(i=i): hf[p + "self_attn.o_proj.weight"],
            T.FFN_NORM.format(i=i): hf[p + "post_attention_layernorm.weight"],
            T.FFN_GATE.format(i=i): hf[p + "mlp.gate_proj.weight"],
            T.FFN_UP.format(i=i): hf[p + "mlp.up_proj.weight"],
            T.FFN_DOWN.format(i=i): hf[p + "mlp.down_proj.weight"],
        }
        if kind == "qwen2":
            for proj, name in (("q", T.ATTN_Q_BIAS), ("k", T.ATTN_K_BIAS), ("v", T.ATTN_V_BIAS)):
                out[name.format(i=i)] = hf[p + f"self_attn.{proj}_proj.bias"]
        if kind == "qwen3":
            out[T.ATTN_Q_NORM.format(i=i)] = hf[p + "self_attn.q_norm.weight"]
            out[T.ATTN_K_NORM.format(i=i)] = hf[p + "self_attn.k_norm.weight"]
    return out


def check_with_gguf_py(path: Path, hf: dict[str, np.ndarray], arch: str) -> None:
    """The file as the `gguf` package reads it equals pyggml's reading, and llama.cpp's own name map
    (gguf-py's TensorNameMap) gives every HF tensor the name we wrote."""
    gguf = pytest.importorskip("gguf")
    theirs = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
        assert keys == list(f.metadata)
        for k in keys:
            field, mine = theirs.fields[k], f.metadata[k]
            assert int(field.types[0]) == int(f.fields[k].type), k
            if isinstance(mine, np.ndarray):
                np.testing.assert_array_equal(np.array(field.contents()), mine, err_msg=k)
            elif isinstance(mine, float):
                assert field.contents() == pytest.approx(mine, rel=1e-7), k
            else:
                assert field.contents() == mine, k
        assert [t.name for t in theirs.tensors] == list(f.tensors)
        for t in theirs.tensors:
            assert int(t.tensor_type) == f.tensors[t.name].ggml_type, t.name
            assert tuple(int(x) for x in t.shape) == f.tensors[t.name].dims, t.name
            np.testing.assert_array_equal(np.asarray(t.data), f.tensor(t.name), err_msg=t.name)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(model_arch, 2)
    written = [t.name for t in theirs.tensors]
    mapped = [name_map.get_name(n, try_suffixes=(".weight", ".bias")) for n in hf]
    assert sorted(mapped) == sorted(n for n in written if n != T.ROPE_FREQS), "llama.cpp maps HF names differently"
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[model_arch] for i in range(2)}
    assert {n.rsplit(".", 1)[0] for n in written} <= allowed  # every tensor is one llama.cpp's arch has
    known_keys = set()
    for group in vars(gguf.Keys).values():
        if isinstance(group, type):
            known_keys |= {v.replace("{arch}", arch) for v in vars(group).values() if isinstance(v, str)}
    assert set(keys) <= known_keys, set(keys) - known_keys  # every key is one of gguf-py's key names


# ------------------------------------------------------------------------------ the architectures
@needs_vocab
def test_llama31_rope_freqs_gqa_untied(tmp_path):
    hf = build(tmp_path / "l31", "llama31")
    path = convert(tmp_path / "l31")
    m = metadata(path)
    want = expected_arch_keys("llama31")
    for k, v in want.items():
        assert m[k] == (pytest.approx(v) if isinstance(v, float | np.floating) else v), k
    assert Keys.arch(Keys.ROPE_SCALING_TYPE, "llama") not in m  # llama3 RoPE is the tensor, not a key
    assert Keys.arch(Keys.KEY_LENGTH, "llama") not in m  # config states no head_dim: llama.cpp writes none
    assert m[Keys.FILE_TYPE] == LlamaFileType.ALL_F32
    tensors = expected_tensors(hf, "llama31")
    with GGUFFile(path) as f:
        names = list(f.tensors)
        assert names[0] == T.ROPE_FREQS and sorted(names[1:]) == sorted(tensors)  # llama.cpp: extras first
        rf = f.tensors[T.ROPE_FREQS]
        assert rf.ggml_type == GGMLType.F32 and rf.shape == (8,)  # head_dim 16 / 2
        got = f.tensor(T.ROPE_FREQS)
        np.testing.assert_allclose(got, rope_freqs_reference(500000.0, 16, 8.0, 1.0, 4.0, 8192), rtol=2e-7)
        # head_dim 16, theta 5e5: wavelengths 6.3 .. 6.1e5; < 2048 keep 1, > 8192 get 8, 4443 interpolates
        assert list(got[:4]) == [1, 1, 1, 1] and list(got[5:]) == [8, 8, 8] and 1 < got[4] < 8
        for name, w in tensors.items():
            assert f.tensors[name].shape == w.shape and f.tensors[name].ggml_type == GGMLType.F32, name
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)
        # the permutation happened: q rows are not HF's
        assert not np.array_equal(f.tensor(T.ATTN_Q.format(i=0)), hf["model.layers.0.self_attn.q_proj.weight"])
    check_with_gguf_py(path, hf, "llama")


@pytest.mark.parametrize("head_dim,theta,factor,low,high,old", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (16, 10000.0, 2.0, 0.5, 3.0, 256),
])
def test_rope_freqs_match_llama_cpp_formula(head_dim, theta, factor, low, high, old):
    rope = RopeSpec("llama3", theta, factor=factor, low_freq_factor=low, high_freq_factor=high, original_context=old)
    got = rope_freqs(rope, head_dim)
    want = rope_freqs_reference(theta, head_dim, factor, low, high, old)
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 1 and got[-1] == factor and np.all(np.diff(got) >= 0)


@needs_vocab
def test_transformers5_rope_parameters_equal_transformers4_form(tmp_path):
    build(tmp_path / "t4", "llama31")
    build(tmp_path / "t5", "llama31", rope_theta=None, rope_scaling=None,
          rope_parameters=dict(LLAMA31_ROPE, rope_theta=500000.0))
    a, b = convert(tmp_path / "t4"), convert(tmp_path / "t5")
    ma, mb = metadata(a), metadata(b)
    ma.pop(Keys.NAME), mb.pop(Keys.NAME)
    assert list(ma) == list(mb)
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k], dtype=object), np.asarray(mb[k], dtype=object), err_msg=k)
    assert a.read_bytes().split(b"t4", 1)[1] == b.read_bytes().split(b"t5", 1)[1]  # only general.name differs


@needs_vocab
def test_linear_rope_scaling_keys(tmp_path):
    build(tmp_path / "lin", "llama31", rope_scaling={"type": "linear", "factor": 4.0})
    m = metadata(convert(tmp_path / "lin"))
    assert m[Keys.arch(Keys.ROPE_SCALING_TYPE, "llama")] == "linear"
    assert m[Keys.arch(Keys.ROPE_SCALING_FACTOR, "llama")] == 4.0
    with GGUFFile(tmp_path / "lin-f32.gguf") as f:
        assert T.ROPE_FREQS not in f.tensors
        assert f.fields[Keys.arch(Keys.ROPE_SCALING_FACTOR, "llama")].type == ValueType.FLOAT32


@needs_vocab
def test_mistral_head_dim_and_tekken(tmp_path):
    hf = build(tmp_path / "mis", "mistral")
    path = convert(tmp_path / "mis")
    m = metadata(path)
    for k, v in expected_arch_keys("mistral").items():
        assert m[k] == (pytest.approx(v) if isinstance(v, float | np.floating) else v), k
    assert m[Keys.arch(Keys.KEY_LENGTH, "llama")] == 32 != 64 // 4  # head_dim differs from hidden / heads
    assert m[Keys.TOKENIZER_PRE] == "tekken"
    with GGUFFile(path) as f:
        for name, w in expected_tensors(hf, "mistral").items():
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)
        assert f.tensors[T.ATTN_Q.format(i=1)].shape == (128, 64)
    check_with_gguf_py(path, hf, "llama")


@needs_vocab
def test_mistral_v01_window_not_below_context_converts(tmp_path, caplog):
    build(tmp_path / "m01", "mistral", sliding_window=4096, max_position_embeddings=4096)
    with caplog.at_level(logging.INFO):
        m = metadata(convert(tmp_path / "m01"))
    assert "sliding_window 4096" in caplog.text
    assert not any("sliding" in k for k in m)


@needs_vocab
def test_qwen2_biases_no_permutation_tied(tmp_path):
    hf = build(tmp_path / "q2", "qwen2")
    path = convert(tmp_path / "q2")
    m = metadata(path)
    want = expected_arch_keys("qwen2")
    arch_keys = {k for k in m if k.startswith("qwen2.")}
    assert arch_keys == {k for k in want if k.startswith("qwen2.")}  # no vocab_size, rope dims, key_length
    for k, v in want.items():
        assert m[k] == (pytest.approx(v) if isinstance(v, float | np.floating) else v), k
    assert m[Keys.TOKENIZER_PRE] == "qwen2"
    assert Keys.ADD_SPACE_PREFIX not in m  # llama.cpp's Qwen2Model does not write it
    tensors = expected_tensors(hf, "qwen2")
    with GGUFFile(path) as f:
        assert sorted(f.tensors) == sorted(tensors) and T.OUTPUT not in f.tensors  # tied
        for name, w in tensors.items():
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)  # q/k in HF order
        assert f.tensors[T.ATTN_K_BIAS.format(i=1)].shape == (32,)
    with GGUFFile(convert(tmp_path / "q2", "f16")) as f:  # biases stay F32, as llama.cpp stores 1-D tensors
        assert f.tensors[T.ATTN_Q_BIAS.format(i=0)].ggml_type == GGMLType.F32
        assert f.tensors[T.ATTN_Q.format(i=0)].ggml_type == GGMLType.F16
    check_with_gguf_py(path, hf, "qwen2")


@needs_vocab
def test_qwen3_qk_norm_head_dim_untied_transformers5(tmp_path):
    hf = build(tmp_path / "q3", "qwen3", rope_theta=None,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    path = convert(tmp_path / "q3")
    m = metadata(path)
    want = expected_arch_keys("qwen3")
    assert {k for k in m if k.startswith("qwen3.")} == {k for k in want if k.startswith("qwen3.")}
    for k, v in want.items():
        assert m[k] == (pytest.approx(v) if isinstance(v, float | np.floating) else v), k
    assert m[Keys.arch(Keys.KEY_LENGTH, "qwen3")] == m[Keys.arch(Keys.VALUE_LENGTH, "qwen3")] == 32
    tensors = expected_tensors(hf, "qwen3")
    with GGUFFile(path) as f:
        assert sorted(f.tensors) == sorted(tensors) and T.OUTPUT in f.tensors
        assert not any(n.endswith(".bias") for n in f.tensors)
        for name, w in tensors.items():
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)
        assert f.tensors[T.ATTN_Q_NORM.format(i=0)].shape == (32,) and f.tensors[T.ATTN_Q.format(i=0)].shape == (128, 64)
    check_with_gguf_py(path, hf, "qwen3")


@needs_vocab
@pytest.mark.parametrize("kind", ["qwen3", "llama31"])
def test_tied_and_untied(tmp_path, kind):
    hf = build(tmp_path / "tied", kind, tie_word_embeddings=True)
    assert "lm_head.weight" not in hf
    with GGUFFile(convert(tmp_path / "tied")) as f:
        assert T.OUTPUT not in f.tensors
    # A checkpoint that stores the tied copy anyway: still no output.weight.
    from safetensors.numpy import save_file

    save_file(hf | {"lm_head.weight": hf["model.embed_tokens.weight"]}, str(tmp_path / "tied" / "model.safetensors"))
    with GGUFFile(convert(tmp_path / "tied")) as f:
        assert T.OUTPUT not in f.tensors
    build(tmp_path / "untied", kind, tie_word_embeddings=False)
    with GGUFFile(convert(tmp_path / "untied")) as f:
        assert T.OUTPUT in f.tensors


def test_arch_table_rows():
    assert {a: s.gguf_arch for a, s in ARCHS.items()} == {
        "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3"}
    assert [a for a, s in ARCHS.items() if s.permute_qk] == ["LlamaForCausalLM", "MistralForCausalLM"]
    assert T.ATTN_Q_BIAS in ARCHS["Qwen2ForCausalLM"].block_tensors.values()
    assert T.ATTN_K_NORM in ARCHS["Qwen3ForCausalLM"].block_tensors.values()


# ------------------------------------------------------------------------------ the tokenizer
@needs_vocab
@pytest.mark.parametrize("name,merges_as_pairs", [("llama-bpe", False), ("qwen2", True)])
def test_full_vocab_equals_llama_cpp(tmp_path, name, merges_as_pairs):
    """tokens, types, merges and ids equal llama.cpp's own vocab file (its [PAD] holes included)."""
    v = gguf_vocab(name)
    tokens, types = v[Keys.TOKENS], v[Keys.TOKEN_TYPE]
    d = tmp_path / name
    d.mkdir()
    bos = "<|begin_of_text|>" if name == "llama-bpe" else None
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, types, v[Keys.MERGES], name, bos=bos,
                                                                merges_as_pairs=merges_as_pairs)))
    tok_cfg = ({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"} if name == "llama-bpe" else
               {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
                "chat_template": v[Keys.CHAT_TEMPLATE]})
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    kind = "llama31" if name == "llama-bpe" else "qwen2"
    extra = {} if name == "llama-bpe" else {"bos_token_id": 151643}
    build(d, kind, tokenizer=False, vocab_size=len(tokens), hidden_size=8, intermediate_size=8,
          num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, eos_token_id=None, **extra)
    m = metadata(convert(d, "f16"))
    assert m[Keys.TOKENIZER_MODEL] == "gpt2" and m[Keys.TOKENIZER_PRE] == name
    assert m[Keys.TOKENS] == tokens
    assert m[Keys.MERGES] == v[Keys.MERGES]
    # llama.cpp's current converter types holes UNUSED (this old qwen2 file has them USER_DEFINED)
    want_types = np.where(np.char.startswith(np.array(tokens), "[PAD"), TokenType.UNUSED, types)
    np.testing.assert_array_equal(m[Keys.TOKEN_TYPE], want_types)
    for key in (Keys.BOS_ID, Keys.EOS_ID, Keys.PAD_ID, Keys.CHAT_TEMPLATE):
        assert m.get(key) == v.get(key), key
    if name == "llama-bpe":
        assert m[Keys.ADD_BOS] is True and m[Keys.ADD_EOS] is False
    else:
        assert m[Keys.ADD_BOS] is False and m[Keys.ADD_EOS] is False


@needs_vocab
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_fixture_tokenizer_json_reproduces_llama_cpp_ids(tmp_path, name):
    """The tokenizer.json files these tests write are faithful: HF `tokenizers` gives llama.cpp's test ids."""
    tokenizers = pytest.importorskip("tokenizers")
    v = gguf_vocab(name)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(v[Keys.TOKENS], v[Keys.TOKEN_TYPE], v[Keys.MERGES], name)))
    tok = tokenizers.Tokenizer.from_file(str(path))
    inputs = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) - 1 <= len(outputs)
    for text, ids in zip(inputs, outputs):
        assert tok.encode(text, add_special_tokens=False).ids == [int(x) for x in ids.split()], repr(text)


@needs_vocab
def test_small_vocab_types_ids_generation_config(tmp_path, caplog):
    d = tmp_path / "tok"
    build(d, "llama31")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, EOM, EOT, 7]}))
    with caplog.at_level(logging.WARNING):
        m = metadata(convert(d))
    tokens, types, merges = small_vocab()
    assert m[Keys.TOKENS][:N_BASE] == tokens[:N_BASE]
    assert m[Keys.TOKENS][N_BASE:] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",
                                       "<|python_tag|>", "tool call", f"[PAD{SMALL_VOCAB - 2}]", f"[PAD{SMALL_VOCAB - 1}]"]
    C, U, N = TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED
    # <|python_tag|> is not special but looks it (<|...|>): CONTROL, as llama.cpp types it
    np.testing.assert_array_equal(m[Keys.TOKEN_TYPE][N_BASE:], [C, C, C, C, C, U, N, N])
    assert set(m[Keys.TOKEN_TYPE][:N_BASE]) == {TokenType.NORMAL}
    assert m[Keys.MERGES] == merges and len(merges) > 50
    # eos = the tokenizer's (tokenizer_config eos_token), not generation_config's first; no eot key is
    # written (llama.cpp finds <|eot_id|> / <|eom_id|> / <|end_of_text|> by their text)
    assert (m[Keys.BOS_ID], m[Keys.EOS_ID]) == (BOS, EOT)
    assert Keys.EOT_ID not in m and Keys.EOM_ID not in m and Keys.PAD_ID not in m
    assert m[Keys.ADD_BOS] is True and m[Keys.ADD_EOS] is False
    assert m[Keys.TOKENIZER_PRE] == "llama-bpe" and m[Keys.CHAT_TEMPLATE] == "{{ bos_token }}"
    assert "eos id 7" in caplog.text and "eos id %d" % EOM not in caplog.text
    with GGUFFile(tmp_path / "tok-f32.gguf") as f:
        assert f.fields[Keys.TOKEN_TYPE].elem_type == ValueType.INT32
        assert f.fields[Keys.MERGES].elem_type == ValueType.STRING
        assert f.fields[Keys.EOS_ID].type == ValueType.UINT32


@needs_vocab
def test_chat_template_file_and_add_prefix_space(tmp_path):
    d = tmp_path / "tpl"
    build(d, "llama31")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["add_prefix_space"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    m = metadata(convert(d))
    assert m[Keys.CHAT_TEMPLATE] == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert m[Keys.ADD_SPACE_PREFIX] is False  # llama.cpp's LlamaModel writes tokenizer_config's add_prefix_space


def test_pre_tokenizer_names_are_ones_the_runtime_reads():
    from pyggml.convert.tokenizer_bpe import PRE_TOKENIZERS
    from pyggml.tokenizer.bpe import PRE_TOKENIZERS as RUNTIME

    names = {p.name for p in PRE_TOKENIZERS} | {p.name_with_bos for p in PRE_TOKENIZERS if p.name_with_bos}
    assert names == {"llama-bpe", "qwen2", "deepseek-r1-qwen", "tekken", "smollm", "gpt-2"}
    assert names <= set(RUNTIME)


def test_merges_with_spaces_are_encoded(tmp_path):
    from pyggml.convert.tokenizer_bpe import _merge_strings

    assert _merge_strings([["a b", "c"], ["Ġx", "y"]], tmp_path) == ["a\u0120b c", "Ġx y"]
    assert _merge_strings(["a b"], tmp_path) == ["a b"]
    with pytest.raises(ConversionError, match="neither"):
        _merge_strings([["a", "b", "c"]], tmp_path)


@pytest.mark.parametrize("pre,normalizer,adds_bos,want", [
    ("llama-bpe", None, True, "llama-bpe"),
    ("qwen2", {"type": "NFC"}, False, "qwen2"),
    ("qwen2", None, False, "qwen2"),
    ("qwen2", None, True, "deepseek-r1-qwen"),
    ("tekken", None, True, "tekken"),
    ("smollm", None, False, "smollm"),
    ("gpt-2", None, False, "gpt-2"),
])
def test_pre_tokenizer_names(tmp_path, pre, normalizer, adds_bos, want):
    tok = {"pre_tokenizer": PRE[pre][0], "normalizer": normalizer}
    assert pre_tokenizer_name(tok, tmp_path / "tokenizer.json", adds_bos) == want


@pytest.mark.parametrize("pre_tokenizer,normalizer,phrase", [
    ({"type": "Sequence", "pretokenizers": [split(r"\p{N}{1,5}"), byte_level(False)]}, None, r"\p{N}{1,5}"),
    ({"type": "Sequence", "pretokenizers": [split(LLAMA3_RE), byte_level(True)]}, None, "unrecognised"),
    (PRE["llama-bpe"][0], {"type": "Lowercase"}, "Lowercase"),
    (PRE["llama-bpe"][0], {"type": "NFC"}, "NFC"),
    (byte_level(True) | {"add_prefix_space": True}, None, "add_prefix_space"),
    (split(LLAMA3_RE), None, "ByteLevel"),
    ({"type": "Metaspace", "replacement": "\u2581"}, None, "Metaspace"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, byte_level(True)]},
     None, "individual_digits"),
])
def test_unknown_pre_tokenizers_are_refused(tmp_path, pre_tokenizer, normalizer, phrase):
    with pytest.raises(ConversionError) as e:
        pre_tokenizer_name({"pre_tokenizer": pre_tokenizer, "normalizer": normalizer}, tmp_path / "tokenizer.json", False)
    assert phrase in str(e.value) and "tokenizer.json" in str(e.value)


# ------------------------------------------------------------------------------ refused configs
def fails(d: Path, *phrases: str) -> None:
    out = d.parent / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_gguf(d, out / "x.gguf", outtype="f16")
    for p in phrases:
        assert p in str(e.value), (p, str(e.value))
    assert str(d) in str(e.value)  # the message names the file
    assert list(out.iterdir()) == []


REFUSED = [
    ("llama31", dict(attention_bias=True), ["attention_bias"]),
    ("llama31", dict(mlp_bias=True), ["mlp_bias"]),
    ("qwen3", dict(attention_bias=True), ["attention_bias", "qwen3"]),
    ("qwen2", dict(use_sliding_window=True), ["use_sliding_window"]),
    ("qwen3", dict(use_sliding_window=True), ["use_sliding_window"]),
    ("mistral", dict(sliding_window=4096, max_position_embeddings=32768), ["sliding_window 4096", "32768"]),
    ("llama31", dict(attn_logit_softcapping=50.0), ["attn_logit_softcapping"]),
    ("llama31", dict(final_logit_softcapping=30.0), ["final_logit_softcapping"]),
    ("llama31", dict(logit_scale=0.25), ["logit_scale"]),
    ("llama31", dict(logits_scaling=8.0), ["logits_scaling"]),
    ("llama31", dict(partial_rotary_factor=0.5), ["partial_rotary_factor"]),
    ("qwen3", dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "partial_rotary_factor": 0.5}), ["partial_rotary_factor"]),
    ("llama31", dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    ("qwen2", dict(layer_types=["full_attention", "sliding_attention"]), ["layer_types"]),
    ("qwen2", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     ["yarn"]),
    ("llama31", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["dynamic"]),
    ("llama31", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}),
     ["longrope"]),
    ("qwen3", dict(rope_theta=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
     ["rope_parameters", "yarn"]),
    ("qwen2", dict(rope_scaling=LLAMA31_ROPE), ["llama3", "qwen2"]),
    ("llama31", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["low_freq_factor"]),
    ("llama31", dict(rope_scaling=dict(LLAMA31_ROPE, high_freq_factor=1.0)), ["high_freq_factor"]),
    ("llama31", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), ["disagree"]),
    ("qwen3", dict(head_dim=None), ["head_dim"]),
    ("qwen2", dict(rope_scaling={"type": "default", "mrope_section": [16, 24, 24]}), ["mrope_section"]),
    # types
    ("llama31", dict(hidden_size="64"), ["hidden_size", "'64'"]),
    ("llama31", dict(vocab_size=408.5), ["vocab_size"]),
    ("llama31", dict(num_hidden_layers=True), ["num_hidden_layers"]),
    ("llama31", dict(rope_theta="500000"), ["rope_theta"]),
    ("llama31", dict(rms_norm_eps=[1e-5]), ["rms_norm_eps"]),
    ("llama31", dict(tie_word_embeddings="no"), ["tie_word_embeddings"]),
    ("llama31", dict(rope_scaling="llama3"), ["rope_scaling"]),
    ("llama31", dict(rope_scaling=dict(LLAMA31_ROPE, factor="8")), ["factor"]),
    ("mistral", dict(sliding_window="4096"), ["sliding_window"]),
    ("qwen2", dict(use_sliding_window="false"), ["use_sliding_window"]),
    ("llama31", dict(num_key_value_heads=3), ["num_key_value_heads"]),
    ("llama31", dict(architectures="LlamaForCausalLM"), ["architectures"]),
]


@needs_vocab
@pytest.mark.parametrize("kind,overrides,phrases", REFUSED, ids=[
    f"{k}-{'-'.join(o)}-{i}" for i, (k, o, _) in enumerate(REFUSED)])
def test_refused_config_fields(tmp_path, kind, overrides, phrases):
    build(tmp_path / "m", kind)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for k, v in overrides.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    fails(tmp_path / "m", *phrases)


@needs_vocab
def test_unknown_architecture_names_it_and_the_supported(tmp_path):
    build(tmp_path / "m", "llama31", architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    fails(tmp_path / "m", "Gemma2ForCausalLM", *ARCHS)


@needs_vocab
def test_qwen2_unused_sliding_window_converts(tmp_path):
    build(tmp_path / "m", "qwen2", sliding_window=64, max_window_layers=1)  # use_sliding_window false
    assert metadata(convert(tmp_path / "m"))[Keys.ARCHITECTURE] == "qwen2"


@needs_vocab
def test_tokenizer_errors(tmp_path):
    d = tmp_path / "m"
    build(d, "llama31")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (d / "tokenizer.json").write_text(json.dumps(tok))
    fails(d, "unrecognised pre-tokenizer", r"\s+|\w+")
    (d / "tokenizer.json").unlink()
    fails(d, "tokenizer.model", "tokenizer.json")
    build(d, "llama31", vocab_size=N_BASE)  # the added tokens lie beyond it
    fails(d, "vocab_size")
