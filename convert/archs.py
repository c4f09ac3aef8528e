"""The HF architectures the converter knows, one table row each, and what the rows imply.

Everything that differs between LLaMA-family architectures is data in `ARCHS`: the GGUF
architecture name, the tensor-name map (biases and per-head norms included), whether q/k rows
are permuted, which config.json keys are read and which keys the GGUF file gets. The HF tensor
names live here and nowhere else; pyggml's own names are the GGUF names (TensorNames).
Facts follow llama.cpp's convert_hf_to_gguf.py (LlamaModel, Qwen2Model, Qwen3Model) and
src/llama-arch.cpp.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from pyggml.gguf.constants import TensorNames as T

from .errors import ConversionError

__all__ = [
    "ArchSpec", "ARCHS", "COMMON_CONFIG_KEYS", "resolve_arch", "gguf_name", "permute_qk", "unpermute_qk",
]  # fmt: skip

# config.json keys every architecture reads (each validated in config.py).
COMMON_CONFIG_KEYS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings", "hidden_act",
    "layer_types", "mlp_bias", "attn_logit_softcapping", "final_logit_softcapping", "logit_scale",
)  # fmt: skip  (config.UNHONOURED lists every key refused when set to a value that changes the math)

# The tensors of one block every architecture has: HF name after "model.layers.{i}." -> GGUF name.
_BLOCK = {
    "input_layernorm.weight": T.ATTN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q,
    "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUTPUT,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP,
    "mlp.down_proj.weight": T.FFN_DOWN,
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": T.ATTN_Q_BIAS,
    "self_attn.k_proj.bias": T.ATTN_K_BIAS,
    "self_attn.v_proj.bias": T.ATTN_V_BIAS,
}
_QK_NORM = {
    "self_attn.q_norm.weight": T.ATTN_Q_NORM,
    "self_attn.k_norm.weight": T.ATTN_K_NORM,
}
# Outside the blocks (the same for every row).
HF_GLOBAL = {
    "model.embed_tokens.weight": T.TOKEN_EMBD,
    "model.norm.weight": T.OUTPUT_NORM,
    "lm_head.weight": T.OUTPUT,
}
# ASCII digits, at most 9: a longer index is no layer of any model (and int() refuses 4300 digits).
HF_BLOCK_PREFIX = re.compile(r"model\.layers\.([0-9]{1,9})\.(.+)")
HF_SKIPPED_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)  # buffers recomputed at run time


@dataclass(frozen=True)
class ArchSpec:
    """What one HF architecture converts to. See ARCHS for the rows."""

    gguf_arch: str  # general.architecture
    model_types: tuple[str, ...]  # config.json model_type values that mean this row
    block_tensors: Mapping[str, str]  # HF name under model.layers.{i}. -> GGUF name template ({i})
    permute_qk: bool  # HF rotate-half q/k rows -> ggml adjacent-pair order (llama); NeoX-RoPE archs keep HF order
    rope_types: frozenset[str]  # rope types honoured ("default" = plain RoPE); any other is refused
    head_dim_required: bool  # config must state head_dim (its transformers default is not hidden/heads)
    key_length: str  # when {arch}.attention.key_length/value_length are written: "if_in_config" | "always"
    rope_dimension_count: bool  # writes {arch}.rope.dimension_count
    vocab_size_key: bool  # writes {arch}.vocab_size
    sliding_window: str  # "vs_context": sliding_window < context is refused (llama.cpp ignores the key);
    #                      "use_flag": refused when use_sliding_window is true, ignored otherwise
    false_flags: tuple[str, ...]  # boolean config keys this row cannot honour when true
    add_prefix_space_key: bool  # tokenizer_config add_prefix_space -> tokenizer.ggml.add_space_prefix
    config_keys: tuple[str, ...]  # config.json keys read beyond COMMON_CONFIG_KEYS


LLAMA = ArchSpec(
    gguf_arch="llama",
    model_types=("llama",),
    block_tensors=MappingProxyType(dict(_BLOCK)),
    permute_qk=True,
    rope_types=frozenset({"default", "linear", "llama3"}),
    head_dim_required=False,
    key_length="if_in_config",
    rope_dimension_count=True,
    vocab_size_key=True,
    sliding_window="vs_context",
    false_flags=("attention_bias",),
    add_prefix_space_key=True,
    config_keys=("attention_bias", "sliding_window"),
)
QWEN2 = ArchSpec(
    gguf_arch="qwen2",
    model_types=("qwen2",),
    block_tensors=MappingProxyType(_BLOCK | _QKV_BIAS),
    permute_qk=False,
    rope_types=frozenset({"default", "linear"}),
    head_dim_required=False,
    key_length="if_in_config",
    rope_dimension_count=False,
    vocab_size_key=False,
    sliding_window="use_flag",
    false_flags=("use_sliding_window",),
    add_prefix_space_key=False,
    config_keys=("use_sliding_window", "sliding_window"),
)
QWEN3 = replace(
    QWEN2,
    gguf_arch="qwen3",
    model_types=("qwen3",),
    block_tensors=MappingProxyType(_BLOCK | _QK_NORM),
    head_dim_required=True,
    key_length="always",
    false_flags=("use_sliding_window", "attention_bias"),
    config_keys=("use_sliding_window", "sliding_window", "attention_bias"),
)

# HF architecture (config.json "architectures") -> its row.
ARCHS: Mapping[str, ArchSpec] = MappingProxyType({
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": replace(LLAMA, model_types=("mistral",)),
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
})  # fmt: skip


def resolve_arch(config: dict[str, Any], source: Path) -> tuple[str, ArchSpec]:
    """The (HF architecture, row) config.json describes: by "architectures", else by model_type."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConversionError(f"{source}: expected \"architectures\" to be a list of strings, found {archs!r}")
    for a in archs or ():
        if a in ARCHS:
            return a, ARCHS[a]
    model_type = config.get("model_type")
    if not archs:
        for a, spec in ARCHS.items():
            if model_type in spec.model_types:
                return a, spec
    raise ConversionError(
        f"{source}: unsupported architecture {archs or None} (model_type {model_type!r}); supported: "
        + ", ".join(f"{a} (model_type {s.model_types[0]})" for a, s in ARCHS.items())
    )


def gguf_name(hf_name: str, spec: ArchSpec) -> str | None:
    """The GGUF name of a HF tensor; None for tensors that are dropped; ConversionError if unknown."""
    if hf_name in HF_GLOBAL:
        return HF_GLOBAL[hf_name]
    m = HF_BLOCK_PREFIX.fullmatch(hf_name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        if suffix in spec.block_tensors:
            return spec.block_tensors[suffix].format(i=i)
        if suffix in HF_SKIPPED_SUFFIXES:
            return None
    shown = repr(hf_name) if len(hf_name) <= 120 else f"{hf_name[:60]!r}... ({len(hf_name):,} characters)"
    raise ConversionError(
        f"tensor {shown} has no GGUF {spec.gguf_arch} equivalent "
        f"(is this a {'/'.join(a for a, s in ARCHS.items() if s is spec) or spec.gguf_arch} checkpoint?)"
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF adjacent-pair row order, per head.

    Within each head, HF rotates row j with row j + head_dim/2; GGUF rotates rows 2j and 2j+1.
    Works on weights (rows, cols) and on vectors (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`: GGUF adjacent-pair row order -> HF rotate-half order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
