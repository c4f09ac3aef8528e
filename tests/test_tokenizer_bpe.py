"""The byte-level BPE tokenizer against llama.cpp's vocabulary test vectors and HF `tokenizers`.

llama.cpp ships two vocabulary-only GGUF files with expected ids (Llama 3's "llama-bpe" and
Qwen2's); HF `tokenizers`, built from the same tokens and merges with the same pre-tokenizer
regexes, checks every pre-tokenizer on thousands of generated strings. Pre-tokenizers without
a vocabulary file of their own run on the Llama 3 or Qwen2 vocabulary: the regex is what differs.
"""
from __future__ import annotations

import logging
import random
import unicodedata
from pathlib import Path

import pytest

from pyggml.gguf import GGUFFile, Keys, TokenType
from pyggml.tokenizer import PRE_TOKENIZERS, BpeTokenizer, TokenizerError, load_tokenizer

N_STRINGS = 5000  # generated strings per pre-tokenizer
VOCABS = ["llama-bpe", "qwen2"]


# --- test strings ---------------------------------------------------------------------------------

WORDS = (
    "the a of and to in is was he she it they hello world quick brown fox jumps over lazy dog Once upon time "
    "don't can't it's we'll I'm you're they've she'd DON'T WE'LL e-mail U.S.A. 3.14 1,000 $5 100% #tag "
    "@user http://example.com/path?x=1 C++ x86_64 naïve façade Ärger Straße McDonald iPhone HTTPServer camelCase"
).split()
SCRIPT_WORDS = (
    "Привет мир съешь ещё 日本語 中文 東京 こんにちは カタカナ 한국어 서울 العربية مرحبا كتاب हिन्दी नमस्ते भारत "
    "Ελληνικά αβγ שלום עברית ภาษาไทย Tiếng Việt ქართული Հայերեն ትግርኛ"
).split()
RANGES = [(0x4E00, 0x9FFF), (0x3041, 0x30FA), (0xAC00, 0xD7A3), (0x0410, 0x044F), (0x0621, 0x064A),
          (0x0900, 0x097F), (0x0391, 0x03C9), (0x05D0, 0x05EA), (0x0E01, 0x0E5B), (0x00C0, 0x024F)]  # fmt: skip
CODE = [
    "def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "if x != None and y >= 3:",
    "#include <stdio.h>", "SELECT * FROM t WHERE id=42;", "const f = (a, b) => a + b;", "print(f\"{x!r:>10}\")",
    "    \n    pass", "x = [1, 2, 3]  # list", "fn main() -> i32 { 0 }", "<div class=\"a\">&nbsp;</div>", "a\\b\\n",
]  # fmt: skip
EMOJI = ["😀", "👍", "❤️", "🎉", "🔥", "🇺🇸", "1️⃣", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏽‍🚀", "🤷🏼‍♀️", "👋🏿"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\n\n\t", " \n ", "\t\t", "\u00a0", "\u3000", "\u2009",
              "\v", "\f", "\x85", "\u2028", " " * 17]  # fmt: skip
LOOK_ALIKES = ["<|im_start", "im_start|>", "< |eot_id|>", "<|eot_id |>", "<|begin_of_text>", "<s>", "</s>",
               "<|endoftext|", "[PAD151650", "<|", "|>", "<<|>>", "'s", "'S", "'LL", "'ll", "'Re", "'ve", "'d",
               "''", "'", "’s"]  # fmt: skip
APOSTROPHES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Ve", "'x", "’ll"]


def _pick_char(rng: random.Random) -> str:
    lo, hi = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x2FFFF)])  # 1-4 UTF-8 bytes
    c = chr(rng.randint(lo, hi))
    # Assigned characters only (surrogates are not text; characters newer than this Python's Unicode
    # may have another category in the regex engine under test).
    return c if unicodedata.category(c) not in ("Cs", "Cn") else "?"


def _english(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    return " ".join(words) + rng.choice([".", "!", "?", ",", "", "...", ":", " "])


def _script(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice([" ", "", "、"]).join(rng.choice(SCRIPT_WORDS) for _ in range(rng.randint(1, 5)))
    lo, hi = rng.choice(RANGES)
    return "".join(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else " " for _ in range(rng.randint(1, 12)))


def _digits(rng: random.Random) -> str:
    run = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14)))
    return rng.choice(["", " ", "x", "$", "v", "٣", "(", "a "]) + run + rng.choice(["", " ", ".5", "th", "%", "١٢"])


