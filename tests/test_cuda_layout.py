"""The GPU's row layout (pyggml/cuda/layout.py), on the CPU: Q4_0 and Q8_0 rows regrouped (a group's 8
scales, then its 8 blocks' codes; the last group padded with zero blocks) hold exactly the file's blocks;
the other types are the file's bytes; the memory plan's byte count is the uploaded array's."""
from types import SimpleNamespace

import numpy as np
import pytest

from pyggml.cuda.layout import GROUP_BLOCKS, GROUPED_TYPES, gpu_nbytes, gpu_row_bytes, to_gpu_layout
from pyggml.gguf.constants import TYPE_TRAITS, GGMLType


def file_blocks_of(gpu: np.ndarray, t: GGMLType, n_blocks: int) -> np.ndarray:
    """The grouped rows back as the file's blocks (rows, n_blocks * block bytes): the inverse, written
    from the layout's description."""
    bb = TYPE_TRAITS[t].type_size
    rows = gpu.shape[0]
    groups = gpu.reshape(rows, -1, GROUP_BLOCKS * bb)
    scales = groups[:, :, :2 * GROUP_BLOCKS].reshape(rows, -1, GROUP_BLOCKS, 2)
    codes = groups[:, :, 2 * GROUP_BLOCKS:].reshape(rows, -1, GROUP_BLOCKS, bb - 2)
    blocks = np.concatenate([scales, codes], axis=3).reshape(rows, -1, bb)
    assert not blocks[:, n_blocks:].any(), "the padding blocks are zero"
    return blocks[:, :n_blocks].reshape(rows, -1)


@pytest.mark.parametrize("t", sorted(GROUPED_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks", [8, 11, 16, 1])
def test_grouped_rows_hold_the_file_blocks(t, n_blocks):
    rng = np.random.default_rng(n_blocks)
    raw = rng.integers(0, 256, (5, n_blocks * TYPE_TRAITS[t].type_size), dtype=np.uint8)
    gpu = to_gpu_layout(np, t, raw)
    assert gpu.shape == (5, gpu_row_bytes(t, raw.shape[1]))
    assert gpu.shape[1] == -(-n_blocks // GROUP_BLOCKS) * GROUP_BLOCKS * TYPE_TRAITS[t].type_size  # whole groups
    np.testing.assert_array_equal(file_blocks_of(gpu, t, n_blocks), raw)
    bb = TYPE_TRAITS[t].type_size
    np.testing.assert_array_equal(gpu[:, 0:2], raw[:, 0:2])  # block 0's scale leads the row
    np.testing.assert_array_equal(gpu[:, 2 * GROUP_BLOCKS:2 * GROUP_BLOCKS + bb - 2], raw[:, 2:bb])  # then its codes, aligned


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_other_types_keep_the_file_bytes(t):
    raw = np.arange(3 * 420, dtype=np.uint32).astype(np.uint8).reshape(3, 420)
    assert to_gpu_layout(np, t, raw) is raw
    assert gpu_row_bytes(t, 420) == 420


@pytest.mark.parametrize("t, cols", [(GGMLType.Q4_0, 4096), (GGMLType.Q4_0, 352), (GGMLType.Q8_0, 352), (GGMLType.F16, 100)])
def test_plan_counts_the_uploaded_bytes(t, cols):
    tr = TYPE_TRAITS[t]
    rows = 7
    nbytes = rows * cols // tr.block_size * tr.type_size
    info = SimpleNamespace(ggml_type=t, shape=(rows, cols), nbytes=nbytes, n_elements=rows * cols)
    raw = np.zeros((rows, nbytes // rows), np.uint8)
    assert gpu_nbytes(info) == to_gpu_layout(np, t, raw).nbytes
