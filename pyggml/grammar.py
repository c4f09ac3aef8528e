"""Constrained sampling: GBNF grammars and JSON schemas, matched by llguidance.

llguidance (a Rust wheel, no compiler needed) compiles a grammar once and, at each step, gives the set
of tokens that keep the output inside it. It needs the vocabulary as bytes: `lltokenizer` builds that
description from the GGUF tokenizer (control tokens marked with a 0xFF prefix, as llguidance's own
llama.cpp bridge does) once per tokenizer.

    g = LlamaGrammar.from_string('root ::= "yes" | "no"')   # GBNF, as llama.cpp / llama-cpp-python
    g = LlamaGrammar.from_json_schema(json.dumps(schema))
    llm("Answer:", grammar=g)
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = "constrained sampling needs llguidance: pip install 'pyggml[grammar]' (or pip install llguidance)"


class GrammarError(ValueError):
    """A grammar or JSON schema is invalid, or the output can no longer satisfy it."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise GrammarError(INSTALL_HINT) from None
    return llguidance


class LlamaGrammar:
    """A compiled-on-demand grammar (llama-cpp-python's class name and constructors).

    Holds llguidance's grammar text; a `GrammarMatcher` per generation tracks the position in it.
    """

    def __init__(self, *, _grammar: str, _source: str = ""):
        self._grammar = _grammar  # llguidance grammar (JSON) text
        self._source = _source

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        """A GBNF grammar (llama.cpp's grammar syntax, `root` rule first) or a Lark grammar."""
        llg = _llguidance()
        if not grammar or not grammar.strip():
            raise GrammarError("the grammar is empty")
        try:
            text = llg.grammar_from("gbnf", grammar)
        except ValueError as e:
            raise GrammarError(f"invalid grammar: {e}") from None
        return cls(_grammar=_validated(text), _source=grammar)

    @classmethod
    def from_file(cls, file: str | Path, verbose: bool = True) -> "LlamaGrammar":
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GrammarError(f"{file}: cannot read grammar file: {e}") from None
        return cls.from_string(text, verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str | dict, verbose: bool = True) -> "LlamaGrammar":
        """Output constrained to JSON valid against `json_schema` (a JSON string or a dict)."""
        llg = _llguidance()
        schema = json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        # compact JSON, no extra whitespace: what a small model can follow, and what json.loads reads
        text = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return cls(_grammar=_validated(text), _source=json.dumps(schema))

    def __repr__(self) -> str:
        return f"LlamaGrammar({self._source[:60]!r})"


def _validated(grammar: str) -> str:
    llg = _llguidance()
    error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise GrammarError(f"invalid grammar: {messages[0] if messages else 'unknown error'}")
    for m in messages:
        log.warning("grammar: %s", m)
    return grammar


def json_grammar(schema: dict | None = None) -> LlamaGrammar:
    """Any JSON object (response_format json_object), or JSON valid against `schema`."""
    return LlamaGrammar.from_json_schema(schema if schema is not None else {"type": "object"})


# ----------------------------------------------------------------------------------- tokenizer
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def lltokenizer(tok, n_vocab: int):
    """llguidance's description of a pyggml tokenizer (built once per tokenizer object: ~1 s at 128k)."""
    cached = _TOKENIZERS.get(tok)
    if cached is not None and cached.vocab_size == n_vocab:
        return cached
    llg = _llguidance()
    from .gguf.constants import TokenType

    tokens = []
    for i in range(tok.n_vocab):
        t = tok.token_types[i]
        if t in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED) or (
                t == TokenType.USER_DEFINED and tok.tokens[i].startswith("<") and tok.tokens[i].endswith(">")):
            tokens.append(b"\xff" + tok.tokens[i].encode("utf-8"))  # special: never matches grammar text
        else:
            tokens.append(tok.token_to_bytes(i))

    byte_ids = {}
    for i, t in enumerate(tok.token_types):
        if t == TokenType.BYTE and len(tokens[i]) == 1:
            byte_ids.setdefault(tokens[i][0], i)

    class _Wrapper:  # the duck type llguidance.TokenizerWrapper expects
        def __init__(self):
            self.eos_token_id = tok.eos_id if tok.eos_id is not None else 0
            self.bos_token_id = tok.bos_id
            self.tokens = tokens
            self.special_token_ids = [i for i, t in enumerate(tok.token_types) if t == TokenType.CONTROL]

        def __call__(self, s):
            # llguidance tokenizes forced text with this: the ids must spell exactly these bytes, so
            # SentencePiece's dummy-prefix space (or collapsed spaces) falls back to byte tokens
            data = s if isinstance(s, bytes) else s.encode("utf-8")
            ids = tok.encode(data.decode("utf-8", errors="replace"), add_bos=False, add_eos=False)
            if b"".join(tokens[i] for i in ids) == data:
                return ids
            if all(b in byte_ids for b in data):
                return [byte_ids[b] for b in data]
            return ids

    eos = sorted(tok.eog_ids) or None
    lt = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper()), n_vocab=n_vocab, eos_token=eos)
    _TOKENIZERS[tok] = lt
    return lt


class GrammarMatcher:
    """Where one generation stands in a grammar: the allowed tokens now, then the chosen one."""

    def __init__(self, grammar: LlamaGrammar, tok, n_vocab: int):
        llg = _llguidance()
        self._np = llg.numpy
        self.n_vocab = n_vocab
        self.matcher = llg.LLMatcher(lltokenizer(tok, n_vocab), grammar._grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {self.matcher.get_error()}")
        self._bits = self._np.allocate_token_bitmask(1, n_vocab)  # (1, ceil(n_vocab / 32)) int32

    def allowed(self) -> np.ndarray:
        """(n_vocab,) bool: the tokens the grammar accepts next (end-of-generation when it is complete)."""
        self._np.fill_next_token_bitmask(self.matcher, self._bits)
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {self.matcher.get_error()}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"grammar: token {token} rejected: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (generation should end)."""
        return self.matcher.is_stopped()
