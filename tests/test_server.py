"""`pyggml serve`: the OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client and by
raw HTTP, over the bundled stories260K (f32). Greedy answers equal the Llama API's on the same prompt;
abuse (malformed JSON, wrong types, huge max_tokens, over-long prompts, disconnects, a full queue) gets
OpenAI's error shapes and leaves the engine free. Only 127.0.0.1 is ever contacted."""
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from pyggml import Llama  # noqa: E402
from pyggml.server.app import create_app  # noqa: E402
from pyggml.server.engine import LlamaEngine  # noqa: E402

N_CTX = 256
KEY = "test-key"
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me about a dog."}]


class LocalServer:
    """A uvicorn server for `app` on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """(status, parsed JSON or raw text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw
        finally:
            conn.close()

    def post(self, path, body, key=KEY, **kw):
        return self.request("POST", path, body, {"Authorization": f"Bearer {key}"} if key else {}, **kw)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)


def _llama(path):
    return Llama(str(path), n_ctx=N_CTX, n_threads=2, seed=-1, verbose=False)


@pytest.fixture(scope="module")
def reference(stories_f32):
    """The Llama API on the same file and context, for greedy comparisons."""
    with _llama(stories_f32) as llm:
        yield llm


@pytest.fixture(scope="module")
def engine(stories_f32):
    eng = LlamaEngine(_llama(stories_f32), max_queue=64, model_id="stories")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    s = LocalServer(create_app(engine, api_key=KEY))
    yield s
    s.stop()


def _greedy_text(reference, prompt=PROMPT, n=24):
    return reference.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]


