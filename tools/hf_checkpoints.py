"""Tiny HF checkpoints for tools/fuzz_convert.py: safetensors written by hand and the three base
checkpoints (SentencePiece shards with an index, byte-level BPE, qwen2) the mutations start from."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ safetensors by hand
Tensors = dict[str, tuple[str, bytes, list]]  # name -> (safetensors dtype, raw data, shape)


def write_safetensors(path: Path, tensors: Tensors, metadata=None, cut: int = 0) -> None:
    """A safetensors file, data laid out in order; `cut` drops that many bytes off the end."""
    header, pos = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, raw, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    data = b"".join(raw for _, raw, _ in tensors.values())
    write_raw_safetensors(path, json.dumps(header).encode(), data[: len(data) - cut])


def write_raw_safetensors(path: Path, head: bytes, data: bytes) -> None:
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def regular(path: Path) -> Path:
    """`path`, if a mutation left a regular file there; else FileNotFoundError (a FIFO would block this
    process forever, and a symlink could lead out of the case's folder)."""
    if path.is_symlink() or not path.is_file():
        raise FileNotFoundError(f"{path} is not a regular file")
    return path


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data section) of a file this tool wrote."""
    raw = regular(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def read_tensors(path: Path) -> tuple[object, Tensors]:
    """(__metadata__, tensors) of a file this tool wrote."""
    header, data = read_safetensors(path)
    meta = header.pop("__metadata__", None)
    return meta, {n: (e["dtype"], data[e["data_offsets"][0] : e["data_offsets"][1]], e["shape"]) for n, e in header.items()}


# ------------------------------------------------------------------------------ base checkpoints
DIM, FF, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2
COMMON = dict(hidden_size=DIM, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu")


def spm_source() -> Path | None:
    """A directory with stories260K's tokenizer.model: PYGGML_TEST_MODELS's, else the repository's."""
    models = Path(os.environ.get("PYGGML_TEST_MODELS", REPO.parent / "shared" / "models"))
    for d in (models / "stories260K-hf", REPO / "models" / "stories260K"):
        if (d / "tokenizer.model").is_file():
            return d
    return None


