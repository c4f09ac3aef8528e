"""The Python API: llama-cpp-python's `Llama`, same names, arguments, defaults and return shapes, so an
app written for llama-cpp-python runs after changing its import.

    from pyggml import Llama
    with Llama("model.gguf", n_ctx=2048) as llm:
        llm("Once upon a time", max_tokens=50)                       # OpenAI-shaped completion
        for chunk in llm("Once upon a time", stream=True): ...
        llm.create_chat_completion([{"role": "user", "content": "Hi"}], response_format={"type": "json_object"})
        for t in llm.generate(llm.tokenize(b"Hello")): ...            # token ids in, token ids out

Arguments of llama-cpp-python that pyggml cannot honour are accepted with one warning naming them.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backends import BackendUnavailableError, CPUBackend
from .chat import chat_template_of, render_chat, strip_leading_bos
from .gguf.reader import GGUFFile
from .grammar import GrammarMatcher, LlamaGrammar, json_grammar
from .model import LlamaConfig, LlamaModel
from .model.kvcache import KVCache
from .prompt_cache import BaseLlamaCache, LlamaState, longest_token_prefix
from .responses import chat_chunks, chat_from_completion, completion_logprobs, tool_call_format
from .sampling import Sampler, SamplingParams
from .session import SessionError, load_session, model_fingerprint, save_session
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: "pick a random seed"

# llama-cpp-python constructor arguments pyggml has no use for, with their defaults: passing one with
# another value is accepted, with one warning naming all of them.
_UNSUPPORTED_INIT = {
    "split_mode": 1, "main_gpu": 0, "tensor_split": None, "vocab_only": False, "use_mmap": True, "use_mlock": False,
    "kv_overrides": None, "n_ubatch": 512, "n_threads_batch": None, "rope_scaling_type": -1, "pooling_type": -1,
    "attention_type": -1, "rope_freq_base": 0.0, "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0,
    "offload_kqv": True, "flash_attn": False, "op_offload": None, "swa_full": None, "no_perf": False,
    "lora_base": None, "lora_scale": 1.0, "lora_path": None, "numa": False, "chat_handler": None,
    "draft_model": None, "tokenizer": None, "type_k": None, "type_v": None, "spm_infill": False,
}
# Accepted and meaningless here (always on or always available): logits_all, embedding.
_NO_EFFECT_INIT = ("logits_all", "embedding")
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


def make_backends(gguf: GGUFFile, config: LlamaConfig, n_gpu_layers: int, n_threads: int | None, n_ctx: int, n_batch: int):
    """Per-layer backends and the head backend. n_gpu_layers: 0 = CPU only, -1 (or >= n_layers) = all
    on the GPU. Without cupy or a usable GPU the model runs on the CPU, with a warning (as
    llama-cpp-python's CPU build does). The GPU memory a placement needs is checked before anything
    is uploaded."""
    cpu = CPUBackend(n_threads)
    n_layers = config.n_layers
    if n_gpu_layers == 0:
        return [cpu] * n_layers, cpu
    try:
        from .cuda.backend import CUDABackend, check_fits
        gpu = CUDABackend()
    except ImportError as e:
        warnings.warn(f"n_gpu_layers={n_gpu_layers} ignored, running on the CPU: the GPU backend needs cupy "
                      f"(pip install 'pyggml[cuda]') and an NVIDIA GPU ({e})", RuntimeWarning, stacklevel=3)
        return [cpu] * n_layers, cpu
    except Exception as e:  # noqa: BLE001 - cupy is there but no usable GPU or driver
        warnings.warn(f"n_gpu_layers={n_gpu_layers} ignored, running on the CPU: no usable CUDA GPU "
                      f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
        return [cpu] * n_layers, cpu
    n_gpu = n_layers if n_gpu_layers < 0 or n_gpu_layers >= n_layers else n_gpu_layers
    plan = check_fits(gguf, config, n_gpu, n_ctx, n_batch, gpu.free_memory())
    gpu.expect_upload(plan.weight_bytes)
    # The last n_gpu layers go to the GPU (as llama.cpp offloads), the head too when all layers do.
    backends = [cpu] * (n_layers - n_gpu) + [gpu] * n_gpu
    return backends, (gpu if plan.head_on_gpu else cpu)


def _metadata_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """GGUF metadata as llama.cpp's llama_model_meta_val_str gives it: every value a string
    (booleans "true"/"false"); the vocabulary-sized arrays are left out."""
    out = {}
    for k, v in metadata.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, (str, int, float)):
            out[k] = str(v)
        elif hasattr(v, "__len__") and len(v) <= 64:
            out[k] = json.dumps([x.item() if hasattr(x, "item") else x for x in v])
    return out


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class Llama:
    """A loaded model with its context (KV cache). Not thread-safe: one generation at a time."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_gpu_layers: int = 0,
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: int | None = None,
        last_n_tokens_size: int = 64,
        chat_format: str | None = None,
        verbose: bool = True,
        kv_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        start = time.perf_counter()
        ignored = sorted(k for k, v in kwargs.items() if k not in _NO_EFFECT_INIT and (k not in _UNSUPPORTED_INIT or v != _UNSUPPORTED_INIT[k]))
        if ignored:
            warnings.warn(f"pyggml.Llama ignores these arguments: {', '.join(ignored)}", UserWarning, stacklevel=2)
        self.model_path = str(model_path)
        self.file = GGUFFile(model_path)
        self.tokenizer_ = load_tokenizer(self.file.metadata)
        self.config = LlamaConfig.from_metadata(self.file.metadata, str(self.file.path))
        if n_ctx <= 0:
            n_ctx = self.config.n_ctx_train
        elif self.config.n_ctx_train and n_ctx > self.config.n_ctx_train:
            warnings.warn(f"n_ctx={n_ctx} exceeds the {self.config.n_ctx_train} tokens the model was trained on: "
                          "output past that is likely to degrade", RuntimeWarning, stacklevel=2)
        backends, head = make_backends(self.file, self.config, n_gpu_layers, n_threads, n_ctx, max(1, n_batch))
        self.model = LlamaModel(self.file, self.config, backends, head)
        self.kv_cache = KVCache(self.config, n_ctx, backends, kv_path)
        self.n_batch = max(1, n_batch)
        self.last_n_tokens_size = last_n_tokens_size
        self.set_seed(seed)
        self.verbose = verbose  # pyggml's library never prints: verbose only matters to callers
        self.chat_format = chat_format
        self._template = _chat_template(chat_format, self.file.metadata)
        self.metadata: dict[str, str] = _metadata_strings(self.file.metadata)
        self.cache: BaseLlamaCache | None = None  # prefix cache (set_cache)
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self._logits: np.ndarray | None = None  # next-token logits after self.tokens
        self._fingerprint: str | None = None
        self._warned: set[str] = set()
        self.timings = Timings(load_s=time.perf_counter() - start)
        self.context_full = False

    # ------------------------------------------------------------------------- basics
    @property
    def tokenizer(self):
        return self.tokenizer_

    def n_ctx(self) -> int:
        return self.kv_cache.n_ctx

    def n_embd(self) -> int:
        return self.config.dim

    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def input_ids(self) -> np.ndarray:
        return np.array(self.tokens, dtype=np.intc)

    def token_bos(self) -> int:
        return self.tokenizer_.bos_id if self.tokenizer_.bos_id is not None else -1

    def token_eos(self) -> int:
        return self.tokenizer_.eos_id if self.tokenizer_.eos_id is not None else -1

    def token_nl(self) -> int:
        ids = self.tokenizer_.encode("\n", add_bos=False, add_eos=False)
        return ids[-1] if ids else -1

    def set_seed(self, seed: int) -> None:
        """Seed of the sampler; LLAMA_DEFAULT_SEED (0xFFFFFFFF) or None = random."""
        self.seed = None if seed is None or seed == LLAMA_DEFAULT_SEED or seed < 0 else int(seed)
        self._rng = np.random.default_rng(self.seed)

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of utf-8 `text`; BOS first when add_bos and the model adds one; `special` parses
        control-token texts ("<|im_start|>", ...) into their ids."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer_.encode(text, add_bos=add_bos and self.tokenizer_.add_bos, add_eos=False, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False) -> bytes:
        """utf-8 bytes of `tokens`; with prev_tokens, as they read after those (a token's leading space kept).
        A sequence that ends inside a UTF-8 character gives its raw bytes."""
        tok = self.tokenizer_
        tokens = [int(t) for t in tokens]
        raw = b"".join(tok.token_to_bytes(t, special) for t in tokens)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
        if prev_tokens:
            prev = tok.decode(list(prev_tokens), special=special)
            return tok.decode(list(prev_tokens) + tokens, special=special)[len(prev):].encode("utf-8")
        return tok.decode(tokens, special=special).encode("utf-8")

    def reset(self) -> None:
        """Forget the context (the cache is simply overwritten from position 0)."""
        self.tokens, self._logits = [], None

    def set_cache(self, cache: BaseLlamaCache | None) -> None:
        """Prefix cache: completions restore the snapshot sharing the longest prefix with their prompt
        and store their final context (pyggml.LlamaRAMCache)."""
        self.cache = cache

    def close(self) -> None:
        """Release the model and its mapped file; the object is unusable afterwards."""
        if getattr(self, "file", None) is not None:
            self.model = self.kv_cache = None
            self.file.close()
            self.file = None

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _warn_unsupported(self, **given: Any) -> None:
        names = [k for k, v in given.items() if v != _UNSUPPORTED_SAMPLING.get(k) and k not in self._warned]
        if names:
            self._warned.update(names)
            warnings.warn(f"pyggml ignores these sampling arguments: {', '.join(names)}", UserWarning, stacklevel=3)

    # ----------------------------------------------------------------------- evaluate
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
        self.tokens = self.tokens[:keep]
        for i in range(keep, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            self._logits = self.model.forward(np.array(chunk), len(self.tokens), self.kv_cache)
            self.tokens += chunk
        return self._logits

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the context (llama-cpp-python's eval); returns the next-token logits."""
        return self.sync_context(self.tokens + list(map(int, tokens)))

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
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                n = params.repeat_last_n
                recent = self.tokens[-n:] if n > 0 else (self.tokens if n < 0 else [])
                if logits_processor is not None:
                    logits = np.asarray(logits_processor(self.input_ids, logits.copy()), dtype=np.float32)
                token = sampler.sample(logits, recent, matcher.allowed() if matcher else None)
                if state.n_logprobs is not None:
                    lp = _log_softmax(logits)
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
        pieces = self.stream_text(self.tokenize(prompt), params, max_tokens, _stops(stop), GenerationState())
        return pieces if stream else "".join(pieces)

    # ---------------------------------------------------------------------- completion
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
        scratch = KVCache(self.config, len(prompt_tokens), [layer.backend for layer in self.model.layers])
        logits = self.model.forward(np.array(prompt_tokens), 0, scratch, all_logits=True)
        out: list[tuple[int, float | None, dict | None]] = []
        bos = self.token_bos()
        for i, t in enumerate(prompt_tokens):
            if i == 0:
                if t != bos:
                    out.append((t, None, None))
                continue
            lp = _log_softmax(logits[i - 1])
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

        def finish() -> None:
            if self.cache is not None and self.tokens:
                self.cache[self.tokens] = self.save_state()

        def special() -> str:  # the text with control tokens (tool-call markers) kept, for the chat layer
            return self.tokenizer_.decode(state.tokens, special=True)

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                done = 0
                if echo:
                    yield {**meta, "choices": [{"text": prompt_text, "index": 0, "logprobs": None, "finish_reason": None}]}
                for piece in pieces:
                    lp = None
                    if logprobs is not None:
                        lp = self._logprobs(state.tokens[done:], state.logprobs[done:], 0)
                        done = len(state.tokens)
                    choice = {"text": piece, "index": 0, "logprobs": lp, "finish_reason": None}
                    if special_text:
                        choice["_special_text"] = piece
                    yield {**meta, "choices": [choice]}
                finish()
                yield {**meta, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": state.finish_reason}]}
            if special_text:  # the chat layer needs the control tokens: re-decode once at the end
                def with_special() -> Iterator[dict[str, Any]]:
                    held = list(chunks())
                    for ch in held[:-1]:
                        ch["choices"][0]["_special_text"] = ""
                    if len(held) > 1:
                        held[-2]["choices"][0]["_special_text"] = special()
                    yield from held
                return with_special()
            return chunks()
        text = "".join(pieces)
        finish()
        lp = None
        if logprobs is not None:
            prefix = self._prompt_logprobs(prompt_tokens, logprobs) if echo else []
            lp = self._logprobs(state.tokens, state.logprobs, 0 if echo else len(prompt_text), prefix)
        choice = {"text": (prompt_text + text) if echo else text, "index": 0, "logprobs": lp,
                  "finish_reason": state.finish_reason}
        if special_text:
            choice["_special_text"] = special()
        usage = {"prompt_tokens": len(prompt_tokens), "completion_tokens": state.n_completion,
                 "total_tokens": len(prompt_tokens) + state.n_completion}
        return {**meta, "choices": [choice], "usage": usage}

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
        return self._completion(tokens, text, max_tokens=max_tokens, params=params, stop=_stops(stop), stream=stream,
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
            kind = response_format.get("type")
            if kind == "json_object":
                grammar = json_grammar(response_format.get("schema"))
            elif kind == "json_schema":
                spec = response_format.get("json_schema") or {}
                grammar = json_grammar(spec.get("schema", spec) if isinstance(spec, dict) else None)
        if forced is not None and tools:
            fn = next((t["function"] for t in tools if t.get("function", {}).get("name") == forced), None)
            if fn is None:
                raise ValueError(f"tool_choice names {forced!r}, which is not among the tools")
            opener, key = tool_call_format(self._template)
            grammar = json_grammar({"type": "object", "properties": {
                "name": {"const": forced}, key: fn.get("parameters") or {"type": "object"}},
                "required": ["name", key], "additionalProperties": False})
            if opener:
                prompt = prompt + self.tokenizer_.encode(opener, add_bos=False, add_eos=False, parse_special=True)
        params = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty,
                                logit_bias, seed)
        n_lp = (top_logprobs or 0) if logprobs else None
        c = self._completion(prompt, "", max_tokens=max_tokens, params=params, stop=_stops(stop), stream=stream,
                             echo=False, logprobs=n_lp, grammar=grammar, logits_processor=logits_processor,
                             stopping_criteria=None, model=model, special_text=bool(tools))
        if stream:
            return chat_chunks(c, bool(tools))
        out = chat_from_completion(c, bool(tools))
        out["choices"][0]["message"].pop("_special_text", None)
        return out

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
            scratch = KVCache(self.config, len(ids), [layer.backend for layer in self.model.layers])
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

    # -------------------------------------------------------------------------- sessions
    def _fp(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.file, self.config)
        return self._fingerprint

    def save_state(self, path: str | os.PathLike | None = None, extra: dict | None = None) -> LlamaState | None:
        """Snapshot of the context: a LlamaState in memory (llama-cpp-python), or with `path` a session
        file (tokens, KV cache, next-token logits, any JSON-able `extra`)."""
        if path is not None:
            return self.save_state_file(path, extra)
        n = len(self.tokens)
        kv = [tuple(np.array(_host(part[:, :n]), dtype=np.float32) for part in self.kv_cache.layer(i))
              for i in range(self.config.n_layers)]
        return LlamaState(input_ids=np.array(self.tokens, dtype=np.intc),
                          scores=None if self._logits is None else np.array(_host(self._logits), dtype=np.float32),
                          n_tokens=n, kv=kv, seed=self.seed, fingerprint=self._fp(), n_ctx=self.n_ctx())

    def load_state(self, state: LlamaState | str | os.PathLike) -> dict | None:
        """Restore a LlamaState, or a session file (returning its `extra`); a state of another model or
        a larger context is refused (SessionError)."""
        if not isinstance(state, LlamaState):
            return self.load_state_file(state)
        if state.fingerprint and state.fingerprint != self._fp():
            raise SessionError("the state was saved with another model")
        if state.n_tokens > self.n_ctx():
            raise SessionError(f"the state holds {state.n_tokens} tokens, the context has room for {self.n_ctx()}")
        n = state.n_tokens
        for i, (k, v) in enumerate(state.kv):
            kd, vd = self.kv_cache.layer(i)
            kd[:, :n] = _to_device_like(kd, k)
            vd[:, :n] = _to_device_like(vd, v)
        self.tokens = [int(t) for t in state.input_ids[:n]]
        self._logits = None if state.scores is None else state.scores.copy()
        return None

    def save_state_file(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        save_session(path, self._fp(), self.kv_cache, self.tokens, self._logits, _host, extra)

    def load_state_file(self, path: str | os.PathLike) -> dict:
        tokens, logits, extra = load_session(path, self._fp(), self.kv_cache, lambda a: a)
        self.tokens, self._logits = tokens, logits
        return extra


_BUILTIN_TEMPLATES = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
              " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}


def _chat_template(chat_format: str | None, metadata) -> str | None:
    """The template chat_format names (llama-2, chatml), else the file's; None = Llama-2's format."""
    from .chat import LLAMA2_CHAT_TEMPLATE

    if chat_format is None:
        return chat_template_of(metadata)
    if chat_format in ("llama-2", "llama2"):
        return LLAMA2_CHAT_TEMPLATE
    if chat_format in _BUILTIN_TEMPLATES:
        return _BUILTIN_TEMPLATES[chat_format]
    warnings.warn(f"chat_format={chat_format!r} is not built into pyggml: using the model's own chat template",
                  UserWarning, stacklevel=3)
    return chat_template_of(metadata)


def _to_device_like(target, a: np.ndarray):
    """`a` on the device of `target` (a cupy array for GPU layers)."""
    if type(target).__module__.startswith("cupy"):
        import cupy

        return cupy.asarray(a)
    return a


def _host(a):
    """A numpy copy of an array from any backend."""
    get = getattr(a, "get", None)  # cupy arrays
    return get() if callable(get) else a
