"""pyggml: a pure-Python runtime for quantized LLaMA-family models stored as GGUF files."""

__version__ = "0.1.0"
__all__ = ["Llama"]


def __getattr__(name: str):
    # Lazy: `import pyggml` (and the CLI's --help) must not pay for numba.
    if name == "Llama":
        from .api import Llama

        return Llama
    raise AttributeError(f"module 'pyggml' has no attribute {name!r}")
