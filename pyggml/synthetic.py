"""Random-weight LLaMA models of real shapes, written as GGUF: benchmark and test subjects.

Weights are drawn one tensor at a time (seeded per tensor, so any subset is reproducible) and
streamed to the writer, so a 7B-shaped file needs no more memory than its largest tensor.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .gguf.constants import FILE_TYPE_OF, QUANTIZATION_VERSION, QUANTIZED_TYPES, GGMLType, Keys, TensorNames, TokenType
from .gguf.writer import TensorPlan, write_gguf
from .model.archs import ARCHITECTURES
from .quant import codecs
from .quant.mixes import get_mix, mix_type
from .quantize import stored_type

@dataclass(frozen=True)
class Shape:
    """LLaMA-family hyperparameters that decide tensor shapes. arch: a row of model/archs.py (its extra
    tensors are written too); head_dim 0: dim // n_heads; rope_freqs: write Llama 3.1-style frequency
    factors (rope_freqs.weight)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    ctx: int = 2048
    rope_base: float = 10000.0
    eps: float = 1e-5
    tied: bool = False
    arch: str = "llama"
    head_dim: int = 0
    rope_freqs: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


SHAPES: dict[str, Shape] = {
    "tinyllama-1.1b": Shape(2048, 22, 32, 4, 5632, 32000, ctx=2048, eps=1e-5),
    "llama-2-7b": Shape(4096, 32, 32, 32, 11008, 32000, ctx=4096, eps=1e-5),
    "tiny": Shape(64, 2, 4, 2, 96, 300, ctx=128),
}


