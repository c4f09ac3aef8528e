"""Request and response shapes: OpenAI's (/v1/...) and llama.cpp's (/completion, /tokenize, ...).

Requests are hostile JSON: every field is checked for its type here, and a wrong one is a RequestError
naming the field (HTTP 400, OpenAI's error shape) before anything reaches the engine. A checked request
becomes the keyword arguments of the Llama method the engine calls.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_INT = 2**31 - 1  # integer fields are clamped into int32 (numpy and the samplers take them)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; llama.cpp has no limit)
MAX_EMBED_INPUTS = 2048  # OpenAI's limit
MAX_TOP_LOGPROBS = 20
ABSENT = object()  # a field the request does not give: the Llama method's default applies


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def dumps(obj: Any) -> str:
    """Compact JSON; infinities (a banned token's log-probability) become the largest finite float,
    as llama-server writes them, since JSON has no infinity."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else math.copysign(3.4028234663852886e38, obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ field checks
_KINDS = {
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
}


def type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _wrong(name: str, expected: str, value: Any) -> RequestError:
    return RequestError(f"Invalid type for '{name}': expected {expected}, but got {type_name(value)} instead.", name)


def field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (absent or null: `default`); integers clamped into int32."""
    v = body.get(name)
    if v is None:
        return default
    ok, expected = _KINDS[kind]
    if not ok(v):
        raise _wrong(name, expected, v)
    if kind == "integer":
        v = max(-MAX_INT, min(MAX_INT, v))
    return v


def _stop(body: dict, name: str = "stop") -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _wrong(name, "a string or an array of strings", v)
    if len(v) > MAX_STOP:
        raise RequestError(f"'{name}' has {len(v)} strings; at most {MAX_STOP} are allowed", name)
    return v


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} (llama.cpp's [[id, bias], ...] too); ids checked against the vocabulary."""
    v = body.get("logit_bias")
    if v is None:
        return None
    pairs = list(v.items()) if isinstance(v, dict) else v if isinstance(v, list) else None
    if pairs is None:
        raise _wrong("logit_bias", "an object", v)
    out = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _wrong("logit_bias", "an object mapping token ids to numbers", v)
        key, bias = pair
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"Invalid key in 'logit_bias': {str(key)[:40]!r} is not a token id", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise RequestError(f"Invalid key in 'logit_bias': token id {token} is outside the vocabulary "
                               f"[0, {n_vocab})", "logit_bias")
        if bias is False:  # llama.cpp: [id, false] bans the token
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _wrong("logit_bias", "an object mapping token ids to numbers", v)
        out[token] = float(bias)
    return out


def _token_ids(v: Any, name: str, n_vocab: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise _wrong(name, "a string or an array of token ids", v)
    bad = next((t for t in v if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise RequestError(f"Invalid token id {bad} in '{name}': outside the vocabulary [0, {n_vocab})", name)
    return list(v)


def _prompt(body: dict, n_vocab: int) -> str | list[int]:
    """A string, token ids, or a one-element array of either (OpenAI's batch form, one prompt only)."""
    v = body.get("prompt")
    if v is None:
        raise RequestError("Missing required parameter: 'prompt'.", "prompt", code="missing_required_parameter")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        if any(isinstance(t, (str, list)) for t in v):
            raise RequestError("Only one prompt per request is supported (n=1, no batches of prompts).", "prompt")
        return _token_ids(v, "prompt", n_vocab)
    raise _wrong("prompt", "a string or an array of token ids", v)


def _sampling(body: dict, n_vocab: int) -> dict[str, Any]:
    """Sampling fields shared by every generating endpoint, as Llama keyword arguments (absent = the
    Llama method's default)."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty"):
        v = field(body, name, "number")
        if v is not None:
            out[name] = float(v)
    top_k = field(body, "top_k", "integer")
    if top_k is not None:
        out["top_k"] = top_k
    seed = field(body, "seed", "integer")
    if seed is not None:
        out["seed"] = seed if seed >= 0 else None  # llama.cpp: -1 = random
    bias = _logit_bias(body, n_vocab)
    if bias:
        out["logit_bias"] = bias
    out["stop"] = _stop(body)
    n = field(body, "n", "integer", 1)
    if n != 1:
        raise RequestError("Only n=1 is supported.", "n")
    field(body, "user", "string")
    return out


def _grammar(body: dict):
    """llama.cpp's "grammar" (GBNF) or "json_schema" fields, as a LlamaGrammar (or None)."""
    from ..grammar import GrammarError, LlamaGrammar

    gbnf = field(body, "grammar", "string")
    schema = body.get("json_schema")
    try:
        if gbnf:
            return LlamaGrammar.from_string(gbnf)
        if schema is not None:
            if not isinstance(schema, dict):
                raise _wrong("json_schema", "an object", schema)
            return LlamaGrammar.from_json_schema(json.dumps(schema))
    except GrammarError as e:
        raise RequestError(str(e), "grammar" if gbnf else "json_schema") from None
    return None


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


def _stream(body: dict) -> StreamOptions:
    stream = field(body, "stream", "boolean", False)
    opts = field(body, "stream_options", "object", {})
    include = field(opts, "include_usage", "boolean", False) if opts else False
    return StreamOptions(stream, include)


def _max_tokens(body: dict, *names: str) -> Any:
    """The first of `names` that is given; 0 or negative (llama.cpp's -1) = until the context is full.
    The engine clamps it to the room left in the context."""
    for name in names:
        v = field(body, name, "integer")
        if v is not None:
            return v if v > 0 else None
    return ABSENT


def completion_request(body: dict, n_vocab: int, model_id: str) -> tuple[dict[str, Any], StreamOptions]:
    """POST /v1/completions -> Llama.create_completion keyword arguments."""
    params: dict[str, Any] = {"prompt": _prompt(body, n_vocab), "model": model_id, **_sampling(body, n_vocab)}
    opts = _stream(body)
    params["stream"] = opts.stream
    max_tokens = _max_tokens(body, "max_tokens")
    if max_tokens is not ABSENT:
        params["max_tokens"] = max_tokens
    if field(body, "echo", "boolean", False):
        params["echo"] = True
    logprobs = field(body, "logprobs", "integer")
    if logprobs is not None:
        params["logprobs"] = max(0, min(logprobs, MAX_TOP_LOGPROBS))
    suffix = field(body, "suffix", "string")
    if suffix:
        params["suffix"] = suffix
    grammar = _grammar(body)
    if grammar is not None:
        params["grammar"] = grammar
    return params, opts


def native_completion_request(body: dict, n_vocab: int, model_id: str) -> tuple[dict[str, Any], StreamOptions]:
    """llama.cpp's POST /completion (n_predict, -1 = until the context is full) -> create_completion."""
    params: dict[str, Any] = {"prompt": _prompt(body, n_vocab), "model": model_id, **_sampling(body, n_vocab)}
    opts = StreamOptions(field(body, "stream", "boolean", False), False)
    params["stream"] = opts.stream
    max_tokens = _max_tokens(body, "n_predict", "max_tokens")
    params["max_tokens"] = None if max_tokens is ABSENT else max_tokens
    grammar = _grammar(body)
    if grammar is not None:
        params["grammar"] = grammar
    return params, opts


def _content(v: Any, where: str) -> str | None:
    """A message's content: a string, null, or an array of text parts (joined)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for part in v:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise RequestError(f"Unsupported content part in '{where}': {str(kind)[:40]!r} (text only)", where)
        return "".join(texts)
    raise _wrong(where, "a string or an array of content parts", v)


def _messages(body: dict) -> list[dict[str, Any]]:
    v = body.get("messages")
    if v is None:
        raise RequestError("Missing required parameter: 'messages'.", "messages", code="missing_required_parameter")
    if not isinstance(v, list):
        raise _wrong("messages", "an array", v)
    if not v:
        raise RequestError("'messages' must contain at least one message.", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"Missing or invalid 'role' in '{where}'.", f"{where}.role")
        msg = dict(m)
        msg["content"] = _content(m.get("content"), f"{where}.content")
        if msg["content"] is None and not m.get("tool_calls"):
            msg["content"] = ""
        out.append(msg)
    return out


def chat_request(body: dict, n_vocab: int, model_id: str) -> tuple[dict[str, Any], StreamOptions]:
    """POST /v1/chat/completions -> Llama.create_chat_completion keyword arguments."""
    params: dict[str, Any] = {"messages": _messages(body), "model": model_id, **_sampling(body, n_vocab)}
    opts = _stream(body)
    params["stream"] = opts.stream
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    if max_tokens is not ABSENT:
        params["max_tokens"] = max_tokens
    for name in ("tools", "functions"):
        v = field(body, name, "array")
        if v:
            if not all(isinstance(t, dict) for t in v):
                raise _wrong(name, "an array of objects", v)
            params[name] = v
    for name in ("tool_choice", "function_call"):
        v = body.get(name)
        if v is not None:
            if not isinstance(v, (str, dict)):
                raise _wrong(name, "a string or an object", v)
            params[name] = v
    fmt = field(body, "response_format", "object")
    if fmt is not None:
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                               "response_format.type")
        params["response_format"] = fmt
    if field(body, "logprobs", "boolean", False):
        params["logprobs"] = True
        params["top_logprobs"] = max(0, min(field(body, "top_logprobs", "integer", 0), MAX_TOP_LOGPROBS))
    grammar = _grammar(body)
    if grammar is not None:
        params["grammar"] = grammar
    return params, opts


@dataclass(frozen=True)
class EmbeddingOptions:
    base64: bool = False


def embedding_request(body: dict, n_vocab: int, model_id: str, detokenize) -> tuple[dict[str, Any], EmbeddingOptions]:
    """POST /v1/embeddings -> Llama.create_embedding keyword arguments; token-id inputs are read as
    the text they spell."""
    v = body.get("input", body.get("content"))
    if v is None:
        raise RequestError("Missing required parameter: 'input'.", "input", code="missing_required_parameter")
    if isinstance(v, str):
        inputs: str | list[str] = v
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        inputs = [detokenize(_token_ids(v, "input", n_vocab))]
    elif isinstance(v, list) and v:
        if len(v) > MAX_EMBED_INPUTS:
            raise RequestError(f"'input' has {len(v)} items; at most {MAX_EMBED_INPUTS} are allowed", "input")
        inputs = []
        for item in v:
            if isinstance(item, str):
                inputs.append(item)
            elif isinstance(item, list):
                inputs.append(detokenize(_token_ids(item, "input", n_vocab)))
            else:
                raise _wrong("input", "a string, an array of strings or an array of token ids", v)
    else:
        raise _wrong("input", "a non-empty string, array of strings or array of token ids", v)
    fmt = field(body, "encoding_format", "string", "float")
    if fmt not in ("float", "base64"):
        raise RequestError("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    return {"input": inputs, "model": model_id}, EmbeddingOptions(base64=fmt == "base64")


def embeddings_base64(result: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's encoding_format=base64: each embedding as the base64 of its little-endian float32 bytes."""
    for item in result["data"]:
        item["embedding"] = base64.b64encode(np.asarray(item["embedding"], dtype="<f4").tobytes()).decode("ascii")
    return result


# --------------------------------------------------------------------------- llama.cpp shapes
def timings_json(t: dict[str, float] | None) -> dict[str, float]:
    """llama-server's "timings" object."""
    t = t or {}
    pn, pms, gn, gms = t.get("prompt_n", 0), t.get("prompt_ms", 0.0), t.get("predicted_n", 0), t.get("predicted_ms", 0.0)
    return {"prompt_n": pn, "prompt_ms": pms, "prompt_per_token_ms": pms / pn if pn else 0.0,
            "prompt_per_second": 1000 * pn / pms if pms else 0.0,
            "predicted_n": gn, "predicted_ms": gms, "predicted_per_token_ms": gms / gn if gn else 0.0,
            "predicted_per_second": 1000 * gn / gms if gms else 0.0}


def native_final(params: dict[str, Any], text: str, finish_reason: str | None, job, prompt_text: str) -> dict[str, Any]:
    """The last object of llama.cpp's /completion (the whole answer when not streaming)."""
    usage = job.usage or {}
    stop_type = "limit" if finish_reason == "length" else ("word" if job.stopping_word else "eos")
    settings = {k: params[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                                       "frequency_penalty", "seed") if k in params}
    settings.update(n_predict=params.get("max_tokens") or -1, stop=params.get("stop", []), stream=params["stream"])
    return {"index": 0, "content": text, "tokens": [], "id_slot": 0, "stop": True, "model": params["model"],
            "tokens_predicted": usage.get("completion_tokens", 0), "tokens_evaluated": usage.get("prompt_tokens", 0),
            "generation_settings": settings, "prompt": prompt_text, "has_new_line": "\n" in text,
            "truncated": False, "stop_type": stop_type, "stopping_word": job.stopping_word,
            "tokens_cached": 0, "timings": timings_json(job.timings)}


def tokenize_request(body: dict) -> tuple[str, bool, bool, bool]:
    """llama.cpp's POST /tokenize: (content, add_special, parse_special, with_pieces)."""
    content = body.get("content")
    if not isinstance(content, str):
        raise _wrong("content", "a string", content) if content is not None else RequestError(
            "Missing required parameter: 'content'.", "content", code="missing_required_parameter")
    return (content, field(body, "add_special", "boolean", False), field(body, "parse_special", "boolean", True),
            field(body, "with_pieces", "boolean", False))


def detokenize_request(body: dict, n_vocab: int) -> list[int]:
    """llama.cpp's POST /detokenize: the token ids."""
    v = body.get("tokens")
    if not isinstance(v, list):
        raise _wrong("tokens", "an array of token ids", v) if v is not None else RequestError(
            "Missing required parameter: 'tokens'.", "tokens", code="missing_required_parameter")
    return _token_ids(v, "tokens", n_vocab)
