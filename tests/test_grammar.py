"""Constrained sampling through llguidance: GBNF and JSON schema, on a real vocabulary."""
import json

import numpy as np
import pytest

pytest.importorskip("llguidance")

from pyggml import Llama, LlamaGrammar  # noqa: E402
from pyggml.grammar import GrammarError, GrammarMatcher  # noqa: E402


@pytest.fixture(scope="module")
def llm(stories_f32):
    return Llama(str(stories_f32), n_ctx=256)


def test_mask_allows_exactly_the_grammar_bytes(llm):
    tok = llm.tokenizer
    m = GrammarMatcher(LlamaGrammar.from_string('root ::= "no" | "yes"'), tok, llm.n_vocab())
    first = {tok.token_to_bytes(i) for i in np.flatnonzero(m.allowed())}
    assert first and all(b"no".startswith(b) or b"yes".startswith(b) for b in first)
    n = next(i for i in np.flatnonzero(m.allowed()) if tok.token_to_bytes(i) == b"n")
    m.accept(n)
    assert {tok.token_to_bytes(i) for i in np.flatnonzero(m.allowed())} == {b"o"}  # never " o" (a space)


def test_gbnf_from_string_and_file(llm, tmp_path):
    gbnf = 'root ::= item ("," item)*\nitem ::= "cat" | "dog"\n'
    p = tmp_path / "list.gbnf"
    p.write_text(gbnf)
    for g in (LlamaGrammar.from_string(gbnf), LlamaGrammar.from_file(p)):
        for seed in range(4):
            text = llm("Pets:", grammar=g, seed=seed, max_tokens=24, temperature=1.0)["choices"][0]["text"]
            parts = text.split(",")
            assert parts and all(x in ("cat", "dog") for x in parts[:-1])
            assert "catdog".find(parts[-1]) >= 0 or parts[-1] in ("cat", "dog")  # the last may be cut by max_tokens


def test_json_schema_grammar(llm):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["n"], "additionalProperties": False}
    g = LlamaGrammar.from_json_schema(json.dumps(schema))
    for seed in range(10):
        out = llm("Q:", grammar=g, seed=seed, max_tokens=None)["choices"][0]
        assert 1 <= json.loads(out["text"])["n"] <= 5 and out["finish_reason"] == "stop"


def test_invalid_grammar_is_a_clear_error():
    with pytest.raises(GrammarError, match="grammar"):
        LlamaGrammar.from_string("root ::= (")
    with pytest.raises(GrammarError, match="not valid JSON"):
        LlamaGrammar.from_json_schema("{nope")
    with pytest.raises(GrammarError, match="empty"):
        LlamaGrammar.from_string("  ")
