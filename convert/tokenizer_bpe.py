"""HF tokenizer.json (byte-level BPE) + tokenizer_config.json -> tokenizer.* GGUF keys ("gpt2").

What llama.cpp's converter writes (TextModel._set_vocab_gpt2 + gguf.SpecialVocab), without
transformers: the vocabulary by id with added tokens and [PAD{id}] holes, token types, merges,
special ids, add_bos/add_eos, the chat template, and tokenizer.ggml.pre. llama.cpp names the
pre-tokenizer by hashing the ids of a test string; here it is read from the tokenizer.json
pre_tokenizer (regexes) and normalizer and looked up in PRE_TOKENIZERS; an unknown one is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyggml.gguf.constants import Keys, TokenType
from pyggml.tokenizer.bpe import EOG_TEXTS  # end-of-generation by text, as llama.cpp's runtime decides it

from .errors import ConversionError, read_json_object
from .tokenizer import TOKENIZER_CONFIG, _chat_template, _shown, _token_content, config_flag

log = logging.getLogger(__name__)

__all__ = ["TOKENIZER_JSON", "PRE_TOKENIZERS", "PreTokenizer", "pre_tokenizer_name", "bpe_tokenizer_metadata"]

TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
GGUF_TOKENIZER_MODEL = "gpt2"  # tokenizer.ggml.model of byte-level BPE

# The pre-tokenizer regexes as tokenizer.json spells them (llama.cpp's src/llama-vocab.cpp quotes
# each as the "original regex from tokenizer.json" of its pre type).
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"  # ByteLevel(use_regex=true)
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_RE = r"\p{N}"  # Digits(individual_digits=true)


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer type: the splits tokenizer.json applies before byte-level BPE."""

    name: str  # tokenizer.ggml.pre
    splits: tuple[str, ...]  # regexes applied in turn (each match isolated)
    normalizers: tuple[str | None, ...] = (None,)  # tokenizer.json normalizer types accepted
    name_with_bos: str | None = None  # when the tokenizer adds a BOS: a model family llama.cpp names apart


PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("llama-bpe", (LLAMA3_RE,)),  # Llama 3.x, DeepSeek-R1-Distill-Llama
    # Qwen2/2.5/3 (NFC: llama.cpp does not normalize, as its qwen2 type shows). DeepSeek-R1-Distill-Qwen
    # has the same regex but adds <｜begin▁of▁sentence｜>; llama.cpp calls it deepseek-r1-qwen (same rules).
    PreTokenizer("qwen2", (QWEN2_RE,), normalizers=(None, "NFC"), name_with_bos="deepseek-r1-qwen"),
    PreTokenizer("tekken", (TEKKEN_RE,)),  # Mistral Nemo and later
    PreTokenizer("smollm", (DIGITS_RE, GPT2_RE)),  # SmolLM, SmolLM2
    PreTokenizer("gpt-2", (GPT2_RE,)),
)

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")  # gguf.SpecialVocab's, less cls (no GGUF key)
ID_KEYS = {"bos": Keys.BOS_ID, "eos": Keys.EOS_ID, "unk": Keys.UNK_ID, "sep": Keys.SEP_ID, "pad": Keys.PAD_ID,
           "mask": Keys.MASK_ID}
ADD_KEYS = {"bos": Keys.ADD_BOS, "eos": Keys.ADD_EOS, "sep": Keys.ADD_SEP}
SPACE_IN_MERGE = chr(ord(" ") + 256)  # how byte-level BPE spells a space ('Ġ'); llama.cpp's choice too


