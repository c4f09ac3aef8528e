"""The GGUF-metadata tokenizer against sentencepiece itself: exact ids, exact decoded text.

Real tokenizers (stories260K's 512-piece model, Llama 2's 32,000) run over a few thousand
generated strings each; tiny models trained here cover what those two never exercise
(NFKC normalization through the precompiled charsmap, user-defined pieces, UNUSED pieces,
no byte fallback, no dummy prefix).
"""
from __future__ import annotations

import io
import json
import random
import unicodedata
from pathlib import Path

import pytest

from pyggml.gguf import GGUFFile, Keys, TokenType, write_gguf
from pyggml.convert.tokenizer import _varint, tokenizer_metadata
from pyggml.tokenizer import SpmTokenizer, StreamingDetokenizer, Tokenizer, TokenizerError, load_tokenizer

spm = pytest.importorskip("sentencepiece")

N_STRINGS = 2200  # generated strings per real tokenizer
SPACE = "\u2581"


# --- test strings ---------------------------------------------------------------------------------

WORDS = (
    "the a of and to in is was he she it they once upon time little girl named lily loved play outside "
    "sunshine happy dog ran park tree big red ball friend said hello world quick brown fox jumps over lazy "
    "don't can't it's e-mail U.S.A. 3.14 1,000 $5 100% #tag @user http://example.com/path?x=1 C++ x86_64"
).split()
SCRIPT_WORDS = (
    "Привет мир Москва съешь ещё 日本語 中文 東京 こんにちは カタカナ 한국어 서울 العربية مرحبا كتاب "
    "हिन्दी नमस्ते भारत Ελληνικά αβγ שלום עברית ภาษาไทย Tiếng Việt Ärger Straße façade naïve"
).split()
RANGES = {  # (first, last) code points of a few scripts
    "cjk": (0x4E00, 0x9FFF), "hiragana": (0x3041, 0x3096), "katakana": (0x30A1, 0x30FA),
    "hangul": (0xAC00, 0xD7A3), "cyrillic": (0x0410, 0x044F), "arabic": (0x0621, 0x0652),
    "devanagari": (0x0900, 0x097F), "greek": (0x0391, 0x03C9), "hebrew": (0x05D0, 0x05EA),
    "thai": (0x0E01, 0x0E5B),
}  # fmt: skip
EMOJI = ["😀", "👍", "❤️", "🎉", "🔥", "🚀", "👩", "👨", "👧", "👦", "🐍", "🇺🇸", "🇯🇵", "1️⃣", "#️⃣", "🤷", "🧑"]
ZWJ_SEQUENCES = ["👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏽‍🚀", "🧑🏿‍🤝‍🧑🏻", "🤷🏼‍♀️", "👁️‍🗨️"]
SKIN_TONES = [chr(c) for c in range(0x1F3FB, 0x1F400)]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000", "\u2009", "\v", "\f", " \t "]
CONTROLS = [chr(c) for c in [*range(0, 32), 0x7F, 0x85, 0x9F, 0x200B, 0x200D, 0x200E, 0x2028, 0xFEFF]]
SPECIAL_TEXTS = ["<s>", "</s>", "<unk>", "<pad>", "<s", "s>", "</s></s>", "<<s>>", "< s >"]
NFKC_TEXTS = ["ﬁ", "ｆｕｌｌ", "ｶﾀｶﾅ", "ｶﾞ", "①", "²", "Ⅻ", "㎏", "™", "…", "ǆ", "Å", "e\u0301", "x\u00b4y", "ſ"]
EDGE_CASES = [
    "", " ", "  ", "\t", "\n", "a", " a", "a ", " a ", "a  b", "a   b   c", SPACE, SPACE * 3, f"a{SPACE}",
    f"{SPACE}a", f" {SPACE} a", "<s>", "</s>", "<unk>", "<s>hello</s>", " <s> ", "😀", "👩‍💻", "\x00", "\ufffd",
    "Once upon a time", "Hello world!", "   leading", "trailing   ", "\n\nparagraph\n\n", "\t\tindent",
]  # fmt: skip


