"""Codecs of the k-quants (Q2_K .. Q6_K, 256-weight super-blocks) and the non-linear IQ4_NL / IQ4_XS.

Decoding is bit-exact with ggml (and gguf-py): the same float32 products in the same order.

Encoding is NOT ggml's: ggml searches scales per sub-block to minimise a weighted error, which
pyggml does not need. The encoders here write valid blocks of good quality from float weights,
so random-weight models can be written in every type; they are marked `exact_encoder = False`
and reached through `codecs.quantize(x, qtype, approximate=True)`. The rule, for every type:

* a super-block scale (and min scale) is the least fp16 value >= what the largest sub-block
  needs divided by the largest sub-scale code, so no sub-scale code overflows;
* each sub-block's scale code is rounded UP (ceil), so its step covers the sub-block's range;
* codes are rounded to nearest (IQ types: the nearest table value), clipped to the code range.

Affine types (Q2_K, Q4_K, Q5_K: x = d*sc*q - dmin*m) take the sub-block's min (clamped to <= 0)
as the offset and (max - min) / q_max as the step, so |error| <= step / 2. Symmetric types (Q3_K,
Q6_K, IQ4_XS) map the sub-block's largest |x| (with its sign) to the most negative code, so the
opposite extreme may clip: |error| <= 1 step (Q3_K, Q6_K) or 14 steps of the table (IQ4; the
widest gap of IQ4NL_VALUES is 24, and +127 clips to 113). Weights are assumed finite; scales
beyond fp16's range saturate at 65504.
"""
from __future__ import annotations

import numpy as np

from pyggml.gguf.constants import QK, QK_K, TYPE_TRAITS, GGMLType

from .base import (F16, Codec, cut, f16_bits, f16_value, finite_or_zero, join_fields, pack_nibbles, split_fields,
                   unpack_nibbles)

__all__ = ["IQ4NL_VALUES", "KQUANT_CODECS"]

# The 16 values an IQ4_NL / IQ4_XS code stands for (ggml's kvalues_iq4nl); the CPU and CUDA kernels
# take the table from here.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_IQ4NL_MIDPOINTS = (IQ4NL_VALUES[1:].astype(np.float32) + IQ4NL_VALUES[:-1].astype(np.float32)) / 2  # (15,)

_F16_MAX = np.float32(65504.0)
_SCALE_BYTES = 12  # Q3_K's 16 6-bit scales, Q4_K/Q5_K's 8 6-bit scales + 8 6-bit mins


# ---------------------------------------------------------------------------------------------
# encoder helpers (see the module docstring for the rule)


def _f16_ceil(v: np.ndarray) -> np.ndarray:
    """Non-negative float32 -> the least fp16 value >= v (at most 65504), as float32."""
    v = np.minimum(v, _F16_MAX)
    h = v.astype(F16)
    with np.errstate(over="ignore"):  # nextafter(65504) is inf, and not taken
        h = np.where(h.astype(np.float32) < v, np.nextafter(h, F16.type(np.inf)), h)
    return h.astype(np.float32)


