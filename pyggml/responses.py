"""OpenAI response shapes as llama-cpp-python returns them: completion logprobs, completion -> chat
conversion, and tool calls parsed out of a model's text in the formats chat templates teach:

    Llama 3.1            {"name": "f", "parameters": {...}}   (optionally after <|python_tag|>)
    Hermes / Qwen2.5     <tool_call>{"name": "f", "arguments": {...}}</tool_call>   (repeatable)
    Mistral              [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]   (or [TOOL_CALLS]f[ARGS]{...})
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Iterable, Iterator

_DECODER = json.JSONDecoder()


def completion_logprobs(tokens: list[str], offsets: list[int], token_logprobs: list[float | None],
                        top: list[dict[str, float] | None]) -> dict[str, Any]:
    """OpenAI completion `logprobs`: parallel lists, one entry per token."""
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_logprobs, "top_logprobs": top}


def chat_logprobs(lp: dict[str, Any] | None) -> dict[str, Any] | None:
    """Completion logprobs -> chat `logprobs` ({"content": [...], "refusal": None})."""
    if lp is None:
        return None
    return {"content": [{"token": t, "bytes": list(t.encode("utf-8")), "logprob": p,
                         "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))}
                                          for k, v in (top or {}).items()]}
                        for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])],
            "refusal": None}


def chat_from_completion(c: dict[str, Any], tools_given: bool) -> dict[str, Any]:
    choice = c["choices"][0]
    text = choice["text"]
    content, calls = parse_tool_calls(choice.get("_special_text", text)) if tools_given else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content if calls else text}
    finish = choice["finish_reason"]
    if calls:
        message["tool_calls"] = calls
        finish = "tool_calls"
    return {"id": "chat" + c["id"], "object": "chat.completion", "created": c["created"], "model": c["model"],
            "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(choice["logprobs"]),
                         "finish_reason": finish}],
            "usage": c["usage"]}


def chat_chunks(chunks: Iterable[dict[str, Any]], tools_given: bool) -> Iterator[dict[str, Any]]:
    """Completion chunks -> chat chunks. With tools, the text is held back until the end, where it
    is sent either as tool-call deltas or as content."""
    head: dict[str, Any] | None = None
    held: list[str] = []
    special: list[str] = []
    for ch in chunks:
        meta = {"id": "chat" + ch["id"], "model": ch["model"], "created": ch["created"], "object": "chat.completion.chunk"}
        choice = ch["choices"][0]
        if head is None:
            head = meta
            yield {**meta, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
        if choice["finish_reason"] is None:
            if tools_given:
                held.append(choice["text"])
                special.append(choice.get("_special_text", choice["text"]))
                continue
            yield {**meta, "choices": [{"index": 0, "delta": {"content": choice["text"]},
                                        "logprobs": chat_logprobs(choice["logprobs"]), "finish_reason": None}]}
            continue
        finish = choice["finish_reason"]
        if tools_given:
            content, calls = parse_tool_calls("".join(special))
            if calls:
                deltas = [{**c, "index": i} for i, c in enumerate(calls)]
                yield {**meta, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}]}
                finish = "tool_calls"
            elif held:
                yield {**meta, "choices": [{"index": 0, "delta": {"content": "".join(held)}, "logprobs": None,
                                            "finish_reason": None}]}
        yield {**meta, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}


# ---------------------------------------------------------------------------------- tool calls
def _call(obj: Any) -> dict[str, Any] | None:
    """{"name", "arguments"|"parameters"} (also under "function") -> an OpenAI tool call, else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def _json_values(text: str) -> list[Any]:
    """Consecutive JSON values in text (separated by whitespace, ',' or ';'); stops at anything else."""
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text) or text[i] not in "[{":
            return out
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return out
        out.append(value)


def _calls_from(values: list[Any]) -> list[dict[str, Any]]:
    calls = []
    for v in values:
        for item in v if isinstance(v, list) else [v]:
            c = _call(item)
            if c is not None:
                calls.append(c)
    return calls


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content before the calls or None, OpenAI tool_calls) from a model's output; no calls -> (text, [])."""
    if "<tool_call>" in text:  # Hermes / Qwen2.5
        calls = _calls_from([v for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)
                             for v in _json_values(m.group(1))])
        cut = text.index("<tool_call>")
    elif "[TOOL_CALLS]" in text:  # Mistral
        cut = text.index("[TOOL_CALLS]")
        rest = text[cut + len("[TOOL_CALLS]"):]
        named = re.findall(r"\s*([\w.\-]+)\s*\[ARGS\]", rest)
        if named:  # v11+ format: [TOOL_CALLS]name[ARGS]{...}
            calls = []
            for m in re.finditer(r"([\w.\-]+)\s*\[ARGS\]", rest):
                args = _json_values(rest[m.end():])
                c = _call({"name": m.group(1), "arguments": args[0] if args else {}})
                if c is not None:
                    calls.append(c)
        else:
            calls = _calls_from(_json_values(rest))
    elif "<|python_tag|>" in text:  # Llama 3.1
        cut = text.index("<|python_tag|>")
        calls = _calls_from(_json_values(text[cut + len("<|python_tag|>"):]))
    else:  # Llama 3.1's bare JSON form
        stripped = text.lstrip()
        cut = len(text) - len(stripped)
        values = _json_values(stripped)
        calls = _calls_from(values) if values and all(isinstance(v, dict) and "name" in v for v in values) else []
    if not calls:
        return text, []
    content = text[:cut].strip()
    return (content or None), calls


def tool_call_format(template: str | None) -> tuple[str, str]:
    """(text that opens a tool call, key of the arguments) in the format a chat template teaches."""
    t = template or ""
    if "<tool_call>" in t:
        return "<tool_call>\n", "arguments"
    if "[TOOL_CALLS]" in t:
        return "[TOOL_CALLS]", "arguments"
    if "<|python_tag|>" in t or "<|eom_id|>" in t:
        return "", "parameters"
    return "", "arguments"
