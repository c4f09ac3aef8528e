"""Byte-level BPE tokenizer ("gpt2" in tokenizer.ggml.model) from GGUF metadata, id for id with llama.cpp.

encode = split out user-defined tokens (always, as llama.cpp does; control tokens only with
parse_special, in the base class), cut the rest into words with the regexes of tokenizer.ggml.pre
(PRE_TOKENIZERS), spell each word's UTF-8 bytes with GPT-2's 256 printable stand-in characters,
then merge adjacent symbols by merge rank, lowest rank first and leftmost on ties
(llm_tokenizer_bpe_session in llama.cpp's src/llama-vocab.cpp). decode maps the stand-ins back
to bytes; user-defined tokens render as their text, control tokens only when asked.
"""
from __future__ import annotations

import copy
import heapq
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyggml.gguf.constants import Keys, TokenType

from . import meta
from .base import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

__all__ = ["BpeTokenizer", "PreTokenizer", "PRE_TOKENIZERS", "DEFAULT_PRE", "EOG_TEXTS", "bytes_to_unicode"]


def bytes_to_unicode() -> list[str]:
    """GPT-2's stand-in character for each byte: printable Latin-1 bytes stand for themselves,
    the other 68 (controls, space, soft hyphen...) become U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(0x100 + n)) for n, b in enumerate(extra))
    return [chars[b] for b in range(256)]


_BYTE_CHARS = bytes_to_unicode()
# str.translate tables: Latin-1 text (one char per byte) -> stand-ins, and back.
_TO_STAND_IN = {b: c for b, c in enumerate(_BYTE_CHARS)}
_FROM_STAND_IN = {ord(c): b for b, c in enumerate(_BYTE_CHARS)}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_KNOWN_TYPES = frozenset(int(t) for t in TokenType)


# --- pre-tokenizers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp cuts text into words for one tokenizer.ggml.pre value.

    `regexes` apply in turn, each to every piece the previous one left: its matches and the text
    between them both become pieces (HF's Split with behavior="isolated"). `ignore_merges`: a word
    that is itself a token stays whole (Llama 3, Tekken). `add_bos` is the default when the file
    has no tokenizer.ggml.add_bos_token.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


# The regex strings are llama.cpp's (llm_tokenizer_bpe in src/llama-vocab.cpp), named after its
# LLAMA_VOCAB_PRE_TYPE_*. Where tokenizer.json has a case-insensitive group (?i:'s|'t|...) or
# \p{Lu}-style classes that std::regex lacks, llama.cpp spells them out; we keep its spelling, so
# ids follow llama.cpp (for Tekken / GPT-4o this differs from tokenizer.json on non-ASCII letters
# that change case inside a word).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (  # Llama 3's with single digits
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (  # Qwen2's with combining marks inside words
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (  # Llama 3's with whitespace runs cut at powers of two
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)"
    r"|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_TEKKEN = (  # upper* lower+ | upper+ lower* words, where "upper" is any letter but a-z, "lower" any but A-Z
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (  # Tekken's words with contractions attached, and digits in threes
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_EXAONE_MOE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5_WORDS = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_DEEPSEEK3_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPARK2_5_WORDS = (  # DeepSeek V3's with newlines alone
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = (  # GPT-4o's with combining marks inside words
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_GPT2_PRE = PreTokenizer((_GPT2,))
_STARCODER_PRE = PreTokenizer((r"\p{N}", _GPT2))
_QWEN2_PRE = PreTokenizer((_QWEN2,))
_GPT4O_PRE = PreTokenizer((_GPT4O,))


def _alias(pre: PreTokenizer, *names: str) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names, pre)


# tokenizer.ggml.pre -> pre-tokenizer, as llama_vocab::impl::load maps names to pre types.
# Not here (each needs more than a regex): kimi-k2, afmoe, tiny_aya / cohere2moe and superbpe
# (hand-written splitters), youtu (llama.cpp reads \p{Lu} as \p{L}), gemma4 / sarvam-moe /
# granite-embed-multi-311m / whitespace (no byte-level mapping), jina-v1-en / jina-v2-code /
# roberta-bpe (embedding models that append a SEP token), and deepseek-llm / deepseek-coder: their
# regexes name non-ASCII spaces (U+3000) that llama.cpp's std::wregex path never sees, as it turns
# every non-ASCII space into U+000B first, so llama.cpp's ids differ from what the regex says.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,  # also used, with a warning, when the file names none (as llama.cpp does)
    # LLAMA3: Llama 3 and its relatives
    **_alias(_LLAMA3_PRE, "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
             "lfm2", "jina-v5-nano"),
    # DBRX, SMAUG, CHATGLM4: Llama 3's regex, merges always applied
    **_alias(PreTokenizer((_LLAMA3,)), "dbrx", "smaug-bpe", "chatglm-bpe"),
    **_alias(PreTokenizer((_LLAMA3,), ignore_merges=True), "glm4", "glm5"),
    # GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    **_alias(_GPT2_PRE, "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
             "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"),
    # STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2: GPT-2's, digits one by one
    **_alias(_STARCODER_PRE, "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
             "mellum2"),
    # QWEN2, STABLELM2, HUNYUAN, SOLAR_OPEN, GROK_2 (the same regex)
    **_alias(_QWEN2_PRE, "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
             "solar-open", "grok-2"),
    "qwen35": PreTokenizer((_QWEN35,)),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "jais-2": PreTokenizer((_JAIS2,)),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),  # Mistral Nemo
    **_alias(_GPT4O_PRE, "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
    "seed-coder": PreTokenizer((_SEED_CODER,)),
    **_alias(PreTokenizer((_BAILINGMOE,)), "bailingmoe", "bailingmoe2", "llada-moe"),
    "ufakzeka": PreTokenizer((_UFAKZEKA,)),
    "laguna": PreTokenizer((r"[^\n]+|[\n]+", _QWEN2)),
    "exaone-moe": PreTokenizer((_EXAONE_MOE,)),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _MINICPM5_WORDS), ignore_merges=True),
    # DEEPSEEK3_LLM, HUNYUAN_DENSE, JOYAI_LLM, HY_V4: DeepSeek V3 / R1 and others
    **_alias(PreTokenizer((r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_WORDS)),
             "deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
    "spark2_5": PreTokenizer((r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _SPARK2_5_WORDS, r"\p{N}")),
    "granite-embed-multi-97m": PreTokenizer((_GRANITE_EMB_MULTI,), ignore_merges=True),
    **_alias(PreTokenizer((_PORO,)), "poro-chat", "bloom", "gpt3-finnish"),
    "viking": PreTokenizer((_PORO, r"\p{N}")),
    "chameleon": PreTokenizer(
        (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
         r"[\p{P}!-/:-@\[-`{-~]", _GPT2),
        add_bos=True,
    ),  # fmt: skip
}
DEFAULT_PRE = "default"

# Tokens llama.cpp treats as end of generation by their text alone (llama_vocab::impl::load),
# besides the eos / eot / eom ids the file names.
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
])  # fmt: skip


def _pre_tokenizer(pre: str) -> PreTokenizer:
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise TokenizerError(
            f"{Keys.TOKENIZER_PRE} = {pre!r} is not a pre-tokenizer pyggml knows; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return spec


def _import_regex():
    try:
        import regex
    except ModuleNotFoundError:  # a declared dependency; say so plainly if it is missing
        raise TokenizerError("byte-level BPE tokenizers need the `regex` package (pip install regex)") from None
    return regex


# --- the tokenizer --------------------------------------------------------------------------------


class BpeTokenizer(Tokenizer):
    """Byte-level BPE ("gpt2" in tokenizer.ggml.model): GPT-2, Llama 3, Qwen2, Mistral Nemo...

    `merges` are tokenizer.ggml.merges ("a b", rank = position). `pre` names the pre-tokenizer
    (a PRE_TOKENIZERS key; None means llama.cpp's "default"). `eot_id` / `eom_id` are end-of-turn
    and end-of-message tokens; `eog_ids` defaults to llama.cpp's end-of-generation set (see
    `end_of_generation_ids`). `cache_size` bounds the per-word cache of merge results.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        *,
        pre: str | None = DEFAULT_PRE,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        eom_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
        add_eos: bool = False,
        eog_ids: Iterable[int] | None = None,
        cache_size: int = 1 << 16,
    ):
        if pre is None:
            log.warning("no %s in the metadata: using llama.cpp's %r pre-tokenizer; ids may differ from the "
                        "model's own tokenizer", Keys.TOKENIZER_PRE, DEFAULT_PRE)  # fmt: skip
            pre = DEFAULT_PRE
        self.pre, self.pre_tokenizer = pre, _pre_tokenizer(pre)
        spec = self.pre_tokenizer
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in token_types]
        if len(types) != len(tokens):
            raise TokenizerError(f"{len(tokens)} tokens but {len(types)} token types")
        odd = [i for i, t in enumerate(types) if t not in _KNOWN_TYPES]
        if odd:
            log.warning("%d tokens have token types outside 1-6 (first: token %d, type %d); treated as normal",
                        len(odd), odd[0], types[odd[0]])  # fmt: skip
            for i in odd:
                types[i] = TokenType.NORMAL
        for name, value in (("eot", eot_id), ("eom", eom_id)):
            if value is not None and not 0 <= value < len(tokens):
                raise TokenizerError(f"{name} token id {value} is outside the vocabulary of {len(tokens)}")
        if eog_ids is None:
            eog_ids = end_of_generation_ids(tokens, types, eos_id, eot_id, eom_id)
        super().__init__(
            tokens, types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
            add_bos=spec.add_bos if add_bos is None else add_bos, add_eos=add_eos, eog_ids=eog_ids,
        )  # fmt: skip
        self.eot_id, self.eom_id = eot_id, eom_id

        regex = _import_regex()
        self._splitters = [regex.compile(r) for r in spec.regexes]
        self._token_id: dict[str, int] = {}  # token text -> id (the first, if a text repeats)
        for i, text in enumerate(self.tokens):
            self._token_id.setdefault(text, i)
        if len(self._token_id) != len(self.tokens):
            log.warning("%d tokens repeat an earlier token's text; the first of each is used",
                        len(self.tokens) - len(self._token_id))  # fmt: skip
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            merge = str(merge)
            cut = merge.find(" ", 1)  # as llama.cpp: a merge may join a token that is a space
            if cut < 0:
                raise TokenizerError(f"merge {rank} is {merge!r}, expected two tokens separated by a space")
            self._ranks.setdefault((merge[:cut], merge[cut + 1 :]), rank)
        # Tokens for the 256 byte stand-ins: what a word falls back to when a merged piece is unknown.
        self._byte_ids = [self._token_id.get(c) for c in _BYTE_CHARS]
        missing = [b for b, i in enumerate(self._byte_ids) if i is None]
        if missing:
            log.warning("the vocabulary lacks %d of the 256 byte tokens (first: byte 0x%02X); text needing "
                        "them loses those bytes, as in llama.cpp", len(missing), missing[0])  # fmt: skip
        # User-defined tokens are cut out of the text before pre-tokenization, longest first.
        user = sorted({t for t, k in zip(self.tokens, self.token_types) if k == TokenType.USER_DEFINED and t},
                      key=len, reverse=True)  # fmt: skip
        self._user_re = re.compile("|".join(map(re.escape, user))) if user else None
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        self._piece_bytes: list[bytes | None] = [None] * len(self.tokens)  # filled as tokens are decoded

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> "BpeTokenizer":
        """Build from tokenizer.ggml.* keys; keyword arguments override or add to them."""
        for key in (Keys.TOKENS, Keys.MERGES):
            if metadata.get(key) is None:
                raise TokenizerError(f"GGUF metadata has no {key}; a byte-level BPE vocabulary needs it")
        tokens = meta.string_list(metadata, Keys.TOKENS)
        n = len(tokens)
        merges = meta.string_list(metadata, Keys.MERGES)
        types = meta.number_list(metadata, Keys.TOKEN_TYPE, n, integral=True)
        kwargs: dict[str, Any] = dict(
            pre=meta.string(metadata, Keys.TOKENIZER_PRE),
            bos_id=meta.token_id(metadata, Keys.BOS_ID, n),
            eos_id=meta.token_id(metadata, Keys.EOS_ID, n),
            eot_id=meta.token_id(metadata, Keys.EOT_ID, n),
            eom_id=meta.token_id(metadata, Keys.EOM_ID, n),
            unk_id=meta.token_id(metadata, Keys.UNK_ID, n),
            pad_id=meta.token_id(metadata, Keys.PAD_ID, n),
            add_bos=meta.flag(metadata, Keys.ADD_BOS, None),
            add_eos=meta.flag(metadata, Keys.ADD_EOS, False),
        )
        kwargs.update(overrides)
        types = [TokenType.NORMAL] * n if types is None else types.tolist()
        return cls(tokens, merges, types, **kwargs)

    def with_pre_tokenizer(self, pre: str) -> "BpeTokenizer":
        """This vocabulary cut into words another way (a file whose tokenizer.ggml.pre is wrong);
        shares the vocabulary and merge tables, so it costs no reload."""
        spec = _pre_tokenizer(pre)
        other = copy.copy(self)
        other.pre, other.pre_tokenizer = pre, spec
        other._splitters = [_import_regex().compile(r) for r in spec.regexes]
        other._cache = {}
        return other

    # --- encoding -------------------------------------------------------------------------------

    def pre_tokenize(self, text: str) -> list[str]:
        """The words `text` is cut into before byte-level BPE (user-defined tokens not cut out)."""
        words = [text] if text else []
        for splitter in self._splitters:
            pieces: list[str] = []
            for word in words:
                pos = 0
                for m in splitter.finditer(word):
                    start, end = m.span()
                    if start > pos:
                        pieces.append(word[pos:start])
                    if end > start:
                        pieces.append(word[start:end])
                    pos = end
                if pos < len(word):
                    pieces.append(word[pos:])
            words = pieces
        return words

    def _encode_fragment(self, text: str) -> list[int]:
        if self._user_re is None:
            return self._encode_plain(text)
        ids: list[int] = []
        start = 0
        for m in self._user_re.finditer(text):
            ids += self._encode_plain(text[start : m.start()])
            ids.append(self._token_id[m.group()])
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in self.pre_tokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(cache) >= self._cache_size:
                    cache.clear()  # simple bound: start over rather than track recency
                cache[word] = word_ids
            ids += word_ids
        return ids

    def _encode_word(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word."""
        spelled = word.encode("utf-8").decode("latin-1").translate(_TO_STAND_IN)
        token_id = self._token_id
        if self.pre_tokenizer.ignore_merges and spelled in token_id:
            return [token_id[spelled]]
        ids = []
        for piece in self.bpe(spelled):
            i = token_id.get(piece)
            if i is not None:
                ids.append(i)
            else:  # a merge made a piece the vocabulary lacks: spell it byte by byte (llama.cpp
                # keeps only the ASCII stand-ins here; such merges exist only in broken files)
                ids.extend(j for j in (token_id.get(c) for c in piece) if j is not None)
        return ids

    def bpe(self, spelled: str) -> list[str]:
        """The pieces byte-level BPE merges a spelled word into (llama.cpp's work queue: lowest
        rank first, leftmost on ties)."""
        n = len(spelled)
        if n < 2:
            return [spelled] if n else []
        ranks = self._ranks
        symbols = list(spelled)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        # (rank, left, right, joined length); an entry is stale once either side has changed,
        # which shows as an emptied symbol or a different joined length.
        agenda = []
        for i in range(n - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None:
                agenda.append((rank, i, i + 1, 2))
        heapq.heapify(agenda)
        while agenda:
            _, left, right, size = heapq.heappop(agenda)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            merged = symbols[left] = a + b
            symbols[right] = ""
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
                rank = ranks.get((merged, symbols[after]))
                if rank is not None:
                    heapq.heappush(agenda, (rank, left, after, len(merged) + len(symbols[after])))
            before = prv[left]
            if before >= 0:
                rank = ranks.get((symbols[before], merged))
                if rank is not None:
                    heapq.heappush(agenda, (rank, before, left, len(symbols[before]) + len(merged)))
        return [s for s in symbols if s]

    # --- decoding -------------------------------------------------------------------------------

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """Byte-level tokens -> their bytes ("Ġhello" -> b" hello"); user-defined tokens -> their
        text; control tokens -> b"" (their text if `special`)."""
        self._check_id(token_id)
        if self.is_raw_bytes(token_id):
            return self._raw_bytes(token_id)
        t = self.token_types[token_id]
        if t == TokenType.USER_DEFINED or (special and t in (TokenType.CONTROL, TokenType.UNKNOWN)):
            return self.tokens[token_id].encode("utf-8")
        return b""

    def _raw_bytes(self, token_id: int) -> bytes:
        data = self._piece_bytes[token_id]
        if data is None:
            text = self.tokens[token_id]
            m = _BYTE_PIECE.fullmatch(text) if self.token_types[token_id] == TokenType.BYTE else None
            if m is not None:
                data = bytes((int(m.group(1), 16),))
            elif all(ord(c) in _FROM_STAND_IN for c in text):
                data = bytes(text.translate(_FROM_STAND_IN), "latin-1")
            else:  # not byte-level text (a hand-added token): its own UTF-8, as HF's ByteLevel decoder does
                data = text.encode("utf-8")
            self._piece_bytes[token_id] = data
        return data

    def is_raw_bytes(self, token_id: int) -> bool:
        # Every byte-level token may hold part of a UTF-8 character.
        return self.token_types[token_id] in (TokenType.NORMAL, TokenType.BYTE)

    def _text_surface(self, token_id: int, at_start: bool) -> tuple[str, bool]:
        # No dummy prefix in byte-level BPE: nothing to drop at the start.
        if self.token_types[token_id] == TokenType.USER_DEFINED:
            return self.tokens[token_id], False
        return "", False  # control, unknown, unused


def end_of_generation_ids(
    tokens: Sequence[str], types: list[int], eos_id: int | None, eot_id: int | None, eom_id: int | None
) -> set[int]:
    """llama.cpp's end-of-generation set: eos, eot, eom, and every token whose text is in EOG_TEXTS.

    Like llama.cpp, a token found by its text that is not a control token becomes one (in `types`,
    so it is parsed and rendered as special); and "<|end|>" is dropped where "<|return|>" and
    "<|call|>" (gpt-oss) or "<|calls|>" and "<|flush|>" (Solar Open) also end generation, and "</s>"
    where "<|tool_response>" or "<|plamo:eos|>" does.
    """
    eog = {i for i in (eos_id, eot_id, eom_id) if i is not None}
    for i, text in enumerate(tokens):
        if text in EOG_TEXTS:
            eog.add(i)
            if types[i] != TokenType.CONTROL:
                log.info("token %d %r ends generation but is not a control token; made one, as llama.cpp does",
                         i, text)  # fmt: skip
                types[i] = TokenType.CONTROL
    by_text = {tokens[i]: i for i in eog}
    ends = by_text.keys()
    if "<|end|>" in ends and ({"<|return|>", "<|call|>"} <= ends or {"<|calls|>", "<|flush|>"} <= ends):
        eog.discard(by_text["<|end|>"])
        types[by_text["<|end|>"]] = TokenType.USER_DEFINED
    if "</s>" in by_text and ("<|tool_response>" in by_text or "<|plamo:eos|>" in by_text):
        eog.discard(by_text["</s>"])
        types[by_text["</s>"]] = TokenType.NORMAL
    return eog
