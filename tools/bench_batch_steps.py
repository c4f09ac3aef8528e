"""Model-only decode steps of n sequences at once (one token each), for several n: ms a step and the
aggregate tokens/s, no sampling or serving around them. Every slot first gets a 32-token prompt. On a
GPU (every layer there) these are the captured batch steps (pyggml/cuda/batch.py) above one sequence
and the captured one-token step at one; on the CPU the prompt-tile kernels.

    python tools/bench_batch_steps.py MODEL.gguf 1,2,8,16,32,64 [n_gpu_layers]
"""
import sys
import time

import numpy as np

from pyggml import Llama

path = sys.argv[1]
sizes = [int(s) for s in sys.argv[2].split(",")]
ngl = int(sys.argv[3]) if len(sys.argv) > 3 else -1
n_max = max(sizes)
llm = Llama(path, n_ctx=256, n_gpu_layers=ngl, verbose=False, n_seq_max=n_max)
m, c = llm.model, llm.kv_cache
for s in range(n_max):  # 32-token prompts in every slot
    m.forward_batch(np.arange(1, 33), np.arange(32), np.full(32, s), c, [31])
for n in sizes:
    pos = np.full(n, 32)
    m.forward_batch(np.full(n, 5), pos, np.arange(n), c)  # warm (a batch size's first step also captures it)
    m.forward_batch(np.full(n, 5), pos + 1, np.arange(n), c)
    k = 10
    t = time.perf_counter()
    for i in range(k):
        m.forward_batch(np.full(n, 5), pos + 2 + i, np.arange(n), c)
    dt = (time.perf_counter() - t) / k
    print(f"batch {n:3d}: {dt * 1000:7.2f} ms/step {n / dt:8.1f} t/s", flush=True)
