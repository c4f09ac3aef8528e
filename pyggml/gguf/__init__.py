"""GGUF v3: format constants, a defensive memory-mapped reader and a streaming writer."""
from .constants import GGMLType, Keys, LlamaFileType, TensorNames, TokenType, ValueType
from .reader import GGUFError, GGUFFile, TensorInfo
from .values import Typed
from .writer import TensorPlan, write_gguf

__all__ = ["GGMLType", "Keys", "LlamaFileType", "TensorNames", "TokenType", "ValueType",
           "GGUFError", "GGUFFile", "TensorInfo", "Typed", "TensorPlan", "write_gguf"]
