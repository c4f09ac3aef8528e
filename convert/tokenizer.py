"""SentencePiece tokenizer.model (+ tokenizer_config.json) -> tokenizer.* GGUF keys.

The runtime tokenizes from these keys alone, so everything sentencepiece does differently per
model goes in: pieces, scores, piece types, special ids, and the normalizer's two flags.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pyggml.gguf.constants import Keys, TokenType

from .errors import ConversionError, read_json_object

log = logging.getLogger(__name__)

__all__ = ["TOKENIZER_FILE", "tokenizer_metadata", "normalizer_flags", "piece_types_from_proto"]

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 16 << 20  # real chat templates are tens of KB; a bigger file is not one (and could exhaust memory)
GGUF_TOKENIZER_MODEL = "llama"  # tokenizer.ggml.model for SentencePiece
PAD_SCORE = -1000.0  # score of the [PAD{i}] pieces that fill a vocabulary larger than the tokenizer's

# sentencepiece_model.proto field numbers (ModelProto / SentencePiece / NormalizerSpec).
MODEL_PIECES, MODEL_NORMALIZER_SPEC = 1, 3
PIECE_TYPE = 3
NORMALIZER_ADD_DUMMY_PREFIX, NORMALIZER_REMOVE_EXTRA_WHITESPACES = 3, 4
WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


class _ProtoError(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _ProtoError(f"truncated or overlong varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a serialized protobuf message.

    value is an int for varints and bytes for everything else. A tiny reader, enough for the
    sentencepiece model proto, so the converter does not need the protobuf package.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (WIRE_I64, WIRE_I32):
            size = 8 if wire == WIRE_I64 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == WIRE_LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise _ProtoError(f"unsupported wire type {wire} at byte {pos}")
        if pos > len(buf):
            raise _ProtoError(f"field {field} runs past the end of the message")
        yield field, wire, value


def normalizer_flags(model_proto: bytes) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a serialized ModelProto; both default true."""
    flags = {NORMALIZER_ADD_DUMMY_PREFIX: True, NORMALIZER_REMOVE_EXTRA_WHITESPACES: True}
    for field, wire, value in _fields(model_proto):
        if field == MODEL_NORMALIZER_SPEC and wire == WIRE_LEN:
            for f, w, v in _fields(value):  # repeated occurrences merge: later fields win
                if f in flags and w == WIRE_VARINT:
                    flags[f] = bool(v)
    return flags[NORMALIZER_ADD_DUMMY_PREFIX], flags[NORMALIZER_REMOVE_EXTRA_WHITESPACES]


