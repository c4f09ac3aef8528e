"""LLaMA-family models: hyperparameters from GGUF metadata, weights as mmap views, forward pass."""
from .config import LlamaConfig, ModelError
from .llama import LlamaModel

__all__ = ["LlamaConfig", "LlamaModel", "ModelError"]
