"""A Llama-3-style chat file (llama.cpp's llama-bpe vocabulary, 128,256 tokens, and a Llama 3 chat
template): the chat prompt renders with the template's header tokens as single special ids, and
generation ends at <|eot_id|> (an end-of-generation token that is not the file's eos)."""
import os
from pathlib import Path

import numpy as np
import pytest

from pyggml import Llama
from pyggml.gguf import GGMLType, GGUFFile
from pyggml.gguf.constants import Keys
from pyggml.synthetic import Shape, write_random_model

MODELS = Path(os.environ.get("PYGGML_TEST_MODELS", Path(__file__).resolve().parent.parent.parent / "shared" / "models"))
VOCAB = MODELS / "vocab" / "ggml-vocab-llama-bpe.gguf"

# The shape of Meta's Llama 3 instruct template (written here, not copied): a header per message,
# <|eot_id|> after each, and the assistant header when a reply is wanted.
TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory):
    if not VOCAB.exists():
        pytest.skip(f"no llama-bpe vocabulary at {VOCAB}")
    vocab = {k: v for k, v in GGUFFile(VOCAB).metadata.items() if k.startswith("tokenizer.")}
    n_vocab = len(vocab[Keys.TOKENS])
    vocab[Keys.CHAT_TEMPLATE] = TEMPLATE
    path = tmp_path_factory.mktemp("l3") / "llama3-chat.gguf"
    write_random_model(path, Shape(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=64, vocab=n_vocab, ctx=128,
                                   rope_base=500000.0, tied=True), GGMLType.F32, seed=3, vocab_metadata=vocab)
    return path


def test_chat_prompt_uses_the_template_and_its_special_tokens(llama3_file):
    llm = Llama(str(llama3_file), n_ctx=128)
    tok = llm.tokenizer
    ids = llm.chat_prompt_tokens([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    special = {t: tok.encode(t, add_bos=False, parse_special=True) for t in
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert all(len(v) == 1 for v in special.values())  # each is one special token
    sid = {t: v[0] for t, v in special.items()}
    assert ids[0] == sid["<|begin_of_text|>"] and ids.count(sid["<|begin_of_text|>"]) == 1  # one BOS
    assert ids.count(sid["<|start_header_id|>"]) == 3 and ids.count(sid["<|eot_id|>"]) == 2
    text = tok.decode(ids, special=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_generation_stops_at_eot_id(llama3_file):
    llm = Llama(str(llama3_file), n_ctx=128)
    eot = llm.tokenizer.encode("<|eot_id|>", add_bos=False, parse_special=True)[0]
    assert eot != llm.token_eos() and llm.tokenizer.is_eog(eot)
    out = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=20, temperature=0,
                                     logit_bias={eot: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == "" and out["usage"]["completion_tokens"] <= 1
    free = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                      logit_bias={eot: -100.0})
    assert free["choices"][0]["finish_reason"] == "length"
