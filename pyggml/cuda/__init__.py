"""The GPU backend: cupy kernels (cuda/*.cu, module.CUDA_SOURCES) over weights kept in their GGUF block layout.

Importing this package needs nothing beyond pyggml; cupy is imported when a CUDABackend is made.
"""