def hf_shapes(c: dict, tied: bool | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors of a LLaMA-family HF checkpoint of config c (llama, mistral, qwen2 biases, qwen3 Q/K
    norms): name -> shape. tied: no lm_head (default: c's tie_word_embeddings). tests/test_convert_archs.py
    builds its checkpoints with it too."""
    d, f, n_vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    qwen2, qwen3 = c.get("model_type") == "qwen2", c.get("model_type") == "qwen3"
    shapes = {"model.embed_tokens.weight": (n_vocab, d), "model.norm.weight": (d,)}
    if not (c.get("tie_word_embeddings", False) if tied is None else tied):
        shapes["lm_head.weight"] = (n_vocab, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
        if qwen2:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if qwen3:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], rng) -> Tensors:
    """Norms and biases F32, the embedding F16, matrices BF16 (as bits)."""
    out = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        if len(shape) == 1:
            out[name] = ("F32", w.tobytes(), list(shape))
        elif name == "model.embed_tokens.weight":
            out[name] = ("F16", w.astype(np.float16).tobytes(), list(shape))
        else:
            out[name] = ("BF16", (w.view(np.uint32) >> 16).astype(np.uint16).tobytes(), list(shape))
    return out


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map, by byte value: what byte-level BPE vocabularies hold."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted, chars = 0, {}
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


BPE_WORDS = ("Ġt", "Ġa", "he", "in", "th", "er", "on", "an", "re", "Ġo", "ou", "Ġs", "ed", "nd", "Ġw",
             "ing", "Ġthe", "Ġand", "Ġon", "the")
BPE_ADDED = (("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|eot_id|>", True), ("<tool>", False))


def bpe_tokenizer(pre: str) -> tuple[dict, int]:
    """A byte-level BPE tokenizer.json (llama-bpe or qwen2 pre-tokenizer) and its vocabulary size."""
    from pyggml.convert.tokenizer_bpe import LLAMA3_RE, QWEN2_RE

    vocab = {c: i for i, c in enumerate(byte_chars())}
    merges = []
    for word in BPE_WORDS:
        for cut in range(1, len(word)):
            a, b = word[:cut], word[cut:]
            if a in vocab and b in vocab:
                merges.append(f"{a} {b}")
                vocab[word] = len(vocab)
                break
    added = [{"id": len(vocab) + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": not special, "special": special} for k, (t, special) in enumerate(BPE_ADDED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    regex = LLAMA3_RE if pre == "llama-bpe" else QWEN2_RE
    post = {**byte_level, "trim_offsets": False}
    if pre == "llama-bpe":
        bos = BPE_ADDED[0][0]
        post = {"type": "Sequence", "processors": [post, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [len(vocab)], "tokens": [bos]}}}]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges},
    }
    return tokenizer, len(vocab) + len(added) + 3  # three [PAD] holes at the end


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def build_llama_spm(d: Path, spm: Path, rng) -> None:
    """Two shards + index, SentencePiece tokenizer.model (512 pieces) padded to 520 with one named added token."""
    d.mkdir(parents=True)
    config = dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=520, rope_theta=10000.0,
                  rope_scaling=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    write_json(d / "config.json", config)
    shutil.copyfile(spm / "tokenizer.model", d / "tokenizer.model")
    if (spm / "tokenizer.json").is_file():  # the HF fast tokenizer real llama repos ship beside it
        shutil.copyfile(spm / "tokenizer.json", d / "tokenizer.json")
    write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "added_tokens_decoder": {"512": {"content": "<|im_end|>", "special": True}},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    write_json(d / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    tensors = random_tensors(hf_shapes(config), rng)
    first = {n: t for n, t in tensors.items() if t[0] != "BF16"}
    second = {n: t for n, t in tensors.items() if t[0] == "BF16"}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    write_safetensors(d / names[0], first, metadata={"format": "pt"})
    write_safetensors(d / names[1], second, metadata={"format": "pt"})
    weight_map = {n: names[0] for n in first} | {n: names[1] for n in second}
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})


def build_bpe(d: Path, kind: str, rng) -> None:
    """One model.safetensors and a byte-level BPE tokenizer.json: 'llama3' (llama3 RoPE, tied) or 'qwen2'."""
    d.mkdir(parents=True)
    tokenizer, n_vocab = bpe_tokenizer("llama-bpe" if kind == "llama3" else "qwen2")
    n_base = len(tokenizer["model"]["vocab"])
    if kind == "llama3":
        config = dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=n_vocab,
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=n_base, eos_token_id=n_base + 2,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    else:
        config = dict(COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=n_vocab,
                      rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, sliding_window=4096)
    write_json(d / "config.json", config)
    write_json(d / "tokenizer.json", tokenizer)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    tok_config = {"bos_token": "<|begin_of_text|>" if kind == "llama3" else None, "eos_token": "<|eot_id|>",
                  "add_bos_token": kind == "llama3", "pad_token": "<|end_of_text|>"}
    if kind == "llama3":
        tok_config["chat_template"] = template
    else:  # newer checkpoints keep the template in a file of its own
        (d / "chat_template.jinja").write_text(template)
    write_json(d / "tokenizer_config.json", tok_config)
    write_json(d / "generation_config.json", {"bos_token_id": n_base, "eos_token_id": [n_base + 1, n_base + 2]})
    tensors = random_tensors(hf_shapes(config), rng)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = ("F32", np.ones(DIM // HEADS // 2, np.float32).tobytes(),
                                                               [DIM // HEADS // 2])
    write_safetensors(d / "model.safetensors", tensors)


def build_bases(folder: Path) -> list[Path]:
    """The valid checkpoints every mutant starts from."""
    rng = np.random.default_rng(0)
    bases = []
    spm = spm_source()
    if spm is not None:
        bases.append(folder / "llama-spm")
        build_llama_spm(bases[-1], spm, rng)
    for kind in ("llama3", "qwen2"):
        bases.append(folder / f"{kind}-bpe")
        build_bpe(bases[-1], kind, rng)
    return bases

