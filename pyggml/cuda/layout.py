"""How weights are laid out in GPU memory. Every type keeps the file's bytes, except Q4_0 and Q8_0:
their blocks (an fp16 scale, then 16 or 32 bytes of codes) are 18 and 34 bytes, so a block's codes
are only 2-byte aligned in the file. On the GPU their rows are regrouped at upload: blocks in groups
of GROUP_BLOCKS, each group its 8 scales (16 bytes), then its 8 blocks' codes, so that every block's
codes are one or two aligned 16-byte loads (decoders.cu, block_scale / block_codes). A row's last
group is padded with zero blocks, so a row is a whole number of groups; the row stride the kernels
take (`ld`) is the uploaded array's."""
from __future__ import annotations

from ..gguf.constants import TYPE_TRAITS, GGMLType

GROUP_BLOCKS = 8
SCALE_BYTES = 2  # the fp16 scale that leads a Q4_0 / Q8_0 block
GROUPED_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q8_0})


def group_bytes(t: GGMLType) -> int:
    return GROUP_BLOCKS * TYPE_TRAITS[t].type_size


def gpu_row_bytes(t: GGMLType, file_row_bytes: int) -> int:
    """Bytes of one row on the GPU for a row of file_row_bytes in the file."""
    if t not in GROUPED_TYPES:
        return file_row_bytes
    return -(-file_row_bytes // group_bytes(t)) * group_bytes(t)


def gpu_nbytes(info) -> int:
    """Bytes of a file's tensor (a gguf TensorInfo) on the GPU."""
    if info.ggml_type not in GROUPED_TYPES or not info.shape:
        return info.nbytes
    rows = info.n_elements // info.shape[-1]
    return rows * gpu_row_bytes(info.ggml_type, info.nbytes // rows)


def to_gpu_layout(xp, t: GGMLType, raw):
    """Rows of type t as the file holds them (rows, row bytes; uint8, numpy or cupy: xp is its module)
    -> the rows as the GPU keeps them (a new array for the grouped types, raw itself otherwise)."""
    if t not in GROUPED_TYPES:
        return raw
    rows, width = raw.shape
    bb = TYPE_TRAITS[t].type_size
    out_width = gpu_row_bytes(t, width)
    padded = raw
    if out_width != width:
        padded = xp.zeros((rows, out_width), xp.uint8)
        padded[:, :width] = raw
    blocks = padded.reshape(rows, out_width // group_bytes(t), GROUP_BLOCKS, bb)
    out = xp.empty_like(padded).reshape(blocks.shape[:2] + (group_bytes(t),))
    out[:, :, :GROUP_BLOCKS * SCALE_BYTES] = blocks[:, :, :, :SCALE_BYTES].reshape(rows, -1, GROUP_BLOCKS * SCALE_BYTES)
    out[:, :, GROUP_BLOCKS * SCALE_BYTES:] = blocks[:, :, :, SCALE_BYTES:].reshape(rows, -1, GROUP_BLOCKS * (bb - SCALE_BYTES))
    return out.reshape(rows, out_width)
