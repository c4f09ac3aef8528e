"""GPU placement decided on any machine: the memory plan, its error, and a clear error without cupy."""
import importlib.util

import pytest

from pyggml import Llama
from pyggml.backends import BackendUnavailableError
from pyggml.cuda.module import ATT_SPLITS, attn_splits
from pyggml.cuda.plan import GPUMemoryError, check_fits, plan_offload
from pyggml.gguf import GGMLType, GGUFFile
from pyggml.model import LlamaConfig
from pyggml.model.kvtypes import kv_type
from pyggml.synthetic import Shape, write_random_model

SHAPE = Shape(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=300, ctx=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "m.gguf"
    write_random_model(path, SHAPE, GGMLType.Q8_0)
    f = GGUFFile(path)
    return f, LlamaConfig.from_metadata(f.metadata)


def test_plan_counts_layer_weights_head_and_kv(model):
    f, cfg = model
    layer = sum(i.nbytes for n, i in f.tensors.items() if n.startswith("blk.0."))
    head = sum(f.tensors[n].nbytes for n in ("token_embd.weight", "output.weight", "output_norm.weight"))
    two = plan_offload(f, cfg, 2, n_ctx=64, n_batch=8)
    assert two.weight_bytes == 2 * layer and not two.head_on_gpu
    assert two.kv_bytes == 2 * 2 * cfg.n_kv_heads * 64 * cfg.head_dim * 2  # f16 keys and values by default
    q8 = plan_offload(f, cfg, 2, n_ctx=64, n_batch=8, kv_types=(kv_type("q8_0"), kv_type("f32")))
    assert q8.kv_bytes == 2 * cfg.n_kv_heads * 64 * (cfg.head_dim // 32 * 34 + cfg.head_dim * 4)
    full = plan_offload(f, cfg, 4, n_ctx=64, n_batch=8)
    assert full.head_on_gpu and full.weight_bytes == 4 * layer + head
    assert plan_offload(f, cfg, 0, 64, 8).total == 0


def test_too_little_memory_names_the_layers_that_fit(model):
    f, cfg = model
    need = {n: plan_offload(f, cfg, n, 64, 8).total for n in range(5)}
    margin = 512 << 20
    assert check_fits(f, cfg, 4, 64, 8, free=need[4] + margin).n_gpu_layers == 4
    with pytest.raises(GPUMemoryError, match=r"--n-gpu-layers 2\b") as e:
        check_fits(f, cfg, 4, 64, 8, free=need[2] + margin)
    assert str(f.path) in str(e.value) and "GiB" in str(e.value)
    assert isinstance(e.value, BackendUnavailableError)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_gpu_layers_without_cupy_run_on_the_cpu_with_a_warning(model):
    """As llama-cpp-python's CPU build: n_gpu_layers is a request, not a requirement (issue 22)."""
    f, _ = model
    with pytest.warns(RuntimeWarning, match="cupy"):
        llm = Llama(f.path, n_ctx=16, n_gpu_layers=-1)
    assert {layer.backend.name for layer in llm.model.layers} == {"cpu"}


def test_decode_attention_ranges_fit_one_wave():
    """A head's keys are cut into at most SMs / heads ranges (one block each), never more than the
    workspace holds, and at least one."""
    assert attn_splits(32, 132) == 4  # Llama-2-7B on an H200
    assert attn_splits(4, 132) == ATT_SPLITS
    assert attn_splits(64, 132) == 2
    assert attn_splits(200, 132) == 1
