"""HF LLaMA-family directory (config.json, safetensors, tokenizer) -> one GGUF file.

Everything is checked before the first byte is written (files present, architecture known and
every config field honoured, every tensor mapped with the shape config.json implies); then
tensors stream one at a time from memory-mapped safetensors through permutation and conversion
into the writer, which renames its temp file into place only on success. What differs between
architectures is a row of archs.ARCHS; this module has no per-architecture branches.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from pyggml.gguf.constants import FILE_TYPE_OF, QUANTIZATION_VERSION, QUANTIZED_TYPES, GGMLType, Keys, TensorNames
from pyggml.gguf.writer import TensorPlan, write_gguf
from pyggml.quantize import FALLBACK_TYPE, stored_type

from .archs import gguf_name, permute_qk
from .config import HParams, arch_metadata, expected_shapes, hparams_from_config, qk_heads, rope_freqs
from .errors import ConversionError, read_json_object
from .safetensors_io import LOADABLE, LazyTensor, open_checkpoint
from .tokenizer import TOKENIZER_FILE, tokenizer_metadata
from .tokenizer_bpe import TOKENIZER_JSON, bpe_tokenizer_metadata

log = logging.getLogger(__name__)

__all__ = ["OUTTYPES", "ConversionPlan", "Fallback", "plan_conversion", "convert_hf_to_gguf", "default_output_path"]

CONFIG_FILE = "config.json"
HF_DIR_SUFFIX = "-hf"  # stripped from the directory name to name the model: stories260K-hf -> stories260K
# Types the converter writes, by their command-line names.
OUTTYPES: dict[str, GGMLType] = {t.name.lower(): t for t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0)}


@dataclass(frozen=True)
class Fallback:
    """A tensor stored in another type than asked for, and why."""

    name: str
    wanted: GGMLType
    used: GGMLType
    reason: str


@dataclass(frozen=True)
class ConversionPlan:
    """Everything write_gguf needs, decided up front; nothing is loaded yet."""

    metadata: dict[str, object]
    tensors: list[TensorPlan]
    fallbacks: list[Fallback]


def model_name(model_dir: Path) -> str:
    """general.name: the directory's name without a trailing '-hf'."""
    name = model_dir.resolve().name
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a directory name that is not UTF-8
    return name[: -len(HF_DIR_SUFFIX)] if name.endswith(HF_DIR_SUFFIX) and len(name) > len(HF_DIR_SUFFIX) else name


def default_output_path(model_dir: str | os.PathLike, outtype: str) -> Path:
    """<model name>-<outtype>.gguf in the current directory, e.g. stories260K-hf -> stories260K-f16.gguf."""
    return Path.cwd() / f"{model_name(Path(model_dir))}-{outtype.lower()}.gguf"


def parse_outtype(outtype: str) -> GGMLType:
    try:
        return OUTTYPES[outtype.lower()]
    except KeyError:
        raise ConversionError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}") from None


def _map_tensors(checkpoint: dict[str, LazyTensor], hp: HParams, model_dir: Path) -> dict[str, LazyTensor]:
    """GGUF name -> source tensor, in GGUF order, with every shape checked against config.json."""
    shapes = expected_shapes(hp)
    found: dict[str, LazyTensor] = {}
    for hf_name, src in checkpoint.items():
        name = gguf_name(hf_name, hp.spec)
        if name is None:
            continue
        if name in found:  # e.g. model.layers.1.* and model.layers.01.*: which one is meant?
            raise ConversionError(
                f"{src.path}: tensors {found[name].name!r} ({found[name].path.name}) and {hf_name!r} both map to {name}"
            )
        if name not in shapes:
            raise ConversionError(
                f"{src.path}: tensor {hf_name!r} ({name}) is beyond the {hp.n_layer} layers of {CONFIG_FILE}"
            )
        if src.shape != shapes[name]:
            raise ConversionError(
                f"{src.path}: tensor {hf_name!r} has shape {list(src.shape)}; {CONFIG_FILE} implies {list(shapes[name])}"
            )
        if src.dtype not in LOADABLE:
            raise ConversionError(
                f"{src.path}: tensor {hf_name!r} has dtype {src.dtype}; only {', '.join(LOADABLE)} weights convert"
            )
        found[name] = src
    if TensorNames.OUTPUT in found and hp.tied_embeddings:
        del found[TensorNames.OUTPUT]  # a tied copy of token_embd: the runtime reuses token_embd
    missing = [n for n in shapes if n not in found and n != TensorNames.OUTPUT]
    if missing:
        raise ConversionError(
            f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) a {hp.n_layer}-layer {hp.arch} needs, "
            f"e.g. {', '.join(missing[:4])}"
        )
    if TensorNames.OUTPUT not in found:
        log.info("%s: no separate lm_head: output is tied to %s", model_dir, TensorNames.TOKEN_EMBD)
    return {n: found[n] for n in shapes if n in found}


def _stored_type(shape: tuple[int, ...], outtype: GGMLType) -> tuple[GGMLType, str | None]:
    """The type a tensor is stored as, and why it differs from `outtype` when it does."""
    used = stored_type(shape, outtype)
    if used is outtype or len(shape) < 2:
        return used, None
    return used, f"row length {shape[-1]} does not fill whole {outtype.name} blocks"