def _wait_idle(server, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        status, health = server.request("GET", "/health")
        if status == 200 and health["slots_idle"] == 1 and health["requests_queued"] == 0:
            return health
        assert time.monotonic() < deadline, f"the engine is still busy: {health}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------- the openai client
def test_openai_chat_streamed_and_not_equal_the_llama_api(server, reference):
    client = server.client()
    want = reference.create_chat_completion(MESSAGES, max_tokens=24, temperature=0)
    got = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=24, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"] != ""
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.model_dump(exclude_none=True) == want["usage"] and got.model == "stories"

    chunks = list(client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # chat streams carry no usage unless asked (llama-server)

    chunks = list(client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == want["usage"]
    assert chunks[-2].choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == got.choices[0].message.content


def test_openai_completion_streamed_and_not_equal_the_llama_api(server, reference):
    client = server.client()
    want = reference.create_completion(PROMPT, max_tokens=32, temperature=0, stop=["Lily"])
    got = client.completions.create(model="any", prompt=PROMPT, max_tokens=32, temperature=0, stop=["Lily"])
    assert got.choices[0].text == want["choices"][0]["text"] and got.choices[0].finish_reason == "stop"
    assert got.usage.model_dump(exclude_none=True) == want["usage"]

    chunks = list(client.completions.create(model="any", prompt=PROMPT, max_tokens=32, temperature=0, stop=["Lily"],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.model_dump(exclude_none=True) == want["usage"]  # llama-server: usage on the finish chunk

    chunks = list(client.completions.create(model="any", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert "".join(c.choices[0].text for c in chunks[:-1]) == _greedy_text(reference, n=20)


def test_openai_embeddings(server, reference):
    client = server.client()
    want = reference.create_embedding(["a dog", "Once upon a time"])
    got = client.embeddings.create(model="any", input=["a dog", "Once upon a time"])  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1]
    for d, w in zip(got.data, want["data"]):
        np.testing.assert_allclose(d.embedding, w["embedding"], rtol=1e-6, atol=1e-6)
    floats = client.embeddings.create(model="any", input="a dog", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want["data"][0]["embedding"], rtol=1e-6, atol=1e-6)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]


def test_api_key(server, engine):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="any", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="any", prompt=PROMPT, max_tokens=2)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/completion", "/tokenize"):
        status, body = server.post(path, {"prompt": PROMPT}, key=None)
        assert status == 401 and body["error"]["type"] == "authentication_error", (path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = server.request("POST", "/tokenize", {"content": "hi"}, {"X-Api-Key": KEY})  # llama-server's header
    assert status == 200
    # /health and /v1/models need no key (llama-server's public endpoints)
    assert server.request("GET", "/health")[0] == 200
    models = server.client(key="wrong").models.list()
    assert [m.id for m in models.data] == ["stories"]
    # without --api-key any key (or none) is accepted
    open_server = LocalServer(create_app(engine))
    try:
        got = open_server.client(key="anything").completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
        assert got.choices[0].text == ", there was a"
        assert open_server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, key=None)[0] == 200
    finally:
        open_server.stop()


# ------------------------------------------------------------------------------ llama.cpp's own
def test_llama_cpp_endpoints(server, reference):
    status, out = server.post("/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0})
    assert status == 200 and out["content"] == _greedy_text(reference, n=16) and out["stop"] is True
    assert out["stop_type"] == "limit" and out["tokens_predicted"] == 16 and out["tokens_evaluated"] == 5
    status, out = server.post("/completion", {"prompt": PROMPT, "n_predict": 40, "temperature": 0, "stop": ["Lily"]})
    assert out["stop_type"] == "word" and out["stopping_word"] == "Lily" and "Lily" not in out["content"]

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/completion", json.dumps({"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stream": True}),
                 {"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    assert "".join(e["content"] for e in events) == _greedy_text(reference, n=16)
    assert [e["stop"] for e in events][-2:] == [False, True] and events[-1]["tokens_predicted"] == 16

    status, out = server.post("/tokenize", {"content": PROMPT})
    assert status == 200 and out["tokens"] == reference.tokenize(PROMPT.encode(), add_bos=False)
    status, with_bos = server.post("/tokenize", {"content": PROMPT, "add_special": True})
    assert with_bos["tokens"] == reference.tokenize(PROMPT.encode())
    status, pieces = server.post("/tokenize", {"content": PROMPT, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == out["tokens"] and "".join(p["piece"] for p in pieces["tokens"]) == " " + PROMPT
    status, text = server.post("/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and text["content"].strip() == PROMPT


def test_models_and_health(server):
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert models["data"][0]["id"] == "stories" and models["data"][0]["meta"]["n_ctx"] == N_CTX
    assert _wait_idle(server)["status"] == "ok"


# --------------------------------------------------------------------------------------- abuse
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', None),             # truncated JSON
    ("/v1/completions", b"\xff\xfe not utf-8", None),
    ("/v1/completions", b"[1, 2, 3]", None),                                # not an object
    ("/v1/completions", b"[" * 10_000 + b"]" * 10_000, None),               # nested too deep
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),               # token id outside the vocabulary
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/tokenize", {"content": ["x"]}, "content"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
])
def test_bad_requests_get_400_in_openai_shape(server, path, body, param):
    status, out = server.post(path, body)
    assert status == 400, out
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["param"] == param and out["error"]["message"]


def test_sampling_values_the_model_refuses_are_400(server):
    status, out = server.post("/v1/completions", {"prompt": PROMPT, "min_p": 7})
    assert status == 400 and "min_p" in out["error"]["message"]
    status, out = server.post("/v1/chat/completions", {"messages": MESSAGES, "repeat_penalty": 0, "stream": True})
    assert status == 400 and "repeat_penalty" in out["error"]["message"]


def test_unknown_route_and_method(server):
    status, out = server.post("/v1/nothing", {})
    assert status == 404 and out["error"]["message"] == "Invalid URL (POST /v1/nothing)"
    status, out = server.request("GET", "/v1/chat/completions")
    assert status == 405 and out["error"]["type"] == "invalid_request_error"


def test_max_tokens_beyond_the_context_is_clamped(server):
    client = server.client()
    got = client.completions.create(model="any", prompt=PROMPT, max_tokens=10**9, temperature=0)
    assert got.choices[0].finish_reason == "length" and got.usage.total_tokens == N_CTX
    status, out = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**30, "temperature": 0})
    assert status == 200 and out["usage"]["total_tokens"] <= N_CTX


def test_prompt_longer_than_the_context_is_400(server):
    long = "the dog ran. " * 200  # about 600 tokens, for a context of 256
    client = server.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            r = client.completions.create(model="any", prompt=long, max_tokens=4, stream=stream)
            list(r) if stream else None
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": long}], stream=stream)
    assert _wait_idle(server)


def test_disconnect_mid_stream_cancels_the_generation(server, engine, reference, monkeypatch):
    """A client that goes away mid-stream stops its generation: the engine is free again at once and the
    next request gets the right greedy text."""
    forward = engine.llm.model.forward

    def slow_forward(*a, **kw):  # ~1 s for the whole context, so the stream cannot end before the disconnect
        time.sleep(0.004)
        return forward(*a, **kw)

    monkeypatch.setattr(engine.llm.model, "forward", slow_forward)
    before = dict(engine.stats)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 10**6, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    seen = b""
    while b"data: {" not in seen:  # the stream has begun
        seen += sock.recv(4096)
    sock.close()
    health = _wait_idle(server)
    assert health["slots_processing"] == 0
    monkeypatch.setattr(engine.llm.model, "forward", forward)
    assert engine.stats["cancelled"] == before["cancelled"] + 1 and engine.stats["completed"] == before["completed"]
    assert len(engine.llm.tokens) < N_CTX // 2  # stopped soon after the disconnect, far from the end
    got = server.client().completions.create(model="any", prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == _greedy_text(reference)


def test_concurrent_requests_queue_and_all_complete(server, reference):
    prompts = ["Once upon a time", "The dog", "Lily saw a bird", "Tim had a red ball", "One day", "The sun was"]
    want = [_greedy_text(reference, p, 16) for p in prompts]
    client = server.client()

    def ask(i):
        if i % 2:
            chunks = client.completions.create(model="any", prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="any", prompt=prompts[i], max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert got == want
    assert _wait_idle(server)


# ------------------------------------------------------------------------- queue and loading, 503
class _BlockingLlama:
    """A stand-in Llama whose completions wait for `release` (the engine's queue, without timing races)."""

    model_path = "blocking.gguf"
    config = type("C", (), {"n_ctx_train": 64, "n_layers": 1})()
    timings = type("T", (), {"prompt_tokens": 0, "prompt_s": 0.0, "gen_tokens": 0, "gen_s": 0.0})()

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def n_ctx(self):
        return 64

    def n_vocab(self):
        return 32

    def n_embd(self):
        return 8

    def stream_text(self, *a, **kw):
        raise AssertionError("not used")

    def create_completion(self, prompt, **kw):
        self.started.set()
        assert self.release.wait(30)
        return {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": kw.get("model"),
                "choices": [{"text": "ok", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_full_queue_is_503_and_queued_requests_complete():
    llm = _BlockingLlama()
    engine = LlamaEngine(llm, max_queue=2)
    srv = LocalServer(create_app(engine))
    try:
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(srv.post, "/v1/completions", {"prompt": "a"})
            assert llm.started.wait(10)
            queued = [pool.submit(srv.post, "/v1/completions", {"prompt": "b"}) for _ in range(2)]
            deadline = time.monotonic() + 10
            while srv.request("GET", "/health")[1]["requests_queued"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, out = srv.post("/v1/completions", {"prompt": "c"})
            assert status == 503 and out["error"]["type"] == "unavailable_error" and out["error"]["code"] == "server_busy"
            llm.release.set()
            assert [f.result()[0] for f in [running, *queued]] == [200, 200, 200]
        assert srv.request("GET", "/health")[1] == {"status": "ok", "slots_idle": 1, "slots_processing": 0,
                                                    "requests_queued": 0}
    finally:
        llm.release.set()
        srv.stop()
        engine.close()


def test_a_queued_request_whose_client_leaves_is_dropped():
    llm = _BlockingLlama()
    engine = LlamaEngine(llm)
    srv = LocalServer(create_app(engine))
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(srv.post, "/v1/completions", {"prompt": "a"})
            assert llm.started.wait(10)
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            body = b'{"prompt": "b"}'
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while srv.request("GET", "/health")[1]["requests_queued"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            sock.close()
            while srv.request("GET", "/health")[1]["requests_queued"] != 0:
                assert time.monotonic() < deadline, "the queued request was not dropped"
                time.sleep(0.01)
            assert engine.stats["cancelled"] == 1
            llm.release.set()
            assert running.result()[0] == 200
        assert engine.stats == {"completed": 1, "cancelled": 1, "failed": 0}
    finally:
        llm.release.set()
        srv.stop()
        engine.close()


def test_503_while_the_model_loads():
    loaded = threading.Event()
    llm = _BlockingLlama()
    llm.release.set()

    def loader():
        assert loaded.wait(30)
        return LlamaEngine(llm)

    srv = LocalServer(create_app(loader))
    try:
        status, out = srv.request("GET", "/health")
        assert status == 503 and out["error"]["message"] == "Loading model"
        assert srv.post("/v1/completions", {"prompt": "a"})[0] == 503
        loaded.set()
        deadline = time.monotonic() + 10
        while srv.request("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert srv.post("/v1/completions", {"prompt": "a"})[1]["choices"][0]["text"] == "ok"
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------- the command
def test_pyggml_serve_command(stories_f32):
    """`pyggml serve -m FILE` with llama-server's flags answers on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "pyggml", "serve", "-m", str(stories_f32), "--port", str(port),
                             "-c", "128", "-np", "2", "-cb", "-ngl", "0", "-t", "2", "--api-key", KEY, "--alias", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        srv = LocalServer.__new__(LocalServer)
        srv.port = port
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = srv.request("GET", "/health", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        status, out = srv.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert status == 200 and out["choices"][0]["text"] == ", there was a" and out["model"] == "tiny"
        assert srv.post("/v1/completions", {"prompt": PROMPT}, key=None)[0] == 401
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------------- several slots, one batch
@pytest.fixture(scope="module")
def slots_server(stories_f32):
    llm = Llama(str(stories_f32), n_ctx=N_CTX, n_threads=2, seed=-1, verbose=False, n_seq_max=4)
    eng = LlamaEngine(llm, max_queue=64, model_id="stories", n_parallel=4)
    s = LocalServer(create_app(eng, api_key=KEY))
    yield s, eng
    s.stop()
    eng.close()
    llm.close()


def test_slots_decode_concurrent_requests_together_with_the_text_alone(slots_server, reference):
    """16 concurrent greedy requests (completions and chats, streamed and not) on 4 slots: each returns the
    text it returns alone, and the slots' sequences shared forward passes."""
    server, engine = slots_server
    prompts = ["Once upon a time", "The dog", "Lily saw a bird", "Tim had a red ball", "One day", "The sun was",
               "Sam and Mia", "A little cat"] * 2
    want = [_greedy_text(reference, p, 16) for p in prompts]
    want_chat = reference.create_chat_completion(MESSAGES, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    client = server.client()

    def ask(i):
        if i % 4 == 3:
            return client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=16, temperature=0).choices[0].message.content
        if i % 2:
            chunks = client.completions.create(model="any", prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="any", prompt=prompts[i], max_tokens=16, temperature=0).choices[0].text

    steps = engine.batcher.stats["steps"]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [want_chat if i % 4 == 3 else want[i] for i in range(16)]
    assert engine.batcher.stats["max_batch"] > 1
    assert engine.batcher.stats["steps"] - steps < 16 * 16  # fewer passes than tokens: they were shared
    health = server.request("GET", "/health")[1]
    assert (health["slots_idle"], health["slots_processing"], health["requests_queued"]) == (4, 0, 0)


def test_slots_disconnects_free_their_slots(slots_server, reference, monkeypatch):
    """Clients that leave mid-stream on a batched server: their slots are free at once, the others finish."""
    server, engine = slots_server
    forward = engine.batcher.model.forward_batch

    def slow_forward(*a, **kw):  # ~1 s for a slot's whole context: the streams cannot end before the disconnects
        time.sleep(0.004)
        return forward(*a, **kw)

    monkeypatch.setattr(engine.batcher.model, "forward_batch", slow_forward)
    before = dict(engine.stats)
    socks = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 10**6, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        socks.append(sock)
    for sock in socks:
        seen = b""
        while b"data: {" not in seen:
            seen += sock.recv(4096)
    with ThreadPoolExecutor(1) as pool:
        fine = pool.submit(lambda: server.client().completions.create(model="any", prompt="The dog", max_tokens=16,
                                                                      temperature=0).choices[0].text)
        for sock in socks:
            sock.close()
        assert fine.result(60) == _greedy_text(reference, "The dog", 16)
    deadline = time.monotonic() + 15
    while server.request("GET", "/health")[1]["slots_idle"] != 4:
        assert time.monotonic() < deadline, "a slot stayed busy"
        time.sleep(0.02)
    assert engine.stats["cancelled"] - before["cancelled"] == 3


def test_slots_survive_an_abuse_campaign(slots_server):
    """tools/abuse_serve.py's mix (dropped streams, malformed JSON, wrong types, over-long prompts, max_tokens
    of 10^9, more connections than slots) against 4 slots: only 200/400 answers, every slot free afterwards,
    the greedy text unchanged."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from abuse_serve import campaign

    server, engine = slots_server
    out = campaign("127.0.0.1", server.port, n=200, clients=40, n_ctx=N_CTX, seed=3, api_key=KEY)
    outcomes = {k.split(" -> ")[1] for k in out["tally"]}
    assert outcomes <= {"200", "400", "dropped:200"}, out["tally"]
    assert sum(out["tally"].values()) == 200
    assert out["greedy_after"] == out["greedy_before"] and not out["greedy_before"].startswith("HTTP")
    assert (out["health"]["slots_processing"], out["health"]["requests_queued"]) == (0, 0)
    assert engine.batcher._busy == set() and engine.batcher._pending == {}