# ------------------------------------------------------------------------------ pre-tokenizer
def _splits(pre: Any, path: Path) -> tuple[list[str], bool]:
    """The regexes a tokenizer.json pre_tokenizer applies, and whether it ends byte-level."""
    if pre is None:
        return [], False
    if not isinstance(pre, dict):
        raise ConversionError(f"{path}: pre_tokenizer: expected an object, found {pre!r}")
    kind = pre.get("type")
    if kind == "Sequence":
        regexes, byte_level = [], False
        steps = pre.get("pretokenizers") or []
        if not isinstance(steps, list):
            raise ConversionError(f"{path}: pre_tokenizer.pretokenizers: expected a list, found {_shown(steps)}")
        for step in steps:
            if byte_level:
                kind = step.get("type") if isinstance(step, dict) else step
                raise ConversionError(f"{path}: pre_tokenizer: a {kind!r} step after ByteLevel is not supported")
            more, byte_level = _splits(step, path)
            regexes += more
        return regexes, byte_level
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ConversionError(f"{path}: pre_tokenizer ByteLevel with add_prefix_space=true is not supported "
                                  f"(llama.cpp's BPE tokenizer adds no prefix space)")
        return ([GPT2_RE] if pre.get("use_regex", True) else []), True
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if not isinstance(regex, str) or pre.get("behavior") != "Isolated" or pre.get("invert"):
            raise ConversionError(
                f"{path}: pre_tokenizer Split {pattern!r} (behavior {pre.get('behavior')!r}, invert "
                f"{pre.get('invert')!r}) is not supported; only an isolating regex split is"
            )
        return [regex], False
    if kind == "Digits":
        if not pre.get("individual_digits"):
            raise ConversionError(f"{path}: pre_tokenizer Digits(individual_digits=false) is not supported")
        return [DIGITS_RE], False
    raise ConversionError(f"{path}: pre_tokenizer of type {kind!r} is not supported (not byte-level BPE?)")


def pre_tokenizer_name(tokenizer: dict[str, Any], path: Path, adds_bos: bool) -> str:
    """tokenizer.ggml.pre for a tokenizer.json: its regexes and normalizer looked up in PRE_TOKENIZERS."""
    regexes, byte_level = _splits(tokenizer.get("pre_tokenizer"), path)
    if not byte_level:
        raise ConversionError(f"{path}: the pre_tokenizer has no ByteLevel step; only byte-level BPE (GPT-2 style) "
                              f"tokenizer.json files convert")
    normalizer = tokenizer.get("normalizer")
    norm_type = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    for pre in PRE_TOKENIZERS:
        if tuple(regexes) == pre.splits:
            if norm_type not in pre.normalizers:
                raise ConversionError(f"{path}: normalizer {normalizer!r} is not supported with the {pre.name} "
                                      f"pre-tokenizer (llama.cpp would not apply it)")
            return pre.name_with_bos if adds_bos and pre.name_with_bos else pre.name
    known = ", ".join(p.name for p in PRE_TOKENIZERS)
    shown = " then ".join(f"`{r}`" for r in regexes) or "none"
    raise ConversionError(f"{path}: unrecognised pre-tokenizer: regex split(s) {shown}, then byte-level; "
                          f"llama.cpp pre-tokenizers known here: {known}")


# ------------------------------------------------------------------------------ vocabulary
def _check_model(model: Any, path: Path) -> tuple[dict[str, int], list]:
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise ConversionError(f"{path}: model type {kind!r}; only BPE tokenizer.json files convert")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ConversionError(f"{path}: a BPE model with byte_fallback / continuing_subword_prefix / "
                              f"end_of_word_suffix is not byte-level BPE (SentencePiece-style: ship tokenizer.model)")
    if model.get("dropout"):
        raise ConversionError(f"{path}: BPE dropout {model['dropout']!r} is not supported")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise ConversionError(f"{path}: model.vocab: expected an object of token -> non-negative id")
    if not isinstance(merges, list):
        raise ConversionError(f"{path}: model.merges: expected a list")
    return vocab, merges


def _is_id(value: Any) -> bool:
    """A token id as JSON may hold one: a non-negative integer, not true/false."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _merge_strings(merges: list, path: Path) -> list[str]:
    """Merges as llama.cpp stores them: "a b", spaces inside a part spelled as SPACE_IN_MERGE."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(" ".join(p.replace(" ", SPACE_IN_MERGE) for p in m))
        else:
            raise ConversionError(f"{path}: model.merges: entry {m!r} is neither \"a b\" nor [\"a\", \"b\"]")
    return out