def _vocab_metadata(model_dir: Path, hp: HParams, config: dict) -> dict[str, object]:
    """tokenizer.* keys: SentencePiece tokenizer.model when there is one (as llama.cpp prefers), else
    a byte-level BPE tokenizer.json."""
    if (model_dir / TOKENIZER_FILE).is_file():
        return tokenizer_metadata(model_dir, hp.n_vocab, config)
    if (model_dir / TOKENIZER_JSON).is_file():
        return bpe_tokenizer_metadata(model_dir, hp.n_vocab, config, add_prefix_space_key=hp.spec.add_prefix_space_key)
    found = sorted(p.name for p in model_dir.glob("tokenizer*"))
    raise ConversionError(
        f"{model_dir}: no tokenizer: expected a SentencePiece {TOKENIZER_FILE} or a byte-level BPE {TOKENIZER_JSON}"
        + (f" (found {', '.join(found)})" if found else "")
    )


# Where each text-valued key's strings come from, for the error that finds one not encodable as UTF-8.
TEXT_SOURCES = {
    Keys.TOKENS: "tokenizer.json / tokenizer_config.json added tokens",
    Keys.MERGES: "tokenizer.json model.merges",
    Keys.CHAT_TEMPLATE: "tokenizer_config.json chat_template",
}


def _check_text(metadata: dict[str, object], model_dir: Path) -> None:
    """Every string the file will hold encodes as UTF-8: JSON may spell a lone surrogate (\\ud800), which
    Python reads into a str that GGUF (UTF-8) cannot hold."""
    for key, value in metadata.items():
        strings = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for i, text in enumerate(strings):
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                at = f"{key}[{i}]" if isinstance(value, list) else key
                raise ConversionError(
                    f"{model_dir}: {at} {text[:40]!r} is not valid Unicode ({e.reason}: a lone surrogate escape "
                    f"in a JSON string?); it comes from {TEXT_SOURCES.get(key, 'the checkpoint files')}"
                ) from None


def _extra_tensors(hp: HParams) -> list[TensorPlan]:
    """Tensors computed from config.json rather than read: llama3 RoPE's rope_freqs (F32, head_dim/2)."""
    if hp.rope.type != "llama3":
        return []
    freqs = rope_freqs(hp.rope, hp.head_dim)
    return [TensorPlan(TensorNames.ROPE_FREQS, freqs.shape, GGMLType.F32, lambda: freqs)]


def _load(src: LazyTensor, ggml_type: GGMLType, n_head: int | None) -> np.ndarray:
    """Read one tensor, permute q/k rows, convert to its stored representation."""
    if ggml_type is GGMLType.BF16 and src.dtype == "BF16":
        data = src.load()  # raw bits pass through exactly
    else:
        data = src.load(float32=True)
    if n_head is not None:
        data = permute_qk(data, n_head)
    data = np.ascontiguousarray(data)
    if ggml_type is GGMLType.F32 or data.dtype == np.uint16:
        return data
    from pyggml.quant.codecs import quantize

    return quantize(data, ggml_type)


def plan_conversion(model_dir: str | os.PathLike, outtype: str = "f16") -> ConversionPlan:
    """Check a HF model directory and decide every key and tensor of its GGUF file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a directory; expected a HF model directory with {CONFIG_FILE}")
    qtype = parse_outtype(outtype)
    config_path = model_dir / CONFIG_FILE
    config = read_json_object(config_path, required=True)
    hp = hparams_from_config(config, config_path)
    sources = _map_tensors(open_checkpoint(model_dir), hp, model_dir)
    tok_meta = _vocab_metadata(model_dir, hp, config)

    heads = qk_heads(hp)
    tensors, fallbacks = _extra_tensors(hp), []
    for name, src in sources.items():
        ggml_type, reason = _stored_type(src.shape, qtype)
        if reason is not None:
            fallbacks.append(Fallback(name, qtype, ggml_type, reason))
        tensors.append(TensorPlan(name, src.shape, ggml_type, partial(_load, src, ggml_type, heads.get(name))))
    if fallbacks:
        log.warning(
            "%d tensor(s) stored as %s instead of %s (rows not a whole number of blocks): %s",
            len(fallbacks), FALLBACK_TYPE.name, qtype.name, ", ".join(f.name for f in fallbacks),
        )

    metadata: dict[str, object] = {
        Keys.ARCHITECTURE: hp.arch,
        Keys.NAME: model_name(model_dir),
        Keys.FILE_TYPE: int(FILE_TYPE_OF[qtype]),
    }
    if any(t.ggml_type in QUANTIZED_TYPES for t in tensors):
        metadata[Keys.QUANTIZATION_VERSION] = QUANTIZATION_VERSION
    metadata.update(arch_metadata(hp))
    metadata.update(tok_meta)
    _check_text(metadata, model_dir)
    return ConversionPlan(metadata, tensors, fallbacks)


def convert_hf_to_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    outtype: str = "f16",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert a HF LLaMA-family directory to GGUF; return the path written.

    Architectures: archs.ARCHS (Llama 1/2/3.x, Mistral, Qwen2/2.5, Qwen3); tokenizers: SentencePiece
    tokenizer.model or byte-level BPE tokenizer.json.

    outtype: f32, f16, bf16 or q8_0 for 2-D weights (token_embd included); norms stay F32, and a
    q8_0 matrix whose rows are not a multiple of 32 long is stored as F16 (logged as a warning).
    out_path defaults to `default_output_path`: <dir name without -hf>-<outtype>.gguf in the
    current directory. `progress(name, index, total)` is called before each tensor is written.
    Raises ConversionError (nothing written) when the directory cannot be converted.
    """
    plan = plan_conversion(model_dir, outtype)
    out = Path(out_path) if out_path is not None else default_output_path(model_dir, outtype)
    write_gguf(out, plan.metadata, plan.tensors, progress=progress)
    log.info("converted %s -> %s (%d tensors)", model_dir, out, len(plan.tensors))
    return out
