"""What every pyggml tokenizer offers, whatever its algorithm.

A tokenizer is built from the GGUF tokenizer.ggml.* metadata alone. Subclasses (one module per
algorithm: spm.py for SentencePiece, bpe.py for byte-level BPE) supply three things:
how a plain-text fragment becomes ids (`_encode_fragment`), the bytes of one token
(`token_to_bytes`), and, for decoding, which tokens are raw bytes that may split a UTF-8
character (`is_raw_bytes`) and how a text token renders at the start of the output
(`_text_surface`). Special-token parsing, BOS/EOS, decoding and streaming are shared here.
"""
from __future__ import annotations

import codecs
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pyggml.gguf.constants import TokenType

__all__ = ["TokenizerError", "Tokenizer", "StreamingDetokenizer"]

REPLACEMENT_CHAR = "\ufffd"
_PER_BYTE_REPLACE = "pyggml.replace_per_byte"


class TokenizerError(ValueError):
    """Tokenizer metadata that cannot be used, or input that cannot be tokenized."""


def _replace_per_byte(err: UnicodeError) -> tuple[str, int]:
    # sentencepiece maps every byte of a malformed UTF-8 sequence to its own U+FFFD, where
    # errors="replace" would write one U+FFFD per maximal malformed subsequence.
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return REPLACEMENT_CHAR * (err.end - err.start), err.end


codecs.register_error(_PER_BYTE_REPLACE, _replace_per_byte)


class Tokenizer(ABC):
    """Token ids <-> text for one GGUF vocabulary.

    `tokens` and `token_types` are the tokenizer.ggml.tokens / token_type arrays; ids absent from
    the metadata are None. `add_bos`/`add_eos` are the defaults `encode` uses.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool,
        eog_ids: Iterable[int] | None = None,
    ):
        if len(tokens) != len(token_types):
            raise TokenizerError(f"{len(tokens)} tokens but {len(token_types)} token types")
        if not tokens:
            raise TokenizerError("the vocabulary is empty")
        self.tokens: list[str] = list(tokens)
        self.token_types: list[int] = [int(t) for t in token_types]
        for name, value in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)):
            if value is not None and not 0 <= value < len(self.tokens):
                raise TokenizerError(f"{name} token id {value} is outside the vocabulary of {len(self.tokens)}")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        ids = {eos_id} if eog_ids is None else set(eog_ids)
        self.eog_ids: frozenset[int] = frozenset(i for i in ids if i is not None)

        # Texts that encode(parse_special=True) maps to their id, longest first so "<s>" never
        # shadows a longer token that starts with it.
        special = {}
        for i, (text, t) in enumerate(zip(self.tokens, self.token_types)):
            if t in (TokenType.CONTROL, TokenType.UNKNOWN) and text:
                special.setdefault(text, i)
        self._special_ids: dict[str, int] = special
        alternatives = sorted(special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    @classmethod
    @abstractmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> "Tokenizer":
        """Build from GGUF tokenizer.ggml.* metadata; keyword arguments override constructor arguments."""

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    # --- encoding -------------------------------------------------------------------------------

    @abstractmethod
    def _encode_fragment(self, text: str) -> list[int]:
        """Ids of a piece of plain text (no special-token parsing, no BOS/EOS)."""

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        parse_special: bool = False,
    ) -> list[int]:
        """Token ids of `text`; BOS/EOS per the arguments, else per the GGUF defaults.

        With `parse_special`, the texts of control tokens ("<s>", "</s>", ...) in `text` become
        those tokens, and the text between them is encoded fragment by fragment (as llama.cpp
        does); without it they are ordinary text (as sentencepiece does).
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not valid Unicode at index {e.start}: {e.reason}") from None
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        if parse_special and self._special_re is not None:
            start = 0
            for m in self._special_re.finditer(text):
                ids += self._encode_fragment(text[start : m.start()])
                ids.append(self._special_ids[m.group()])
                start = m.end()
            ids += self._encode_fragment(text[start:])
        else:
            ids += self._encode_fragment(text)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    # --- decoding -------------------------------------------------------------------------------

    @abstractmethod
    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for; control tokens give b"" unless `special`."""

    @abstractmethod
    def is_raw_bytes(self, token_id: int) -> bool:
        """True for tokens whose bytes may be part of a UTF-8 character (byte tokens)."""

    @abstractmethod
    def _text_surface(self, token_id: int, at_start: bool) -> tuple[str, bool]:
        """(text, consumed_start_space) of a token that is not raw bytes; control tokens give "".

        `at_start` says no visible text precedes it, so a leading space the encoder added
        (SentencePiece's dummy prefix) may be dropped; the flag says one was.
        """

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of a token sequence, as the reference tokenizer decodes it."""
        detok = StreamingDetokenizer(self, special)
        return "".join(detok.feed(i) for i in ids) + detok.flush()

    def detokenizer(self, special: bool = False, continuing: bool = False) -> "StreamingDetokenizer":
        """A fresh streaming decoder for one sequence; see StreamingDetokenizer."""
        return StreamingDetokenizer(self, special, continuing)

    def is_eog(self, token_id: int) -> bool:
        """True if generation ends at this token (end of sequence / turn)."""
        return token_id in self.eog_ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {len(self.tokens)}")


class StreamingDetokenizer:
    """Token ids in, one at a time; complete text out.

    `feed` returns only whole characters: the bytes of a character split over several byte
    tokens are held until it is complete. A byte sequence that cannot become valid UTF-8 turns
    into U+FFFD (one per byte, as sentencepiece decodes), as does an incomplete one when a
    text token follows it or at `flush`. The concatenated output equals `Tokenizer.decode`.

    Like decode, it drops the space the encoder put before the first word (SentencePiece's dummy
    prefix). When the ids continue text already shown, e.g. tokens generated after a prompt,
    pass `continuing=True` to keep it: "▁time" after "Once upon a" must print " time".
    `special` shows control tokens ("<s>") as text.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False, continuing: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self.continuing = continuing
        self.reset()

    def reset(self) -> None:
        """Start a new sequence."""
        self._bytes = codecs.getincrementaldecoder("utf-8")(_PER_BYTE_REPLACE)
        self._pending = False  # bytes are held in the decoder
        self._any_text = False  # some text (maybe still pending) has been produced
        self._at_start = not self.continuing  # a dummy-prefix space may still be dropped
        self._start_space_seen = False

    def feed(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        tok = self.tokenizer
        tok._check_id(token_id)
        if tok.is_raw_bytes(token_id):
            data = tok.token_to_bytes(token_id, self.special)
            if data:
                self._pending = self._any_text = True
            return self._bytes.decode(data)
        out = self.flush()
        if self._start_space_seen or self._any_text:
            self._at_start = False
        text, self._start_space_seen = tok._text_surface(token_id, self._at_start)
        if text:
            self._any_text = True
        elif self.special and tok.token_types[token_id] == TokenType.CONTROL:
            text = tok.tokens[token_id]  # shown, but not text: "<s>" + "▁Hello" still reads "<s>Hello"
        return out + text

    def flush(self) -> str:
        """Whatever is held back, incomplete characters as U+FFFD; call at the end of a sequence."""
        if not self._pending:
            return ""
        self._pending = False
        return self._bytes.decode(b"", final=True)