def piece_types_from_proto(model_proto: bytes) -> list[int]:
    """The SentencePiece.Type of every piece (NORMAL when unset). Its values are TokenType's."""
    types = []
    for field, wire, value in _fields(model_proto):
        if field == MODEL_PIECES and wire == WIRE_LEN:
            t = TokenType.NORMAL
            for f, w, v in _fields(value):
                if f == PIECE_TYPE and w == WIRE_VARINT:
                    t = v
            types.append(int(t))
    return types


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _token_content(value: Any, where: str | None = None) -> str | None:
    """A special token as tokenizer_config / special_tokens_map write it: a string or {"content": ...}.
    With `where` (file: key), anything else but null is a ConversionError naming it."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str) and where is not None:
        raise ConversionError(f"{where}: expected a string or {{\"content\": string}}, found {_shown(value)}")
    return value if isinstance(value, str) else None


def config_flag(tok_config: dict[str, Any], key: str, default: bool, source: Path) -> bool:
    """A true/false field of tokenizer_config.json (null or absent: `default`)."""
    value = tok_config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConversionError(f"{source}: {key}: expected true or false, found {_shown(value)}")
    return value


def _chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    source = model_dir / TOKENIZER_CONFIG
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise ConversionError(f"{source}: chat_template: expected a string or a list of "
                                  f"{{\"name\": string, \"template\": string}}")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
        if template is None:
            log.warning("%s: no chat template named 'default' among %s; none written", model_dir, sorted(named))
    elif template is not None and not isinstance(template, str):
        raise ConversionError(f"{source}: chat_template: expected a string or a list of named templates, "
                              f"found {_shown(template)}")
    path = model_dir / CHAT_TEMPLATE_FILE
    if template is None and path.is_file():
        size = path.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise ConversionError(f"{path}: {size:,} bytes, more than the {MAX_TEMPLATE_BYTES:,} a chat template may have")
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConversionError(f"{path}: not UTF-8 text: {e}") from None
    return template


def tokenizer_metadata(model_dir: str | Path, n_vocab: int, hf_config: dict[str, Any] | None = None) -> dict[str, object]:
    """The tokenizer.* keys for a model directory holding a SentencePiece tokenizer.model.

    The vocabulary is padded to `n_vocab` (the embedding's row count) with unused [PAD{i}] pieces,
    named from tokenizer_config.json's added_tokens_decoder where it names them. `hf_config`
    (config.json) supplies a pad_token_id when nothing else names a padding token.
    """
    import sentencepiece as spm  # imported here: only conversion needs it

    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        found = sorted(p.name for p in model_dir.glob("tokenizer*"))
        hint = f"; found {', '.join(found)} (only SentencePiece tokenizers are supported)" if found else ""
        raise ConversionError(f"{model_dir}: expected a SentencePiece {TOKENIZER_FILE} at {path}{hint}")
    proto = path.read_bytes()
    try:  # sentencepiece raises UnicodeDecodeError (a ValueError) for a piece that is not UTF-8
        sp = spm.SentencePieceProcessor(model_proto=proto)
        add_space_prefix, remove_extra_whitespaces = normalizer_flags(proto)
        proto_types = piece_types_from_proto(proto)
        n_pieces = sp.vocab_size()
        pieces = [sp.id_to_piece(i) for i in range(n_pieces)]
    except (RuntimeError, OSError, ValueError, _ProtoError) as e:
        raise ConversionError(f"{path}: not a valid SentencePiece model: {e}") from e
    if len(proto_types) != n_pieces:
        raise ConversionError(f"{path}: not a valid SentencePiece model: sentencepiece reads {n_pieces} pieces, "
                              f"the protobuf holds {len(proto_types)}")

    if n_pieces > n_vocab:
        raise ConversionError(f"{path}: {n_pieces} pieces, but config.json vocab_size is only {n_vocab}")
    tokens, scores, types = [], np.empty(n_vocab, np.float32), np.empty(n_vocab, np.int32)
    for i in range(n_pieces):
        tokens.append(pieces[i])
        scores[i] = sp.get_score(i)
        if sp.is_unknown(i):
            types[i] = TokenType.UNKNOWN
        elif sp.is_control(i):
            types[i] = TokenType.CONTROL
        elif sp.is_unused(i):
            types[i] = TokenType.UNUSED
        elif sp.is_byte(i):
            types[i] = TokenType.BYTE
        elif proto_types[i] == TokenType.USER_DEFINED:  # sentencepiece has no is_user_defined()
            types[i] = TokenType.USER_DEFINED
        else:
            types[i] = TokenType.NORMAL

    tok_config = read_json_object(model_dir / TOKENIZER_CONFIG)
    added = _added_tokens_decoder(tok_config, model_dir / TOKENIZER_CONFIG)
    for i in range(n_pieces, n_vocab):
        entry = added.get(str(i))
        if entry is not None:
            tokens.append(entry["content"])
            types[i] = TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED
        else:
            tokens.append(f"[PAD{i}]")
            types[i] = TokenType.UNUSED
        scores[i] = PAD_SCORE
    if n_vocab > n_pieces:
        log.info("%s: vocabulary padded from %d pieces to vocab_size %d", path, n_pieces, n_vocab)

    meta: dict[str, object] = {
        Keys.TOKENIZER_MODEL: GGUF_TOKENIZER_MODEL,
        Keys.TOKENS: tokens,
        Keys.SCORES: scores,
        Keys.TOKEN_TYPE: types,
    }
    meta.update(_special_ids(model_dir, sp, tokens, tok_config, hf_config or {}))
    meta[Keys.ADD_BOS] = config_flag(tok_config, "add_bos_token", True, model_dir / TOKENIZER_CONFIG)
    meta[Keys.ADD_EOS] = config_flag(tok_config, "add_eos_token", False, model_dir / TOKENIZER_CONFIG)
    meta[Keys.ADD_SPACE_PREFIX] = add_space_prefix
    meta[Keys.REMOVE_EXTRA_WHITESPACES] = remove_extra_whitespaces
    template = _chat_template(model_dir, tok_config)
    if template is not None:
        meta[Keys.CHAT_TEMPLATE] = template
    return meta


def _added_tokens_decoder(tok_config: dict[str, Any], source: Path) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's added_tokens_decoder, {"id": {"content": string, "special": bool, ...}}, checked."""
    added = tok_config.get("added_tokens_decoder")
    if added is None:
        return {}
    if not isinstance(added, dict):
        raise ConversionError(f"{source}: added_tokens_decoder: expected an object of token id -> token, "
                              f"found {_shown(added)}")
    for key, entry in added.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and isinstance(entry.get("special", False), bool)):
            raise ConversionError(f"{source}: added_tokens_decoder[{key!r}]: expected "
                                  f"{{\"content\": string, \"special\": true/false}}, found {_shown(entry)}")
    return added


def _special_ids(
    model_dir: Path, sp: Any, tokens: list[str], tok_config: dict[str, Any], config: dict[str, Any]
) -> dict[str, int]:
    """bos/eos/unk/pad ids: named tokens from tokenizer_config.json or special_tokens_map.json,
    else sentencepiece's own ids, else (pad) config.json's pad_token_id."""
    special_map = read_json_object(model_dir / SPECIAL_TOKENS_MAP)
    index = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id of each piece
    own = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    keys = {"bos": Keys.BOS_ID, "eos": Keys.EOS_ID, "unk": Keys.UNK_ID, "pad": Keys.PAD_ID}
    ids: dict[str, int] = {}
    for kind, key in keys.items():
        content = (_token_content(tok_config.get(f"{kind}_token"), f"{model_dir / TOKENIZER_CONFIG}: {kind}_token")
                   or _token_content(special_map.get(f"{kind}_token"), f"{model_dir / SPECIAL_TOKENS_MAP}: {kind}_token"))
        token_id = index.get(content, -1) if content is not None else -1
        if content is not None and token_id < 0:
            log.warning("%s: %s_token %r is not in the vocabulary; ignored", model_dir, kind, content)
        if token_id < 0:
            token_id = own[kind]
        if token_id < 0:
            fallback = config.get(f"{kind}_token_id")
            token_id = fallback if isinstance(fallback, int) and 0 <= fallback < len(tokens) else -1
        if token_id >= 0:
            ids[key] = token_id
    return ids
