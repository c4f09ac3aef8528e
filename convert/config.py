"""config.json -> validated hyperparameters, the {arch}.* GGUF keys, shapes, and extra tensors.

Both config forms are read: transformers 4 (`rope_theta`, `rope_scaling`) and transformers 5
(`rope_parameters` = {"rope_type", "rope_theta", factor, ...}). Every field that changes the math
is either honoured or refused with a ConversionError naming it; none is silently dropped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyggml.gguf.constants import Keys, TensorNames
from pyggml.model.config import LIMITS

from .archs import ArchSpec, resolve_arch
from .errors import ConversionError

log = logging.getLogger(__name__)

__all__ = ["RopeSpec", "HParams", "hparams_from_config", "arch_metadata", "expected_shapes", "qk_heads", "rope_freqs"]

DEFAULT_ROPE_THETA = 10000.0  # transformers' default for every row
DEFAULT_RMS_EPS = 1e-6  # transformers' LlamaConfig / Qwen2Config / Qwen3Config default
SUPPORTED_ACT = "silu"  # SwiGLU FFN: the only activation llama.cpp's llama/qwen2/qwen3 graphs use
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Config fields no row honours: (key, values that are harmless). Present with another value -> error.
UNHONOURED = {
    "mlp_bias": (None, False),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "use_qk_norm": (None, False),
    "no_rope_layers": (None,),
}


@dataclass(frozen=True)
class RopeSpec:
    """RoPE as the file records it. `type` is "default", "linear" or "llama3"."""

    type: str
    theta: float
    factor: float | None = None  # linear and llama3
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_context: int | None = None  # llama3: original_max_position_embeddings


@dataclass(frozen=True)
class HParams:
    """The hyperparameters of a HF config.json that the GGUF file records."""

    hf_arch: str
    spec: ArchSpec
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_in_config: bool  # config states head_dim: llama.cpp then writes key_length/value_length
    n_ctx: int
    rope: RopeSpec
    rms_eps: float
    tied_embeddings: bool

    @property
    def arch(self) -> str:
        return self.spec.gguf_arch


# ------------------------------------------------------------------------------ typed field access
def _where(source: Path, key: str) -> str:
    return f"{source}: {key}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _bounded(value: float, key: str, source: Path, gguf_key: str | None) -> None:
    """The runtime's bound on the GGUF key a field becomes (model/config.py LIMITS), so that nothing is
    sized from a value no model has (and a file the runtime would refuse is never written)."""
    if gguf_key is None:
        return
    lo, hi = LIMITS[gguf_key]
    if not lo <= value <= hi:
        raise ConversionError(f"{_where(source, key)}: {value!r} is outside [{lo:g}, {hi:g}], the bound pyggml "
                              f"(and llama.cpp, for layers) puts on {gguf_key.format(arch='{arch}')}")


def _int(config: dict[str, Any], key: str, source: Path, default: int | None = None, positive: bool = True,
         bound: str | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{_where(source, key)} is missing; expected a positive integer")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # some configs write 4096.0
    if not isinstance(value, int) or isinstance(value, bool) or (positive and value <= 0):
        raise ConversionError(f"{_where(source, key)}: expected a positive integer, found {_shown(value)}")
    _bounded(value, key, source, bound)
    return value


def _float(config: dict[str, Any], key: str, source: Path, default: float | None = None,
           bound: str | None = None) -> float:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{_where(source, key)} is missing; expected a number")
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{_where(source, key)}: expected a positive number, found {_shown(value)}")
    _bounded(value, key, source, bound)
    return float(value)


def _bool(config: dict[str, Any], key: str, source: Path, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConversionError(f"{_where(source, key)}: expected true or false, found {value!r}")
    return value


# ------------------------------------------------------------------------------ RoPE
def _rope_params(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The merged RoPE parameters of either config form, keys as transformers 5 names them."""
    merged: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4, transformers 5
        part = config.get(key)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ConversionError(f"{_where(source, key)}: expected an object or null, found {part!r}")
        if "sliding_attention" in part:
            raise ConversionError(f"{_where(source, key)}: per-layer-type RoPE (sliding_attention) is not supported")
        part = part.get("full_attention", part)
        if not isinstance(part, dict):
            raise ConversionError(f"{_where(source, key)}.full_attention: expected an object, found {part!r}")
        for k, v in part.items():
            k = "rope_type" if k == "type" else k
            if k in merged and merged[k] != v:
                raise ConversionError(
                    f"{source}: rope_scaling and rope_parameters disagree on {k} ({merged[k]!r} vs {v!r})"
                )
            merged[k] = v
    if config.get("rope_theta") is not None:
        if "rope_theta" in merged and merged["rope_theta"] != config["rope_theta"]:
            raise ConversionError(
                f"{source}: rope_theta {config['rope_theta']!r} disagrees with rope_parameters.rope_theta "
                f"{merged['rope_theta']!r}"
            )
        merged["rope_theta"] = config["rope_theta"]
    if config.get("original_max_position_embeddings") is not None:  # as llama.cpp mirrors it
        merged.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    if merged.get("mrope_section") is not None:
        raise ConversionError(f"{source}: multimodal RoPE (mrope_section) is not supported")
    return merged