def _whitespace(rng: random.Random) -> str:
    parts = [rng.choice(WHITESPACE) if rng.random() < 0.5 else ""]
    for _ in range(rng.randint(1, 5)):
        parts += [rng.choice(WORDS), rng.choice(WHITESPACE)]
    return "".join(parts[:-1] if rng.random() < 0.4 else parts)  # trailing whitespace half the time


def _emoji(rng: random.Random) -> str:
    joins = ["", " ", "\u200d", rng.choice(WORDS)]
    return "".join(rng.choice(EMOJI) + rng.choice(joins) for _ in range(rng.randint(1, 4)))


def _look_alikes(rng: random.Random) -> str:
    return "".join(rng.choice(LOOK_ALIKES) + rng.choice(["", " ", "a", "\n", rng.choice(WORDS)])
                   for _ in range(rng.randint(1, 4)))  # fmt: skip


def _apostrophes(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(APOSTROPHES) for _ in range(rng.randint(1, 4)))


def _code_points(rng: random.Random) -> str:
    return "".join(_pick_char(rng) for _ in range(rng.randint(1, 10)))


def _combining(rng: random.Random) -> str:
    return "".join(rng.choice("aeinoAEKsz éñ") + chr(rng.randint(0x300, 0x36F)) * rng.randint(0, 2)
                   for _ in range(rng.randint(1, 8)))  # fmt: skip


GENERATORS = [_english, _script, _digits, _whitespace, _emoji, _look_alikes, _apostrophes, _code_points,
              _combining, lambda rng: rng.choice(CODE)]  # fmt: skip
EDGE_CASES = ["", " ", "  ", "\n", "\n\n\n", "\t", " \t\n", "a", " a", "a ", "Hello world", " Hello world", "1234567",
              "'s", "don't", "😀", "👨‍👩‍👧‍👦", "日本語", "<|im_start|>user", "<|eot_id|>", "\r\n\r\n", "   leading",
              "trailing   ", "A\n\n\n\nB", "x" * 300, " " * 300, "ab" * 150]  # fmt: skip


def make_strings(n: int, seed: int) -> list[str]:
    """`n` deterministic test strings: edge cases, each generator in turn, and mixtures of them."""
    rng = random.Random(seed)
    out = list(EDGE_CASES)
    i = 0
    while len(out) < n:
        if i % (len(GENERATORS) + 1) < len(GENERATORS):
            out.append(GENERATORS[i % (len(GENERATORS) + 1)](rng))
        else:
            out.append(rng.choice(["", " ", "\n"]).join(rng.choice(GENERATORS)(rng) for _ in range(rng.randint(2, 4))))
        i += 1
    return out


STRINGS = make_strings(N_STRINGS, seed=2024)


# --- fixtures -------------------------------------------------------------------------------------

_metadata: dict[str, dict] = {}
_tokenizers: dict[str, BpeTokenizer] = {}


