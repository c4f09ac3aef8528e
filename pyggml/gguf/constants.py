"""Every fact of the GGUF v3 format that pyggml relies on, and nothing else.

Data only: type ids, block geometry, metadata key names, tensor names. Every other
module takes these facts from here (public spec: docs/gguf.md in the ggml repository).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_SUPPORTED_VERSIONS = (2, 3)  # v2 has the same layout as v3 (v3 only adds big-endian files)
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_ALIGNMENT = 1 << 16  # sanity limit; llama.cpp files use 32, some tools 64 or 4096

QK = 32  # weights per block for Q4_0, Q5_0, Q8_0
QK_K = 256  # weights per super-block for the k-quants (Q6_K)


class GGMLType(IntEnum):
    """ggml tensor type ids (the u32 stored in each tensor info)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


@dataclass(frozen=True)
class TypeTraits:
    """Block geometry of a ggml type: `block_size` elements take `type_size` bytes."""

    block_size: int
    type_size: int


# Types pyggml can read (and, for the first six, write).
TYPE_TRAITS: dict[GGMLType, TypeTraits] = {
    GGMLType.F32: TypeTraits(1, 4),
    GGMLType.F16: TypeTraits(1, 2),
    GGMLType.BF16: TypeTraits(1, 2),
    GGMLType.Q4_0: TypeTraits(QK, 2 + QK // 2),  # 18 bytes: d, qs[16]
    GGMLType.Q5_0: TypeTraits(QK, 2 + 4 + QK // 2),  # 22 bytes: d, qh, qs[16]
    GGMLType.Q8_0: TypeTraits(QK, 2 + QK),  # 34 bytes: d, qs[32]
    GGMLType.Q6_K: TypeTraits(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # 210 bytes
    GGMLType.I8: TypeTraits(1, 1),
    GGMLType.I16: TypeTraits(1, 2),
    GGMLType.I32: TypeTraits(1, 4),
    GGMLType.I64: TypeTraits(1, 8),
    GGMLType.F64: TypeTraits(1, 8),
}

# numpy dtype of the elements of the unquantized types.
PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"),
    GGMLType.F16: np.dtype("<f2"),
    GGMLType.BF16: np.dtype("<u2"),  # raw bfloat16 bits; numpy has no bfloat16
    GGMLType.I8: np.dtype("i1"),
    GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"),
    GGMLType.I64: np.dtype("<i8"),
    GGMLType.F64: np.dtype("<f8"),
}

QUANTIZED_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q6_K})


class LlamaFileType(IntEnum):
    """general.file_type: the type most weights of the file have."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_BF16 = 32


FILE_TYPE_OF: dict[GGMLType, LlamaFileType] = {
    GGMLType.F32: LlamaFileType.ALL_F32,
    GGMLType.F16: LlamaFileType.MOSTLY_F16,
    GGMLType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}

QUANTIZATION_VERSION = 2


class ValueType(IntEnum):
    """GGUF metadata value type ids."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size scalar value types and their little-endian numpy dtypes.
SCALAR_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("u1"),
    ValueType.INT8: np.dtype("i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}


class Keys:
    """Metadata key names. `{arch}` is replaced by general.architecture."""

    ARCHITECTURE = "general.architecture"
    NAME = "general.name"
    ALIGNMENT = "general.alignment"
    FILE_TYPE = "general.file_type"
    QUANTIZATION_VERSION = "general.quantization_version"

    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    VOCAB_SIZE = "{arch}.vocab_size"

    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    SCORES = "tokenizer.ggml.scores"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
    REMOVE_EXTRA_WHITESPACES = "tokenizer.ggml.remove_extra_whitespaces"
    CHAT_TEMPLATE = "tokenizer.chat_template"

    @staticmethod
    def arch(key: str, arch: str) -> str:
        return key.format(arch=arch)


class TokenType(IntEnum):
    """tokenizer.ggml.token_type values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TensorNames:
    """GGUF tensor names of the llama architecture; pyggml's internal names are these."""

    TOKEN_EMBD = "token_embd.weight"
    OUTPUT_NORM = "output_norm.weight"
    OUTPUT = "output.weight"
    ATTN_NORM = "blk.{i}.attn_norm.weight"
    ATTN_Q = "blk.{i}.attn_q.weight"
    ATTN_K = "blk.{i}.attn_k.weight"
    ATTN_V = "blk.{i}.attn_v.weight"
    ATTN_OUTPUT = "blk.{i}.attn_output.weight"
    FFN_NORM = "blk.{i}.ffn_norm.weight"
    FFN_GATE = "blk.{i}.ffn_gate.weight"
    FFN_UP = "blk.{i}.ffn_up.weight"
    FFN_DOWN = "blk.{i}.ffn_down.weight"

    BLOCK = (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN)
