"""pyggml: a pure-Python runtime for quantized LLaMA-family models stored as GGUF files."""

__version__ = "0.1.0"
