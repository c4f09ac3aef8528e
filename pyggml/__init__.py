"""pyggml: a pure-Python runtime for quantized LLaMA-family models stored as GGUF files."""

__version__ = "0.1.0"
__all__ = ["Llama", "LlamaGrammar", "LlamaRAMCache", "LlamaCache", "LlamaState", "BaseLlamaCache"]

_LAZY = {"Llama": "api", "LlamaGrammar": "grammar", "LlamaRAMCache": "prompt_cache", "LlamaCache": "prompt_cache",
         "LlamaState": "prompt_cache", "BaseLlamaCache": "prompt_cache"}


def __getattr__(name: str):
    # Lazy: `import pyggml` (and the CLI's --help) must not pay for numba.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pyggml' has no attribute {name!r}")
