"""Tokenizers built from a GGUF file's tokenizer.ggml.* metadata alone.

    tok = load_tokenizer(gguf.metadata)
    ids = tok.encode("Hello")            # BOS per tokenizer.ggml.add_bos_token
    text = tok.decode(ids)
    stream = tok.detokenizer()           # stream.feed(id) -> complete text, stream.flush() at the end
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyggml.gguf.constants import Keys

from .base import StreamingDetokenizer, Tokenizer, TokenizerError
from .bpe import PRE_TOKENIZERS, BpeTokenizer
from .spm import SpmTokenizer

__all__ = [
    "load_tokenizer", "Tokenizer", "StreamingDetokenizer", "TokenizerError", "SpmTokenizer", "BpeTokenizer",
    "PRE_TOKENIZERS",
]  # fmt: skip

# tokenizer.ggml.model -> tokenizer class, one module per algorithm.
TOKENIZERS: dict[str, type[Tokenizer]] = {"llama": SpmTokenizer, "gpt2": BpeTokenizer}
# Vocabulary types llama.cpp knows that pyggml does not (yet).
UNSUPPORTED = {
    "bert": "WordPiece",
    "t5": "Unigram (T5)",
    "rwkv": "RWKV's greedy trie",
    "plamo2": "PLaMo-2's Aho-Corasick",
    "gemma4": "SentencePiece-style BPE without byte-level mapping",
}
_DESCRIPTIONS = {"llama": "SentencePiece", "gpt2": "byte-level BPE"}


def load_tokenizer(metadata: Mapping[str, Any], **overrides: Any) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes; `overrides` go to its constructor."""
    model = metadata.get(Keys.TOKENIZER_MODEL)
    if model is None:
        raise TokenizerError(f"GGUF metadata has no {Keys.TOKENIZER_MODEL}: the file carries no tokenizer")
    if not isinstance(model, str):
        raise TokenizerError(f"{Keys.TOKENIZER_MODEL} is a {type(model).__name__}, expected a string")
    cls = TOKENIZERS.get(model)
    if cls is None:
        what = f" ({UNSUPPORTED[model]})" if model in UNSUPPORTED else ""
        raise TokenizerError(
            f"{Keys.TOKENIZER_MODEL} = {model!r}{what} is not supported; "
            f"pyggml tokenizes {', '.join(f'{m!r} ({_DESCRIPTIONS[m]})' for m in TOKENIZERS)} vocabularies"
        )
    return cls.from_metadata(metadata, **overrides)
