"""The OpenAI-shaped layer of `Llama`, as llama-cpp-python returns it: text completions (echo,
logprobs, stop strings, streaming, the prefix cache), chat completions through the model's chat
template (response_format, tools), and embeddings. Built on ContextMixin's stream_text (generation.py);
the response shapes themselves come from responses.py.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from .chat import render_chat, strip_leading_bos
from .generation import ContextFullError, GenerationState, stop_list
from .grammar import LlamaGrammar, json_grammar
from .prompt_cache import longest_token_prefix
from .responses import chat_chunks, chat_from_completion, completion_logprobs, tool_call_format
from .sampling import SamplingParams, log_softmax


class CompletionMixin:
    """Completion, chat and embedding methods of `Llama` (api.py), which owns the state they use."""

    def _token_text(self, token: int) -> str:
        return self.tokenizer_.token_to_bytes(token).decode("utf-8", errors="ignore")

    def _logprobs(self, tokens: list[int], entries: list[tuple[float, list[tuple[int, float]]]], offset: int,
                  prefix: list[tuple[int, float | None, dict | None]] = ()) -> dict[str, Any]:
        """OpenAI logprobs of `tokens` (with `entries` from generate_tokens), text offsets from `offset`."""
        names, offsets, lps, tops = [], [], [], []
        for tok_id, lp, top in prefix:
            names.append(self._token_text(tok_id)); offsets.append(offset); lps.append(lp); tops.append(top)
            offset += len(names[-1])
        for tok_id, (lp, top) in zip(tokens, entries):
            name = self._token_text(tok_id)
            d = {self._token_text(i): v for i, v in top}
            d[name] = lp
            names.append(name); offsets.append(offset); lps.append(lp); tops.append(d)
            offset += len(name)
        return completion_logprobs(names, offsets, lps, tops)

    def _prompt_logprobs(self, prompt_tokens: list[int], n: int) -> list[tuple[int, float | None, dict | None]]:
        """Log-probabilities of each prompt token given those before it (echo=True), on a scratch cache."""
        scratch = self._scratch_cache(len(prompt_tokens))
        logits = self.model.forward(np.array(prompt_tokens), 0, scratch, all_logits=True)
        out: list[tuple[int, float | None, dict | None]] = []
        bos = self.token_bos()
        for i, t in enumerate(prompt_tokens):
            if i == 0:
                if t != bos:
                    out.append((t, None, None))
                continue
            lp = log_softmax(logits[i - 1])
            top = np.argsort(-lp, kind="stable")[:n]
            d = {self._token_text(int(j)): float(lp[j]) for j in top}
            d[self._token_text(t)] = float(lp[t])
            out.append((t, float(lp[t]), d))
        if out:  # OpenAI's convention, as llama-cpp-python keeps it: no log-probability for the first token
            out[0] = (out[0][0], None, None)
        return out

    def _restore_from_cache(self, prompt_tokens: list[int]) -> None:
        if self.cache is None:
            return
        try:
            state = self.cache[prompt_tokens]
        except KeyError:
            return
        if longest_token_prefix(state.input_ids.tolist(), prompt_tokens) > longest_token_prefix(self.tokens, prompt_tokens):
            self.load_state(state)

    def _completion(self, prompt_tokens: list[int], prompt_text: str, *, max_tokens: int | None, params: SamplingParams,
                    stop: list[str], stream: bool, echo: bool, logprobs: int | None, grammar: LlamaGrammar | None,
                    logits_processor: Callable | None, stopping_criteria: Callable | None, model: str | None,
                    special_text: bool = False) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """The completion behind create_completion and create_chat_completion. With special_text, each
        choice also carries "_special_text": the text with control tokens kept, for the chat layer."""
        if not prompt_tokens:
            prompt_tokens = [self.token_bos()] if self.token_bos() >= 0 else []
        if len(prompt_tokens) >= self.n_ctx():
            raise ContextFullError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {self.n_ctx()}")
        room = self.n_ctx() - len(prompt_tokens)
        limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        self._restore_from_cache(prompt_tokens)
        state = GenerationState(n_logprobs=logprobs)
        pieces = self.stream_text(prompt_tokens, params, limit, stop, state, grammar=grammar,
                                  logits_processor=logits_processor, stopping_criteria=stopping_criteria)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_path}
        if stream:
            chunks = self._completion_chunks(pieces, state, meta, prompt_text if echo else None, logprobs, special_text)
            return _with_special_text(chunks, self._special_text(state)) if special_text else chunks
        text = "".join(pieces)
        self._store_in_cache()
        lp = None
        if logprobs is not None:
            prefix = self._prompt_logprobs(prompt_tokens, logprobs) if echo else []
            lp = self._logprobs(state.tokens, state.logprobs, 0 if echo else len(prompt_text), prefix)
        choice = {"text": (prompt_text + text) if echo else text, "index": 0, "logprobs": lp,
                  "finish_reason": state.finish_reason}
        if special_text:
            choice["_special_text"] = self._special_text(state)()
        usage = {"prompt_tokens": len(prompt_tokens), "completion_tokens": state.n_completion,
                 "total_tokens": len(prompt_tokens) + state.n_completion}
        return {**meta, "choices": [choice], "usage": usage}

    def _completion_chunks(self, pieces: Iterator[str], state: GenerationState, meta: dict[str, Any],
                           echo_text: str | None, logprobs: int | None, special_text: bool) -> Iterator[dict[str, Any]]:
        """Streamed completion chunks: the echoed prompt (when echo_text is not None), one per text
        piece, then one with the finish reason."""
        done = 0
        if echo_text is not None:
            yield {**meta, "choices": [{"text": echo_text, "index": 0, "logprobs": None, "finish_reason": None}]}
        for piece in pieces:
            lp = None
            if logprobs is not None:
                lp = self._logprobs(state.tokens[done:], state.logprobs[done:], 0)
                done = len(state.tokens)
            choice = {"text": piece, "index": 0, "logprobs": lp, "finish_reason": None}
            if special_text:
                choice["_special_text"] = piece
            yield {**meta, "choices": [choice]}
        self._store_in_cache()
        yield {**meta, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": state.finish_reason}]}

    def _store_in_cache(self) -> None:
        if self.cache is not None and self.tokens:
            self.cache[self.tokens] = self.save_state()

    def _special_text(self, state: GenerationState) -> Callable[[], str]:
        """The generated text with control tokens (tool-call markers) kept, decoded when called."""
        return lambda: self.tokenizer_.decode(state.tokens, special=True)

    def create_completion(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                          logprobs: int | None = None, echo: bool = False, stop: str | list[str] | None = [],
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: int | None = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: str | None = None, stopping_criteria: Callable | None = None,
                          logits_processor: Callable | None = None, grammar: LlamaGrammar | None = None,
                          logit_bias: dict[int, float] | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped text completion (a dict, or chunks when stream=True). max_tokens None or <= 0:
        until the context is full. A token-list prompt is used as is (no BOS added)."""
        self._warn_unsupported(suffix=suffix, typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_bos=True, special=True) if prompt else []
            text = prompt
        else:
            tokens = [int(t) for t in prompt]
            text = self.tokenizer_.decode(tokens)
        params = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty,
                                logit_bias, seed)
        return self._completion(tokens, text, max_tokens=max_tokens, params=params, stop=stop_list(stop), stream=stream,
                                echo=echo, logprobs=logprobs, grammar=grammar, logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria, model=model)

    __call__ = create_completion

    # ---------------------------------------------------------------------------- chat
    def chat_prompt_tokens(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                           **variables: Any) -> list[int]:
        """Render messages with the chat template (the file's, chat_format's, or Llama-2's) and tokenize
        them; `variables` (tools, ...) go to the template."""
        tok = self.tokenizer_
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        variables = {k: v for k, v in variables.items() if v is not None}
        text = render_chat(messages, self._template, bos, eos, add_generation_prompt, **variables)
        text, had_bos = strip_leading_bos(text, bos)
        return tok.encode(text, add_bos=had_bos or tok.add_bos, add_eos=False, parse_special=True)

    def create_chat_completion(self, messages: list[dict[str, Any]], functions: list[dict] | None = None,
                               function_call: str | dict | None = None, tools: list[dict] | None = None,
                               tool_choice: str | dict | None = None, temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: str | list[str] | None = [], seed: int | None = None,
                               response_format: dict | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                               logits_processor: Callable | None = None, grammar: LlamaGrammar | None = None,
                               logit_bias: dict[int, float] | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped chat completion through the model's chat template. max_tokens None = until the
        context is full. `tools` go to the template; tool calls in the model's format (Llama 3.1,
        Hermes/Qwen2.5, Mistral) come back as message.tool_calls; a tool_choice naming a function
        forces a call to it (its arguments constrained to the function's JSON schema)."""
        self._warn_unsupported(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode)
        if functions and not tools:
            tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and tool_choice is None:
            tool_choice = function_call if isinstance(function_call, str) else {"type": "function", "function": function_call}
        forced = None
        if isinstance(tool_choice, dict):
            forced = (tool_choice.get("function") or {}).get("name")
        elif tool_choice == "required" and tools and len(tools) == 1:
            forced = tools[0]["function"]["name"]
        if tool_choice == "none":
            tools = None
        prompt = self.chat_prompt_tokens(messages, tools=tools)
        if response_format is not None and grammar is None:
            grammar = _response_format_grammar(response_format)
        if forced is not None and tools:
            grammar, opener = self._forced_tool_call(tools, forced)
            if opener:
                prompt = prompt + self.tokenizer_.encode(opener, add_bos=False, add_eos=False, parse_special=True)
        params = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty,
                                logit_bias, seed)
        n_lp = (top_logprobs or 0) if logprobs else None
        c = self._completion(prompt, "", max_tokens=max_tokens, params=params, stop=stop_list(stop), stream=stream,
                             echo=False, logprobs=n_lp, grammar=grammar, logits_processor=logits_processor,
                             stopping_criteria=None, model=model, special_text=bool(tools))
        if stream:
            return chat_chunks(c, bool(tools))
        out = chat_from_completion(c, bool(tools))
        out["choices"][0]["message"].pop("_special_text", None)
        return out

    def _forced_tool_call(self, tools: list[dict], name: str) -> tuple[LlamaGrammar, str]:
        """The grammar of a call to tool `name` in the template's format, and the text that opens a call."""
        fn = next((t["function"] for t in tools if t.get("function", {}).get("name") == name), None)
        if fn is None:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        opener, key = tool_call_format(self._template)
        grammar = json_grammar({"type": "object", "properties": {
            "name": {"const": name}, key: fn.get("parameters") or {"type": "object"}},
            "required": ["name", key], "additionalProperties": False})
        return grammar, opener

    # ------------------------------------------------------------------------ embeddings
    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Mean-pooled final hidden state per input text (the context used for generation is untouched).
        A list of floats for one string, a list of them for a list; with return_count, (that, n_tokens)."""
        texts = [input] if isinstance(input, str) else list(input)
        out, count = [], 0
        for text in texts:
            ids = self.tokenize(text)
            if len(ids) > self.n_ctx():
                if not truncate:
                    raise ContextFullError(f"{len(ids)} tokens do not fit the context of {self.n_ctx()}")
                ids = ids[: self.n_ctx()]
            count += len(ids)
            scratch = self._scratch_cache(len(ids))
            h, b = self.model.hidden_states(np.array(ids), 0, scratch)
            v = b.to_host(h).astype(np.float64).mean(axis=0)
            if normalize:
                v = v / max(np.linalg.norm(v), 1e-12)
            out.append(v.astype(np.float32).tolist())
        result = out[0] if isinstance(input, str) else out
        return (result, count) if return_count else result

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict[str, Any]:
        """OpenAI-shaped embeddings: {"object": "list", "data": [{"object": "embedding", "embedding", "index"}], ...}."""
        inputs = input if isinstance(input, list) else [input]
        embeds, n = self.embed(inputs, return_count=True)
        return {"object": "list", "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "model": model or self.model_path, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _response_format_grammar(response_format: dict) -> LlamaGrammar | None:
    """The grammar of an OpenAI response_format: json_object (any JSON object, or its "schema"),
    json_schema (its json_schema.schema); None for text."""
    kind = response_format.get("type")
    if kind == "json_object":
        return json_grammar(response_format.get("schema"))
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        return json_grammar(spec.get("schema", spec) if isinstance(spec, dict) else None)
    return None


def _with_special_text(chunks: Iterator[dict[str, Any]], special: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """Streamed chunks for the chat layer, which needs the control tokens: the whole stream is held,
    and the special text, decoded once at the end, rides on the last piece."""
    held = list(chunks)
    for ch in held[:-1]:
        ch["choices"][0]["_special_text"] = ""
    if len(held) > 1:
        held[-2]["choices"][0]["_special_text"] = special()
    yield from held
