"""The CPU backend's malloc tuning (backends.keep_freed_memory): activations freed in one forward pass
are reused by the next without faulting fresh pages in."""
import subprocess
import sys

import pytest

from pyggml.backends import keep_freed_memory

# A forward pass in miniature: 22 layers, each making arrays of 1-3 MB and freeing each two arrays
# later; prints the minor page faults of a second pass (the first one grows the heap).
PASSES = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from pyggml.backends import CPUBackend
    CPUBackend()
MB = 1 << 20
def forward():
    for _ in range(22):
        live = []
        for size in (1 * MB, 3 * MB, 3 * MB, 1 * MB, 3 * MB, 12 * MB // 10):
            a = np.empty(size, np.uint8)
            a[::4096] = 1
            live.append(a)
            if len(live) > 2:
                live.pop(0)
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_pass_faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PASSES, mode], capture_output=True, text=True, check=True).stdout)


def test_freed_activations_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("no glibc malloc to tune here")
    untuned, tuned = second_pass_faults("default"), second_pass_faults("tuned")
    # a pass touches 22 * 12.2 MB: untuned glibc returned most of it to the kernel (38,720 faults measured)
    assert untuned > 5000, untuned  # the pattern does show the problem ...
    assert tuned < 200, tuned  # ... and the backend's tuning removes it (0 measured)