def _rope(config: dict[str, Any], spec: ArchSpec, source: Path) -> RopeSpec:
    params = _rope_params(config, source)
    name = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    theta = _float(params, "rope_theta", source, DEFAULT_ROPE_THETA, bound=Keys.ROPE_FREQ_BASE)
    rope_type = params.get("rope_type") or "default"
    if not isinstance(rope_type, str):
        raise ConversionError(f"{source}: {name}.rope_type: expected a string, found {rope_type!r}")
    rope_type = rope_type.lower()
    if rope_type not in spec.rope_types:
        raise ConversionError(
            f"{source}: {name} rope_type {rope_type!r} is not supported for {spec.gguf_arch} "
            f"(supported: {', '.join(sorted(spec.rope_types))}); converting would change the model's math"
        )
    prf = params.get("partial_rotary_factor")
    if prf is not None and prf != 1:
        raise ConversionError(f"{source}: {name}.partial_rotary_factor {prf!r} is not supported (only 1.0)")
    where = Path(f"{source}: {name}")
    if rope_type == "linear":
        return RopeSpec("linear", theta, factor=_float(params, "factor", where, bound=Keys.ROPE_SCALING_FACTOR))
    if rope_type == "llama3":
        for k in LLAMA3_KEYS:
            if params.get(k) is None:
                raise ConversionError(f"{source}: {name} of rope_type llama3 lacks {k}; needs {', '.join(LLAMA3_KEYS)}")
        low, high = _float(params, "low_freq_factor", where), _float(params, "high_freq_factor", where)
        if high <= low:
            raise ConversionError(f"{source}: {name}: high_freq_factor {high} must exceed low_freq_factor {low}")
        return RopeSpec("llama3", theta, factor=_float(params, "factor", where, bound=Keys.ROPE_SCALING_FACTOR), low_freq_factor=low,
                        high_freq_factor=high, original_context=_int(params, "original_max_position_embeddings", where,
                                                                   bound=Keys.CONTEXT_LENGTH))
    return RopeSpec("default", theta)


