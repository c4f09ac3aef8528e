"""SentencePiece (BPE-type model) tokenizer from GGUF metadata, id for id with sentencepiece.

encode = normalize (optional charsmap, whitespace rules, spaces -> U+2581 "▁", dummy prefix),
then sentencepiece's BPE: start from single characters (user-defined pieces matched greedily
and frozen), repeatedly merge the adjacent pair whose joined piece has the highest score
(leftmost on ties) among NORMAL, USER_DEFINED and UNUSED pieces, split merged UNUSED pieces back
into the pair that made them, and spell what is still unknown with <0xXX> byte pieces when the
vocabulary has them (else <unk>). decode follows SentencePieceProcessor::Decode.
"""
from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pyggml.gguf.constants import Keys, TokenType

from . import meta
from .base import Tokenizer, TokenizerError
from .charsmap import CharsMap

log = logging.getLogger(__name__)

__all__ = ["SpmTokenizer", "SPACE", "DEFAULT_UNK_SURFACE"]

SPACE = "\u2581"  # "▁", sentencepiece's escaped space
DEFAULT_UNK_SURFACE = " \u2047 "  # " ⁇ ", what sentencepiece decodes <unk> to
# Defaults llama.cpp assumes for a "llama" vocabulary that names no BOS/EOS.
DEFAULT_BOS_ID, DEFAULT_EOS_ID = 1, 2

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_RUN = re.compile(" {2,}")
# Pieces the BPE may merge into (sentencepiece's `pieces_`); all others are only looked up whole.
_MERGEABLE = (TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED)
_KNOWN_TYPES = frozenset(int(t) for t in TokenType)


