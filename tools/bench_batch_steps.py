"""Model-only decode steps of n sequences at once (one token each), for several n: ms a step and the
aggregate tokens/s, no sampling or serving around them. Every slot first gets a prompt of `depth`
tokens (32 unless given), so the steps' attention reads that many positions a sequence. On a GPU (every
layer there) these are the captured batch steps (pyggml/cuda/batch.py) above one sequence and the
captured one-token step at one; on the CPU the prompt-tile kernels.

    python tools/bench_batch_steps.py MODEL.gguf 1,2,8,16,32,64 [n_gpu_layers [depth]]
"""
import sys
import time

import numpy as np

from pyggml import Llama

path = sys.argv[1]
sizes = [int(s) for s in sys.argv[2].split(",")]
ngl = int(sys.argv[3]) if len(sys.argv) > 3 else -1
depth = int(sys.argv[4]) if len(sys.argv) > 4 else 32
n_max = max(sizes)
llm = Llama(path, n_ctx=depth + 32, n_gpu_layers=ngl, verbose=False, n_seq_max=n_max)
m, c = llm.model, llm.kv_cache
prompt = np.arange(depth) % 1000 + 1
for s in range(n_max):  # the prompt in every slot, 512 tokens a batch
    for b in range(0, depth, 512):
        n_b = min(512, depth - b)
        m.forward_batch(prompt[b:b + n_b], np.arange(b, b + n_b), np.full(n_b, s), c, [n_b - 1])
for n in sizes:
    pos = np.full(n, depth)
    m.forward_batch(np.full(n, 5), pos, np.arange(n), c)  # warm (a batch size's first step also captures it)
    m.forward_batch(np.full(n, 5), pos + 1, np.arange(n), c)
    k = 10
    t = time.perf_counter()
    for i in range(k):
        m.forward_batch(np.full(n, 5), pos + 2 + i, np.arange(n), c)
    dt = (time.perf_counter() - t) / k
    print(f"batch {n:3d}: {dt * 1000:7.2f} ms/step {n / dt:8.1f} t/s", flush=True)
