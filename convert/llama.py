"""HF LLaMA/Mistral -> GGUF llama: config keys, tensor names, and the Q/K row permutation.

The HF tensor names live here and nowhere else; pyggml's own names are the GGUF names
(pyggml.gguf.constants.TensorNames).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyggml.gguf.constants import Keys, TensorNames

from .errors import ConversionError

log = logging.getLogger(__name__)

__all__ = [
    "ARCH", "SUPPORTED_ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "HParams", "check_architecture", "hparams_from_config",
    "llama_metadata", "gguf_name", "expected_shapes", "qk_heads", "permute_qk", "unpermute_qk",
]  # fmt: skip

ARCH = "llama"  # general.architecture of everything this module converts
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
DEFAULT_ROPE_THETA = 10000.0  # transformers' LlamaConfig default
DEFAULT_RMS_EPS = 1e-6  # transformers' LlamaConfig default

# HF tensor names outside the blocks, and inside block i (after "model.layers.{i}.").
HF_GLOBAL = {
    "model.embed_tokens.weight": TensorNames.TOKEN_EMBD,
    "model.norm.weight": TensorNames.OUTPUT_NORM,
    "lm_head.weight": TensorNames.OUTPUT,
}
HF_BLOCK = {
    "input_layernorm.weight": TensorNames.ATTN_NORM,
    "self_attn.q_proj.weight": TensorNames.ATTN_Q,
    "self_attn.k_proj.weight": TensorNames.ATTN_K,
    "self_attn.v_proj.weight": TensorNames.ATTN_V,
    "self_attn.o_proj.weight": TensorNames.ATTN_OUTPUT,
    "post_attention_layernorm.weight": TensorNames.FFN_NORM,
    "mlp.gate_proj.weight": TensorNames.FFN_GATE,
    "mlp.up_proj.weight": TensorNames.FFN_UP,
    "mlp.down_proj.weight": TensorNames.FFN_DOWN,
}
HF_BLOCK_PREFIX = re.compile(r"model\.layers\.(\d+)\.(.+)")
HF_SKIPPED_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)  # buffers recomputed at run time


@dataclass(frozen=True)
class HParams:
    """The hyperparameters of a HF LLaMA config.json that the GGUF file records."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool


