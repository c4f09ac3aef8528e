"""The Python API: load a model once, then generate, chat, embed. Names and return shapes follow
llama-cpp-python, which users already know; generation is a generator so apps can stream.

    from pyggml import Llama
    llm = Llama("model.gguf", n_ctx=2048)
    for piece in llm.generate("Once upon a time", max_tokens=50, stream=True): ...
    llm.create_chat_completion([{"role": "user", "content": "Hi"}])
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import BackendUnavailableError, CPUBackend
from .chat import chat_template_of, render_chat, strip_leading_bos
from .gguf.reader import GGUFFile
from .model import LlamaConfig, LlamaModel
from .model.kvcache import KVCache
from .sampling import Sampler, SamplingParams
from .session import load_session, model_fingerprint, save_session
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class ContextFullError(ValueError):
    """The prompt does not fit in the context window."""


@dataclass
class Timings:
    """Wall-clock figures of the last generation, as llama.cpp prints them."""

    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0


@dataclass
class GenerationState:
    """State of one text generation: why it ended and how many tokens it made."""

    finish_reason: str | None = None
    n_prompt: int = 0
    n_completion: int = 0
    text: list[str] = field(default_factory=list)


def make_backends(gguf: GGUFFile, config: LlamaConfig, n_gpu_layers: int, n_threads: int | None, n_ctx: int, n_batch: int):
    """Per-layer backends and the head backend. n_gpu_layers: 0 = CPU only, -1 (or >= n_layers) = all
    on the GPU. The GPU memory the placement needs is checked before anything is uploaded."""
    cpu = CPUBackend(n_threads)
    n_layers = config.n_layers
    if n_gpu_layers == 0:
        return [cpu] * n_layers, cpu
    try:
        from .cuda.backend import CUDABackend, check_fits
        gpu = CUDABackend()
    except ImportError as e:
        raise BackendUnavailableError(f"n_gpu_layers={n_gpu_layers} needs cupy (pip install 'pyggml[cuda]') "
                                      f"and an NVIDIA GPU: {e}") from None
    except Exception as e:  # cupy is there but no usable GPU or driver
        raise BackendUnavailableError(f"n_gpu_layers={n_gpu_layers}: no usable CUDA GPU ({type(e).__name__}: {e})") from None
    n_gpu = n_layers if n_gpu_layers < 0 or n_gpu_layers >= n_layers else n_gpu_layers
    plan = check_fits(gguf, config, n_gpu, n_ctx, n_batch, gpu.free_memory())
    gpu.expect_upload(plan.weight_bytes)
    # The last n_gpu layers go to the GPU (as llama.cpp offloads), the head too when all layers do.
    backends = [cpu] * (n_layers - n_gpu) + [gpu] * n_gpu
    return backends, (gpu if plan.head_on_gpu else cpu)


class Llama:
    """A loaded model with its context (KV cache). Not thread-safe: one generation at a time."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        kv_path: str | os.PathLike | None = None,
        verbose: bool = False,
    ):
        start = time.perf_counter()
        self.model_path = str(model_path)
        self.file = GGUFFile(model_path)
        self.tokenizer = load_tokenizer(self.file.metadata)
        self.config = LlamaConfig.from_metadata(self.file.metadata, str(self.file.path))
        if n_ctx <= 0:
            n_ctx = self.config.n_ctx_train
        backends, head = make_backends(self.file, self.config, n_gpu_layers, n_threads, n_ctx, max(1, n_batch))
        self.model = LlamaModel(self.file, self.config, backends, head)
        self.cache = KVCache(self.config, n_ctx, backends, kv_path)
        self.n_batch = max(1, n_batch)
        self.seed = seed
        self.verbose = verbose
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self._logits: np.ndarray | None = None  # next-token logits after self.tokens
        self._fingerprint: str | None = None
        self.timings = Timings(load_s=time.perf_counter() - start)
        self.context_full = False

    # ------------------------------------------------------------------------- basics
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    def n_vocab(self) -> int:
        return self.config.n_vocab

    def token_bos(self) -> int | None:
        return self.tokenizer.bos_id

    def token_eos(self) -> int | None:
        return self.tokenizer.eos_id

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=add_bos and self.tokenizer.add_bos, add_eos=False, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self.tokenizer.decode(tokens, special=special).encode("utf-8")

    def reset(self) -> None:
        """Forget the context (the cache is simply overwritten from position 0)."""
        self.tokens, self._logits = [], None

    # ----------------------------------------------------------------------- evaluate
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the context hold exactly `tokens`; returns the next-token logits.

        The longest prefix already in the cache is kept (multi-turn chat re-uses its history);
        the rest is processed in batches of n_batch tokens.
        """
        tokens = list(map(int, tokens))
        if len(tokens) > self.n_ctx():
            raise ContextFullError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx()} (raise n_ctx)")
        if not tokens:
            raise ValueError("nothing to evaluate: the prompt has no tokens")
        keep = min(len(self.tokens), len(tokens))
        if self.tokens[:keep] != tokens[:keep]:  # one list comparison covers the usual case: one token more
            keep = next(i for i, (a, b) in enumerate(zip(self.tokens, tokens)) if a != b)
        if keep == len(tokens) == len(self.tokens) and self._logits is not None:
            return self._logits
        keep = min(keep, len(tokens) - 1)  # evaluate at least one token to get its logits
        self.tokens = self.tokens[:keep]
        for i in range(keep, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            self._logits = self.model.forward(np.array(chunk), len(self.tokens), self.cache)
            self.tokens += chunk
        return self._logits

    # ---------------------------------------------------------------------- generation
    def generate_tokens(self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
                        state: GenerationState | None = None) -> Iterator[int]:
        """Yield sampled token ids after the prompt; stops at end-of-generation, max_tokens or a full
        context (state.finish_reason says which). The end-of-generation token is not yielded."""
        state = state if state is not None else GenerationState()
        t0 = time.perf_counter()
        n_cached = len(self.tokens)
        logits = self.eval(prompt_tokens)
        self.timings.prompt_s = time.perf_counter() - t0
        self.timings.prompt_tokens = len(prompt_tokens) - min(n_cached, len(prompt_tokens) - 1)
        self.timings.gen_tokens, self.timings.gen_s = 0, 0.0
        state.n_prompt = len(prompt_tokens)
        seed = params.seed if params.seed is not None else self.seed
        sampler = Sampler(replace(params, seed=seed))
        self.context_full = False
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                recent = self.tokens[-params.repeat_last_n:] if params.repeat_last_n > 0 else (self.tokens if params.repeat_last_n < 0 else [])
                token = sampler.sample(logits, recent)
                if self.tokenizer.is_eog(token):
                    state.finish_reason = "stop"
                    return
                state.n_completion += 1
                yield token
                if len(self.tokens) >= self.n_ctx():
                    self.context_full = True
                    state.finish_reason = "length"
                    return
                logits = self.eval(self.tokens + [token])
                self.timings.gen_tokens += 1
            state.finish_reason = "length"
        finally:
            self.timings.gen_s = time.perf_counter() - t0

    def stream_text(self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
                     stop: Sequence[str], state: GenerationState) -> Iterator[str]:
        """Text pieces of a generation; never half a UTF-8 character, never part of a stop string."""
        # The prompt's text comes first, so the first generated token keeps its leading space.
        detok = self.tokenizer.detokenizer(continuing=bool(self.tokenizer.decode(prompt_tokens)))
        pending = ""
        longest = max((len(s) for s in stop), default=0)
        for token in self.generate_tokens(prompt_tokens, params, max_tokens, state):
            pending += detok.feed(token)
            if stop:
                hit = min((i for i in (pending.find(s) for s in stop) if i >= 0), default=-1)
                if hit >= 0:
                    if pending[:hit]:
                        yield pending[:hit]
                    state.finish_reason = "stop"
                    return
                # hold back a tail that could still grow into a stop string
                hold = next((n for n in range(min(longest - 1, len(pending)), 0, -1)
                             if any(s.startswith(pending[-n:]) for s in stop)), 0)
                out, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
            else:
                out, pending = pending, ""
            if out:
                yield out
        pending += detok.flush()
        if pending:
            yield pending

    @staticmethod
    def _params(temperature, top_k, top_p, min_p, repeat_penalty, seed) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repeat_penalty=repeat_penalty, seed=seed)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.1, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, stream: bool = False) -> str | Iterator[str]:
        """Continue `prompt` (BOS added per the model). stream=True yields text pieces as they come."""
        params = self._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        pieces = self.stream_text(self.tokenize(prompt), params, max_tokens, stops, GenerationState())
        return pieces if stream else "".join(pieces)

    def create_completion(self, prompt: str, max_tokens: int = 16, temperature: float = 0.8, top_k: int = 40,
                          top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.1,
                          seed: int | None = None, stop: Sequence[str] | str | None = None,
                          stream: bool = False) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped text completion (a dict, or chunks when stream=True)."""
        params = self._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        state = GenerationState()
        pieces = self.stream_text(self.tokenize(prompt), params, max_tokens, stops, state)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()), "model": self.model_path}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                for piece in pieces:
                    yield {**meta, "choices": [choice(piece, None)]}
                yield {**meta, "choices": [choice("", state.finish_reason)]}
            return chunks()
        text = "".join(pieces)
        return {**meta, "choices": [choice(text, state.finish_reason)], "usage": self._usage(state)}

    __call__ = create_completion

    @staticmethod
    def _usage(state: GenerationState) -> dict[str, int]:
        return {"prompt_tokens": state.n_prompt, "completion_tokens": state.n_completion,
                "total_tokens": state.n_prompt + state.n_completion}

    # ---------------------------------------------------------------------------- chat
    def chat_prompt_tokens(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the file's chat template (or the Llama-2 format) and tokenize them."""
        tok = self.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        text = render_chat(messages, chat_template_of(self.file.metadata), bos, eos, add_generation_prompt)
        text, had_bos = strip_leading_bos(text, bos)
        return tok.encode(text, add_bos=had_bos or tok.add_bos, add_eos=False, parse_special=True)

    def create_chat_completion(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                               temperature: float = 0.2, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                               repeat_penalty: float = 1.1, seed: int | None = None,
                               stop: Sequence[str] | str | None = None,
                               stream: bool = False) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped chat completion. max_tokens None = until the context is full."""
        prompt = self.chat_prompt_tokens(messages)
        params = self._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else self.n_ctx()
        state = GenerationState()
        pieces = self.stream_text(prompt, params, limit, stops, state)
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": self.model_path}
        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                yield {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                for piece in pieces:
                    yield {**meta, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": state.finish_reason}]}
            return chunks()
        text = "".join(pieces)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": state.finish_reason}],
                "usage": self._usage(state)}

    # ------------------------------------------------------------------------ embeddings
    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True) -> list[float] | list[list[float]]:
        """Mean-pooled final hidden state per input text (the context used for generation is untouched)."""
        texts = [input] if isinstance(input, str) else list(input)
        out = []
        for text in texts:
            ids = self.tokenize(text)
            if len(ids) > self.n_ctx():
                if not truncate:
                    raise ContextFullError(f"{len(ids)} tokens do not fit the context of {self.n_ctx()}")
                ids = ids[: self.n_ctx()]
            scratch = KVCache(self.config, len(ids), [layer.backend for layer in self.model.layers])
            h, b = self.model.hidden_states(np.array(ids), 0, scratch)
            v = b.to_host(h).astype(np.float64).mean(axis=0)
            if normalize:
                v = v / max(np.linalg.norm(v), 1e-12)
            out.append(v.astype(np.float32).tolist())
        return out[0] if isinstance(input, str) else out

    # -------------------------------------------------------------------------- sessions
    def _fp(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.file, self.config)
        return self._fingerprint

    def save_state(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Save the context (tokens, KV cache, next-token logits, and any JSON-able `extra`) to a file."""
        save_session(path, self._fp(), self.cache, self.tokens, self._logits, _host, extra)

    def load_state(self, path: str | os.PathLike) -> dict:
        """Restore a context saved by save_state and return its `extra`; refuses a session of another
        model or context size (SessionError)."""
        tokens, logits, extra = load_session(path, self._fp(), self.cache, lambda a: a)
        self.tokens, self._logits = tokens, logits
        return extra


def _host(a):
    """A numpy copy of an array from any backend."""
    get = getattr(a, "get", None)  # cupy arrays
    return get() if callable(get) else a
