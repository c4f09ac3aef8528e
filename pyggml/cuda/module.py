"""The CUDA source (CUDA_SOURCES) as Python sees it: which template instances are compiled (per weight
type, KV type pair and product path), the launch geometry the kernels were built for, and the helpers
that launch them (int8 inputs, programmatic dependent launch)."""
from __future__ import annotations

import ctypes
import math
from importlib import resources
from typing import NamedTuple

import numpy as np

from ..gguf.constants import GGMLType
from ..model.kvtypes import KV_TYPES, KVType
from ..model.kvtypes import cuda_defines as kv_cuda_defines
from ..quant.registry import cuda_type_defines
from ..tensor import KERNEL_TYPE_CODES
from .layout import GROUP_BLOCKS, GROUPED_TYPES

TYPE_CODES = KERNEL_TYPE_CODES  # the T of the CUDA templates
SUPPORTED_TYPES = frozenset(TYPE_CODES)
INT8_INPUT_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q2_K,
                              GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL,
                              GGMLType.IQ4_XS})  # multiply int8 activations
FLOAT_VECTOR_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})  # 8-wide loads when cols % 8 == 0
CHUNK_TYPES = GROUPED_TYPES  # whole blocks a lane, their codes in aligned 16-byte loads (decoders.cu, dot_rows_chunk)
MODE_STORE, MODE_ADD, MODE_SILU, MODE_QKV = 0, 1, 2, 3
PATH_GROUP, PATH_CHUNK, PATH_ANY, PATH_WIDE = 0, 1, 2, 3
UNROLL = {GGMLType.Q5_0: 4, GGMLType.F32: 4, GGMLType.F16: 4, GGMLType.BF16: 4}  # the group path's types
# The wide path (matvec.cu, dot_rows_wide): units of 32 weights a lane, this many in flight.
WIDE_UNROLL = {t: 2 for t in INT8_INPUT_TYPES - CHUNK_TYPES - UNROLL.keys()}  # the int8 types of no other path
# The chunked path: blocks a lane has in flight. These were measured (H200, whole decode steps) for the
# loop before the regrouping, over 16-byte runs of the file's blocks, and kept for the whole-block loop
# without a new sweep. ADD products run one 16-warp block per SM (matvec.cu), so registers cost them no
# occupancy: Q4_0's took 3 runs in flight then (7B q4_0 graph replay 1767 -> 1746 us per token; 4: 1748).
CHUNK_UNROLL = {GGMLType.Q4_0: 2, GGMLType.Q8_0: 3}
ADD_CHUNK_UNROLL = {GGMLType.Q4_0: 3, GGMLType.Q8_0: 3}


def chunk_unroll(t: GGMLType, mode: int) -> int:
    """Blocks in flight per lane of a chunked product: what kernel_names compiles and _mmv launches."""
    return (ADD_CHUNK_UNROLL if mode == MODE_ADD else CHUNK_UNROLL)[t]


K_SPLITS = {PATH_GROUP: (1, 4), PATH_CHUNK: (1,), PATH_WIDE: (1,)}  # the warps per row pair k_split can choose, per path (ADD: 1)


def k_split(path: int, pairs: int) -> int:
    """Warps per row pair, measured on an H200 (whole decode steps, 7B shapes): splitting the columns
    of matrices with few rows helps the group path (Q5_0's 2-byte loads, the float types), not the
    chunked one (Q4_0, Q8_0: 1 beat 2 and 4 for Q8_0 by 1%). ADD products always take 1 (_mmv):
    for f16, one warp per pair with the next RMSNorm folded beat 4 warps and its own RMSNorm kernel,
    3574 against 3735 us per token."""
    if path == PATH_GROUP and pairs <= 2048:
        return 4
    return 1
