"""The GPU memory a placement needs (weights, KV cache, scratch), worked out from the file before
anything is uploaded, and the typed error that names how many layers would fit."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..backends import BackendUnavailableError
from ..gguf.constants import TensorNames
from ..model.kvtypes import KVType, kv_type
from .layout import gpu_nbytes
from .module import ATT_SPLITS

log = logging.getLogger(__name__)

MARGIN = 512 << 20  # GPU memory left free for cuBLAS workspaces, cupy's pool and the driver


class GPUMemoryError(BackendUnavailableError):
    """The layers asked for do not fit in the GPU's free memory."""


# ---------------------------------------------------------------------------- memory plan
@dataclass(frozen=True)
class OffloadPlan:
    """GPU memory needed by a placement, worked out from the file before anything is uploaded."""

    n_gpu_layers: int
    head_on_gpu: bool
    weight_bytes: int
    kv_bytes: int
    scratch_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.scratch_bytes


def plan_offload(gguf, config, n_gpu: int, n_ctx: int, n_batch: int,
                 kv_types: tuple[KVType, KVType] | None = None) -> OffloadPlan:
    """Bytes on the GPU for the last `n_gpu` layers (and the head when n_gpu == all), with a KV cache
    of types kv_types = (type_k, type_v) (None: the default, f16 for both)."""
    cfg = config
    tk, tv = (kv_type(None), kv_type(None)) if kv_types is None else (kv_type(kv_types[0]), kv_type(kv_types[1]))
    head = n_gpu == cfg.n_layers
    on_gpu = tuple(f"blk.{i}." for i in range(cfg.n_layers - n_gpu, cfg.n_layers))
    weights = sum(gpu_nbytes(info) for name, info in gguf.tensors.items() if name.startswith(on_gpu))
    matrices = [info for name, info in gguf.tensors.items() if name.startswith(f"blk.{cfg.n_layers - 1}.") and len(info.shape) == 2]
    if head:
        for name in (TensorNames.TOKEN_EMBD, TensorNames.OUTPUT, TensorNames.OUTPUT_NORM):
            if name in gguf.tensors:
                weights += gpu_nbytes(gguf.tensors[name])
                if name != TensorNames.OUTPUT_NORM:
                    matrices.append(gguf.tensors[name])
    kv = n_gpu * n_ctx * cfg.n_kv_heads * (tk.row_bytes(cfg.head_dim) + tv.row_bytes(cfg.head_dim))
    # prompt batches: the largest matrix as fp16, activations of n_batch tokens (attention forms no
    # score matrix: attn_prompt)
    largest = max((int(np.prod(m.shape)) for m in matrices), default=0) * 2 if n_gpu else 0
    acts = n_batch * (4 * cfg.dim + 3 * cfg.ffn_dim) * 4 + n_batch * max(cfg.dim, cfg.ffn_dim) * 2
    decode = ((4 * max(cfg.dim, cfg.ffn_dim) + cfg.n_vocab + 2 * cfg.kv_dim) * 4
              + cfg.n_heads * ATT_SPLITS * (cfg.head_dim + 2) * 4)
    scratch = (largest + acts + decode) if n_gpu else 0
    return OffloadPlan(n_gpu, head, weights, kv, scratch)


def check_fits(gguf, config, n_gpu: int, n_ctx: int, n_batch: int, free: int,
               kv_types: tuple[KVType, KVType] | None = None) -> OffloadPlan:
    """The plan for n_gpu layers, or GPUMemoryError naming how many layers would fit."""
    plan = plan_offload(gguf, config, n_gpu, n_ctx, n_batch, kv_types)
    log.info("GPU memory needed for %d layers%s: %.2f GiB (weights %.2f, KV cache %.2f, scratch %.2f); %.2f GiB free",
             n_gpu, " and the head" if plan.head_on_gpu else "", plan.total / 2**30, plan.weight_bytes / 2**30,
             plan.kv_bytes / 2**30, plan.scratch_bytes / 2**30, free / 2**30)
    if plan.total + MARGIN <= free:
        return plan
    fits = max((n for n in range(n_gpu) if plan_offload(gguf, config, n, n_ctx, n_batch, kv_types).total + MARGIN <= free),
               default=0)
    raise GPUMemoryError(
        f"{gguf.path}: {n_gpu} layers on the GPU need {plan.total / 2**30:.2f} GiB (weights {plan.weight_bytes / 2**30:.2f}, "
        f"KV cache for {n_ctx} tokens {plan.kv_bytes / 2**30:.2f}, scratch {plan.scratch_bytes / 2**30:.2f}) but only "
        f"{(free - MARGIN) / 2**30:.2f} GiB is free; try --n-gpu-layers {fits}" + (" or a smaller context" if fits else ""))