def _looks_special(token: str) -> bool:
    """llama.cpp's TextModel.does_token_look_special: added tokens typed CONTROL though not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokens_and_types(vocab: dict[str, int], added: list[dict[str, Any]], n_vocab: int, path: Path):
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    special: dict[str, bool] = {}
    for a in added:
        content, i = a.get("content"), a.get("id")
        if not isinstance(content, str) or not _is_id(i):
            raise ConversionError(f"{path}: added_tokens: entry {a!r} lacks a string content and an id")
        by_id[i] = content
        special[content] = bool(a.get("special"))
    if by_id and max(by_id) >= n_vocab:
        raise ConversionError(f"{path}: token id {max(by_id)} is beyond config.json vocab_size {n_vocab}")
    tokens, types = [], np.empty(n_vocab, np.int32)
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types[i] = TokenType.UNUSED
        elif token in special:
            if special[token] or _looks_special(token):
                types[i] = TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
                types[i] = TokenType.USER_DEFINED
            tokens.append(token)
        else:
            tokens.append(token)
            types[i] = TokenType.NORMAL
    return tokens, types


# ------------------------------------------------------------------------------ special tokens
def _post_processor_adds(tokenizer: dict[str, Any], contents: dict[str, str | None], path: Path) -> dict[str, bool]:
    """add_bos / add_eos as tokenizer.json's post_processor decides them (gguf.SpecialVocab's reading).

    A template that adds a token other than the bos/eos tokenizer_config.json names would make
    llama.cpp tokenize differently from HF, so it is refused.
    """
    adds: dict[str, bool] = {}
    post = tokenizer.get("post_processor")
    if not post:
        return adds
    if not isinstance(post, dict):
        raise ConversionError(f"{path}: post_processor: expected an object, found {post!r}")
    processors = post.get("processors", [post])
    if not isinstance(processors, list):
        raise ConversionError(f"{path}: post_processor.processors: expected a list, found {type(processors).__name__}")
    for proc in processors:
        kind = proc.get("type") if isinstance(proc, dict) else proc
        if kind == "ByteLevel":
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            if not isinstance(single, list) or not all(
                    isinstance(p, dict) and isinstance(p.get("SpecialToken", {}), dict)
                    and isinstance(p.get("SpecialToken", {}).get("id", ""), str) for p in single):
                raise ConversionError(f"{path}: post_processor TemplateProcessing.single: expected a list of "
                                      f"{{\"SpecialToken\": {{\"id\": string}}}} / {{\"Sequence\": ...}} pieces")
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                for typ, tok in (("bos", first), ("eos", last)):
                    if tok is None:
                        continue
                    if contents[typ] is None:
                        contents[typ] = tok
                    elif tok != contents[typ]:
                        raise ConversionError(f"{path}: post_processor adds {tok!r} where tokenizer_config.json's "
                                              f"{typ}_token is {contents[typ]!r}; llama.cpp would not add it")
                    adds[typ] = True
        else:
            raise ConversionError(f"{path}: post_processor of type {kind!r} is not supported")
    return adds


def _generation_eos(model_dir: Path) -> list[int]:
    gen = read_json_object(model_dir / GENERATION_CONFIG).get("eos_token_id")
    ids = gen if isinstance(gen, list) else [gen]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def bpe_tokenizer_metadata(model_dir: str | Path, n_vocab: int, hf_config: dict[str, Any] | None = None,
                           add_prefix_space_key: bool = False) -> dict[str, object]:
    """The tokenizer.* keys for a model directory holding a byte-level BPE tokenizer.json.

    `add_prefix_space_key`: write tokenizer_config.json's add_prefix_space as tokenizer.ggml.add_space_prefix
    (llama.cpp's LlamaModel does; Qwen2Model does not).
    """
    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER_JSON
    tokenizer = read_json_object(path, required=True)
    tok_config = read_json_object(model_dir / TOKENIZER_CONFIG)
    config = hf_config or {}
    vocab, merges = _check_model(tokenizer.get("model"), path)
    added = tokenizer.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise ConversionError(f"{path}: added_tokens: expected a list of objects")
    tokens, types = _tokens_and_types(vocab, added, n_vocab, path)

    contents = {t: _token_content(tok_config.get(f"{t}_token"), f"{model_dir / TOKENIZER_CONFIG}: {t}_token")
                for t in (*SPECIAL_TYPES, "cls")}
    contents["bos"] = contents["bos"] or contents["cls"]
    contents["eos"] = contents["eos"] or contents["sep"]
    adds = _post_processor_adds(tokenizer, contents, path)
    for typ in SPECIAL_TYPES:
        flag = tok_config.get(f"add_{typ}_token")
        if flag is not None and typ not in adds:
            adds[typ] = config_flag(tok_config, f"add_{typ}_token", False, model_dir / TOKENIZER_CONFIG)
    prefix = tok_config.get("add_prefix_space")
    if prefix is True:
        raise ConversionError(f"{model_dir / TOKENIZER_CONFIG}: add_prefix_space=true is not supported for byte-level "
                              f"BPE (llama.cpp's BPE tokenizer adds no prefix space)")

    ids: dict[str, int] = {}
    added_id = {}
    for a in added:
        added_id.setdefault(a["content"], a["id"])
    for typ in SPECIAL_TYPES:  # tokenizer_config.json names, looked up among the added tokens
        if contents[typ] is not None and contents[typ] in added_id:
            ids[typ] = added_id[contents[typ]]
        elif contents[typ] is not None:
            log.warning("%s: %s_token %r is not an added token of %s; ignored", model_dir, typ, contents[typ], path.name)
    for typ in SPECIAL_TYPES:  # then config.json's <typ>_token_id
        value = config.get(f"{typ}_token_id")
        if typ not in ids and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ids[typ] = value
    gen_eos = _generation_eos(model_dir)
    if "eos" not in ids and gen_eos:  # not read by llama.cpp: only when nothing else names an eos
        ids["eos"] = gen_eos[0]
    for i in gen_eos:
        if i != ids.get("eos") and 0 <= i < n_vocab and tokens[i] not in EOG_TEXTS:
            log.warning("%s: %s lists eos id %d (%r), which llama.cpp does not treat as end-of-generation",
                        model_dir, GENERATION_CONFIG, i, tokens[i])
    for typ, i in ids.items():
        if i >= n_vocab:
            raise ConversionError(f"{model_dir}: {typ} token id {i} is beyond vocab_size {n_vocab}")

    meta: dict[str, object] = {
        Keys.TOKENIZER_MODEL: GGUF_TOKENIZER_MODEL,
        Keys.TOKENIZER_PRE: pre_tokenizer_name(
            tokenizer, path, adds_bos=adds.get("bos", False) or tok_config.get("add_bos_token") is True),
        Keys.TOKENS: tokens,
        Keys.TOKEN_TYPE: types,
    }
    if merges:
        meta[Keys.MERGES] = _merge_strings(merges, path)
    else:
        log.warning("%s: no merges; the tokenizer will only ever produce single bytes", path)
    for typ, i in ids.items():
        meta[ID_KEYS[typ]] = i
    for typ, flag in adds.items():
        if typ in ADD_KEYS:
            meta[ADD_KEYS[typ]] = flag
    if add_prefix_space_key and prefix is False:
        meta[Keys.ADD_SPACE_PREFIX] = False
    template = _chat_template(model_dir, tok_config) if tok_config else None  # llama.cpp: none without the file
    if template is not None:
        meta[Keys.CHAT_TEMPLATE] = template
    return meta