class SpmTokenizer(Tokenizer):
    """SentencePiece-style tokenizer ("llama" in tokenizer.ggml.model).

    `add_space_prefix` and `remove_extra_whitespaces` are the normalizer's add_dummy_prefix and
    remove_extra_whitespaces. `precompiled_charsmap` is the normalizer's compiled rule (e.g.
    nmt_nfkc); None means the identity rule, which is what LLaMA tokenizers use. `unk_surface`
    is what <unk> decodes to (sentencepiece's trainer_spec.unk_surface, not stored in GGUF).
    `eog_ids` are the tokens that end generation (default: EOS).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int],
        *,
        bos_id: int | None = DEFAULT_BOS_ID,
        eos_id: int | None = DEFAULT_EOS_ID,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        add_space_prefix: bool = True,
        remove_extra_whitespaces: bool = False,
        precompiled_charsmap: bytes | None = None,
        unk_surface: str = DEFAULT_UNK_SURFACE,
        eog_ids: Iterable[int] | None = None,
    ):
        if len(scores) != len(tokens):
            raise TokenizerError(f"{len(tokens)} tokens but {len(scores)} scores")
        types = [int(t) for t in token_types]
        odd = [i for i, t in enumerate(types) if t not in _KNOWN_TYPES]
        if odd:  # e.g. 0, "undefined" in llama.cpp: treat as ordinary pieces
            log.warning("%d tokens have token types outside 1-6 (first: token %d, type %d); treated as normal",
                        len(odd), odd[0], types[odd[0]])  # fmt: skip
            for i in odd:
                types[i] = TokenType.NORMAL
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
        super().__init__(
            tokens, types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
            add_bos=add_bos, add_eos=add_eos, eog_ids=eog_ids,
        )  # fmt: skip
        self.add_space_prefix = bool(add_space_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        self.unk_surface = unk_surface
        self._charsmap = CharsMap(precompiled_charsmap) if precompiled_charsmap else None

        # piece -> id: sentencepiece looks reserved pieces (control, unknown, byte) up first.
        self._score: dict[str, float] = {}  # mergeable piece -> score
        mergeable: dict[str, int] = {}
        reserved: dict[str, int] = {}
        self._unused: set[str] = set()
        self._byte_of: dict[int, int] = {}  # byte token id -> byte value
        byte_ids: dict[int, int] = {}  # byte value -> token id
        user: list[str] = []
        repeats = []
        for i, (piece, t) in enumerate(zip(self.tokens, self.token_types)):
            if t in _MERGEABLE:
                if piece in mergeable:
                    repeats.append(i)
                    continue
                mergeable[piece] = i
                self._score[piece] = float(scores[i])
                if t == TokenType.UNUSED:
                    self._unused.add(piece)
                elif t == TokenType.USER_DEFINED and piece:
                    user.append(piece)
            else:
                reserved.setdefault(piece, i)
                if t == TokenType.BYTE:
                    m = _BYTE_PIECE.fullmatch(piece)
                    if m is None:
                        raise TokenizerError(f"byte token {i} is {piece!r}, expected the form <0xAB>")
                    self._byte_of[i] = int(m.group(1), 16)
                    byte_ids.setdefault(int(m.group(1), 16), i)
        if repeats:
            log.warning("%d tokens repeat an earlier token's text (first: token %d, %r); the first of each is used",
                        len(repeats), repeats[0], self.tokens[repeats[0]])  # fmt: skip
        self._piece_id = {**mergeable, **reserved}
        self._byte_fallback = bool(byte_ids)
        self._byte_ids = [byte_ids.get(b, self.unk_id) for b in range(256)]
        if self._byte_fallback and None in self._byte_ids:
            raise TokenizerError(f"only {len(byte_ids)} of the 256 byte tokens, and no <unk> to stand for the rest")
        # User-defined pieces: matched longest first, in the normalizer and the BPE's initial split.
        self._user = set(user)
        self._user_lengths = sorted({len(p) for p in user}, reverse=True)
        self._user_first = {p[0] for p in user}
        self._user_bytes = {p.encode("utf-8") for p in user}
        self._user_byte_lengths = sorted({len(p) for p in self._user_bytes}, reverse=True)
        # The identity rule can work on whole strings unless a user-defined piece holds a space.
        self._simple_normalizer = self._charsmap is None and not any(" " in p for p in user)
        # Decoded text of every token (byte tokens excepted), the SentencePiece way.
        self._surface = [
            "" if t in (TokenType.CONTROL, TokenType.BYTE)
            else unk_surface if t == TokenType.UNKNOWN
            else piece.replace(SPACE, " ")
            for piece, t in zip(self.tokens, self.token_types)
        ]  # fmt: skip

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> "SpmTokenizer":
        """Build from tokenizer.ggml.* keys; keyword arguments override or add to them."""

        for key in (Keys.TOKENS, Keys.SCORES, Keys.TOKEN_TYPE):
            if metadata.get(key) is None:
                raise TokenizerError(f"GGUF metadata has no {key}; a SentencePiece vocabulary needs it")
        tokens = meta.string_list(metadata, Keys.TOKENS)
        n = len(tokens)
        scores = meta.number_list(metadata, Keys.SCORES, n, integral=False)
        types = meta.number_list(metadata, Keys.TOKEN_TYPE, n, integral=True)
        kwargs: dict[str, Any] = dict(
            bos_id=meta.token_id(metadata, Keys.BOS_ID, n, DEFAULT_BOS_ID if n > DEFAULT_BOS_ID else None),
            eos_id=meta.token_id(metadata, Keys.EOS_ID, n, DEFAULT_EOS_ID if n > DEFAULT_EOS_ID else None),
            unk_id=meta.token_id(metadata, Keys.UNK_ID, n),
            pad_id=meta.token_id(metadata, Keys.PAD_ID, n),
            add_bos=meta.flag(metadata, Keys.ADD_BOS, True),
            add_eos=meta.flag(metadata, Keys.ADD_EOS, False),
            add_space_prefix=meta.flag(metadata, Keys.ADD_SPACE_PREFIX, True),
            remove_extra_whitespaces=meta.flag(metadata, Keys.REMOVE_EXTRA_WHITESPACES, False),
        )
        kwargs.update(overrides)
        return cls(tokens, scores.tolist(), types.tolist(), **kwargs)

    # --- normalization --------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """The string the BPE sees: sentencepiece's Normalizer::Normalize."""
        if not text:
            return ""
        if not self._simple_normalizer:
            return self._normalize_chunks(text)
        if self.remove_extra_whitespaces:
            text = _SPACE_RUN.sub(" ", text.strip(" "))
            if not text:
                return ""
        out = text.replace(" ", SPACE)
        if self.add_space_prefix:
            out = SPACE + out
        return out.rstrip(SPACE) if self.remove_extra_whitespaces else out

    def _normalize_chunks(self, text: str) -> str:
        """The general normalizer: rewrite chunk by chunk, then apply the whitespace rules per chunk."""
        chunks = self._normalized_chunks(text.encode("utf-8"))
        i = 0
        if self.remove_extra_whitespaces:
            while i < len(chunks) and chunks[i] == " ":
                i += 1
        if i == len(chunks):
            return ""
        out = [SPACE] if self.add_space_prefix else []
        prev_space = self.remove_extra_whitespaces
        for chunk in chunks[i:]:
            if prev_space:
                chunk = chunk.lstrip(" ")
            if chunk:
                out.append(chunk.replace(" ", SPACE))
                prev_space = chunk.endswith(" ")
            if not self.remove_extra_whitespaces:
                prev_space = False
        normalized = "".join(out)
        return normalized.rstrip(SPACE) if self.remove_extra_whitespaces else normalized

    def _normalized_chunks(self, data: bytes) -> list[str]:
        """Replacement of each prefix: a user-defined piece as is, else the charsmap's longest rule,
        else one character unchanged."""
        chunks = []
        pos, n = 0, len(data)
        while pos < n:
            length = 0
            for size in self._user_byte_lengths:
                if data[pos : pos + size] in self._user_bytes:
                    length, chunk = size, data[pos : pos + size].decode("utf-8")
                    break
            if not length and self._charsmap is not None:
                hit = self._charsmap.match(data, pos)
                if hit is not None:
                    length, chunk = hit
            if not length:
                lead = data[pos]
                length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                chunk = data[pos : pos + length].decode("utf-8")  # valid: it came from a str
            chunks.append(chunk)
            pos += length
        return chunks

    # --- BPE ------------------------------------------------------------------------------------

    def _initial_symbols(self, normalized: str) -> tuple[list[str], list[bool] | None]:
        """Characters, with user-defined pieces (longest match) kept whole and frozen."""
        if not self._user:
            return list(normalized), None
        symbols, frozen = [], []
        pos, n = 0, len(normalized)
        while pos < n:
            size = 1
            if normalized[pos] in self._user_first:
                for length in self._user_lengths:
                    if normalized[pos : pos + length] in self._user:
                        size = length
                        break
            symbols.append(normalized[pos : pos + size])
            frozen.append(size > 1 or symbols[-1] in self._user)
            pos += size
        return symbols, frozen

    def _bpe(self, normalized: str) -> list[str]:
        """The pieces sentencepiece's bpe::Model::Encode splits a normalized string into."""
        symbols, frozen = self._initial_symbols(normalized)
        n = len(symbols)
        if n == 0:
            return []
        score, unused = self._score, self._unused
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        rev_merge: dict[str, tuple[str, str]] = {}  # merged UNUSED piece -> the pair that made it
        # Agenda of candidate merges: highest score first, then leftmost. An entry is stale once
        # either side has changed, which shows in the joined length.
        agenda: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0 or (frozen is not None and (frozen[left] or frozen[right])):
                return
            piece = symbols[left] + symbols[right]
            s = score.get(piece)
            if s is None:
                return
            heapq.heappush(agenda, (-s, left, right, len(piece)))
            if piece in unused:
                rev_merge[piece] = (symbols[left], symbols[right])

        for i in range(n - 1):
            push(i, i + 1)
        while agenda:
            _, left, right, size = heapq.heappop(agenda)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            symbols[left] = a + b
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])

        pieces = []
        i = 0
        while i >= 0:
            pieces.append(symbols[i])
            i = nxt[i]
        if not rev_merge:
            return pieces
        out: list[str] = []
        for piece in pieces:
            self._resegment(piece, rev_merge, out)
        return out

    def _resegment(self, piece: str, rev_merge: dict[str, tuple[str, str]], out: list[str]) -> None:
        """An UNUSED piece is never emitted: split it back into the pair that formed it."""
        i = self._piece_id.get(piece)
        pair = rev_merge.get(piece) if i is not None and self.token_types[i] == TokenType.UNUSED else None
        if pair is None:
            out.append(piece)
            return
        self._resegment(pair[0], rev_merge, out)
        self._resegment(pair[1], rev_merge, out)

    def _encode_fragment(self, text: str) -> list[int]:
        piece_id, unk = self._piece_id, self.unk_id
        ids: list[int] = []
        for piece in self._bpe(self.normalize(text)):
            i = piece_id.get(piece, unk)
            if i != unk:
                ids.append(i)
            elif self._byte_fallback:
                ids.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
            elif unk is None:
                raise TokenizerError(f"{piece!r} is not in the vocabulary, which has neither <unk> nor byte tokens")
            elif not ids or ids[-1] != unk:  # sentencepiece merges a run of unknown pieces into one <unk>
                ids.append(unk)
        return ids

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece as sentencepiece looks it up (unknown pieces -> unk_id)."""
        return self._piece_id.get(piece, self.unk_id)

    # --- decoding -------------------------------------------------------------------------------

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """<0xAB> -> b"\\xab"; "▁" -> b" "; control tokens -> b"" (their text if `special`)."""
        self._check_id(token_id)
        t = self.token_types[token_id]
        if t == TokenType.BYTE:
            return bytes((self._byte_of[token_id],))
        if t == TokenType.CONTROL and special:
            return self.tokens[token_id].encode("utf-8")
        return self._surface[token_id].encode("utf-8")

    def is_raw_bytes(self, token_id: int) -> bool:
        return self.token_types[token_id] == TokenType.BYTE

    def _text_surface(self, token_id: int, at_start: bool) -> tuple[str, bool]:
        if self.token_types[token_id] in (TokenType.CONTROL, TokenType.UNKNOWN):
            return self._surface[token_id], False
        piece = self.tokens[token_id]
        # sentencepiece drops the dummy-prefix space of the first piece; with
        # remove_extra_whitespaces it drops one from every piece until some text appears.
        if at_start and (self.add_space_prefix or self.remove_extra_whitespaces) and piece.startswith(SPACE):
            return self._surface[token_id][1:], not self.remove_extra_whitespaces
        return self._surface[token_id], False
