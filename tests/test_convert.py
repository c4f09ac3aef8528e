"""HF -> GGUF conversion: Q/K permutation, the real stories260K model, sharded bf16, errors."""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pyggml.gguf.constants import (
    QUANTIZATION_VERSION,
    GGMLType,
    Keys,
    LlamaFileType,
    TensorNames,
    TokenType,
    ValueType,
)
from pyggml.gguf.reader import GGUFFile
from pyggml.convert import ConversionError, convert_hf_to_gguf, permute_qk, unpermute_qk
from pyggml.convert import safetensors_io
from pyggml.convert.tokenizer import normalizer_flags
from pyggml.quant.codecs import dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]

MODELS = Path(os.environ.get("PYGGML_TEST_MODELS", ROOT.parent / "shared" / "models"))
STORIES = MODELS / "stories260K-hf"
if not (STORIES / "model.safetensors").is_file():
    STORIES = ROOT / "models" / "stories260K"  # the bundled copy
LLAMA2_TOKENIZER = MODELS / "llama2-tokenizer" / "tokenizer.model"
A = "llama"  # general.architecture


def key(k: str) -> str:
    return Keys.arch(k, A)


# ------------------------------------------------------------------------------ Q/K permutation
def rope_rotate_half(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """HF LLaMA RoPE: x (T, n_head, hd); dimension j is paired with j + hd/2."""
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
    ang = pos[:, None] * freqs[None, :]  # (T, hd/2)
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + np.concatenate([-x2, x1], axis=-1) * sin


def rope_adjacent(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """ggml/llama.cpp RoPE: x (T, n_head, hd); dimensions 2i and 2i+1 rotate together."""
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    ang = (pos[:, None] * freqs[None, :])[:, None, :]  # (T, 1, hd/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


@pytest.mark.parametrize("n_head,n_head_kv,head_dim", [(8, 4, 8), (4, 4, 16), (6, 2, 32), (2, 1, 2)])
def test_permute_qk_turns_rotate_half_rope_into_adjacent_pair_rope(n_head, n_head_kv, head_dim):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    dim, T, theta = 24, 7, 10000.0
    wq = rng.standard_normal((n_head * head_dim, dim))
    wk = rng.standard_normal((n_head_kv * head_dim, dim))
    x = rng.standard_normal((T, dim))
    pos = np.arange(T, dtype=np.float64) + 3

    q_hf = rope_rotate_half((x @ wq.T).reshape(T, n_head, head_dim), pos, theta)
    k_hf = rope_rotate_half((x @ wk.T).reshape(T, n_head_kv, head_dim), pos, theta)
    q_gg = rope_adjacent((x @ permute_qk(wq, n_head).T).reshape(T, n_head, head_dim), pos, theta)
    k_gg = rope_adjacent((x @ permute_qk(wk, n_head_kv).T).reshape(T, n_head_kv, head_dim), pos, theta)

    # Same vectors, rows in the GGUF order: permuting the HF result gives the GGUF result.
    np.testing.assert_allclose(q_gg.reshape(T, -1), permute_qk(q_hf.reshape(T, -1).T, n_head).T, atol=1e-10)
    np.testing.assert_allclose(k_gg.reshape(T, -1), permute_qk(k_hf.reshape(T, -1).T, n_head_kv).T, atol=1e-10)
    # And what attention sees is identical: scores q.k per head, with GQA sharing of kv heads.
    group = n_head // n_head_kv
    scores_hf = np.einsum("thd,shd->hts", q_hf, np.repeat(k_hf, group, axis=1))
    scores_gg = np.einsum("thd,shd->hts", q_gg, np.repeat(k_gg, group, axis=1))
    np.testing.assert_allclose(scores_gg, scores_hf, atol=1e-9)
    # Without the permutation the scores differ (unless head_dim is 2, where the orders coincide).
    if head_dim > 2:
        q_bad = rope_adjacent((x @ wq.T).reshape(T, n_head, head_dim), pos, theta)
        k_bad = rope_adjacent((x @ wk.T).reshape(T, n_head_kv, head_dim), pos, theta)
        assert not np.allclose(np.einsum("thd,shd->hts", q_bad, np.repeat(k_bad, group, axis=1)), scores_hf)


def test_unpermute_qk_inverts_permute_qk():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8 * 16, 5))
    p = permute_qk(w, 8)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 8), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, 8), 8), w)
    # Per head: rows (0..hd/2-1 | hd/2..hd-1) interleave as 0, hd/2, 1, hd/2+1, ...
    rows = np.arange(16)
    np.testing.assert_array_equal(permute_qk(rows, 1), [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
    with pytest.raises(ValueError):
        permute_qk(np.zeros((12, 3)), 8)


# ------------------------------------------------------------------------------ the real model
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"test model not found at {STORIES} (set PYGGML_TEST_MODELS)")


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def expected_gguf_f32(hf: dict[str, np.ndarray], n_layer: int, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """The tensors a correct f32 conversion holds, from the HF weights (written out longhand)."""
    out = {TensorNames.TOKEN_EMBD: hf["model.embed_tokens.weight"], TensorNames.OUTPUT_NORM: hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out[TensorNames.OUTPUT] = hf["lm_head.weight"]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        out[TensorNames.ATTN_NORM.format(i=i)] = hf[p + "input_layernorm.weight"]
        out[TensorNames.ATTN_Q.format(i=i)] = permute_qk(hf[p + "self_attn.q_proj.weight"], n_head)
        out[TensorNames.ATTN_K.format(i=i)] = permute_qk(hf[p + "self_attn.k_proj.weight"], n_head_kv)
        out[TensorNames.ATTN_V.format(i=i)] = hf[p + "self_attn.v_proj.weight"]
        out[TensorNames.ATTN_OUTPUT.format(i=i)] = hf[p + "self_attn.o_proj.weight"]
        out[TensorNames.FFN_NORM.format(i=i)] = hf[p + "post_attention_layernorm.weight"]
        out[TensorNames.FFN_GATE.format(i=i)] = hf[p + "mlp.gate_proj.weight"]
        out[TensorNames.FFN_UP.format(i=i)] = hf[p + "mlp.up_proj.weight"]
        out[TensorNames.FFN_DOWN.format(i=i)] = hf[p + "mlp.down_proj.weight"]
    return out


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"test model not found at {STORIES} (set PYGGML_TEST_MODELS)")
    calls = []
    out = convert_hf_to_gguf(STORIES, tmp_path_factory.mktemp("f32") / "s.gguf", outtype="f32",
                             progress=lambda name, i, n: calls.append((name, i, n)))
    assert [c[1] for c in calls] == list(range(len(calls))) and {c[2] for c in calls} == {len(calls)}
    return out


@needs_stories
def test_stories_f32_tensors_equal_hf_weights(stories_f32):
    want = expected_gguf_f32(hf_weights(STORIES), n_layer=5, n_head=8, n_head_kv=4)
    with GGUFFile(stories_f32) as f:
        assert TensorNames.OUTPUT not in f.tensors  # tied embeddings: no output.weight
        assert sorted(f.tensors) == sorted(want)
        assert len(f.tensors) == 2 + 5 * 9
        for name, w in want.items():
            assert f.tensors[name].ggml_type == GGMLType.F32, name
            assert f.tensors[name].shape == w.shape, name
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)


@needs_stories
def test_stories_metadata(stories_f32):
    with GGUFFile(stories_f32) as f:
        m = f.metadata
        assert m[Keys.ARCHITECTURE] == "llama"
        assert m[Keys.NAME] == "stories260K"
        assert m[Keys.FILE_TYPE] == LlamaFileType.ALL_F32
        assert Keys.QUANTIZATION_VERSION not in m
        assert m[key(Keys.CONTEXT_LENGTH)] == 512
        assert m[key(Keys.EMBEDDING_LENGTH)] == 64
        assert m[key(Keys.BLOCK_COUNT)] == 5
        assert m[key(Keys.FEED_FORWARD_LENGTH)] == 172
        assert m[key(Keys.HEAD_COUNT)] == 8
        assert m[key(Keys.HEAD_COUNT_KV)] == 4
        assert m[key(Keys.ROPE_DIMENSION_COUNT)] == 8
        assert m[key(Keys.ROPE_FREQ_BASE)] == 10000.0
        assert m[key(Keys.RMS_EPS)] == pytest.approx(1e-5, rel=1e-6)
        assert m[key(Keys.VOCAB_SIZE)] == 512
        # llama.cpp reads these as u32 / f32 / bool: the stored types matter, not just the values.
        for k in (key(Keys.BLOCK_COUNT), key(Keys.HEAD_COUNT_KV), Keys.FILE_TYPE, Keys.BOS_ID):
            assert f.fields[k].type == ValueType.UINT32, k
        assert f.fields[key(Keys.RMS_EPS)].type == ValueType.FLOAT32
        assert f.fields[Keys.ADD_BOS].type == ValueType.BOOL


@needs_stories
def test_stories_tokenizer_keys_equal_sentencepiece(stories_f32):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    n = sp.vocab_size()
    types = []
    for i in range(n):
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    with GGUFFile(stories_f32) as f:
        m = f.metadata
        assert m[Keys.TOKENIZER_MODEL] == "llama"
        assert m[Keys.TOKENS] == [sp.id_to_piece(i) for i in range(n)]
        assert m[Keys.SCORES].dtype == np.float32 and m[Keys.TOKEN_TYPE].dtype == np.int32
        np.testing.assert_array_equal(m[Keys.SCORES], np.array([sp.get_score(i) for i in range(n)], np.float32))
        np.testing.assert_array_equal(m[Keys.TOKEN_TYPE], types)
        assert (m[Keys.TOKEN_TYPE] == TokenType.BYTE).sum() == 256
        assert (m[Keys.BOS_ID], m[Keys.EOS_ID], m[Keys.UNK_ID]) == (1, 2, 0)
        assert Keys.PAD_ID not in m  # the model has none
        assert m[Keys.ADD_BOS] is True and m[Keys.ADD_EOS] is False
        # README: this normalizer collapses whitespace; check the flags against sentencepiece's behaviour.
        assert m[Keys.REMOVE_EXTRA_WHITESPACES] is True and m[Keys.ADD_SPACE_PREFIX] is True
        assert sp.normalize("  a   b ") == "\u2581a\u2581b"
        assert Keys.CHAT_TEMPLATE not in m


def greedy_with_adjacent_pair_rope(f: GGUFFile, prompt: list[int], n_new: int) -> list[int]:
    """A plain numpy llama forward (float64, tied output) over a GGUF file, rotating ADJACENT pairs."""
    m = f.metadata
    n_layer, n_head, n_kv = m[key(Keys.BLOCK_COUNT)], m[key(Keys.HEAD_COUNT)], m[key(Keys.HEAD_COUNT_KV)]
    hd, eps, theta = m[key(Keys.ROPE_DIMENSION_COUNT)], m[key(Keys.RMS_EPS)], m[key(Keys.ROPE_FREQ_BASE)]
    w = {name: np.asarray(f.tensor(name), np.float64) for name in f.tensors}
    blk = lambda i, t: w[t.format(i=i)]  # noqa: E731

    def rms(x, g):
        return x / np.sqrt((x * x).mean() + eps) * g

    cache = [([], []) for _ in range(n_layer)]
    tokens = list(prompt)
    for pos in range(len(prompt) + n_new - 1):
        x = w[TensorNames.TOKEN_EMBD][tokens[pos]].copy()
        for i in range(n_layer):
            h = rms(x, blk(i, TensorNames.ATTN_NORM))
            q = rope_adjacent((blk(i, TensorNames.ATTN_Q) @ h).reshape(1, n_head, hd), np.array([pos]), theta)[0]
            k = rope_adjacent((blk(i, TensorNames.ATTN_K) @ h).reshape(1, n_kv, hd), np.array([pos]), theta)[0]
            cache[i][0].append(k)
            cache[i][1].append((blk(i, TensorNames.ATTN_V) @ h).reshape(n_kv, hd))
            ks = np.repeat(np.stack(cache[i][0]), n_head // n_kv, axis=1)  # (pos+1, n_head, hd)
            vs = np.repeat(np.stack(cache[i][1]), n_head // n_kv, axis=1)
            s = np.einsum("hd,thd->ht", q, ks) / np.sqrt(hd)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            o = np.einsum("ht,thd->hd", p / p.sum(axis=1, keepdims=True), vs)
            x = x + blk(i, TensorNames.ATTN_OUTPUT) @ o.reshape(-1)
            h = rms(x, blk(i, TensorNames.FFN_NORM))
            g, u = blk(i, TensorNames.FFN_GATE) @ h, blk(i, TensorNames.FFN_UP) @ h
            x = x + blk(i, TensorNames.FFN_DOWN) @ (g / (1 + np.exp(-g)) * u)
        if pos >= len(prompt) - 1:
            tokens.append(int(np.argmax(w[TensorNames.TOKEN_EMBD] @ rms(x, w[TensorNames.OUTPUT_NORM]))))
    return tokens[len(prompt):]


@needs_stories
def test_stories_f32_reproduces_reference_greedy_text(stories_f32):
    """End to end: with q/k permuted, adjacent-pair RoPE on the GGUF weights reproduces llama2.c's text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    prompt = "Once upon a time"
    reference = (STORIES / "reference_greedy.txt").read_text(encoding="utf-8")
    with GGUFFile(stories_f32) as f:
        new = greedy_with_adjacent_pair_rope(f, [sp.bos_id()] + sp.encode(prompt), 40)
    text = prompt + sp.decode(new)
    assert len(text) > len(prompt) + 60 and reference.startswith(text), text


@needs_stories
def test_stories_reads_back_with_gguf_py(stories_f32):
    gguf = pytest.importorskip("gguf")
    theirs = gguf.GGUFReader(str(stories_f32))
    with GGUFFile(stories_f32) as f:
        keys = {k for k in theirs.fields if not k.startswith("GGUF.")}
        assert keys == set(f.metadata)
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
            assert int(t.tensor_type) == f.tensors[t.name].ggml_type
            assert tuple(int(d) for d in t.shape) == f.tensors[t.name].dims
            np.testing.assert_array_equal(np.asarray(t.data), f.tensor(t.name), err_msg=t.name)


@needs_stories
@pytest.mark.parametrize("outtype,gtype,ftype", [("f16", GGMLType.F16, LlamaFileType.MOSTLY_F16),
                                                  ("bf16", GGMLType.BF16, LlamaFileType.MOSTLY_BF16)])
def test_stories_f16_bf16_store_the_right_dtypes(tmp_path, outtype, gtype, ftype):
    want = expected_gguf_f32(hf_weights(STORIES), n_layer=5, n_head=8, n_head_kv=4)
    with GGUFFile(convert_hf_to_gguf(STORIES, tmp_path / "s.gguf", outtype=outtype)) as f:
        assert f.metadata[Keys.FILE_TYPE] == ftype
        for name, w in want.items():
            got = f.tensor(name)
            if w.ndim == 1:  # norms stay F32
                assert f.tensors[name].ggml_type == GGMLType.F32
                np.testing.assert_array_equal(got, w)
            elif gtype == GGMLType.F16:
                assert f.tensors[name].ggml_type == GGMLType.F16 and got.dtype == np.float16
                np.testing.assert_array_equal(got, w.astype(np.float16), err_msg=name)
            else:
                assert f.tensors[name].ggml_type == GGMLType.BF16 and got.dtype == np.uint16
                np.testing.assert_array_equal(got, bf16_bits(w), err_msg=name)


@needs_stories
def test_stories_q8_0_falls_back_to_f16_for_172_long_rows(tmp_path, caplog):
    want = expected_gguf_f32(hf_weights(STORIES), n_layer=5, n_head=8, n_head_kv=4)
    with caplog.at_level("WARNING"):
        out = convert_hf_to_gguf(STORIES, tmp_path / "q.gguf", outtype="q8_0")
    assert "blk.0.ffn_down.weight" in caplog.text
    with GGUFFile(out) as f:
        assert f.metadata[Keys.FILE_TYPE] == LlamaFileType.MOSTLY_Q8_0
        assert f.metadata[Keys.QUANTIZATION_VERSION] == QUANTIZATION_VERSION
        for name, w in want.items():
            t = f.tensors[name].ggml_type
            if w.ndim == 1:
                assert t == GGMLType.F32
            elif w.shape[-1] % 32:  # ffn_down: rows of 172
                assert t == GGMLType.F16, name
                np.testing.assert_array_equal(f.tensor(name), w.astype(np.float16))
            else:
                assert t == GGMLType.Q8_0, name
                np.testing.assert_array_equal(f.tensor(name), quantize(w, GGMLType.Q8_0), err_msg=name)
                got = dequantize(f.tensor(name), GGMLType.Q8_0)
                amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
                err = np.abs(got.reshape(-1, 32) - w.reshape(-1, 32))
                # half a step, plus the fp16 rounding of the scale d = amax/127 times |q| <= 127
                assert (err <= amax * (0.5 / 127 + 2.0**-11) * 1.01).all(), name
        assert sum(f.tensors[n].ggml_type == GGMLType.F16 for n in f.tensors) == 5


@needs_stories
def test_default_output_name_strips_hf_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = convert_hf_to_gguf(STORIES, outtype="f16")
    assert out == tmp_path / "stories260K-f16.gguf" and out.is_file()


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason=f"{LLAMA2_TOKENIZER} not found")
def test_normalizer_flags_of_llama2_tokenizer():
    # README: unlike stories260K, Llama 2 keeps runs of spaces.
    assert normalizer_flags(LLAMA2_TOKENIZER.read_bytes()) == (True, False)


# ------------------------------------------------------------------------------ tiny random models
def write_safetensors_by_hand(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file from (dtype name, raw array) pairs; lets us store BF16 as uint16 bits."""
    header, blobs, pos = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def train_tokenizer(vocab_size: int) -> bytes:
    import sentencepiece as spm

    text = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a little girl",
            "she liked to play in the park with her friends"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["<tool>"],
    )
    return model.getvalue()


TINY = dict(vocab=300 + 4, dim=64, layers=2, heads=4, kv_heads=2, ff=96)


def build_tiny_llama(d: Path, sharded: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A random 2-layer llama with an untied lm_head: norms F32, embeddings F16, matrices BF16 bits.

    Returns the HF tensors as float32 (what an exact f32 conversion holds, before permutation).
    """
    rng = np.random.default_rng(seed)
    c = TINY
    hd = c["dim"] // c["heads"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c["vocab"],
        "hidden_size": c["dim"], "intermediate_size": c["ff"], "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "rope_scaling": None,
    }))
    (d / "tokenizer.model").write_bytes(train_tokenizer(300))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": True,
        "added_tokens_decoder": {"301": {"content": "<|im_end|>", "special": True}},
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ messages }}"}],
    }))

    shapes = {"model.embed_tokens.weight": (c["vocab"], c["dim"]), "lm_head.weight": (c["vocab"], c["dim"]),
              "model.norm.weight": (c["dim"],)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c["dim"],), p + "post_attention_layernorm.weight": (c["dim"],),
            p + "self_attn.q_proj.weight": (c["heads"] * hd, c["dim"]),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * hd, c["dim"]),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * hd, c["dim"]),
            p + "self_attn.o_proj.weight": (c["dim"], c["heads"] * hd),
            p + "mlp.gate_proj.weight": (c["ff"], c["dim"]), p + "mlp.up_proj.weight": (c["ff"], c["dim"]),
            p + "mlp.down_proj.weight": (c["dim"], c["ff"]),
        })
    plain, bf16, values = {}, {}, {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            plain[name] = values[name] = w
        elif name == "model.embed_tokens.weight":
            plain[name] = w.astype(np.float16)
            values[name] = plain[name].astype(np.float32)
        else:
            bf16[name] = bf16_bits(w)
            values[name] = (bf16[name].astype(np.uint32) << 16).view(np.float32)
    plain["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(hd // 2, np.float32)  # dropped

    from safetensors.numpy import save_file

    if sharded:
        save_file(plain, str(d / "model-00001-of-00002.safetensors"))
        write_safetensors_by_hand(d / "model-00002-of-00002.safetensors", {n: ("BF16", a) for n, a in bf16.items()})
        weight_map = {n: "model-00001-of-00002.safetensors" for n in plain}
        weight_map.update({n: "model-00002-of-00002.safetensors" for n in bf16})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        write_safetensors_by_hand(
            d / "model.safetensors",
            {n: ("F16" if a.dtype == np.float16 else "F32", a) for n, a in plain.items()}
            | {n: ("BF16", a) for n, a in bf16.items()},
        )
    return values


def test_sharded_bf16_checkpoint_converts_exactly(tmp_path):
    values = build_tiny_llama(tmp_path / "tiny")
    c = TINY
    want = expected_gguf_f32(values, c["layers"], c["heads"], c["kv_heads"])
    out = convert_hf_to_gguf(tmp_path / "tiny", tmp_path / "tiny-f32.gguf", outtype="f32")
    with GGUFFile(out) as f:
        assert sorted(f.tensors) == sorted(want) and TensorNames.OUTPUT in f.tensors
        for name, w in want.items():
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)
        m = f.metadata
        assert m[key(Keys.HEAD_COUNT)] == 4 and m[key(Keys.HEAD_COUNT_KV)] == 2
        assert m[key(Keys.ROPE_DIMENSION_COUNT)] == 16 and m[key(Keys.ROPE_FREQ_BASE)] == 500000.0
        assert m[key(Keys.VOCAB_SIZE)] == c["vocab"] == len(m[Keys.TOKENS])
        assert m[Keys.NAME] == "tiny"
        # Tokenizer: padded to vocab_size, added token named, non-default flags and ids.
        assert m[Keys.TOKENS][300:] == ["[PAD300]", "<|im_end|>", "[PAD302]", "[PAD303]"]
        np.testing.assert_array_equal(m[Keys.TOKEN_TYPE][300:], [TokenType.UNUSED, TokenType.CONTROL] + [TokenType.UNUSED] * 2)
        assert m[Keys.TOKENS][4] == "<tool>" and m[Keys.TOKEN_TYPE][4] == TokenType.USER_DEFINED
        assert m[Keys.TOKENS][3] == "<pad>" and m[Keys.TOKEN_TYPE][3] == TokenType.CONTROL
        assert (m[Keys.BOS_ID], m[Keys.EOS_ID], m[Keys.UNK_ID], m[Keys.PAD_ID]) == (1, 301, 0, 3)
        assert m[Keys.ADD_EOS] is True
        assert m[Keys.ADD_SPACE_PREFIX] is False and m[Keys.REMOVE_EXTRA_WHITESPACES] is False
        assert m[Keys.CHAT_TEMPLATE] == "{{ messages }}"

    # bf16 out of a bf16 checkpoint: the stored bits pass through untouched (q/k permuted).
    with GGUFFile(convert_hf_to_gguf(tmp_path / "tiny", tmp_path / "tiny-bf16.gguf", outtype="bf16")) as f:
        for name, w in want.items():
            if w.ndim == 2:
                np.testing.assert_array_equal(f.tensor(name), bf16_bits(w), err_msg=name)
    # q8_0: every matrix row (64 or 96 long) fills whole blocks, so nothing falls back.
    with GGUFFile(convert_hf_to_gguf(tmp_path / "tiny", tmp_path / "tiny-q8_0.gguf", outtype="q8_0")) as f:
        assert {f.tensors[n].ggml_type for n in want if want[n].ndim == 2} == {GGMLType.Q8_0}


def test_single_file_checkpoint_equals_sharded(tmp_path):
    values = build_tiny_llama(tmp_path / "one", sharded=False)
    assert (tmp_path / "one" / "model.safetensors").is_file()
    want = expected_gguf_f32(values, TINY["layers"], TINY["heads"], TINY["kv_heads"])
    with GGUFFile(convert_hf_to_gguf(tmp_path / "one", tmp_path / "one.gguf", outtype="f32")) as f:
        for name, w in want.items():
            np.testing.assert_array_equal(f.tensor(name), w, err_msg=name)


def test_lazy_tensors_load_nothing_until_asked(tmp_path):
    build_tiny_llama(tmp_path / "m", sharded=False)
    tensors = safetensors_io.open_checkpoint(tmp_path / "m")
    t = tensors["model.layers.1.mlp.up_proj.weight"]
    assert (t.dtype, t.shape) == ("BF16", (96, 64))
    raw = t.load()
    assert isinstance(raw, np.memmap) and raw.dtype == np.uint16
    np.testing.assert_array_equal(t.load(float32=True), (raw.astype(np.uint32) << 16).view(np.float32))
    assert tensors["model.embed_tokens.weight"].load().dtype == np.float16


# ------------------------------------------------------------------------------ errors
def assert_fails(model_dir: Path, out_dir: Path, *phrases: str) -> None:
    """Conversion raises ConversionError naming `phrases`, and leaves nothing behind."""
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_gguf(model_dir, out_dir / "out.gguf", outtype="f16")
    for phrase in phrases:
        assert phrase in str(e.value), (phrase, str(e.value))
    assert list(out_dir.iterdir()) == []


@pytest.fixture
def tiny(tmp_path) -> Path:
    build_tiny_llama(tmp_path / "m", sharded=False)
    return tmp_path / "m"


def test_missing_config_json(tiny, tmp_path):
    (tiny / "config.json").unlink()
    assert_fails(tiny, tmp_path / "out", "config.json", str(tiny))


def test_unknown_architecture(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tiny / "config.json").write_text(json.dumps(config))
    assert_fails(tiny, tmp_path / "out", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM")


def test_mistral_converts_as_llama(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    (tiny / "config.json").write_text(json.dumps(config))
    with GGUFFile(convert_hf_to_gguf(tiny, tmp_path / "m.gguf", outtype="f16")) as f:
        assert f.metadata[Keys.ARCHITECTURE] == "llama"


def test_unsupported_rope_scaling(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (tiny / "config.json").write_text(json.dumps(config))
    assert_fails(tiny, tmp_path / "out", "rope_scaling", "yarn")


def test_missing_tokenizer_model(tiny, tmp_path):
    (tiny / "tokenizer.model").unlink()
    assert_fails(tiny, tmp_path / "out", "tokenizer.model")


def test_missing_weights(tiny, tmp_path):
    (tiny / "model.safetensors").unlink()
    assert_fails(tiny, tmp_path / "out", "model.safetensors", "model.safetensors.index.json")


def test_truncated_safetensors_header(tiny, tmp_path):
    path = tiny / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # the header length now points past the end
    assert_fails(tiny, tmp_path / "out", str(path), "header length")
    path.write_bytes(b"\x01\x02")
    assert_fails(tiny, tmp_path / "out", str(path), "too short")


def test_truncated_safetensors_data(tiny, tmp_path):
    path = tiny / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # the last tensor's bytes are cut
    assert_fails(tiny, tmp_path / "out", str(path), "truncated")


def test_corrupt_header_json_and_offsets(tiny, tmp_path):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["data_offsets"][1] += 2  # span disagrees with shape
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
    assert_fails(tiny, tmp_path / "out", name, "needs")
    path.write_bytes(struct.pack("<Q", 4) + b"{]!x" + data[8 + n :])
    assert_fails(tiny, tmp_path / "out", "JSON")


def test_sharded_index_names_a_missing_shard(tmp_path):
    build_tiny_llama(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    assert_fails(tmp_path / "m", tmp_path / "out", "model-00002-of-00002.safetensors")


def test_missing_and_misshapen_tensors(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny / "config.json").write_text(json.dumps(config))
    assert_fails(tiny, tmp_path / "out", "blk.2.")
    config.update(num_hidden_layers=2, intermediate_size=128)
    (tiny / "config.json").write_text(json.dumps(config))
    assert_fails(tiny, tmp_path / "out", "mlp", "[96, 64]", "[128, 64]")


def test_failure_while_streaming_leaves_no_file(tiny, tmp_path, monkeypatch):
    real_load, calls = safetensors_io.LazyTensor.load, []

    def failing_load(self, float32=False):
        calls.append(self.name)
        if len(calls) == 5:
            raise ConversionError(f"{self.path}: tensor {self.name!r}: simulated read error")
        return real_load(self, float32)

    monkeypatch.setattr(safetensors_io.LazyTensor, "load", failing_load)
    assert_fails(tiny, tmp_path / "out", "simulated read error")
    assert len(calls) == 5


def test_unknown_outtype(tiny, tmp_path):
    with pytest.raises(ConversionError, match="q4_0"):
        convert_hf_to_gguf(tiny, tmp_path / "x.gguf", outtype="q4_0")