def _require(config: dict[str, Any], key: str, source: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(f"{source}: expected a positive integer {key!r}, found {value!r}")
    return value


def check_architecture(config: dict[str, Any], source: Path) -> None:
    """Raise unless config.json describes a LLaMA-architecture causal LM."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if any(a in SUPPORTED_ARCHITECTURES for a in archs) or model_type in SUPPORTED_MODEL_TYPES:
        return
    raise ConversionError(
        f"{source}: unsupported architecture {archs or None} (model_type {model_type!r}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type {' or '.join(SUPPORTED_MODEL_TYPES)})"
    )


def hparams_from_config(config: dict[str, Any], source: Path) -> HParams:
    """Validate config.json (already parsed) and take the llama hyperparameters from it."""
    check_architecture(config, source)
    if config.get("rope_scaling"):
        raise ConversionError(
            f"{source}: rope_scaling {config['rope_scaling']!r} is not supported; "
            f"only plain RoPE (rope_scaling null) converts correctly"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{source}: {flag}=true is not supported (llama GGUF files have no biases)")
    n_embd = _require(config, "hidden_size", source)
    n_head = _require(config, "num_attention_heads", source)
    n_head_kv = _require(config, "num_key_value_heads", source) if config.get("num_key_value_heads") is not None else n_head
    head_dim = _require(config, "head_dim", source) if config.get("head_dim") is not None else n_embd // n_head
    if n_head % n_head_kv or head_dim % 2:
        raise ConversionError(
            f"{source}: num_attention_heads {n_head} must be a multiple of num_key_value_heads {n_head_kv}, "
            f"and head_dim {head_dim} even"
        )
    if head_dim * n_head != n_embd:
        raise ConversionError(
            f"{source}: head_dim {head_dim} x num_attention_heads {n_head} != hidden_size {n_embd}; "
            f"llama GGUF files need head_dim = hidden_size / num_attention_heads"
        )
    if config.get("sliding_window"):
        log.warning("%s: sliding_window=%s is not recorded; attention will span the whole context",
                    source, config["sliding_window"])
    return HParams(
        n_vocab=_require(config, "vocab_size", source),
        n_embd=n_embd,
        n_layer=_require(config, "num_hidden_layers", source),
        n_ff=_require(config, "intermediate_size", source),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=_require(config, "max_position_embeddings", source),
        rope_theta=float(config.get("rope_theta") or DEFAULT_ROPE_THETA),
        rms_eps=float(config.get("rms_norm_eps") or DEFAULT_RMS_EPS),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def llama_metadata(hp: HParams) -> dict[str, object]:
    """The llama.* keys of the GGUF file."""
    return {
        Keys.arch(Keys.CONTEXT_LENGTH, ARCH): hp.n_ctx,
        Keys.arch(Keys.EMBEDDING_LENGTH, ARCH): hp.n_embd,
        Keys.arch(Keys.BLOCK_COUNT, ARCH): hp.n_layer,
        Keys.arch(Keys.FEED_FORWARD_LENGTH, ARCH): hp.n_ff,
        Keys.arch(Keys.HEAD_COUNT, ARCH): hp.n_head,
        Keys.arch(Keys.HEAD_COUNT_KV, ARCH): hp.n_head_kv,
        Keys.arch(Keys.ROPE_DIMENSION_COUNT, ARCH): hp.head_dim,
        Keys.arch(Keys.ROPE_FREQ_BASE, ARCH): hp.rope_theta,
        Keys.arch(Keys.RMS_EPS, ARCH): hp.rms_eps,
        Keys.arch(Keys.VOCAB_SIZE, ARCH): hp.n_vocab,
    }


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a HF tensor; None for tensors that are dropped; ConversionError if unknown."""
    if hf_name in HF_GLOBAL:
        return HF_GLOBAL[hf_name]
    m = HF_BLOCK_PREFIX.fullmatch(hf_name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        if suffix in HF_BLOCK:
            return HF_BLOCK[suffix].format(i=i)
        if suffix in HF_SKIPPED_SUFFIXES:
            return None
    raise ConversionError(f"tensor {hf_name!r} has no GGUF llama equivalent (is this a LLaMA checkpoint?)")


def expected_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a llama file of these hyperparameters holds, with its numpy shape."""
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    per_block = {
        TensorNames.ATTN_NORM: (hp.n_embd,),
        TensorNames.ATTN_Q: (q_dim, hp.n_embd),
        TensorNames.ATTN_K: (kv_dim, hp.n_embd),
        TensorNames.ATTN_V: (kv_dim, hp.n_embd),
        TensorNames.ATTN_OUTPUT: (hp.n_embd, q_dim),
        TensorNames.FFN_NORM: (hp.n_embd,),
        TensorNames.FFN_GATE: (hp.n_ff, hp.n_embd),
        TensorNames.FFN_UP: (hp.n_ff, hp.n_embd),
        TensorNames.FFN_DOWN: (hp.n_embd, hp.n_ff),
    }
    shapes = {TensorNames.TOKEN_EMBD: (hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layer):
        shapes.update({name.format(i=i): shape for name, shape in per_block.items()})
    shapes[TensorNames.OUTPUT_NORM] = (hp.n_embd,)
    shapes[TensorNames.OUTPUT] = (hp.n_vocab, hp.n_embd)
    return shapes


def qk_heads(hp: HParams) -> dict[str, int]:
    """GGUF tensors whose rows `permute_qk` reorders, with the head count to use (k: n_head_kv)."""
    heads = {TensorNames.ATTN_Q.format(i=i): hp.n_head for i in range(hp.n_layer)}
    heads.update({TensorNames.ATTN_K.format(i=i): hp.n_head_kv for i in range(hp.n_layer)})
    return heads


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