WARPS = 8  # warps (row pairs) per block of the matvec ...
ADD_WARPS = 16  # ... but 16 for an ADD product with one warp per pair (matvec.cu): one 32-row group
ATT_SPLITS = 16  # decode attention: at most this many key ranges per head (attention.cu, attn_partial)
ATT_THREADS = 512  # attn_partial's block (attention.cu, ATT_WARPS)
ATT_MAX_HEAD_DIM = 256  # attn_partial's and attn_seqs' per-warp outputs in shared memory (attention.cu, sacc)
PROMPT_QUERIES, PROMPT_KEYS, PROMPT_THREADS = 32, 32, 128  # attn_prompt's tile (attention.cu, PQ_*)
MMQ_TYPES = INT8_INPUT_TYPES  # the batch products on the int8 tensor cores (mmq.cu: mq_load)
MMQ_THREADS = 128  # mmq's block: MQ_WARPS warps of 16 rows, or of 32 (mq_shape: NT >= 4)
MMQ_TILES = (1, 2, 4, 8)  # its NT: tiles of 8 tokens a block (64 at most; more go to grid z)
MMQ_MIN_CC = 80  # mma.sync m16n8k32 on int8: compute capability 8.0+
MMQ_MAX_TOKENS = 64  # larger batches (prompts) dequantize to fp16 for cuBLAS (faster from 128 tokens on, H100)


class MmvLaunch(NamedTuple):
    name: str  # the instance: mmv<type, mode, unroll, path, warps a pair>
    path: int
    blocks: int
    threads: int


