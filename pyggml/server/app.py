"""The HTTP layer: routes, API-key check, OpenAI error shapes and server-sent events over an engine
(engine.py). No model logic lives here.

    POST /v1/chat/completions  /v1/completions  /v1/embeddings      OpenAI
    GET  /v1/models  /health                                        (no API key needed, as llama-server)
    POST /completion  /tokenize  /detokenize                        llama.cpp's own

Streams are OpenAI's server-sent events: `data: {chunk}\\n\\n` ..., then `data: [DONE]\\n\\n`. With
stream_options.include_usage the last chunk carries `usage` and no choices (as OpenAI sends it); without
it llama-server's behaviour holds: /v1/completions puts usage on its finish chunk, chat sends none. A
request whose client goes away (before or during its stream) is cancelled and frees the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..api import ContextFullError
from ..boundedjson import JSONLimitError
from ..boundedjson import loads as bounded_loads
from . import shapes
from .engine import EngineBusy, EngineClosed
from .shapes import RequestError, dumps, error_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413)
MAX_JSON_DEPTH = 64
PUBLIC_PATHS = {"/health", "/v1/health", "/models", "/v1/models"}  # llama-server's: no API key needed
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Errors the model raises for a request that cannot be served as asked (ContextFullError, ChatTemplateError,
# GrammarError, TokenizerError, sampling parameters out of range ...): all ValueErrors -> 400.
_CLIENT_ERRORS = (ValueError, OverflowError)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(message: str, status: int, type: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return json_response(error_body(message, type, param, code), status, headers)


def _from_exception(e: BaseException) -> Response:
    """The error response of an exception raised by a request."""
    if isinstance(e, RequestError):
        return error_response(e.message, e.status, e.type, e.param, e.code)
    if isinstance(e, EngineBusy):
        return error_response(f"The server is busy: {e}. Retry later.", 503, "unavailable_error", code="server_busy",
                              headers={"Retry-After": "1"})
    if isinstance(e, EngineClosed):
        return error_response("The server is shutting down.", 503, "unavailable_error", code="shutting_down")
    if isinstance(e, ContextFullError):
        return error_response(str(e), 400, "invalid_request_error", code="context_length_exceeded")
    if isinstance(e, _CLIENT_ERRORS):
        return error_response(str(e), 400, "invalid_request_error")
    log.error("request failed", exc_info=e)
    return error_response(f"Internal server error: {type(e).__name__}", 500, "server_error")


class _App:
    """The routes' shared state: the engine (None while it loads), the API key."""

    def __init__(self, engine_or_loader, api_key: str | None, on_load_error: Callable[[BaseException], None] | None):
        self.api_key = api_key or None
        self.engine = None
        self.load_error: BaseException | None = None
        self._loader = engine_or_loader if callable(engine_or_loader) and not hasattr(engine_or_loader, "submit") else None
        self._on_load_error = on_load_error
        if self._loader is None:
            self.engine = engine_or_loader

    def start_loading(self) -> None:
        if self._loader is None or self.engine is not None:
            return

        def load() -> None:
            try:
                self.engine = self._loader()
            except BaseException as e:  # noqa: BLE001 - reported through /health and on_load_error
                self.load_error = e
                log.error("cannot load the model: %s", e)
                if self._on_load_error is not None:
                    self._on_load_error(e)

        threading.Thread(target=load, name="pyggml-load", daemon=True).start()

    def ready_engine(self):
        if self.engine is None:
            if self.load_error is not None:
                raise RequestError(f"The model failed to load: {self.load_error}", None, 500, "server_error")
            raise RequestError("Loading model", None, 503, "unavailable_error", "model_loading")
        return self.engine

    # ------------------------------------------------------------------------ plumbing
    def check_key(self, request: Request) -> None:
        if self.api_key is None or request.url.path in PUBLIC_PATHS:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError("Invalid API Key" if given else "Missing API Key (send 'Authorization: Bearer KEY')",
                               None, 401, "authentication_error", "invalid_api_key")

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read within MAX_BODY_BYTES and MAX_JSON_DEPTH."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise RequestError(f"The request body is {int(size):,} bytes; at most {MAX_BODY_BYTES:,} are accepted.",
                               None, 413, "invalid_request_error", "request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY_BYTES:
                raise RequestError(f"The request body is larger than {MAX_BODY_BYTES:,} bytes.", None, 413,
                                   "invalid_request_error", "request_too_large")
            chunks.append(chunk)
        try:
            body = bounded_loads(b"".join(chunks), MAX_BODY_BYTES, MAX_JSON_DEPTH)
        except JSONLimitError as e:
            raise RequestError(f"The JSON body of the request is refused: {e}.") from None
        except ValueError:
            raise RequestError("We could not parse the JSON body of your request: it is not valid UTF-8 JSON.",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(f"The JSON body must be an object, not {shapes.type_name(body)}.", code="invalid_json")
        return body

    async def run_job(self, request: Request, kind: str, params: dict[str, Any], stream: bool,
                      render: Callable[[Any, Any], Any], stream_format: "_StreamFormat | None" = None) -> Response:
        """Submit to the engine; answer with its result (render) or stream its chunks (stream_format).
        Nothing is sent until the first item, so a request refused by the model gets its own status."""
        engine = self.ready_engine()
        job = engine.submit(kind, params)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            first = await job.__anext__()
        except StopAsyncIteration:  # cancelled before it started: the client has gone
            watcher.cancel()
            return error_response("The request was cancelled.", 499, "invalid_request_error", code="cancelled")
        except BaseException as e:
            watcher.cancel()
            job.cancel()
            if isinstance(e, Exception):
                return _from_exception(e)
            raise
        if not stream:
            watcher.cancel()
            async for _ in job:  # the end marker: usage and timings are filled in by then
                pass
            return json_response(render(first, job))
        return StreamingResponse(_events(first, job, watcher, stream_format), media_type="text/event-stream",
                                 headers=SSE_HEADERS)


async def _cancel_on_disconnect(request: Request, job) -> None:
    """Cancel `job` when the client disconnects (the request body has been read: the next message is
    the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


async def _events(first: Any, job, watcher: asyncio.Future, fmt: "_StreamFormat") -> AsyncIterator[str]:
    """A job's chunks as server-sent events; an error after the stream began is sent as an error event."""
    try:
        for out in fmt.chunk(first):
            yield out
        async for item in job:
            for out in fmt.chunk(item):
                yield out
        for out in fmt.end(job):
            yield out
    except Exception as e:  # noqa: BLE001 - the status line has gone: tell the client in the stream
        resp = _from_exception(e)
        yield f"data: {resp.body.decode()}\n\n"
    finally:
        watcher.cancel()
        job.cancel()


class _StreamFormat:
    """Turns the engine's OpenAI chunks into SSE text. The finish chunk is held until the job ends, when
    usage and timings are known."""

    def __init__(self, include_usage: bool, usage_on_finish: bool, done: bool = True):
        self.include_usage, self.usage_on_finish, self.done = include_usage, usage_on_finish, done
        self.held: dict | None = None

    def chunk(self, ch: dict) -> list[str]:
        if self.include_usage:
            ch["usage"] = None
        if ch["choices"] and ch["choices"][0].get("finish_reason") is not None:
            self.held = ch
            return []
        return [_sse(ch)]

    def end(self, job) -> list[str]:
        out = []
        if self.held is not None:
            last = self.held
            if self.include_usage:
                out.append(_sse(last))
                last = {k: last[k] for k in ("id", "object", "created", "model")}
                last["choices"] = []
                last["usage"] = job.usage
            elif self.usage_on_finish:
                last["usage"] = job.usage
            last["timings"] = shapes.timings_json(job.timings)
            out.append(_sse(last))
        if self.done:
            out.append("data: [DONE]\n\n")
        return out


class _NativeStream(_StreamFormat):
    """llama.cpp's /completion stream: {"content", "stop": false} objects, then the final one; no [DONE]."""

    def __init__(self, params: dict[str, Any], prompt_text: str):
        super().__init__(False, False, done=False)
        self.params, self.prompt_text, self.finish = params, prompt_text, None

    def chunk(self, ch: dict) -> list[str]:
        choice = ch["choices"][0]
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
            return []
        return [_sse({"index": 0, "content": choice["text"], "tokens": [], "stop": False, "id_slot": 0})]

    def end(self, job) -> list[str]:
        return [_sse(shapes.native_final(self.params, "", self.finish, job, self.prompt_text))]


def create_app(engine_or_loader, *, api_key: str | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Starlette:
    """The ASGI app over an engine, or over a loader called at startup (in a thread; until it returns,
    /health and every request answer 503 "Loading model", as llama-server does)."""
    app_state = _App(engine_or_loader, api_key, on_load_error)

    def route(handler):
        async def endpoint(request: Request) -> Response:
            try:
                app_state.check_key(request)
                return await handler(request)
            except Exception as e:  # noqa: BLE001 - every failure answers in OpenAI's error shape
                return _from_exception(e)
        return endpoint

    async def chat_completions(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        params, opts = shapes.chat_request(body, engine.n_vocab, engine.model_id)
        return await app_state.run_job(request, "chat", params, opts.stream, _with_timings,
                                       _StreamFormat(opts.include_usage, usage_on_finish=False))

    async def completions(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        params, opts = shapes.completion_request(body, engine.n_vocab, engine.model_id)
        return await app_state.run_job(request, "completion", params, opts.stream, _with_timings,
                                       _StreamFormat(opts.include_usage, usage_on_finish=True))

    async def native_completion(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        params, opts = shapes.native_completion_request(body, engine.n_vocab, engine.model_id)
        prompt = params["prompt"]
        prompt_text = prompt if isinstance(prompt, str) else await run_in_threadpool(engine.detokenize, prompt)

        def render(result: dict, job) -> dict:
            choice = result["choices"][0]
            return shapes.native_final(params, choice["text"], choice["finish_reason"], job, prompt_text)

        return await app_state.run_job(request, "completion", params, opts.stream, render,
                                       _NativeStream(params, prompt_text))

    async def embeddings(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        params, opts = await run_in_threadpool(shapes.embedding_request, body, engine.n_vocab, engine.model_id,
                                               engine.detokenize)
        render = (lambda result, _job: shapes.embeddings_base64(result)) if opts.base64 else (lambda result, _job: result)
        return await app_state.run_job(request, "embedding", params, False, render)

    async def tokenize(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        content, add_special, parse_special, with_pieces = shapes.tokenize_request(body)
        ids = await run_in_threadpool(engine.tokenize, content, add_special, parse_special)
        if not with_pieces:
            return json_response({"tokens": ids})
        pieces = []
        for t in ids:
            raw = engine.token_piece(t)
            try:
                piece: Any = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)  # llama-server: the bytes of a piece that is not valid UTF-8 alone
            pieces.append({"id": t, "piece": piece})
        return json_response({"tokens": pieces})

    async def detokenize(request: Request) -> Response:
        body = await app_state.body(request)
        engine = app_state.ready_engine()
        ids = shapes.detokenize_request(body, engine.n_vocab)
        return json_response({"content": await run_in_threadpool(engine.detokenize, ids)})

    async def models(request: Request) -> Response:
        engine = app_state.ready_engine()
        return json_response({"object": "list", "data": [{
            "id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "pyggml",
            "meta": engine.describe()}]})

    async def health(request: Request) -> Response:
        engine = app_state.ready_engine()
        return json_response({"status": "ok", **engine.status()})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return error_response(f"Method not allowed ({request.method} {request.url.path})", 405,
                                  "invalid_request_error", code="method_not_allowed")
        return error_response(f"Invalid URL ({request.method} {request.url.path})", exc.status_code,
                              "invalid_request_error", code="not_found" if exc.status_code == 404 else None)

    routes = []
    for paths, handler, methods in [
        (("/v1/chat/completions", "/chat/completions"), chat_completions, ["POST"]),
        (("/v1/completions", "/completions"), completions, ["POST"]),
        (("/v1/embeddings", "/embeddings"), embeddings, ["POST"]),
        (("/completion",), native_completion, ["POST"]),
        (("/tokenize",), tokenize, ["POST"]),
        (("/detokenize",), detokenize, ["POST"]),
        (("/v1/models", "/models"), models, ["GET"]),
        (("/health", "/v1/health"), health, ["GET"]),
    ]:
        routes += [Route(p, route(handler), methods=methods) for p in paths]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        app_state.start_loading()
        yield
        engine = app_state.engine
        if engine is not None and app_state._loader is not None:  # an engine the app made is the app's to close
            await run_in_threadpool(engine.close)

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.pyggml = app_state
    return app


def _with_timings(result: dict, job) -> dict:
    """A non-streamed OpenAI result with llama-server's "timings"."""
    if isinstance(result, dict) and "choices" in result:
        result["timings"] = shapes.timings_json(job.timings)
    return result