def synthetic_vocab(n_vocab: int) -> dict[str, object]:
    """A valid SentencePiece-style vocabulary: unk, bos, eos, the 256 byte tokens, then filler pieces."""
    if n_vocab < 3 + 256:
        raise ValueError(f"a vocabulary needs at least {3 + 256} tokens, got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"▁t{i}" for i in range(n_vocab - len(tokens))]
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    return {
        Keys.TOKENIZER_MODEL: "llama",
        Keys.TOKENS: tokens,
        Keys.SCORES: -np.arange(n_vocab, dtype=np.float32),
        Keys.TOKEN_TYPE: np.array(types, dtype=np.int32),
        Keys.BOS_ID: 1,
        Keys.EOS_ID: 2,
        Keys.UNK_ID: 0,
        Keys.ADD_BOS: True,
        Keys.ADD_EOS: False,
    }


def llama_metadata(shape: Shape, name: str, weight_type: GGMLType | str) -> dict[str, object]:
    """`weight_type`: one type for every matrix, or a llama.cpp mix name ("q4_k_m")."""
    k = lambda key: Keys.arch(key, shape.arch)  # noqa: E731
    mix = get_mix(weight_type) if isinstance(weight_type, str) else None
    meta = {
        Keys.ARCHITECTURE: shape.arch,
        Keys.NAME: name,
        Keys.FILE_TYPE: int(mix.file_type if mix else FILE_TYPE_OF[weight_type]),
        k(Keys.CONTEXT_LENGTH): shape.ctx,
        k(Keys.EMBEDDING_LENGTH): shape.dim,
        k(Keys.BLOCK_COUNT): shape.n_layers,
        k(Keys.FEED_FORWARD_LENGTH): shape.ffn_dim,
        k(Keys.HEAD_COUNT): shape.n_heads,
        k(Keys.HEAD_COUNT_KV): shape.n_kv_heads,
        k(Keys.ROPE_DIMENSION_COUNT): shape.hd,
        k(Keys.ROPE_FREQ_BASE): float(shape.rope_base),
        k(Keys.RMS_EPS): float(shape.eps),
        k(Keys.VOCAB_SIZE): shape.vocab,
    }
    if shape.head_dim:
        meta[k(Keys.KEY_LENGTH)] = meta[k(Keys.VALUE_LENGTH)] = shape.head_dim
    if mix or weight_type in QUANTIZED_TYPES:
        meta[Keys.QUANTIZATION_VERSION] = QUANTIZATION_VERSION
    return meta


def tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape (rows, cols)."""
    head_dim = shape.hd
    kv, q = shape.n_kv_heads * head_dim, shape.n_heads * head_dim
    out: dict[str, tuple[int, ...]] = {TensorNames.TOKEN_EMBD: (shape.vocab, shape.dim)}
    if shape.rope_freqs:
        out[TensorNames.ROPE_FREQS] = (head_dim // 2,)
    arch = ARCHITECTURES[shape.arch]
    for i in range(shape.n_layers):
        per_layer = {
            TensorNames.ATTN_NORM: (shape.dim,),
            TensorNames.ATTN_Q: (q, shape.dim),
            TensorNames.ATTN_K: (kv, shape.dim),
            TensorNames.ATTN_V: (kv, shape.dim),
            TensorNames.ATTN_OUTPUT: (shape.dim, q),
            TensorNames.FFN_NORM: (shape.dim,),
            TensorNames.FFN_GATE: (shape.ffn_dim, shape.dim),
            TensorNames.FFN_UP: (shape.ffn_dim, shape.dim),
            TensorNames.FFN_DOWN: (shape.dim, shape.ffn_dim),
        }
        if arch.qkv_bias:
            per_layer.update({TensorNames.ATTN_Q_BIAS: (q,), TensorNames.ATTN_K_BIAS: (kv,), TensorNames.ATTN_V_BIAS: (kv,)})
        if arch.qk_norm:
            per_layer.update({TensorNames.ATTN_Q_NORM: (head_dim,), TensorNames.ATTN_K_NORM: (head_dim,)})
        out.update({name.format(i=i): s for name, s in per_layer.items()})
    out[TensorNames.OUTPUT_NORM] = (shape.dim,)
    if not shape.tied:
        out[TensorNames.OUTPUT] = (shape.vocab, shape.dim)
    return out


def random_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 weights with a realistic scale: norms near 1, matrices ~ N(0, 1/sqrt(cols))."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name == TensorNames.ROPE_FREQS:  # Llama 3.1-style factors: 1 for high frequencies, up to 8 for low
        return np.linspace(1.0, 8.0, shape[0], dtype=np.float32)
    if name.endswith(".bias"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1])))


def random_block_rows(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Stored rows (uint8, rows x row bytes) of weight type t for kernel benchmarks and tests: weights
    ~ N(0, 1/sqrt(cols)) encoded as t, so every block is valid and has sane scales (any type pyggml can
    encode; the k-quants and IQ4 through the approximate encoders)."""
    w = random_weight(f"block_rows.{t.name}", (rows, cols), seed)
    return np.ascontiguousarray(codecs.quantize(w, t, approximate=True)).view(np.uint8).reshape(rows, -1)


def write_random_model(
    path: str | os.PathLike,
    shape: Shape | str,
    weight_type: GGMLType | str = GGMLType.F16,
    seed: int = 0,
    vocab_metadata: dict[str, object] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int | None = None,
) -> None:
    """Write a random-weight LLaMA GGUF of any type pyggml can encode (k-quants and IQ4 by the approximate
    encoders), or of a llama.cpp K-quant mix named as a string ("q4_k_m": each tensor's type as
    llama-quantize would choose it, see quant/mixes.py); `vocab_metadata` (tokenizer.* keys) defaults
    to a synthetic vocab.
    Tensors are drawn on `workers` threads (default: one per CPU); the bytes do not depend on it."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    meta = llama_metadata(shape, f"random-{shape.dim}x{shape.n_layers}", weight_type)
    meta.update(vocab_metadata if vocab_metadata is not None else synthetic_vocab(shape.vocab))

    def tensor_type(name: str, s: tuple[int, ...]) -> GGMLType:
        if isinstance(weight_type, str):
            return mix_type(weight_type, name, s, shape.n_layers, shape.n_heads // shape.n_kv_heads, tied=shape.tied)
        return stored_type(s, weight_type)

    def plan(name: str, s: tuple[int, ...]) -> TensorPlan:
        t = tensor_type(name, s)
        return TensorPlan(name, s, t, lambda: codecs.quantize(random_weight(name, s, seed), t, approximate=True))

    plans = [plan(n, s) for n, s in tensor_shapes(shape).items()]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        write_gguf(path, meta, plans, progress=progress)
        return
    with ThreadPoolExecutor(workers) as pool:  # numpy's generators and ufuncs release the GIL
        write_gguf(path, meta, _prefetched(plans, pool, workers), progress=progress)


def _prefetched(plans: list[TensorPlan], pool: ThreadPoolExecutor, ahead: int) -> list[TensorPlan]:
    """The same plans, each load() also starting the next `ahead` loads on the pool (the writer
    still receives the tensors one at a time, in order)."""
    pending: dict[int, object] = {}

    def loader(i: int) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            for j in range(i, min(i + ahead, len(plans))):
                if j not in pending:
                    pending[j] = pool.submit(plans[j].load)
            return pending.pop(i).result()
        return load

    return [TensorPlan(p.name, p.shape, p.ggml_type, loader(i)) for i, p in enumerate(plans)]
