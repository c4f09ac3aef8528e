"""The context and the token loop under `Llama`: keeping the KV cache in step with a token list
(sync_context / eval), llama-cpp-python's low-level sample / generate on token ids, and pyggml's
generate_tokens -> stream_text -> generate_text, which the completion layer (completion.py) builds on.

`ContextMixin` holds no state of its own: `Llama` (api.py) owns the model, the KV cache, the tokenizer,
`tokens` (what the cache holds), `_logits` (the next-token logits after them), `_rng`, `seed`, `timings`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .grammar import GrammarMatcher, LlamaGrammar
from .model.kvcache import KVCache
from .sampling import Sampler, SamplingParams, log_softmax

# Sampling arguments without a pyggml stage, with their neutral values.
_UNSUPPORTED_SAMPLING = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "suffix": None}


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
    """State of one text generation: why it ended, the tokens it made, their log-probabilities."""

    finish_reason: str | None = None
    n_prompt: int = 0
    n_completion: int = 0
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    n_logprobs: int | None = None  # collect log-probabilities with this many alternatives
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    """llama-cpp-python's `stop` (a string, a list or None) as a list of non-empty strings."""
    return [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]


class ContextMixin:
    """Evaluation and generation methods of `Llama` (see the module docstring for the state they use)."""

    before_token: Callable[[], None] | None = None  # called before each token is sampled; raising stops the generation
    _chain: Callable | None = None  # a server sequence's: its batcher runs the decode loop (server/batching.py Chain)
    _chain_stop: Callable | None = None

    def _warn_unsupported(self, **given: Any) -> None:
        names = [k for k, v in given.items() if v != _UNSUPPORTED_SAMPLING.get(k) and k not in self._warned]
        if names:
            self._warned.update(names)
            warnings.warn(f"pyggml ignores these sampling arguments: {', '.join(names)}", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------ evaluate
    def sync_context(self, tokens: Sequence[int]) -> np.ndarray:
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
        if keep < len(self.tokens):
            self.tokens, self._logits = self.tokens[:keep], None  # the logits were those after the dropped tokens
        return self._append(tokens[keep:])

    def _append(self, new: list[int]) -> np.ndarray:
        """Evaluate `new` after the context's tokens, n_batch at a time; the next-token logits."""
        for i in range(0, len(new), self.n_batch):
            chunk = new[i : i + self.n_batch]
            self._logits = self._evaluate(np.array(chunk), len(self.tokens))
            self.tokens += chunk
        return self._logits

    def _evaluate(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Next-token logits after `tokens` placed at positions start.. of this context's sequence
        (a server's sequence replaces this with its batched evaluation)."""
        return self.model.forward(tokens, start, self.kv_cache)

    def _scratch_cache(self, n_ctx: int) -> KVCache:
        """A cache of n_ctx positions beside the context's, of its K and V types (the same kernels and the
        same rounding as the context's own cache)."""
        return KVCache(self.config, n_ctx, [layer.backend for layer in self.model.layers],
                       type_k=self.kv_cache.type_k, type_v=self.kv_cache.type_v)

    def warm_up(self) -> None:
        """Run the forward pass over two tokens and over one on a scratch cache, so that numba compiles
        (or loads) the kernels this model uses now rather than at the first prompt. The context is untouched."""
        scratch = self._scratch_cache(3)
        bos = max(self.token_bos(), 0)
        self.model.forward(np.array([bos, bos]), 0, scratch)
        self.model.forward(np.array([bos]), 2, scratch)

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the context (llama-cpp-python's eval); returns the next-token logits.
        What sync_context(self.tokens + tokens) does, without copying and comparing the whole context
        for every generated token (~150 us at 4096 tokens)."""
        new = list(map(int, tokens))
        if not new:
            return self.sync_context(self.tokens)
        if len(self.tokens) + len(new) > self.n_ctx():
            raise ContextFullError(f"{len(self.tokens) + len(new)} tokens do not fit the context of {self.n_ctx()} (raise n_ctx)")
        return self._append(new)

    def _sampling(self, temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty,
                  logit_bias, seed) -> SamplingParams:
        bias = tuple((int(k), float(v)) for k, v in (logit_bias or {}).items())
        return SamplingParams(temperature=temp, top_k=top_k, top_p=min(max(top_p, 1e-9), 1.0), min_p=min_p,
                              repeat_penalty=repeat_penalty, repeat_last_n=self.last_n_tokens_size, seed=seed,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, logit_bias=bias)

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor: Callable | None = None,
               grammar: LlamaGrammar | None = None, idx: int | None = None) -> int:
        """One token from the logits after the current context (call eval first)."""
        if self._logits is None:
            raise ValueError("nothing to sample from: eval some tokens first")
        self._warn_unsupported(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode)
        params = self._sampling(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty, None, None)
        logits = self._logits
        if logits_processor is not None:
            logits = np.asarray(logits_processor(self.input_ids, logits.copy()), dtype=np.float32)
        allowed = None
        if grammar is not None:  # the grammar is matched against the context's tokens since the last reset
            matcher = GrammarMatcher(grammar, self.tokenizer_, self.n_vocab())
            allowed = matcher.allowed()
        return Sampler(params, self._rng).sample(logits, self.tokens, allowed)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Callable | None = None,
                 stopping_criteria: Callable | None = None, grammar: LlamaGrammar | None = None) -> Iterator[int]:
        """llama-cpp-python's low-level generator: prompt token ids in, sampled token ids out, forever
        (the caller stops; end-of-generation tokens are yielded too). reset=False continues after the
        current context; a prompt sharing a prefix with it re-uses that prefix either way.
        `send(ids)` feeds extra tokens after the yielded one."""
        self._warn_unsupported(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode)
        params = self._sampling(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty, None, None)
        sampler = Sampler(params, self._rng)
        matcher = GrammarMatcher(grammar, self.tokenizer_, self.n_vocab()) if grammar is not None else None
        logits = self.sync_context(list(tokens) if reset else self.tokens + list(tokens))
        while True:
            if logits_processor is not None:
                logits = np.asarray(logits_processor(self.input_ids, logits.copy()), dtype=np.float32)
            token = sampler.sample(logits, self.tokens, matcher.allowed() if matcher else None)
            if matcher is not None:
                matcher.accept(token)
            if stopping_criteria is not None and stopping_criteria(self.input_ids, logits):
                return
            more = yield token
            new = [token] + [int(t) for t in (more or [])]
            if len(self.tokens) + len(new) > self.n_ctx():
                return
            logits = self.eval(new)

    # ---------------------------------------------------------------------- generation
    def generate_tokens(self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
                        state: GenerationState | None = None, grammar: LlamaGrammar | None = None,
                        logits_processor: Callable | None = None,
                        stopping_criteria: Callable | None = None) -> Iterator[int]:
        """Yield sampled token ids after the prompt; stops at end-of-generation, max_tokens, a full
        context or a completed grammar (state.finish_reason says which). The end-of-generation token
        is not yielded."""
        state = state if state is not None else GenerationState()
        t0 = time.perf_counter()
        n_cached = len(self.tokens)
        logits = self.sync_context(prompt_tokens)
        self.timings.prompt_s = time.perf_counter() - t0
        self.timings.prompt_tokens = len(prompt_tokens) - min(n_cached, len(prompt_tokens) - 1)
        self.timings.gen_tokens, self.timings.gen_s = 0, 0.0
        state.n_prompt = len(prompt_tokens)
        seed = params.seed if params.seed is not None else self.seed
        sampler = Sampler(replace(params, seed=seed))
        matcher = GrammarMatcher(grammar, self.tokenizer_, self.n_vocab()) if grammar is not None else None
        self.context_full = False
        if self._chain is not None and matcher is None and logits_processor is None and stopping_criteria is None \
                and state.n_logprobs is None and max_tokens > 0:
            yield from self._chained_tokens(logits, sampler, params, max_tokens, state)
            return
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                if self.before_token is not None:
                    self.before_token()
                n = params.repeat_last_n
                recent = self.tokens[-n:] if n > 0 else (self.tokens if n < 0 else [])
                if logits_processor is not None:
                    logits = np.asarray(logits_processor(self.input_ids, logits.copy()), dtype=np.float32)
                token = sampler.sample(logits, recent, matcher.allowed() if matcher else None)
                if state.n_logprobs is not None:
                    lp = log_softmax(logits)
                    top = np.argsort(-lp, kind="stable")[: state.n_logprobs]
                    state.logprobs.append((float(lp[token]), [(int(i), float(lp[i])) for i in top]))
                if matcher is not None:
                    matcher.accept(token)
                if self.tokenizer_.is_eog(token):
                    state.finish_reason = "stop"
                    return
                if stopping_criteria is not None and stopping_criteria(self.input_ids, logits):
                    state.finish_reason = "stop"
                    return
                state.n_completion += 1
                state.tokens.append(token)
                yield token
                if matcher is not None and matcher.done:
                    state.finish_reason = "stop"
                    return
                if len(self.tokens) >= self.n_ctx():
                    self.context_full = True
                    state.finish_reason = "length"
                    return
                logits = self.eval([token])
                self.timings.gen_tokens += 1
            state.finish_reason = "length"
        finally:
            self.timings.gen_s = time.perf_counter() - t0

    def _chained_tokens(self, logits: np.ndarray, sampler: Sampler, params: SamplingParams, max_tokens: int,
                        state: GenerationState) -> Iterator[int]:
        """generate_tokens' loop with the server's batcher running it (self._chain): each token after the
        first is chosen on the batcher's thread as soon as the forward pass that makes its logits has run,
        and joins the next decode step at once; this thread yields the tokens as they come. The same
        decisions in the same order: the cancel check, the sampler (its own RNG), end-of-generation, then
        max_tokens and the context (a token that ends the generation is not evaluated)."""
        n = params.repeat_last_n
        base, ctx = len(self.tokens), list(self.tokens)  # ctx: what the cache holds, as the chain extends it
        n_ctx = self.n_ctx()
        chosen = 0
        ends = {"reason": "length", "full": False}

        def decide(row: np.ndarray) -> int | None:
            nonlocal chosen
            if self.before_token is not None:
                self.before_token()
            token = sampler.sample(row, ctx[-n:] if n > 0 else (ctx if n < 0 else []))
            if self.tokenizer_.is_eog(token):
                ends["reason"] = "stop"
                return None
            chosen += 1
            return token

        def more() -> bool:  # whether the token just chosen is evaluated (another one follows it)
            if len(ctx) >= n_ctx:
                ends["full"] = True
                return False
            return chosen < max_tokens

        def choose(row: np.ndarray, evaluated: int) -> tuple[int | None, bool]:  # on the batcher's thread
            ctx.append(evaluated)
            token = decide(row)
            return token, token is not None and more()

        t0 = time.perf_counter()
        first = decide(logits)
        chain = self._chain(first, len(ctx), choose) if first is not None and more() else None
        try:
            token = first
            while token is not None:
                state.n_completion += 1
                state.tokens.append(token)
                yield token
                if chain is None:
                    break
                kind, value = chain.out.get()
                if kind == "error":
                    try:
                        raise value
                    finally:  # the exception's traceback holds this frame: were the frame to hold the
                        value = None  # exception, the cycle would keep the logits until a full collection
                token = value if kind == "token" else None
        finally:
            if chain is not None:
                self._chain_stop(chain)
                self.tokens = self.tokens[:base] + chain.evaluated
                if chain.evaluated:
                    self._logits = chain.logits
                self.timings.gen_tokens = len(chain.evaluated)
            self.timings.gen_s = time.perf_counter() - t0
        self.context_full = ends["full"]
        state.finish_reason = ends["reason"]

    def stream_text(self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
                    stop: Sequence[str], state: GenerationState, **kw: Any) -> Iterator[str]:
        """Text pieces of a generation; never half a UTF-8 character, never part of a stop string.
        Keyword arguments go to generate_tokens (grammar, logits_processor, stopping_criteria)."""
        # The prompt's text comes first, so the first generated token keeps its leading space.
        detok = self.tokenizer_.detokenizer(continuing=bool(self.tokenizer_.decode(prompt_tokens)))
        pending = ""
        longest = max((len(s) for s in stop), default=0)
        for token in self.generate_tokens(prompt_tokens, params, max_tokens, state, **kw):
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

    def generate_text(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                      top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                      stop: Sequence[str] | str | None = None, stream: bool = False) -> str | Iterator[str]:
        """Continue `prompt` (BOS added per the model): the text, or its pieces as they come with stream=True."""
        params = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, 0.0, 0.0, None, seed)
        pieces = self.stream_text(self.tokenize(prompt), params, max_tokens, stop_list(stop), GenerationState())
        return pieces if stream else "".join(pieces)