def _english(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "!", "?", ",", "", "...", ":"])


def _cased_words(rng: random.Random) -> str:
    def word() -> str:
        w = "".join(c.upper() if rng.random() < 0.4 else c for c in rng.choice(WORDS))
        return w + (str(rng.randint(0, 10**rng.randint(1, 6))) if rng.random() < 0.5 else "")

    return rng.choice([" ", "", "_", "-"]).join(word() for _ in range(rng.randint(1, 6)))


def _script(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(SCRIPT_WORDS) for _ in range(rng.randint(1, 5)))
    lo, hi = RANGES[rng.choice(sorted(RANGES))]
    return "".join(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else " " for _ in range(rng.randint(1, 12)))


def _emoji(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice(ZWJ_SEQUENCES))
        elif r < 0.55:
            parts.append(rng.choice(["👍", "👋", "🧑", "👩", "✋"]) + rng.choice(SKIN_TONES))
        elif r < 0.7:
            parts.append("\u200d".join(rng.choice(EMOJI) for _ in range(rng.randint(2, 4))))
        else:
            parts.append(rng.choice(EMOJI))
        parts.append(rng.choice(["", " ", " ", rng.choice(WORDS) + " "]))
    return "".join(parts)


def _combining(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 8)):
        out.append(rng.choice("aeiouAEnNcszy" + "éñÅ" + " "))
        out += [chr(rng.randint(0x300, 0x36F)) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
    return "".join(out)


def _whitespace(rng: random.Random) -> str:
    parts = [rng.choice(WHITESPACE) if rng.random() < 0.5 else ""]
    for _ in range(rng.randint(1, 5)):
        parts += [rng.choice(WORDS), rng.choice(WHITESPACE)]
    if rng.random() < 0.5:
        parts.pop()
    return "".join(parts)


def _controls(rng: random.Random) -> str:
    return "".join(rng.choice(CONTROLS) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


def _specials(rng: random.Random) -> str:
    return "".join(
        rng.choice(SPECIAL_TEXTS) if rng.random() < 0.5 else rng.choice(["", " "]) + rng.choice(WORDS)
        for _ in range(rng.randint(1, 5))
    )


def _code_points(rng: random.Random) -> str:
    def cp() -> str:
        lo, hi = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF)])  # 1-4 UTF-8 bytes
        c = rng.randint(lo, hi)
        return chr(c) if not 0xD800 <= c <= 0xDFFF else "?"  # no lone surrogates: not encodable text

    return "".join(cp() for _ in range(rng.randint(1, 10)))


def _nfkc(rng: random.Random) -> str:
    parts = [rng.choice(NFKC_TEXTS) + rng.choice(["", " ", rng.choice(WORDS)]) for _ in range(rng.randint(1, 5))]
    return "".join(parts)


GENERATORS = [_english, _cased_words, _script, _emoji, _combining, _whitespace, _controls, _specials, _code_points, _nfkc]


def make_strings(n: int, seed: int, vocab: list[str]) -> list[str]:
    """`n` deterministic test strings: edge cases, every generator in turn, vocabulary soups, mixtures."""
    rng = random.Random(seed)
    pieces = [p for p in vocab if p and not (p.startswith("<") and p.endswith(">"))]
    out = list(EDGE_CASES)
    i = 0
    while len(out) < n:
        kind = i % (len(GENERATORS) + 2)
        if kind < len(GENERATORS):
            out.append(GENERATORS[kind](rng))
        elif kind == len(GENERATORS):  # pieces of the vocabulary glued together: many competing merges
            soup = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            out.append(soup.replace(SPACE, " ") if rng.random() < 0.7 else soup)
        else:
            out.append("".join(rng.choice(GENERATORS)(rng) for _ in range(rng.randint(2, 4))))
        i += 1
    out.append(" ".join(_english(rng) for _ in range(120)))  # one long text
    return out


