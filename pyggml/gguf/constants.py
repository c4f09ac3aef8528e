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

QK = 32  # weights per block for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL
QK_K = 256  # weights per super-block for the k-quants and most i-quants


class GGMLType(IntEnum):
    """Every ggml tensor type id of the GGUF spec (the u32 stored in each tensor info). Ids 4, 5
    and 31-33, 36-38 were removed from ggml and are not valid in a file."""

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
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class TypeTraits:
    """Block geometry of a ggml type: `block_size` elements take `type_size` bytes."""

    block_size: int
    type_size: int


# The block geometry of every type id (ggml.c's type_traits; each layout in a comment). The reader
# takes any of them, so `inspect` shows any valid file; what pyggml computes with is the weight-type
# registry's business (pyggml/quant/registry.py).
TYPE_TRAITS: dict[GGMLType, TypeTraits] = {
    GGMLType.F32: TypeTraits(1, 4),
    GGMLType.F16: TypeTraits(1, 2),
    GGMLType.BF16: TypeTraits(1, 2),
    GGMLType.F64: TypeTraits(1, 8),
    GGMLType.I8: TypeTraits(1, 1),
    GGMLType.I16: TypeTraits(1, 2),
    GGMLType.I32: TypeTraits(1, 4),
    GGMLType.I64: TypeTraits(1, 8),
    GGMLType.Q4_0: TypeTraits(QK, 2 + QK // 2),  # 18: d, qs[16]
    GGMLType.Q4_1: TypeTraits(QK, 2 + 2 + QK // 2),  # 20: d, m, qs[16]
    GGMLType.Q5_0: TypeTraits(QK, 2 + 4 + QK // 2),  # 22: d, qh[4], qs[16]
    GGMLType.Q5_1: TypeTraits(QK, 2 + 2 + 4 + QK // 2),  # 24: d, m, qh[4], qs[16]
    GGMLType.Q8_0: TypeTraits(QK, 2 + QK),  # 34: d, qs[32]
    GGMLType.Q8_1: TypeTraits(QK, 4 + 4 + QK),  # 40: d, s (fp32 each), qs[32]
    GGMLType.Q2_K: TypeTraits(QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # 84: scales[16], qs[64], d, dmin
    GGMLType.Q3_K: TypeTraits(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # 110: hmask[32], qs[64], scales[12], d
    GGMLType.Q4_K: TypeTraits(QK_K, 2 + 2 + 12 + QK_K // 2),  # 144: d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: TypeTraits(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # 176: d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: TypeTraits(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # 210: ql[128], qh[64], scales[16], d
    GGMLType.Q8_K: TypeTraits(QK_K, 4 + QK_K + QK_K // 16 * 2),  # 292: d (fp32), qs[256], bsums (i16)[16]
    GGMLType.IQ2_XXS: TypeTraits(QK_K, 2 + QK_K // 4),  # 66: d, qs (u16)[32]
    GGMLType.IQ2_XS: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 32),  # 74: d, qs (u16)[32], scales[8]
    GGMLType.IQ2_S: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 32),  # 82: d, qs[64], qh[8], scales[8]
    GGMLType.IQ3_XXS: TypeTraits(QK_K, 2 + 3 * QK_K // 8),  # 98: d, qs[96]
    GGMLType.IQ3_S: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),  # 110: d, qs, qh, signs, scales
    GGMLType.IQ1_S: TypeTraits(QK_K, 2 + QK_K // 8 + QK_K // 16),  # 50: d, qs[32], qh (u16)[8]
    GGMLType.IQ1_M: TypeTraits(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # 56: qs[32], qh[16], scales[8]
    GGMLType.IQ4_NL: TypeTraits(QK, 2 + QK // 2),  # 18: d, qs[16] (indices into a 16-value table)
    GGMLType.IQ4_XS: TypeTraits(QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),  # 136: d, scales_h (u16), scales_l[4], qs[128]
    GGMLType.TQ1_0: TypeTraits(QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),  # 54: qs[48], qh[4], d
    GGMLType.TQ2_0: TypeTraits(QK_K, QK_K // 4 + 2),  # 66: qs[64], d
    GGMLType.MXFP4: TypeTraits(QK, 1 + QK // 2),  # 17: e (E8M0), qs[16]
}
assert set(TYPE_TRAITS) == set(GGMLType)

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

# Block-quantized types: every type with blocks of more than one element.
QUANTIZED_TYPES = frozenset(t for t, tr in TYPE_TRAITS.items() if tr.block_size > 1)


class LlamaFileType(IntEnum):
    """general.file_type: the type most weights of the file have (llama.h's llama_ftype)."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ4_XS = 30
    MOSTLY_BF16 = 32


# The file type of a file whose matrices are all of one type.
FILE_TYPE_OF: dict[GGMLType, LlamaFileType] = {
    GGMLType.F32: LlamaFileType.ALL_F32,
    GGMLType.F16: LlamaFileType.MOSTLY_F16,
    GGMLType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLType.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    GGMLType.Q3_K: LlamaFileType.MOSTLY_Q3_K_S,
    GGMLType.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    GGMLType.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    GGMLType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
    GGMLType.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    GGMLType.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
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
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX_LEN = "{arch}.rope.scaling.original_context_length"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    VOCAB_SIZE = "{arch}.vocab_size"

    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    SCORES = "tokenizer.ggml.scores"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    EOT_ID = "tokenizer.ggml.eot_token_id"
    EOM_ID = "tokenizer.ggml.eom_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    SEP_ID = "tokenizer.ggml.seperator_token_id"  # sic: llama.cpp's spelling
    MASK_ID = "tokenizer.ggml.mask_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    ADD_SEP = "tokenizer.ggml.add_sep_token"
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
    """GGUF tensor names of the llama-family architectures; pyggml's internal names are these."""

    TOKEN_EMBD = "token_embd.weight"
    ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling: F32 [head_dim / 2] frequency factors
    OUTPUT_NORM = "output_norm.weight"
    OUTPUT = "output.weight"
    ATTN_NORM = "blk.{i}.attn_norm.weight"
    ATTN_Q = "blk.{i}.attn_q.weight"
    ATTN_K = "blk.{i}.attn_k.weight"
    ATTN_V = "blk.{i}.attn_v.weight"
    ATTN_OUTPUT = "blk.{i}.attn_output.weight"
    ATTN_Q_BIAS = "blk.{i}.attn_q.bias"  # qwen2
    ATTN_K_BIAS = "blk.{i}.attn_k.bias"
    ATTN_V_BIAS = "blk.{i}.attn_v.bias"
    ATTN_Q_NORM = "blk.{i}.attn_q_norm.weight"  # qwen3: per-head RMS norm, [head_dim]
    ATTN_K_NORM = "blk.{i}.attn_k_norm.weight"
    FFN_NORM = "blk.{i}.ffn_norm.weight"
    FFN_GATE = "blk.{i}.ffn_gate.weight"
    FFN_UP = "blk.{i}.ffn_up.weight"
    FFN_DOWN = "blk.{i}.ffn_down.weight"

    BLOCK = (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN)
