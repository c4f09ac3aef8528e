"""A llama-cpp-python app, written only against llama-cpp-python's documented API, runs with
`from pyggml import Llama` and gets llama-cpp-python's result shapes (on the bundled stories260K)."""
import json
import warnings

import numpy as np
import pytest

from pyggml import Llama, LlamaGrammar, LlamaRAMCache

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(stories_f32):
    with Llama(model_path=str(stories_f32), n_ctx=512, n_gpu_layers=0, seed=1337, verbose=False,
               embedding=True, logits_all=True) as m:
        yield m


def _completion_shape(c):
    assert set(c) >= {"id", "object", "created", "model", "choices", "usage"}
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
    ch = c["choices"][0]
    assert set(ch) == {"text", "index", "logprobs", "finish_reason"} and ch["index"] == 0
    assert set(c["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# -------------------------------------------------------------------------------- the app
def test_completion_and_greedy_reference_with_defaults(llm, stories_dir):
    ref = (stories_dir / "reference_greedy.txt").read_text(encoding="utf-8")
    out = llm(PROMPT, max_tokens=252, temperature=0)  # default repeat_penalty is llama.cpp's 1.0
    _completion_shape(out)
    assert PROMPT + out["choices"][0]["text"] + "\n" == ref
    echo = llm.create_completion(PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echo["choices"][0]["text"].startswith(PROMPT + ", there")
    # max_tokens None / <= 0: to the end of the context
    small = Llama(model_path=str(llm.model_path), n_ctx=32, verbose=False)
    for n in (None, 0, -1):
        c = small(PROMPT, max_tokens=n, temperature=0)
        assert c["choices"][0]["finish_reason"] == "length" and c["usage"]["total_tokens"] == 32
    # token-list prompt, stop lists
    ids = llm.tokenize(PROMPT.encode())
    assert llm(ids, max_tokens=8, temperature=0)["choices"][0]["text"] == llm(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    cut = llm(PROMPT, max_tokens=30, temperature=0, stop=["Lily", "zzz"])
    assert cut["choices"][0]["finish_reason"] == "stop" and "Lily" not in cut["choices"][0]["text"]


def test_streaming(llm):
    chunks = list(llm(PROMPT, max_tokens=12, temperature=0, stream=True))
    whole = llm(PROMPT, max_tokens=12, temperature=0)
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_logprobs_openai_shape(llm):
    c = llm(PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = c["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == c["choices"][0]["text"]
    assert all(len(t) >= 3 and max(t.values()) <= 0 for t in lp["top_logprobs"])
    # greedy: each chosen token is its step's most likely one
    assert all(p == pytest.approx(max(t.values())) for p, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
    assert lp["text_offset"][0] == len(PROMPT)
    e = llm(PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True)["choices"][0]["logprobs"]
    assert e["token_logprobs"][0] is None and len(e["tokens"]) == len(llm.tokenize(PROMPT.encode())) - 1 + 2


def test_logit_bias_penalties_and_seed(llm):
    first = llm(PROMPT, max_tokens=1, temperature=0)["choices"][0]["text"]
    tid = llm.tokenize(first.encode(), add_bos=False)[-1]
    banned = llm(PROMPT, max_tokens=1, temperature=0, logit_bias={tid: -100.0})["choices"][0]["text"]
    assert banned != first
    a = llm(PROMPT, max_tokens=20, temperature=1.0, seed=42)["choices"][0]["text"]
    b = llm(PROMPT, max_tokens=20, temperature=1.0, seed=42)["choices"][0]["text"]
    assert a == b
    plain = llm(PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"]
    pen = llm(PROMPT, max_tokens=40, temperature=0, presence_penalty=1.5, frequency_penalty=1.0)["choices"][0]["text"]
    assert pen != plain


def test_chat_completion_shapes(llm):
    msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Hi"}]
    c = llm.create_chat_completion(messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert c["object"] == "chat.completion" and c["id"].startswith("chatcmpl-")
    ch = c["choices"][0]
    assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
    assert ch["finish_reason"] in ("stop", "length")
    tok = ch["logprobs"]["content"][0]
    assert set(tok) == {"token", "bytes", "logprob", "top_logprobs"} and len(tok["top_logprobs"]) >= 2
    stream = list(llm.create_chat_completion(messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(s["object"] == "chat.completion.chunk" for s in stream)
    assert "".join(s["choices"][0]["delta"].get("content", "") for s in stream) == ch["message"]["content"]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "likes"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "likes": {"type": "array", "maxItems": 3, "items": {"enum": ["cats", "dogs", "cake"]}}}}


def test_json_schema_output_validates_on_50_seeds(llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(50):
        c = llm.create_chat_completion([{"role": "user", "content": "Describe a person."}], response_format=fmt,
                                       seed=seed, temperature=0.8)
        data = json.loads(c["choices"][0]["message"]["content"])
        jsonschema.validate(data, SCHEMA)
    obj = llm.create_chat_completion([{"role": "user", "content": "JSON please"}], response_format={
        "type": "json_object", "schema": SCHEMA}, seed=3)
    jsonschema.validate(json.loads(obj["choices"][0]["message"]["content"]), SCHEMA)


def test_grammar_argument(llm):
    g = LlamaGrammar.from_string('root ::= ("yes" | "no") "!"')
    for seed in range(5):
        assert llm("Is it?", grammar=g, seed=seed, max_tokens=10)["choices"][0]["text"] in ("yes!", "no!")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                         "properties": {"city": {"type": "string", "maxLength": 16}}}}}]


def test_tool_call(llm):
    c = llm.create_chat_completion([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    ch = c["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    call = ch["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert any("tool_calls" in c["choices"][0]["delta"] for c in chunks)


def test_embeddings(llm):
    e = llm.create_embedding(["a little girl", "a big dog"])
    assert e["object"] == "list" and [d["index"] for d in e["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == llm.n_embd() for d in e["data"])
    assert e["usage"]["prompt_tokens"] == e["usage"]["total_tokens"] > 0
    one = llm.create_embedding("a little girl")
    assert np.allclose(one["data"][0]["embedding"], e["data"][0]["embedding"])
    assert len(llm.embed("hello")) == llm.n_embd()


def test_tokenize_detokenize_and_sizes(llm):
    ids = llm.tokenize(b"Hello world")
    assert ids[0] == llm.token_bos() and llm.detokenize(ids) == b"Hello world"
    assert llm.tokenize(b"Hello world", add_bos=False) == ids[1:]
    assert llm.tokenize(b"<s>", add_bos=False, special=True) == [llm.token_bos()]
    assert llm.detokenize([llm.token_eos()]) == b"" and llm.detokenize([llm.token_eos()], special=True) == b"</s>"
    assert (llm.n_ctx(), llm.n_embd(), llm.n_vocab()) == (512, 64, 512)
    assert llm.token_eos() == 2 and isinstance(llm.metadata, dict)
    assert llm.metadata["general.architecture"] == "llama" and all(isinstance(v, str) for v in llm.metadata.values())


def test_save_load_state_in_memory(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"Once upon a time, there was"))
    state = llm.save_state()
    assert state.n_tokens == len(llm.tokenize(b"Once upon a time, there was"))
    t1 = llm.sample(temp=0)
    llm.eval([100, 101])
    llm.load_state(state)
    assert llm.n_tokens == state.n_tokens and llm.sample(temp=0) == t1


def test_low_level_generate(llm):
    ids = llm.tokenize(PROMPT.encode())
    out = []
    for t in llm.generate(ids, temp=0):
        if t == llm.token_eos() or len(out) == 10:
            break
        out.append(t)
    want = llm(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"]
    assert llm.detokenize(out, prev_tokens=ids).decode() == want


def test_prefix_cache(llm):
    llm.set_cache(LlamaRAMCache(capacity_bytes=1 << 30))
    try:
        a = llm("Once upon a time, in a land", max_tokens=5, temperature=0)
        llm.reset()
        b = llm("Once upon a time, in a land", max_tokens=5, temperature=0)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert llm.timings.prompt_tokens == 1  # the prompt came back from the cache
    finally:
        llm.set_cache(None)


def test_unsupported_arguments_warn_once_never_raise(stories_f32):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = Llama(str(stories_f32), n_ctx=64, use_mlock=True, rope_freq_base=20000.0, chat_handler=object(),
                  some_future_flag=1, verbose=False)
    msgs = [str(x.message) for x in w if "ignores" in str(x.message)]
    assert len(msgs) == 1 and all(n in msgs[0] for n in ("use_mlock", "rope_freq_base", "chat_handler", "some_future_flag"))
    m.close()


def test_gpu_layers_without_gpu_fall_back_to_cpu(stories_f32):
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed: the GPU path is tested in test_cuda.py")
    except ImportError:
        pass
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        m = Llama(str(stories_f32), n_ctx=64, n_gpu_layers=-1, verbose=False)
    assert m(PROMPT, max_tokens=3, temperature=0)["choices"][0]["text"]


def test_n_ctx_zero_is_trained_context_and_larger_warns(stories_f32):
    assert Llama(str(stories_f32), n_ctx=0).n_ctx() == 512
    with pytest.warns(RuntimeWarning, match="exceeds the 512"):
        Llama(str(stories_f32), n_ctx=1024)