def _scale_codes(need: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative sub-block scales (n, n_sub) -> (d (n, 1), codes (n, n_sub) uint8 in 0..top):
    d = the least fp16 >= max(need) / top, code = ceil(need / d), so that d * code >= need."""
    d = _f16_ceil(need.max(axis=-1, keepdims=True) / np.float32(top))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.clip(np.ceil(need / d), 0, top)  # 0/0 (an all-zero super-block) -> NaN -> 0
    return d, finite_or_zero(k).astype(np.uint8)


def _round_codes(x: np.ndarray, step: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """x (n, n_sub, sub) / step (n, n_sub), rounded to nearest and clipped to lo..hi (int16); 0 where step is 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.clip(np.rint(x / step[..., None]), lo, hi)
    return finite_or_zero(t).astype(np.int16)


def _affine(blocks: np.ndarray, sub: int, q_top: int, s_top: int) -> tuple[np.ndarray, ...]:
    """Super-blocks (n, QK_K) -> d, dmin (n, 1), sc, m (n, n_sub) uint8, q (n, QK_K) uint8
    with x ~ d*sc*q - dmin*m, q in 0..q_top, sc and m in 0..s_top."""
    n = blocks.shape[0]
    x = blocks.reshape(n, -1, sub)  # (n, n_sub, sub)
    lo = np.minimum(x.min(axis=-1), np.float32(0))  # the offset only ever lowers the range
    dmin, m = _scale_codes(-lo, s_top)
    off = dmin * m.astype(np.float32)  # >= -lo, exactly as decoding computes it
    with np.errstate(over="ignore"):
        d, sc = _scale_codes((x.max(axis=-1) + off) / np.float32(q_top), s_top)
    q = _round_codes(x + off[..., None], d * sc.astype(np.float32), 0, q_top)
    return d, dmin, sc, m, q.astype(np.uint8).reshape(n, QK_K)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """(..., m) -> (...): the element of largest |x|, with its sign (the first one on ties)."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, i, axis=-1)[..., 0]


def _symmetric(blocks: np.ndarray, sub: int, q_neg: int, s_top: int) -> tuple[np.ndarray, ...]:
    """Super-blocks (n, QK_K) -> d (n, 1), signed sub-scales s (n, n_sub) int16 in -s_top..s_top,
    x (n, n_sub, sub), step = d*s (n, n_sub): each sub-block's largest |x| maps to about -q_neg steps."""
    n = blocks.shape[0]
    x = blocks.reshape(n, -1, sub)
    want = _signed_max(x) / np.float32(-q_neg)  # (n, n_sub)
    d, k = _scale_codes(np.abs(want), s_top)
    s = np.where(want < 0, -k.astype(np.int16), k.astype(np.int16))
    return d, s, x, d * s.astype(np.float32)


def _nearest_iq4(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """x (n, n_sub, sub) / step (n, n_sub) -> index (uint8) of the nearest IQ4NL_VALUES entry."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = finite_or_zero(x / step[..., None])
    return np.searchsorted(_IQ4NL_MIDPOINTS, t).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# 6-bit scale packing


def _unpack_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K scales (n, 12) -> sc, m (n, 8) in 0..63. Bytes 0-3: sc 0-3 and the top 2 bits of
    sc 4-7; bytes 4-7: m 0-3 and the top 2 bits of m 4-7; bytes 8-11: low nibbles sc 4-7 | m 4-7 << 4."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    six = np.uint8(0x3F)
    sc = np.concatenate([a & six, (c & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=-1)
    m = np.concatenate([b & six, (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, m


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sc, m (n, 8) in 0..63 -> Q4_K/Q5_K scales (n, 12); inverts `_unpack_scale_min`."""
    a = sc[:, :4] | ((sc[:, 4:] >> np.uint8(4)) << np.uint8(6))
    b = m[:, :4] | ((m[:, 4:] >> np.uint8(4)) << np.uint8(6))
    c = (sc[:, 4:] & np.uint8(0x0F)) | (m[:, 4:] << np.uint8(4))
    return np.concatenate([a, b, c], axis=-1)


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K scales (n, 12) -> 16 signed scales (n, 16) float32. Bytes 0-7 hold the low nibbles
    (scale b low, scale b+8 high); byte 8+b holds the top 2 bits of scales b, b+4, b+8, b+12."""
    n = s.shape[0]
    low = split_fields(s[:, :8], 4, 2).reshape(n, 16)
    high = split_fields(s[:, 8:], 2, 4).reshape(n, 16)
    return ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)


def _pack_q3_scales(u: np.ndarray) -> np.ndarray:
    """Stored scales (n, 16) in 0..63 (signed scale + 32) -> (n, 12); inverts `_unpack_q3_scales`."""
    n = u.shape[0]
    low = join_fields((u & np.uint8(0x0F)).reshape(n, 2, 8), 4)
    high = join_fields((u >> np.uint8(4)).reshape(n, 4, 4), 2)
    return np.concatenate([low, high], axis=-1)


# ---------------------------------------------------------------------------------------------
# codecs, one per type


class Q2_KCodec(Codec):
    """84 bytes per 256 weights: scales[16] (sc low nibble, m high), qs[64], fp16 d, fp16 dmin.

    Sub-block j (16 weights): x = d*sc_j * q - dmin*m_j. Weight 128h + 32k + l (h = 0..1,
    k = 0..3, l = 0..31) has the 2-bit code (qs[32h + l] >> 2k) & 3.
    """

    qtype = GGMLType.Q2_K
    exact_encoder = False
    layout = (QK_K // 16, QK_K // 4, 2, 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin, sc, m, q = _affine(blocks, 16, 3, 15)
        qs = join_fields(q.reshape(n, 2, 4, 32), 2).reshape(n, QK_K // 4)
        return np.concatenate([sc | (m << np.uint8(4)), qs, f16_bits(d), f16_bits(dmin)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        scales, qs, d, dmin = cut(blocks, Q2_KCodec.layout)
        dl = f16_value(d) * (scales & np.uint8(0x0F)).astype(np.float32)  # (n, 16)
        ml = f16_value(dmin) * (scales >> np.uint8(4)).astype(np.float32)
        q = split_fields(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).astype(np.float32)
        return (dl[..., None] * q - ml[..., None]).reshape(n, QK_K)


class Q3_KCodec(Codec):
    """110 bytes per 256 weights: hmask[32], qs[64], scales[12] (16 6-bit, stored + 32), fp16 d.

    Sub-block j (16 weights): x = d*s_j * q with q = low - 4*(1 - high) in -4..3; the low 2 bits
    are laid out as Q2_K's, the high bit of weight 32i + l is (hmask[l] >> i) & 1.
    """

    qtype = GGMLType.Q3_K
    exact_encoder = False
    layout = (QK_K // 8, QK_K // 4, _SCALE_BYTES, 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, s, x, step = _symmetric(blocks, 16, 4, 31)
        u = (_round_codes(x, step, -4, 3) + 4).astype(np.uint8).reshape(n, QK_K)  # 0..7
        qs = join_fields((u & np.uint8(3)).reshape(n, 2, 4, 32), 2).reshape(n, QK_K // 4)
        hmask = join_fields((u >> np.uint8(2)).reshape(n, 8, 32), 1)
        scales = _pack_q3_scales((s + 32).astype(np.uint8))
        return np.concatenate([hmask, qs, scales, f16_bits(d)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        hmask, qs, scales, d = cut(blocks, Q3_KCodec.layout)
        dl = f16_value(d) * _unpack_q3_scales(scales)  # (n, 16)
        low = split_fields(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).astype(np.int8)
        high = split_fields(hmask, 1, 8).reshape(n, 16, 16)
        q = (low - ((high ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)).astype(np.float32)
        return (dl[..., None] * q).reshape(n, QK_K)


class Q4_KCodec(Codec):
    """144 bytes per 256 weights: fp16 d, fp16 dmin, scales[12] (8 6-bit sc, 8 6-bit m), qs[128].

    Sub-block j (32 weights): x = d*sc_j * q - dmin*m_j. Weight 64c + 32h + l has the nibble h
    (low for h = 0) of qs[32c + l].
    """

    qtype = GGMLType.Q4_K
    exact_encoder = False
    layout = (2, 2, _SCALE_BYTES, QK_K // 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin, sc, m, q = _affine(blocks, 32, 15, 63)
        qs = join_fields(q.reshape(n, 4, 2, 32), 4).reshape(n, QK_K // 2)
        return np.concatenate([f16_bits(d), f16_bits(dmin), _pack_scale_min(sc, m), qs], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qs = cut(blocks, Q4_KCodec.layout)
        return _decode_q45(d, dmin, scales, qs, None)


class Q5_KCodec(Codec):
    """176 bytes per 256 weights: fp16 d, fp16 dmin, scales[12], qh[32], qs[128].

    As Q4_K, with 5-bit codes: bit 4 of weight 32i + l is (qh[l] >> i) & 1.
    """

    qtype = GGMLType.Q5_K
    exact_encoder = False
    layout = (2, 2, _SCALE_BYTES, QK_K // 8, QK_K // 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin, sc, m, q = _affine(blocks, 32, 31, 63)
        qs = join_fields((q & np.uint8(0x0F)).reshape(n, 4, 2, 32), 4).reshape(n, QK_K // 2)
        qh = join_fields((q >> np.uint8(4)).reshape(n, 8, 32), 1)
        return np.concatenate([f16_bits(d), f16_bits(dmin), _pack_scale_min(sc, m), qh, qs], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qh, qs = cut(blocks, Q5_KCodec.layout)
        return _decode_q45(d, dmin, scales, qs, qh)


def _decode_q45(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, qs: np.ndarray,
                qh: np.ndarray | None) -> np.ndarray:
    """Q4_K (qh None) or Q5_K fields -> float32 (n, QK_K)."""
    n = qs.shape[0]
    sc, m = _unpack_scale_min(scales)
    dl = f16_value(d) * sc.astype(np.float32)  # (n, 8)
    ml = f16_value(dmin) * m.astype(np.float32)
    q = split_fields(qs.reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    if qh is not None:
        q = q | (split_fields(qh, 1, 8) << np.uint8(4))
    return (dl[..., None] * q.astype(np.float32) - ml[..., None]).reshape(n, QK_K)


class Q6_KCodec(Codec):
    """210 bytes per 256 weights: ql[128], qh[64], int8 scales[16], fp16 d.

    A super-block is two halves of 128 weights; half h uses ql[64h:64h+64] and qh[32h:32h+32].
    Within a half, weight 32k + l (k = 0..3, l = 0..31) has low 4 bits from ql[l + 32(k % 2)]
    (low nibble for k < 2, high nibble for k >= 2) and high 2 bits (qh[l] >> 2k) & 3;
    x = d * scales[i // 16] * (q - 32) for weight i of the super-block.
    """

    qtype = GGMLType.Q6_K
    exact_encoder = False
    layout = (QK_K // 2, QK_K // 4, QK_K // 16, 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, s, x, step = _symmetric(blocks, 16, 32, 127)
        u = (_round_codes(x, step, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # (half, k, l)
        ql = ((u[:, :, :2] & np.uint8(0x0F)) | (u[:, :, 2:] << np.uint8(4))).reshape(n, QK_K // 2)
        qh = join_fields(u >> np.uint8(4), 2).reshape(n, QK_K // 4)
        return np.concatenate([ql, qh, s.astype(np.int8).view(np.uint8), f16_bits(d)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        ql, qh, scales, d = cut(blocks, Q6_KCodec.layout)
        scale = f16_value(d) * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)  # (n, 16)
        ql = ql.reshape(n, 2, 64)
        low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=-1)  # (n, 2, 128)
        high = split_fields(qh.reshape(n, 2, 32), 2, 4).reshape(n, 2, 128)
        q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
        return (scale[..., None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class IQ4_NLCodec(Codec):
    """18 bytes per 32 weights: fp16 d, qs[16] (4-bit indices, nibbles as Q4_0's); x = d * IQ4NL_VALUES[q]."""

    qtype = GGMLType.IQ4_NL
    exact_encoder = False
    layout = (2, QK // 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        d = f16_bits(np.clip(_signed_max(blocks)[:, None] / np.float32(IQ4NL_VALUES[0]), -_F16_MAX, _F16_MAX))
        q = _nearest_iq4(blocks[:, None, :], f16_value(d))[:, 0]
        return np.concatenate([d, pack_nibbles(q)], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        d, qs = cut(blocks, IQ4_NLCodec.layout)
        return f16_value(d) * IQ4NL_VALUES[unpack_nibbles(qs)].astype(np.float32)


class IQ4_XSCodec(Codec):
    """136 bytes per 256 weights: fp16 d, u16 scales_h, scales_l[4], qs[128].

    Sub-block j (32 weights) has a 6-bit scale ls_j (low 4 bits: nibble j % 2 of scales_l[j // 2];
    high 2 bits: bits 2j, 2j+1 of scales_h) and 16 bytes of indices packed as IQ4_NL's;
    x = d*(ls_j - 32) * IQ4NL_VALUES[q].
    """

    qtype = GGMLType.IQ4_XS
    exact_encoder = False
    layout = (2, 2, QK_K // 64, QK_K // 2)

    @staticmethod
    def encode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, s, x, step = _symmetric(blocks, 32, -int(IQ4NL_VALUES[0]), 31)
        q = pack_nibbles(_nearest_iq4(x, step).reshape(n * 8, 32)).reshape(n, QK_K // 2)
        ls = (s + 32).astype(np.uint16)  # (n, 8) in 1..63
        scales_h = join_fields((ls >> np.uint16(4))[:, :, None], 2).astype("<u2").view(np.uint8)  # (n, 2)
        scales_l = join_fields((ls & np.uint16(0x0F)).astype(np.uint8).reshape(n, 4, 2).transpose(0, 2, 1), 4)
        return np.concatenate([f16_bits(d), scales_h, scales_l, q], axis=-1)

    @staticmethod
    def decode(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, scales_h, scales_l, qs = cut(blocks, IQ4_XSCodec.layout)
        low = split_fields(scales_l, 4, 2).transpose(0, 2, 1).reshape(n, 8)
        high = split_fields(np.ascontiguousarray(scales_h).view("<u2"), 2, 8).reshape(n, 8).astype(np.uint8)
        ls = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
        dl = f16_value(d) * ls.astype(np.float32)  # (n, 8)
        q = unpack_nibbles(qs.reshape(n * 8, 16)).reshape(n, 8, 32)
        return (dl[..., None] * IQ4NL_VALUES[q].astype(np.float32)).reshape(n, QK_K)


KQUANT_CODECS: tuple[type[Codec], ...] = (
    Q2_KCodec, Q3_KCodec, Q4_KCodec, Q5_KCodec, Q6_KCodec, IQ4_NLCodec, IQ4_XSCodec,
)

for _c in KQUANT_CODECS:  # the layouts must agree with the format's block geometry
    assert sum(_c.layout) == TYPE_TRAITS[_c.qtype].type_size, _c.qtype
