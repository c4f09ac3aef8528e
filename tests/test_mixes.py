"""K-quant mixes: random-weight files whose per-tensor types are llama-quantize's for the same mix.

The expected tables are written out by hand from llama.cpp's llama_tensor_get_type (src/llama-quant.cpp)
for a dense llama model, not computed by pyggml.quant.mixes.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyggml import synthetic
from pyggml.gguf.constants import GGMLType, Keys, LlamaFileType, QUANTIZATION_VERSION
from pyggml.gguf.reader import GGUFFile
from pyggml.quant import codecs
from pyggml.quant.mixes import MIXES, mix_type

T = GGMLType
REPO = Path(__file__).resolve().parent.parent

# 8 layers: use_more_bits picks layers 0, 3, 6, 7; n_gqa = 4; every row a multiple of 256.
SHAPE = synthetic.Shape(dim=256, n_layers=8, n_heads=4, n_kv_heads=1, ffn_dim=512, vocab=300, ctx=64)


def _types(s: str) -> list[GGMLType]:
    return [T[w] for w in s.split()]


# mix -> (general.file_type, base type of all other matrices, {role: type of layers 0..7}).
# output.weight is Q6_K in every mix; token_embd keeps the base type.
EXPECTED = {
    "q2_k": (10, T.Q2_K, {
        "attn_v": _types("Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K"),  # n_gqa >= 4
        "ffn_down": _types("Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K"),
        "attn_output": _types("Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K Q3_K")}),
    "q3_k_s": (11, T.Q3_K, {}),
    "q3_k_m": (12, T.Q3_K, {
        "attn_v": _types("Q5_K Q5_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K"),
        "ffn_down": _types("Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K"),  # n/16 = 0 layers of Q5_K
        "attn_output": _types("Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K")}),
    "q3_k_l": (13, T.Q3_K, {
        "attn_v": _types("Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K"),
        "ffn_down": _types("Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K"),
        "attn_output": _types("Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K Q5_K")}),
    "q4_k_s": (14, T.Q4_K, {
        "attn_v": _types("Q5_K Q5_K Q5_K Q5_K Q4_K Q4_K Q4_K Q4_K"),
        "ffn_down": _types("Q5_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K")}),
    "q4_k_m": (15, T.Q4_K, {
        "attn_v": _types("Q6_K Q4_K Q4_K Q6_K Q4_K Q4_K Q6_K Q6_K"),
        "ffn_down": _types("Q6_K Q4_K Q4_K Q6_K Q4_K Q4_K Q6_K Q6_K")}),
    "q5_k_s": (16, T.Q5_K, {}),
    "q5_k_m": (17, T.Q5_K, {
        "attn_v": _types("Q6_K Q5_K Q5_K Q6_K Q5_K Q5_K Q6_K Q6_K"),
        "ffn_down": _types("Q6_K Q5_K Q5_K Q6_K Q5_K Q5_K Q6_K Q6_K")}),
}
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Relative RMS error of the stored weights, by type (pyggml's approximate encoders, loose bounds).
MAX_REL_ERR = {T.Q2_K: 0.5, T.Q3_K: 0.3, T.Q4_K: 0.15, T.Q5_K: 0.08, T.Q6_K: 0.04, T.F32: 0.0}


def expected_types(mix: str) -> dict[str, GGMLType]:
    _, base, upgrades = EXPECTED[mix]
    out = {"token_embd.weight": base, "output_norm.weight": T.F32, "output.weight": T.Q6_K}
    for i in range(SHAPE.n_layers):
        out[f"blk.{i}.attn_norm.weight"] = T.F32
        out[f"blk.{i}.ffn_norm.weight"] = T.F32
        for role in LAYER_MATRICES:
            out[f"blk.{i}.{role}.weight"] = upgrades[role][i] if role in upgrades else base
    return out


def test_every_mix_has_an_expected_table():
    assert set(EXPECTED) == set(MIXES)


@pytest.mark.parametrize("mix", sorted(EXPECTED))
def test_random_model_has_llama_cpp_mix_types(tmp_path, mix):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / f"m-{mix}.gguf"
    synthetic.write_random_model(path, SHAPE, mix, seed=3, workers=2)
    file_type, _, _ = EXPECTED[mix]
    want = expected_types(mix)

    with GGUFFile(path) as f:
        got = {t.name: t.ggml_type for t in f}
        assert got == want
        assert f.get(Keys.FILE_TYPE) == file_type == MIXES[mix].file_type
        assert f.get(Keys.QUANTIZATION_VERSION) == QUANTIZATION_VERSION
        for info in f:  # every tensor decodes to its random weights, within its type's error
            x = synthetic.random_weight(info.name, info.shape, 3)
            y = codecs.dequantize(f.tensor(info.name), info.ggml_type, info.shape)
            err = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
            assert err <= MAX_REL_ERR[info.ggml_type], (info.name, info.ggml_type.name, err)

    reader = gguf.GGUFReader(path)
    assert {t.name: T(int(t.tensor_type)) for t in reader.tensors} == want
    assert int(reader.fields[Keys.FILE_TYPE].contents()) == file_type
    ffn_down0 = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tuple(int(d) for d in ffn_down0.shape) == (SHAPE.ffn_dim, SHAPE.dim)  # gguf order: row length first


def test_tiny_shape_falls_back_like_llama_cpp(tmp_path):
    """tiny: rows of 64 and 96 weights, no whole 256-weight super-blocks: every K type takes its
    32-weight fallback (Q4_K -> Q5_0, Q6_K -> Q8_0) and output.weight is Q8_0."""
    shape = synthetic.SHAPES["tiny"]  # 2 layers: use_more_bits picks layer 1 only
    path = tmp_path / "tiny-q4_k_m.gguf"
    synthetic.write_random_model(path, shape, "Q4_K_M", workers=1)
    want = {"token_embd.weight": T.Q5_0, "output_norm.weight": T.F32, "output.weight": T.Q8_0}
    for i, big in ((0, T.Q5_0), (1, T.Q8_0)):
        want.update({f"blk.{i}.attn_norm.weight": T.F32, f"blk.{i}.ffn_norm.weight": T.F32})
        want.update({f"blk.{i}.{r}.weight": T.Q5_0 for r in LAYER_MATRICES})
        want.update({f"blk.{i}.attn_v.weight": big, f"blk.{i}.ffn_down.weight": big})
    with GGUFFile(path) as f:
        assert {t.name: t.ggml_type for t in f} == want
        assert f.get(Keys.FILE_TYPE) == LlamaFileType.MOSTLY_Q4_K_M == 15


@pytest.mark.parametrize("mix, base_fallback", [("q2_k", T.Q4_0), ("q3_k_s", T.Q4_0), ("q5_k_s", T.Q5_1)])
def test_fallback_of_each_base_type(mix, base_fallback):
    assert mix_type(mix, "blk.0.attn_q.weight", (64, 96), 8, 1) == base_fallback
    assert mix_type(mix, "blk.0.attn_q.weight", (64, 48), 8, 1) == T.F16  # not whole 32-blocks either
    assert mix_type(mix, "output.weight", (300, 48), 8, 1) == T.F16


# Layers that get Q6_K attn_v / ffn_down in q4_k_m and q5_k_m (use_more_bits), by hand.
MORE_BITS_LAYERS = {
    16: {0, 1, 4, 7, 10, 13, 14, 15},
    32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},  # llama-2-7b: 16 of 32
}


@pytest.mark.parametrize("n_layers", sorted(MORE_BITS_LAYERS))
def test_layer_rules_of_deeper_models(n_layers):
    layers = range(n_layers)
    got = {i for i in layers if mix_type("q4_k_m", f"blk.{i}.ffn_down.weight", (4096, 11008), n_layers, 1) == T.Q6_K}
    assert got == MORE_BITS_LAYERS[n_layers]
    got = {i for i in layers if mix_type("q5_k_m", f"blk.{i}.attn_v.weight", (4096, 4096), n_layers, 1) == T.Q6_K}
    assert got == MORE_BITS_LAYERS[n_layers]
    # q3_k_m: ffn_down Q5_K in the first n/16 layers; q4_k_s: ffn_down Q5_K in the first n/8
    assert [i for i in layers if mix_type("q3_k_m", f"blk.{i}.ffn_down.weight", (4096, 11008), n_layers, 1) == T.Q5_K] \
        == list(range(n_layers // 16))
    assert [i for i in layers if mix_type("q4_k_s", f"blk.{i}.ffn_down.weight", (4096, 11008), n_layers, 1) == T.Q5_K] \
        == list(range(n_layers // 8))
    assert mix_type("q2_k", "blk.5.attn_v.weight", (4096, 4096), n_layers, 1) == T.Q3_K  # no GQA


def test_70b_attn_v_bump():
    """80 layers with GQA (llama.cpp's 70B): attn_v that would be Q3_K or Q4_K is Q5_K; not for 65B (no GQA)."""
    v = lambda mix, i, gqa: mix_type(mix, f"blk.{i}.attn_v.weight", (1024, 8192), 80, gqa)  # noqa: E731
    assert v("q3_k_s", 40, 8) == T.Q5_K
    assert v("q2_k", 40, 8) == T.Q5_K  # Q4_K for n_gqa >= 4, then bumped
    assert v("q4_k_m", 11, 8) == T.Q5_K and v("q4_k_m", 12, 8) == T.Q6_K
    assert v("q5_k_s", 40, 8) == T.Q5_K
    assert v("q3_k_s", 40, 1) == T.Q3_K
    assert mix_type("q3_k_s", "blk.40.ffn_down.weight", (8192, 28672), 80, 8) == T.Q3_K


def test_tied_embeddings_take_the_output_type():
    assert mix_type("q4_k_m", "token_embd.weight", (32000, 4096), 32, 1, tied=True) == T.Q6_K
    assert mix_type("q4_k_m", "token_embd.weight", (32000, 4096), 32, 1) == T.Q4_K


def test_norms_stay_f32_and_unknown_mix_names_the_valid_ones():
    assert mix_type("q4_k_m", "blk.0.attn_norm.weight", (4096,), 32, 1) == T.F32
    with pytest.raises(ValueError, match="q4_k_m"):
        mix_type("q4_k_x", "output.weight", (300, 256), 8, 1)
    with pytest.raises(ValueError, match="q5_k_s"):
        synthetic.llama_metadata(SHAPE, "x", "q7_k")


def test_single_types_unchanged():
    meta = synthetic.llama_metadata(SHAPE, "x", T.Q4_K)
    assert meta[Keys.FILE_TYPE] == LlamaFileType.MOSTLY_Q4_K_S
    assert Keys.QUANTIZATION_VERSION not in synthetic.llama_metadata(SHAPE, "x", T.F16)


@pytest.mark.parametrize("arg, file_type, attn_v", [("q2_k", 10, T.F16), ("q2_k_mix", 10, T.Q4_0), ("q5_k_m", 17, T.Q5_1)])
def test_cli_takes_mixes_and_keeps_single_types(tmp_path, arg, file_type, attn_v):
    """tools/make_random_gguf.py: q2_k stays the single type (F16 where tiny's rows cannot be Q2_K),
    q2_k_mix is llama.cpp's Q2_K mix (attn_v Q3_K, falling back to Q4_0 on tiny)."""
    out = tmp_path / f"{arg}.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_random_gguf.py"), "tiny", arg, "-o", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    with GGUFFile(out) as f:
        assert f.get(Keys.FILE_TYPE) == file_type
        assert f.tensors["blk.0.attn_v.weight"].ggml_type == attn_v