def rope_freqs(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """llama3 RoPE: the per-frequency factors llama.cpp stores as rope_freqs.weight, F32 (head_dim/2,).

    The formula of llama.cpp's LlamaModel.generate_extra_tensors (transformers'
    _compute_llama3_parameters): wavelengths shorter than original/high_freq_factor keep factor 1,
    longer than original/low_freq_factor get `factor`, those between are interpolated smoothly.
    Evaluated in float32 step by step as that torch code does (python scalars meet float32
    tensors; `x / tensor` is `reciprocal(tensor) * x`), so the bytes match up to torch's pow.
    """
    if rope.type != "llama3":
        raise ValueError(f"rope_freqs is for llama3 RoPE, not {rope.type!r}")
    f32 = np.float32
    freqs = f32(1) / (f32(rope.theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    old = rope.original_context
    low_wavelen, high_wavelen = f32(old / rope.low_freq_factor), f32(old / rope.high_freq_factor)
    factor, low, span = f32(rope.factor), f32(rope.low_freq_factor), f32(rope.high_freq_factor - rope.low_freq_factor)
    out = np.empty(len(freqs), f32)
    for i, freq in enumerate(freqs):
        wavelen = (f32(1) / freq) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out[i] = 1
        elif wavelen > low_wavelen:
            out[i] = factor
        else:
            smooth = ((f32(1) / wavelen) * f32(old) - low) / span
            out[i] = f32(1) / ((f32(1) - smooth) / factor + smooth)
    return out


# ------------------------------------------------------------------------------ the whole config
def _check_unhonoured(config: dict[str, Any], spec: ArchSpec, source: Path, n_ctx: int) -> None:
    for key in spec.false_flags:
        if _bool(config, key, source, False):
            raise ConversionError(
                f"{source}: {key}=true is not supported for {spec.gguf_arch}; converting would change the model's math"
            )
    for key, harmless in UNHONOURED.items():
        if key in config and config[key] not in harmless:
            raise ConversionError(
                f"{source}: {key}={config[key]!r} is not supported; converting would change the model's math"
            )
    act = config.get("hidden_act", SUPPORTED_ACT)
    if act != SUPPORTED_ACT:
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported (only {SUPPORTED_ACT!r}, SwiGLU)")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            raise ConversionError(f"{source}: layer_types {layer_types!r}: only full_attention layers are supported")
    window = config.get("sliding_window")
    if spec.sliding_window == "vs_context" and window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ConversionError(f"{source}: sliding_window: expected a positive integer or null, found {window!r}")
        if window < n_ctx:
            raise ConversionError(
                f"{source}: sliding_window {window} is smaller than max_position_embeddings {n_ctx}; "
                f"llama.cpp's {spec.gguf_arch} attends over the whole context, so the model would compute "
                f"differently past {window} tokens (lower max_position_embeddings to {window} to convert it)"
            )
        log.info("%s: sliding_window %d >= context %d: no token is ever outside the window; not recorded",
                 source, window, n_ctx)


def hparams_from_config(config: dict[str, Any], source: Path) -> HParams:
    """Validate config.json (already parsed) against its architecture's row; take the hyperparameters."""
    hf_arch, spec = resolve_arch(config, source)
    n_embd = _int(config, "hidden_size", source, bound=Keys.EMBEDDING_LENGTH)
    n_head = _int(config, "num_attention_heads", source, bound=Keys.HEAD_COUNT)
    n_head_kv = _int(config, "num_key_value_heads", source, default=n_head, bound=Keys.HEAD_COUNT_KV)
    n_ctx = _int(config, "max_position_embeddings", source, bound=Keys.CONTEXT_LENGTH)
    head_dim_in_config = config.get("head_dim") is not None
    if spec.head_dim_required and not head_dim_in_config:
        raise ConversionError(f"{_where(source, 'head_dim')} is missing; {hf_arch} needs it stated")
    if not head_dim_in_config and n_embd % n_head:
        raise ConversionError(f"{source}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    head_dim = _int(config, "head_dim", source, default=n_embd // n_head, bound=Keys.KEY_LENGTH)
    if n_head % n_head_kv or head_dim % 2:
        raise ConversionError(
            f"{source}: num_attention_heads {n_head} must be a multiple of num_key_value_heads {n_head_kv}, "
            f"and head_dim {head_dim} even"
        )
    _check_unhonoured(config, spec, source, n_ctx)
    return HParams(
        hf_arch=hf_arch,
        spec=spec,
        n_vocab=_int(config, "vocab_size", source, bound=Keys.VOCAB_SIZE),
        n_embd=n_embd,
        n_layer=_int(config, "num_hidden_layers", source, bound=Keys.BLOCK_COUNT),
        n_ff=_int(config, "intermediate_size", source, bound=Keys.FEED_FORWARD_LENGTH),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_in_config=head_dim_in_config,
        n_ctx=n_ctx,
        rope=_rope(config, spec, source),
        rms_eps=_float(config, "rms_norm_eps", source, DEFAULT_RMS_EPS, bound=Keys.RMS_EPS),
        tied_embeddings=_bool(config, "tie_word_embeddings", source, False),
    )


def arch_metadata(hp: HParams) -> dict[str, object]:
    """The {arch}.* keys of the GGUF file, in the order llama.cpp's converter writes them."""
    a, spec = hp.arch, hp.spec
    k = lambda key: Keys.arch(key, a)  # noqa: E731
    meta: dict[str, object] = {
        k(Keys.BLOCK_COUNT): hp.n_layer,
        k(Keys.CONTEXT_LENGTH): hp.n_ctx,
        k(Keys.EMBEDDING_LENGTH): hp.n_embd,
        k(Keys.FEED_FORWARD_LENGTH): hp.n_ff,
        k(Keys.HEAD_COUNT): hp.n_head,
        k(Keys.HEAD_COUNT_KV): hp.n_head_kv,
    }
    if hp.rope.type == "linear":
        meta[k(Keys.ROPE_SCALING_TYPE)] = "linear"
        meta[k(Keys.ROPE_SCALING_FACTOR)] = hp.rope.factor
    meta[k(Keys.ROPE_FREQ_BASE)] = hp.rope.theta
    meta[k(Keys.RMS_EPS)] = hp.rms_eps
    if spec.key_length == "always" or hp.head_dim_in_config:
        meta[k(Keys.KEY_LENGTH)] = hp.head_dim
        meta[k(Keys.VALUE_LENGTH)] = hp.head_dim
    if spec.vocab_size_key:
        meta[k(Keys.VOCAB_SIZE)] = hp.n_vocab
    if spec.rope_dimension_count:
        meta[k(Keys.ROPE_DIMENSION_COUNT)] = hp.head_dim
    return meta


def expected_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a file of these hyperparameters holds from the checkpoint, numpy shapes, in order."""
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shape_of = {
        TensorNames.ATTN_NORM: (hp.n_embd,),
        TensorNames.ATTN_Q: (q_dim, hp.n_embd),
        TensorNames.ATTN_K: (kv_dim, hp.n_embd),
        TensorNames.ATTN_V: (kv_dim, hp.n_embd),
        TensorNames.ATTN_OUTPUT: (hp.n_embd, q_dim),
        TensorNames.ATTN_Q_BIAS: (q_dim,),
        TensorNames.ATTN_K_BIAS: (kv_dim,),
        TensorNames.ATTN_V_BIAS: (kv_dim,),
        TensorNames.ATTN_Q_NORM: (hp.head_dim,),
        TensorNames.ATTN_K_NORM: (hp.head_dim,),
        TensorNames.FFN_NORM: (hp.n_embd,),
        TensorNames.FFN_GATE: (hp.n_ff, hp.n_embd),
        TensorNames.FFN_UP: (hp.n_ff, hp.n_embd),
        TensorNames.FFN_DOWN: (hp.n_embd, hp.n_ff),
    }
    shapes = {TensorNames.TOKEN_EMBD: (hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layer):
        shapes.update({name.format(i=i): shape_of[name] for name in hp.spec.block_tensors.values()})
    shapes[TensorNames.OUTPUT_NORM] = (hp.n_embd,)
    shapes[TensorNames.OUTPUT] = (hp.n_vocab, hp.n_embd)
    return shapes


def qk_heads(hp: HParams) -> dict[str, int]:
    """GGUF tensors whose rows `permute_qk` reorders, with the head count to use (k: n_head_kv).
    Empty for architectures run with NeoX RoPE (their HF row order is already right)."""
    if not hp.spec.permute_qk:
        return {}
    heads = {TensorNames.ATTN_Q.format(i=i): hp.n_head for i in range(hp.n_layer)}
    heads.update({TensorNames.ATTN_K.format(i=i): hp.n_head_kv for i in range(hp.n_layer)})
    return heads