# --- fixtures -------------------------------------------------------------------------------------

REAL_TOKENIZERS = ["stories260K-hf", "llama2-tokenizer"]


class Case:
    """One tokenizer under test: ours, sentencepiece's, the metadata and the strings."""

    def __init__(self, name: str, sp, meta: dict, strings: list[str], **overrides):
        self.name, self.sp, self.meta, self.strings = name, sp, meta, strings
        self.tok: SpmTokenizer = load_tokenizer(meta, **overrides)
        self.sp_ids = [sp.encode(s) for s in strings]
        self.id_pools: list | None = None  # for _random_ids


@pytest.fixture(scope="module", params=REAL_TOKENIZERS)
def real(request, models_dir) -> Case:
    d = models_dir / request.param
    if not (d / "tokenizer.model").is_file():
        pytest.skip(f"{d} has no tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    config = d / "config.json"
    n_vocab = json.loads(config.read_text())["vocab_size"] if config.is_file() else sp.vocab_size()
    meta = tokenizer_metadata(d, n_vocab)
    strings = make_strings(N_STRINGS, seed=1234, vocab=[sp.id_to_piece(i) for i in range(sp.vocab_size())])
    # sentencepiece's <unk> surface is model data GGUF does not store (stories260K's is odd); pass it in.
    return Case(request.param, sp, meta, strings, unk_surface=sp.decode([sp.unk_id()]))


def _mismatches(case: Case, ours: list, theirs: list) -> list[str]:
    bad = [f"{s!r}: ours {a} sentencepiece {b}" for s, a, b in zip(case.strings, ours, theirs) if a != b]
    return bad[:5] + ([f"... {len(bad)} of {len(ours)} differ"] if bad else [])


# --- real tokenizers ------------------------------------------------------------------------------


def test_metadata_flags(real: Case):
    # The two test models differ exactly here: stories260K collapses and trims spaces.
    tok = real.tok
    assert tok.add_space_prefix is True
    assert tok.remove_extra_whitespaces is (real.name == "stories260K-hf")
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (real.sp.bos_id(), real.sp.eos_id(), real.sp.unk_id())
    assert tok.n_vocab == len(real.meta[Keys.TOKENS])


def test_encode_matches_sentencepiece(real: Case):
    assert len(real.strings) >= 2000
    ours = [real.tok.encode(s, add_bos=False, add_eos=False) for s in real.strings]
    assert not _mismatches(real, ours, real.sp_ids)


def test_decode_matches_sentencepiece(real: Case):
    ours = [real.tok.decode(ids) for ids in real.sp_ids]
    theirs = [real.sp.decode(ids) for ids in real.sp_ids]
    assert not _mismatches(real, ours, theirs)


def _random_ids(case: Case, rng: random.Random) -> list[int]:
    """Token soups the encoder never makes: stray byte tokens, controls, <unk>, runs of ▁."""
    if case.id_pools is None:
        types = case.meta[Keys.TOKEN_TYPE]
        n = case.sp.vocab_size()
        byte_ids = [i for i in range(n) if types[i] == TokenType.BYTE]
        space_ids = [i for i in range(n) if case.sp.id_to_piece(i).startswith(SPACE)]
        special = [case.sp.bos_id(), case.sp.eos_id(), case.sp.unk_id()]
        case.id_pools = [p for p in (byte_ids, byte_ids[0xC0:], space_ids, special, range(n)) if p]
    return [rng.choice(rng.choice(case.id_pools)) for _ in range(rng.randint(1, 12))]


def test_decode_random_ids_matches_sentencepiece(real: Case):
    rng = random.Random(7)
    for _ in range(600):
        ids = _random_ids(real, rng)
        assert real.tok.decode(ids) == real.sp.decode(ids), ids


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    return [detok.feed(i) for i in ids] + [detok.flush()]


def test_streaming_equals_decode(real: Case):
    rng = random.Random(11)
    sequences = real.sp_ids + [_random_ids(real, rng) for _ in range(300)]
    for ids in sequences:
        chunks = _stream(real.tok, ids)
        text = real.tok.decode(ids)
        assert "".join(chunks) == text, ids
        if "\ufffd" not in text:  # no chunk carries a broken piece of a character
            assert all("\ufffd" not in c for c in chunks), (ids, chunks)


@pytest.mark.parametrize("text", ["😀", "👩🏽‍🚀", "日本語", "Привет"])
def test_streaming_holds_split_characters(real: Case, text: str):
    ids = real.tok.encode(text, add_bos=False)
    if text == "😀":  # a character split over byte tokens
        assert sum(map(real.tok.is_raw_bytes, ids)) == 4
    chunks = _stream(real.tok, ids)
    assert "".join(chunks) == real.sp.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    assert all(any(ch in c for c in chunks) for ch in text)  # every character arrives whole, in one chunk


def test_streaming_continuation_keeps_the_space(real: Case):
    full = real.sp.encode("Once upon a time there was")
    prompt, generated = full[:3], full[3:]  # generation goes on from a prompt
    assert real.sp.id_to_piece(generated[0]).startswith(SPACE)
    detok = real.tok.detokenizer(continuing=True)
    shown = "".join(detok.feed(i) for i in generated) + detok.flush()
    assert real.tok.decode(prompt) + shown == real.sp.decode(prompt + generated)
    detok.reset()  # a new sequence, still continuing a prompt
    assert detok.feed(generated[0]).startswith(" ")


def test_streaming_flushes_incomplete_bytes(real: Case):
    sp = real.sp
    ids = [sp.piece_to_id("<0xF0>"), sp.piece_to_id("<0x9F>")]
    detok = real.tok.detokenizer()
    assert [detok.feed(i) for i in ids] == ["", ""]
    assert detok.flush() == sp.decode(ids) == "\ufffd\ufffd"  # one U+FFFD per byte, as sentencepiece
    assert detok.flush() == ""
    # An incomplete character cut short by a text token is broken, not carried into it.
    a = sp.piece_to_id("▁a")
    assert "".join(_stream(real.tok, ids + [a])) == sp.decode(ids + [a])


def test_leading_space_rules(real: Case):
    sp, tok = real.sp, real.tok
    sp_id, a, space_a = sp.piece_to_id(SPACE), sp.piece_to_id("a"), sp.piece_to_id("▁a")
    for ids in ([space_a], [1, space_a], [sp_id, space_a], [sp_id, sp_id, a], [sp_id, 1, sp_id, space_a], [a, space_a]):
        assert tok.decode(ids) == sp.decode(ids), ids
        assert "".join(_stream(tok, ids)) == sp.decode(ids), ids


def test_token_to_bytes(real: Case):
    tok, sp = real.tok, real.sp
    assert tok.token_to_bytes(sp.piece_to_id("<0xAB>")) == b"\xab"
    assert tok.token_to_bytes(sp.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_to_bytes(sp.piece_to_id(SPACE)) == b" "
    assert tok.token_to_bytes(sp.piece_to_id("▁a")) == b" a"
    assert tok.token_to_bytes(tok.bos_id) == b""
    assert tok.token_to_bytes(tok.eos_id, special=True) == b"</s>"
    with pytest.raises(TokenizerError):
        tok.token_to_bytes(tok.n_vocab)


def test_bos_eos_and_eog(real: Case):
    tok = real.tok
    body = real.sp.encode("Hello world")
    assert tok.add_bos is True and tok.add_eos is False
    assert tok.encode("Hello world") == [tok.bos_id] + body
    assert tok.encode("Hello world", add_bos=False, add_eos=True) == body + [tok.eos_id]
    assert tok.encode("") == [tok.bos_id]
    assert tok.is_eog(tok.eos_id) and not tok.is_eog(tok.bos_id) and not tok.is_eog(body[0])
    no_bos = load_tokenizer({**real.meta, Keys.ADD_BOS: False, Keys.ADD_EOS: True})
    assert no_bos.encode("Hello world") == body + [tok.eos_id]


def test_parse_special(real: Case):
    tok, sp = real.tok, real.sp
    assert tok.encode("<s>", add_bos=False, parse_special=True) == [tok.bos_id]
    assert tok.encode("<s>", add_bos=False) == sp.encode("<s>")  # plain text without parse_special
    ids = tok.encode("<s>Hello</s> world<unk>", add_bos=False, parse_special=True)
    assert ids == [tok.bos_id] + sp.encode("Hello") + [tok.eos_id] + sp.encode(" world") + [tok.unk_id]
    assert tok.encode("a <s", add_bos=False, parse_special=True) == sp.encode("a <s")
    assert tok.decode(ids, special=True).startswith("<s>Hello</s>")


def test_gguf_round_trip(real: Case, tmp_path: Path):
    # The file alone is enough: write the metadata, read it back, tokenize identically.
    path = tmp_path / "tok.gguf"
    write_gguf(path, real.meta, [])
    with GGUFFile(path) as f:
        tok = load_tokenizer(f.metadata)
    for s, ids in list(zip(real.strings, real.sp_ids))[::20]:
        assert tok.encode(s, add_bos=False) == ids, s


def test_long_text_matches_sentencepiece(real: Case):
    # 10 KB through one merge loop (sentencepiece does not split text into words first).
    text = " ".join(real.strings)[:10_000]
    assert real.tok.encode(text, add_bos=False) == real.sp.encode(text)


# --- load_tokenizer -------------------------------------------------------------------------------


def test_unsupported_models_are_refused():
    with pytest.raises(TokenizerError, match="bert.*WordPiece.*not supported.*'llama' .SentencePiece.*'gpt2'"):
        load_tokenizer({Keys.TOKENIZER_MODEL: "bert", Keys.TOKENS: ["a"]})
    with pytest.raises(TokenizerError, match=Keys.TOKENIZER_MODEL):
        load_tokenizer({})
    with pytest.raises(TokenizerError, match=Keys.SCORES):
        load_tokenizer({Keys.TOKENIZER_MODEL: "llama", Keys.TOKENS: ["a"], Keys.TOKEN_TYPE: [1]})


def test_streaming_detokenizer_is_a_class_of_its_own(real: Case):
    detok = StreamingDetokenizer(real.tok)
    ids = real.sp.encode("Once upon a time 😀")
    assert "".join(detok.feed(i) for i in ids) + detok.flush() == "Once upon a time 😀"


# --- tokenizers trained here ----------------------------------------------------------------------


def _proto_fields(buf: bytes):
    """(field, wire type, value, raw bytes) of a protobuf message; enough for ModelProto."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            size = {1: 8, 5: 4}[wire]
            value, pos = buf[pos : pos + size], pos + size
        yield key >> 3, wire, value, buf[start:pos]


def _encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _charsmap(proto: bytes) -> bytes | None:
    """ModelProto.normalizer_spec.precompiled_charsmap."""
    for field, _, value, _ in _proto_fields(proto):
        if field == 3:
            for f, _, v, _ in _proto_fields(value):
                if f == 2 and v:
                    return v
    return None


def _retype(proto: bytes, types: dict[int, int]) -> bytes:
    """The model with piece i retyped types[i] (SentencePiece.type is field 3)."""
    out, i = bytearray(), 0
    for field, _, value, raw in _proto_fields(proto):
        if field == 1:
            if i in types:
                piece = b"".join(r for f, _, _, r in _proto_fields(value) if f != 3)
                piece += b"\x18" + _encode_varint(types[i])  # field 3, varint
                raw = b"\x0a" + _encode_varint(len(piece)) + piece  # field 1, length-delimited
            i += 1
        out += raw
    return bytes(out)


TRAIN_WORDS = WORDS + SCRIPT_WORDS[:12] + ["ｆｕｌｌ", "ﬁne", "café", "①", "㎏", "Ⅻ", "<sep>"]
TRAINED = {
    "nfkc_user_defined": dict(normalization_rule_name="nmt_nfkc", user_defined_symbols=["<sep>", "ab", "he"]),
    "nfkc_keep_spaces": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=False),
    "no_prefix_no_bytes": dict(add_dummy_prefix=False, byte_fallback=False, remove_extra_whitespaces=False),
    "no_prefix_trimmed": dict(add_dummy_prefix=False),
    "retyped_pieces": dict(remove_extra_whitespaces=False),
}


_trained_cases: dict[str, Case] = {}


def _trained_case(name: str, tmp_path_factory) -> Case:
    """A tiny BPE model trained with TRAINED[name], as a Case (trained once per session)."""
    if name in _trained_cases:
        return _trained_cases[name]
    rng = random.Random(5)
    sentences = [" ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    buf = io.BytesIO()
    options = dict(model_type="bpe", vocab_size=600, byte_fallback=True, character_coverage=1.0,
                   normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    options.update(TRAINED[name])
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **options)
    proto = buf.getvalue()
    if name == "retyped_pieces":
        # UNUSED pieces: sentencepiece merges into them, then splits them back into the pair.
        # USER_DEFINED pieces that are also parts of longer pieces: they must stay whole (frozen).
        sp = spm.SentencePieceProcessor(model_proto=proto)
        special = lambda i: sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)  # noqa: E731
        merged = [i for i in range(sp.vocab_size()) if len(sp.id_to_piece(i)) > 1 and not special(i)]
        types = {i: TokenType.UNUSED for i in merged[::3]}
        types.update({i: TokenType.USER_DEFINED for i in merged[1:40:6]})
        proto = _retype(proto, types)
    d = tmp_path_factory.mktemp(name)
    (d / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    strings = make_strings(400, seed=99, vocab=[sp.id_to_piece(i) for i in range(sp.vocab_size())]) + sentences[:50]
    case = Case(name, sp, tokenizer_metadata(d, sp.vocab_size()), strings, precompiled_charsmap=_charsmap(proto))
    _trained_cases[name] = case
    return case


@pytest.fixture(scope="module", params=sorted(TRAINED))
def trained(request, tmp_path_factory) -> Case:
    return _trained_case(request.param, tmp_path_factory)


def test_trained_models_match_sentencepiece(trained: Case):
    types = list(trained.meta[Keys.TOKEN_TYPE])
    if trained.name == "retyped_pieces":
        assert TokenType.UNUSED in types and TokenType.USER_DEFINED in types
    if trained.name == "nfkc_user_defined":
        assert TokenType.USER_DEFINED in types
    ours = [trained.tok.encode(s, add_bos=False) for s in trained.strings]
    assert not _mismatches(trained, ours, trained.sp_ids)
    ours = [trained.tok.decode(ids) for ids in trained.sp_ids]
    assert not _mismatches(trained, ours, [trained.sp.decode(ids) for ids in trained.sp_ids])
    rng = random.Random(3)
    for ids in [_random_ids(trained, rng) for _ in range(300)]:
        assert trained.tok.decode(ids) == "".join(_stream(trained.tok, ids)) == trained.sp.decode(ids), ids


@pytest.mark.parametrize("name", [name for name in sorted(TRAINED) if name.startswith("nfkc")])
def test_nfkc_is_not_unicodedata_nfkc(name: str, tmp_path_factory):
    # sentencepiece's nmt_nfkc also folds tabs and newlines into spaces and drops control and
    # zero-width characters, which unicodedata's NFKC leaves alone: only the charsmap matches.
    trained = _trained_case(name, tmp_path_factory)
    for text, like_nfkc in [("ｆｕｌｌ\tﬁ\u200b①", False), ("a\r\nb\x7f", False), ("ｶﾞ ™ … x\u00b4", True)]:
        ours = trained.tok.normalize(text)
        assert ours == trained.sp.normalize(text)
        assert (ours == SPACE + unicodedata.normalize("NFKC", text).replace(" ", SPACE)) is like_nfkc
