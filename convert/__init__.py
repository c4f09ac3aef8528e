"""HF -> GGUF conversion (installs as pyggml.convert).

    from pyggml.convert import convert_hf_to_gguf
    convert_hf_to_gguf("Llama-2-7b-hf", "llama-2-7b-f16.gguf", outtype="f16")

Supported architectures are the rows of `ARCHS` (archs.py).
"""
from .archs import ARCHS, ArchSpec, permute_qk, unpermute_qk
from .converter import OUTTYPES, ConversionPlan, Fallback, convert_hf_to_gguf, default_output_path, plan_conversion
from .errors import ConversionError

__all__ = [
    "ARCHS", "ArchSpec", "OUTTYPES", "ConversionError", "ConversionPlan", "Fallback", "convert_hf_to_gguf",
    "default_output_path", "plan_conversion", "permute_qk", "unpermute_qk",
]  # fmt: skip
