"""The Python API: llama-cpp-python's `Llama`, same names, arguments, defaults and return shapes, so an
app written for llama-cpp-python runs after changing its import.

    from pyggml import Llama
    with Llama("model.gguf", n_ctx=2048) as llm:
        llm("Once upon a time", max_tokens=50)                       # OpenAI-shaped completion
        for chunk in llm("Once upon a time", stream=True): ...
        llm.create_chat_completion([{"role": "user", "content": "Hi"}], response_format={"type": "json_object"})
        for t in llm.generate(llm.tokenize(b"Hello")): ...            # token ids in, token ids out

Arguments of llama-cpp-python that pyggml cannot honour are accepted with one warning naming them.
`Llama` is the facade: it loads the model and owns the context (tokens, KV cache, logits); evaluation
and generation live in generation.py (ContextMixin), completions, chat and embeddings in
completion.py (CompletionMixin).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np

from .backends import BackendUnavailableError, make_backends
from .chat import chat_template_of
from .completion import CompletionMixin
from .generation import ContextFullError, ContextMixin, GenerationState, Timings
from .gguf.reader import GGUFFile
from .model import LlamaConfig, LlamaModel
from .model.config import ModelError
from .model.kvcache import KVCache
from .model.kvtypes import kv_type
from .prompt_cache import BaseLlamaCache, LlamaState
from .session import SessionError, load_session, model_fingerprint, save_session
from .tokenizer import load_tokenizer

__all__ = ["Llama", "LLAMA_DEFAULT_SEED", "ContextFullError", "GenerationState", "Timings", "BackendUnavailableError",
           "make_backends"]

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
    "draft_model": None, "tokenizer": None, "spm_infill": False,
}
# Accepted and meaningless here (always on or always available): logits_all, embedding.
_NO_EFFECT_INIT = ("logits_all", "embedding")


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


class Llama(ContextMixin, CompletionMixin):
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
        n_seq_max: int = 1,
        type_k: str | int | None = None,
        type_v: str | int | None = None,
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
        if self.tokenizer_.n_vocab != self.config.n_vocab:  # else a prompt or a sampled id fails mid-generation
            raise ModelError(f"{self.file.path}: the tokenizer has {self.tokenizer_.n_vocab} tokens but the model's "
                             f"vocabulary (token_embd rows, {self.config.architecture.name}.vocab_size) is {self.config.n_vocab}")
        if n_ctx <= 0:
            n_ctx = self.config.n_ctx_train
        elif self.config.n_ctx_train and n_ctx > self.config.n_ctx_train:
            warnings.warn(f"n_ctx={n_ctx} exceeds the {self.config.n_ctx_train} tokens the model was trained on: "
                          "output past that is likely to degrade", RuntimeWarning, stacklevel=2)
        n_seq_max = max(1, int(n_seq_max))
        kv_types = (kv_type(type_k), kv_type(type_v))  # f16 by default, as llama.cpp
        for t in kv_types:
            t.row_width(self.config.head_dim)  # KVTypeError before anything is loaded
        backends, head = make_backends(self.file, self.config, n_gpu_layers, n_threads, n_ctx * n_seq_max, max(1, n_batch),
                                       kv_types=kv_types)
        self.model = LlamaModel(self.file, self.config, backends, head)
        # n_seq_max sequences of n_ctx tokens each (a server's slots); this object's own context is slot 0
        self.kv_cache = KVCache(self.config, n_ctx, backends, kv_path, n_seq=n_seq_max, type_k=kv_types[0], type_v=kv_types[1])
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
        kv = [tuple(np.array(_host(part[:, :n])) for part in self.kv_cache.layer(i)) for i in range(self.config.n_layers)]
        return LlamaState(input_ids=np.array(self.tokens, dtype=np.intc),
                          scores=None if self._logits is None else np.array(_host(self._logits), dtype=np.float32),
                          n_tokens=n, kv=kv, seed=self.seed, fingerprint=self._fp(), n_ctx=self.n_ctx(),
                          kv_types=self.kv_cache.type_names)

    def load_state(self, state: LlamaState | str | os.PathLike) -> dict | None:
        """Restore a LlamaState, or a session file (returning its `extra`); a state of another model or
        a larger context is refused (SessionError)."""
        if not isinstance(state, LlamaState):
            return self.load_state_file(state)
        if state.fingerprint and state.fingerprint != self._fp():
            raise SessionError("the state was saved with another model")
        types = self.kv_cache.type_names
        if tuple(state.kv_types) != types:
            raise SessionError(f"the state holds a KV cache of types {'/'.join(state.kv_types)} (keys/values); this "
                               f"context stores {'/'.join(types)} (type_k / type_v)")
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
