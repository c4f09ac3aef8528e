"""Compute kernels: `reference` (numpy, obviously correct), `cpu` (numba), later `cuda` (cupy)."""