def vocab_path(models_dir: Path, name: str) -> Path:
    path = models_dir / "vocab" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (llama.cpp's vocabulary test files)")
    return path


def vocab_metadata(models_dir: Path, name: str) -> dict:
    if name not in _metadata:
        with GGUFFile(vocab_path(models_dir, name)) as f:
            _metadata[name] = dict(f.metadata)
    return _metadata[name]


def vocab_tokenizer(models_dir: Path, name: str) -> BpeTokenizer:
    if name not in _tokenizers:
        _tokenizers[name] = load_tokenizer(vocab_metadata(models_dir, name))
    return _tokenizers[name]


@pytest.fixture(scope="module", params=VOCABS)
def vocab(request, models_dir) -> tuple[str, BpeTokenizer]:
    return request.param, vocab_tokenizer(models_dir, request.param)


@pytest.fixture(scope="module")
def llama3(models_dir) -> BpeTokenizer:
    return vocab_tokenizer(models_dir, "llama-bpe")


@pytest.fixture(scope="module")
def qwen2(models_dir) -> BpeTokenizer:
    return vocab_tokenizer(models_dir, "qwen2")


def _mismatches(strings: list[str], ours: list, theirs: list) -> list[str]:
    bad = [f"{s!r}: ours {a} reference {b}" for s, a, b in zip(strings, ours, theirs) if a != b]
    return bad[:5] + ([f"... {len(bad)} of {len(ours)} differ"] if bad else [])


# --- llama.cpp's test vectors ---------------------------------------------------------------------


def read_vocab_tests(path: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) cases of X.gguf.inp / X.gguf.out, split as llama.cpp's test-tokenizer-0 does."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts = raw.split(sep)
    if raw.endswith(sep):
        texts.pop()
    expected = [[int(i) for i in line.split()] for line in path.with_name(path.name + ".out").read_text().splitlines()]
    assert len(texts) == len(expected), f"{path}: {len(texts)} inputs, {len(expected)} outputs"
    return list(zip(texts, expected))


def test_llama_cpp_vocab_vectors(vocab, models_dir):
    name, tok = vocab
    cases = read_vocab_tests(vocab_path(models_dir, name))
    assert len(cases) >= 40
    assert tok.pre == name
    ours = [tok.encode(text, add_bos=False, add_eos=False, parse_special=False) for text, _ in cases]
    assert not _mismatches([t for t, _ in cases], ours, [ids for _, ids in cases])


# --- HF tokenizers as a second oracle -------------------------------------------------------------

# One pre-tokenizer name for each distinct way of cutting words (regexes + ignore_merges), with the
# vocabulary it runs on.
ORACLE_VOCAB = {"qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "qwen35": "qwen2", "ufakzeka": "qwen2"}
_distinct: dict[tuple, str] = {}
for _name in ["llama-bpe", "qwen2", "smollm", "gpt-2", "deepseek-r1-qwen", "tekken", *sorted(PRE_TOKENIZERS)]:
    _spec = PRE_TOKENIZERS[_name]
    _distinct.setdefault((_spec.regexes, _spec.ignore_merges), _name)
ORACLE_PRES = sorted(set(_distinct.values()) | {"deepseek-r1-qwen"})

_hf: dict[tuple[str, bool], object] = {}


def hf_tokenizer(models_dir: Path, vocab_name: str, pre: str):
    """HF tokenizers' byte-level BPE over the GGUF vocabulary and merges, cutting words with `pre`'s regexes."""
    tk = pytest.importorskip("tokenizers")
    spec = PRE_TOKENIZERS[pre]
    key = (vocab_name, spec.ignore_merges)
    if key not in _hf:
        meta = vocab_metadata(models_dir, vocab_name)
        tokens, types = list(meta[Keys.TOKENS]), list(meta[Keys.TOKEN_TYPE])
        merges = [tuple(m.split(" ", 1)) for m in meta[Keys.MERGES]]
        model = tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=spec.ignore_merges)
        hf = tk.Tokenizer(model)
        user = [tokens[i] for i, t in enumerate(types) if t == TokenType.USER_DEFINED]
        if user:  # split out of plain text, as llama.cpp does
            hf.add_tokens([tk.AddedToken(t, special=False, normalized=False) for t in user])
        hf.decoder = tk.decoders.ByteLevel()
        _hf[key] = hf
    hf = _hf[key]
    splits = [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in spec.regexes]
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [*splits, tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf


@pytest.mark.parametrize("pre", ORACLE_PRES)
def test_encode_matches_hf_tokenizers(pre, models_dir):
    vocab_name = ORACLE_VOCAB.get(pre, "llama-bpe")
    hf = hf_tokenizer(models_dir, vocab_name, pre)
    tok = vocab_tokenizer(models_dir, vocab_name).with_pre_tokenizer(pre)
    assert len(STRINGS) >= 5000
    theirs = [e.ids for e in hf.encode_batch(STRINGS, add_special_tokens=False)]
    ours = [tok.encode(s, add_bos=False, parse_special=False) for s in STRINGS]
    assert not _mismatches(STRINGS, ours, theirs)


def test_decode_matches_hf_tokenizers(vocab, models_dir):
    name, tok = vocab
    hf = hf_tokenizer(models_dir, name, name)
    ids = [tok.encode(s, add_bos=False) for s in STRINGS[:1000]]
    assert not _mismatches(STRINGS, [tok.decode(i) for i in ids], hf.decode_batch(ids, skip_special_tokens=False))


# --- decoding -------------------------------------------------------------------------------------


def test_decode_round_trip(vocab):
    _, tok = vocab
    decoded = [tok.decode(tok.encode(s, add_bos=False)) for s in STRINGS]
    assert not _mismatches(STRINGS, decoded, STRINGS)


def _stream(tok: BpeTokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = tok.detokenizer(**kwargs)
    return [detok.feed(i) for i in ids] + [detok.flush()]


def test_streaming_equals_decode(vocab):
    _, tok = vocab
    for s in STRINGS[::5]:
        ids = tok.encode(s, add_bos=False)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == s, ids
        assert all("\ufffd" not in c for c in chunks), (s, chunks)  # no chunk carries a broken character


SPLIT_TEXTS = ["😀", "👨‍👩‍👧‍👦", "ქართული", "a🤷🏼‍♀️b", "龘", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ཀྵ"]


def test_streaming_holds_split_characters(vocab):
    _, tok = vocab
    n_split = 0
    for text in SPLIT_TEXTS:
        ids = tok.encode(text, add_bos=False)
        if any(_incomplete(tok.token_to_bytes(i)) for i in ids):  # a token holds part of a character
            n_split += 1
            chunks = _stream(tok, ids)
            assert "".join(chunks) == text
            assert all("\ufffd" not in c for c in chunks), (text, chunks)
            assert all(any(ch in c for c in chunks) for ch in text)  # every character arrives whole, in one chunk
            assert "" in chunks[:-1]  # a token with part of a character shows nothing yet
    assert n_split >= 3


def _incomplete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_streaming_flushes_incomplete_bytes(llama3):
    ids = llama3.encode("😀", add_bos=False)  # F0 9F 98 80 over several tokens
    chunks = _stream(llama3, ids[:-1])
    assert chunks[:-1] == [""] * (len(ids) - 1)
    assert chunks[-1] == "\ufffd" * len(b"".join(map(llama3.token_to_bytes, ids[:-1])))
    # An incomplete character cut short by a user-defined or control token is broken there.
    assert llama3.decode([*ids[:-1], llama3.bos_id, *ids[-1:]]).startswith("\ufffd")


def test_token_to_bytes(llama3, qwen2):
    assert llama3.token_to_bytes(llama3.encode(" hello", add_bos=False)[0]) == b" hello"
    assert llama3.token_to_bytes(llama3.encode("\n\n", add_bos=False)[0]) == b"\n\n"
    assert llama3.token_to_bytes(llama3.bos_id) == b""
    assert llama3.token_to_bytes(llama3.bos_id, special=True) == b"<|begin_of_text|>"
    pad = qwen2.encode("[PAD151650]", add_bos=False)
    assert pad == [151650] and qwen2.token_to_bytes(151650) == b"[PAD151650]"  # user-defined: always its text
    with pytest.raises(TokenizerError):
        llama3.token_to_bytes(llama3.n_vocab)


# --- special tokens, BOS, end of generation -------------------------------------------------------


def test_llama3_bos_and_special_tokens(llama3):
    tok = llama3
    assert tok.pre == "llama-bpe" and tok.add_bos and not tok.add_eos  # llama.cpp's default for Llama 3
    assert tok.tokens[tok.bos_id] == "<|begin_of_text|>" and tok.tokens[tok.eos_id] == "<|end_of_text|>"
    body = tok.encode("Hello world", add_bos=False)
    assert body == [9906, 1917]
    assert tok.encode("Hello world") == [tok.bos_id, *body]
    assert tok.encode("") == [tok.bos_id]
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = tok.encode(text, add_bos=False, parse_special=True)
    sid, eid, eot = (tok.tokens.index(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert ids == [sid, *tok.encode("user", add_bos=False), eid, *tok.encode("\n\nHi", add_bos=False), eot]
    plain = tok.encode(text, add_bos=False)  # without parse_special: ordinary text
    assert not {sid, eid, eot} & set(plain) and tok.decode(plain) == text
    assert tok.decode(ids) == "user\n\nHi" and tok.decode(ids, special=True) == text
    look_alike = "< |eot_id|><|eot_id |><|begin_of_text>"
    assert tok.encode(look_alike, add_bos=False, parse_special=True) == tok.encode(look_alike, add_bos=False)


def test_llama3_end_of_generation(llama3):
    tok = llama3
    eot = tok.tokens.index("<|eot_id|>")
    assert tok.eog_ids == {tok.eos_id, eot}  # <|end_of_text|>, <|eot_id|>: llama.cpp's set for this file
    assert tok.is_eog(eot) and not tok.is_eog(tok.bos_id) and not tok.is_eog(tok.encode("a", add_bos=False)[0])
    meta = {**llama3_metadata(tok), Keys.EOM_ID: 128008, Keys.EOT_ID: 128009}
    assert load_tokenizer(meta).eog_ids == {tok.eos_id, 128008, 128009}


def llama3_metadata(tok: BpeTokenizer) -> dict:
    return {k: v for k, v in _metadata["llama-bpe"].items() if k.startswith("tokenizer.")}


def test_qwen2_special_tokens(qwen2):
    tok = qwen2
    assert not tok.add_bos  # Qwen2 adds no BOS
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=False) == [13048]
    im_start, im_end = tok.tokens.index("<|im_start|>"), tok.tokens.index("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.encode("<|im_start", parse_special=True) == tok.encode("<|im_start")
    # llama.cpp's end-of-generation set: <|endoftext|>, <|im_end|>, and the ordinary "</s>" token
    # (its text is on llama.cpp's list, which makes it a control token too).
    s = tok.tokens.index("</s>")
    assert tok.eog_ids == {tok.eos_id, im_end, s}
    assert tok.encode("a</s>b", parse_special=True) == [64, s, 65]
    # User-defined tokens are cut out even without parse_special, as llama.cpp does.
    assert tok.encode("a[PAD151650]b") == [64, 151650, 65]


def test_gpt2_style_control_token_becomes_eog():
    tokens = ["a", "b", "ab", "<|endoftext|>", "<|im_end|>", "Ġ"]
    types = [1, 1, 1, 1, 3, 1]  # GPT-2 ships <|endoftext|> as an ordinary token
    tok = BpeTokenizer(tokens, ["a b"], types, pre="gpt-2", eos_id=3)
    assert tok.eog_ids == {3, 4}
    assert tok.token_types[3] == TokenType.CONTROL  # llama.cpp makes it one
    assert tok.encode("ab<|endoftext|>", parse_special=True) == [2, 3]
    assert tok.decode([2, 3]) == "ab" and tok.decode([2, 3], special=True) == "ab<|endoftext|>"


# --- metadata -------------------------------------------------------------------------------------


def test_unknown_pre_is_refused(llama3):
    meta = {**llama3_metadata(llama3), Keys.TOKENIZER_PRE: "no-such-pre"}
    with pytest.raises(TokenizerError, match="'no-such-pre'.*supported:.*llama-bpe.*qwen2"):
        load_tokenizer(meta)
    with pytest.raises(TokenizerError, match="no-such-pre"):
        llama3.with_pre_tokenizer("no-such-pre")


def test_missing_pre_uses_llama_cpp_default(llama3, caplog):
    meta = {k: v for k, v in llama3_metadata(llama3).items() if k != Keys.TOKENIZER_PRE}
    with caplog.at_level(logging.WARNING, logger="pyggml.tokenizer.bpe"):
        tok = load_tokenizer(meta)
    assert tok.pre == "default" and "default" in caplog.text
    assert not tok.add_bos  # the Llama 3 default comes with its pre-tokenizer name, not the vocabulary
    # llama.cpp's default cuts punctuation runs and digit runs apart: "3.14" -> 3 . 14
    assert tok.pre_tokenize("pi=3.14!!") == ["pi", "=", "3", ".", "14", "!!"]


def test_missing_merges_is_refused():
    with pytest.raises(TokenizerError, match=Keys.MERGES):
        load_tokenizer({Keys.TOKENIZER_MODEL: "gpt2", Keys.TOKENS: ["a"], Keys.TOKEN_TYPE: [1]})


def test_pre_tokenizer_table():
    # Aliases share llama.cpp's regexes; Llama 3 and Tekken add BOS by default and skip merges for whole tokens.
    assert PRE_TOKENIZERS["llama3"] is PRE_TOKENIZERS["llama-bpe"]
    assert PRE_TOKENIZERS["dbrx"].regexes == PRE_TOKENIZERS["smaug-bpe"].regexes == PRE_TOKENIZERS["llama-bpe"].regexes
    assert not PRE_TOKENIZERS["dbrx"].ignore_merges and PRE_TOKENIZERS["llama-bpe"].ignore_merges
    assert PRE_TOKENIZERS["qwen2"] is PRE_TOKENIZERS["deepseek-r1-qwen"]
    assert PRE_TOKENIZERS["smollm"].regexes[0] == r"\p{N}"
    assert {n for n, p in PRE_TOKENIZERS.items() if p.add_bos} >= {"llama-bpe", "tekken"}
    assert not PRE_TOKENIZERS["qwen2"].add_bos