def mmv_launch(t: GGMLType, mode: int, cols: int, pairs: int, int8: bool) -> MmvLaunch:
    """The decode product for a weight of type t (cols columns) in `mode` over `pairs` row pairs: its
    instance, path and grid. int8: the input's int8 blocks are given. The chunked path for Q4_0 / Q8_0
    (grouped rows: layout.py), the wide path for the other int8 types, the group path for the types with
    one, else the general one."""
    if t in CHUNK_TYPES and int8:
        path, unroll = PATH_CHUNK, chunk_unroll(t, mode)
    elif t in WIDE_UNROLL and int8:
        path, unroll = PATH_WIDE, WIDE_UNROLL[t]
    elif t not in UNROLL or (t in FLOAT_VECTOR_TYPES and cols % 8) or (t in INT8_INPUT_TYPES and not int8):
        path, unroll = PATH_ANY, 1
    else:
        path, unroll = PATH_GROUP, UNROLL[t]
    if mode == MODE_ADD:  # one warp per pair: blocks of whole 32-row groups, which fold the next norm
        ks, warps = 1, ADD_WARPS
    else:
        ks, warps = k_split(path, pairs), WARPS
    per_block = warps // ks
    name = f"mmv<{TYPE_CODES[t]}, {mode}, {unroll}, {path}, {ks}>"
    return MmvLaunch(name, path, (pairs + per_block - 1) // per_block, 32 * warps)


def mmq_tiles(n_tok: int) -> int:
    """mmq's NT for n_tok tokens: the fewest tiles of 8 that hold them, at most 8 (chunks of 64)."""
    return next(t for t in MMQ_TILES if 8 * t >= min(n_tok, 64))


def mmq_fragment_layout(nt: int) -> bool:
    """Whether mmq<T, nt> reads its batch's int8 blocks laid out for its fragments (mmq.cu, MQX: one
    8-byte load for a lane's two words, one for its two tokens' scales) rather than as they are. Up to
    4 tiles (32 tokens) it pays: H100, 7B shapes q4_0, 4096 x 4096 at 8 / 16 / 32 tokens 18.3 / 21.6 /
    24.4 -> 16.6 / 18.5 / 21.0 us, gate+up 67.1 / 94.9 / 100.1 -> 63.2 / 71.4 / 77.2; at 8 tiles it
    did not (4096 x 4096 at 64 tokens 37.1 -> 45.5 us, 4096 x 11008 62.0 -> 71.2)."""
    return nt <= 4


def mmq_kernel_name(t: GGMLType, nt: int) -> str:
    return f"mmq<{TYPE_CODES[t]}, {nt}, {'true' if mmq_fragment_layout(nt) else 'false'}>"


def mmq_rows(nt: int) -> int:
    """Weight rows a block of mmq<T, nt> owns (mmq.cu, mq_shape)."""
    return 64 * (2 if nt >= 4 else 1)


def mmq_splits(row_tiles: int, groups: int, sms: int, n_tok: int, row_bytes: int) -> int:
    """Ranges of K groups mmq cuts a product into (grid y; mmq_reduce adds their partial sums): enough
    blocks for eight per SM up to 8 tokens (each warp's few groups of loads in flight at once: few warps
    cannot fill the memory pipe), four with 8 groups a range at least beyond, and partial sums of at most
    half the weight bytes. Measured on an H100, 7B shapes (4096 x 4096 q4_0: 2 tokens 17.5 us against
    22.0 with four, 32 tokens 26.8 against 46.5 with eight). Rounded down to a power of two, so that the
    ranges are even: 4096 x 4096 at 32 tokens 9 ranges 27.4 us, 8 ranges 22.5; 11008 x 4096 at 8 tokens
    7 ranges 43.4, 4 ranges 37.7 (H100, session 20)."""
    few = n_tok <= 8
    want = -(-(8 if few else 4) * sms // row_tiles)
    most = max(1, min(want, groups // (4 if few else 8), row_bytes // (8 * n_tok)))
    return 1 << (most.bit_length() - 1)  # a power of two: even ranges of the usual K (groups 64 * m, 344, 448)


def attn_splits(n_heads: int, sms: int) -> int:
    """Key ranges per head the decode attention may cut the keys into: at most ATT_SPLITS (its
    grid's y), and few enough that the blocks in use (one per SM) run in one wave (attention.cu,
    attn_ranges)."""
    return max(1, min(ATT_SPLITS, sms // n_heads))


def attn_per_lane(head_dim: int) -> int:
    """attn_partial's PER: dimensions per lane, head_dim / 32 rounded up to a power of two."""
    return 1 << max(0, math.ceil(math.log2(max(1, head_dim) / 32)))


# -------------------------------------------------------------------------------- kernels
_MODULE = None


ATT_PER = (1, 2, 4, 8)  # the attention kernels' dimensions per lane (attn_per_lane): head_dim <= 256


def kernel_names() -> list[str]:
    names = [f"kv_write<{t.code}>" for t in KV_TYPES.values()]
    names += [mmq_kernel_name(t, nt) for t in sorted(MMQ_TYPES, key=TYPE_CODES.get) for nt in MMQ_TILES]
    for t, code in TYPE_CODES.items():
        names += [f"get_rows<{code}>", f"dequant_f16<{code}>"]
        for mode in (MODE_STORE, MODE_ADD, MODE_SILU, MODE_QKV):
            names.append(f"mmv<{code}, {mode}, 1, {PATH_ANY}, 1>")
            if t in UNROLL:
                names += [f"mmv<{code}, {mode}, {UNROLL[t]}, {PATH_GROUP}, {ks}>" for ks in K_SPLITS[PATH_GROUP]
                          if ks == 1 or mode != MODE_ADD]
            if t in CHUNK_TYPES:
                names += [f"mmv<{code}, {mode}, {chunk_unroll(t, mode)}, {PATH_CHUNK}, {ks}>" for ks in K_SPLITS[PATH_CHUNK]]
            if t in WIDE_UNROLL:
                names += [f"mmv<{code}, {mode}, {WIDE_UNROLL[t]}, {PATH_WIDE}, {ks}>" for ks in K_SPLITS[PATH_WIDE]]
    return names


def attn_kernel_names(tk: KVType, tv: KVType) -> list[str]:
    """The attention kernels reading keys stored as tk and values as tv, for every ATT_PER."""
    return [f"{k}<{per}, {tk.code}, {tv.code}>" for k in ("attn_partial", "attn_seqs", "attn_prompt") for per in ATT_PER]


def generated_constants() -> str:
    """What the CUDA source takes from Python: the weight and KV type codes, the blocks of a group of a
    regrouped row (layout.py) and the IQ4_NL value table."""
    from ..quant.kquants import IQ4NL_VALUES

    table = ", ".join(str(int(v)) for v in IQ4NL_VALUES)
    return (cuda_type_defines() + kv_cuda_defines() + f"#define GROUP_BLOCKS {GROUP_BLOCKS}\n"
            + f"__device__ __constant__ __align__(16) signed char IQ4NL_VALUES[16] = {{{table}}};\n")


# The CUDA source: these files in this order make one module (each uses what the ones before define).
CUDA_SOURCES = ("common.cu", "decoders.cu", "matvec.cu", "ops.cu", "kvcache.cu", "attention.cu", "mmq.cu")


def cuda_source() -> str:
    """The module's source as compiled, without the generated constants."""
    return "".join(resources.files(__package__).joinpath(f).read_text() for f in CUDA_SOURCES)


def _compile(names: list[str]):
    import cupy as cp

    return cp.RawModule(code=generated_constants() + cuda_source(), options=("-std=c++17",), name_expressions=names)


def compiled_module():
    """The CUDA source compiled for this GPU (cupy keeps the binary in its on-disk kernel cache)."""
    global _MODULE
    if _MODULE is None:
        _MODULE = _compile(kernel_names())
    return _MODULE


_ATTN_MODULES: dict[tuple[int, int], object] = {}


def attn_module(tk: KVType, tv: KVType):
    """The CUDA source compiled with the attention kernels of one (key type, value type) pair only: 16 pairs
    times 3 kernels times 4 head sizes would make every first start compile 192 kernels."""
    key = (tk.code, tv.code)
    if key not in _ATTN_MODULES:
        _ATTN_MODULES[key] = _compile(attn_kernel_names(tk, tv))
    return _ATTN_MODULES[key]


def dev_ptr(a) -> np.uint64:
    return np.uint64(0 if a is None else a.data.ptr)


# ------------------------------------------------------------- programmatic dependent launch
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: a 4-byte id, then an 8-aligned 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


class ProgrammaticLauncher:
    """Launches a kernel through the driver's cuLaunchKernelEx with programmatic stream
    serialization: it may start while the kernel before it on the stream still runs, and waits for
    that kernel's results itself (pdl_wait in common.cu). Captured into a graph, this becomes a
    programmatic edge, which hides most of the gap between the decode step's ~290 small kernels."""

    def __init__(self):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.cuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.attr = _LaunchAttribute(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attr.value[0] = 1

    def __call__(self, fn, grid: tuple, block: tuple, args: tuple, stream_ptr: int) -> None:
        values = [np.asarray(np.uint64(a.data.ptr) if hasattr(a, "data") and hasattr(a.data, "ptr") else a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[v.ctypes.data for v in values])
        grid3, block3 = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        config = _LaunchConfig((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), 0, stream_ptr,
                               ctypes.pointer(self.attr), 1)
        status = self.cuda.cuLaunchKernelEx(ctypes.byref(config), fn.kernel.ptr, params, None)
        if status != 0:
            name = ctypes.c_char_p()
            self.cuda.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernelEx failed: {name.value.decode() if name.value else status}")


class Int8Input:
    """An input's int8 blocks for the next product: values and scales."""

    def __init__(self, cp, width: int):
        self.q = cp.zeros(width, np.int8)
        self.d = cp.zeros(width // 32 + 1, np.float32)

    def args(self) -> tuple:
        """What a producer writes: q and d."""
        return (dev_ptr(self.q), dev_ptr(self.d))


NO_INT8 = (np.uint64(0), np.uint64(0))
NO_FOLD = (np.uint64(0), np.uint64(0), *NO_INT8, np.uint64(0))
