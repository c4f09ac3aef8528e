"""Token sampling composed from small pure functions over a logits vector.

Every filter takes a float logits vector of shape (n,) and returns a new one in which the dropped
tokens are -inf; none modifies its input. `Sampler` chains them in llama.cpp's default order:
logit bias -> penalties (repeat, frequency, presence) -> grammar mask -> top-k -> top-p -> min-p ->
temperature -> draw. After top-k only the k
survivors are carried on, so top-p's sort runs over k entries rather than the whole vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

IdsLike = Sequence[int] | np.ndarray


@dataclass(frozen=True)
class SamplingParams:
    """Sampling hyperparameters; defaults are llama.cpp's.

    temperature <= 0 means greedy. top_k <= 0, top_p >= 1, min_p <= 0, repeat_penalty == 1 and
    frequency/presence_penalty == 0 each disable their stage. repeat_last_n is how many of the most
    recent ids are penalised: 0 none, -1 all that are passed. logit_bias maps token id -> value added
    to its logit (OpenAI / llama-cpp-python's `logit_bias`).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0.0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be -1 (all), 0 (off) or positive, got {self.repeat_last_n}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0


# ------------------------------------------------------------------------------------- filters
def apply_repetition_penalty(logits: np.ndarray, recent_ids: IdsLike, penalty: float) -> np.ndarray:
    """CTRL / llama.cpp rule: each id seen in `recent_ids` (once, however often it occurs) has a
    positive logit divided by `penalty` and a negative one multiplied by it."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.asarray(recent_ids, dtype=np.int64))
    if ids.size == 0:
        return logits
    if ids[0] < 0 or ids[-1] >= logits.shape[0]:
        raise ValueError(f"recent token id out of range [0, {logits.shape[0]}): {ids[0] if ids[0] < 0 else ids[-1]}")
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_frequency_presence(logits: np.ndarray, recent_ids: IdsLike, frequency: float, presence: float) -> np.ndarray:
    """OpenAI / llama.cpp rule: an id seen c > 0 times in `recent_ids` loses c * frequency + presence."""
    if (frequency == 0.0 and presence == 0.0) or len(recent_ids) == 0:
        return logits
    ids, counts = np.unique(np.asarray(recent_ids, dtype=np.int64), return_counts=True)
    out = logits.copy()
    out[ids] -= counts * np.float32(frequency) + np.float32(presence)
    return out


def apply_logit_bias(logits: np.ndarray, bias: Sequence[tuple[int, float]]) -> np.ndarray:
    """Add bias[id] to each listed id's logit (-inf bans a token); ids outside the vocabulary are an error."""
    if not bias:
        return logits
    ids = np.array([i for i, _ in bias], dtype=np.int64)
    if ids.min() < 0 or ids.max() >= logits.shape[0]:
        raise ValueError(f"logit_bias token id out of range [0, {logits.shape[0]})")
    out = logits.copy()
    np.add.at(out, ids, np.array([b for _, b in bias], dtype=out.dtype))
    return out


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, ordered by logit descending then id ascending.

    A partition finds the cut in O(n), then only the k winners are sorted; k <= 0 or k >= n sorts all.
    """
    n = logits.shape[0]
    if 0 < k < n:
        cut = np.partition(logits, n - k)[n - k]  # k-th largest value
        above = np.flatnonzero(logits > cut)
        at_cut = np.flatnonzero(logits == cut)[: k - above.size]
        idx = np.concatenate([above, at_cut])  # (k,)
    else:
        idx = np.arange(n)
    return idx[np.argsort(-logits[idx], kind="stable")]


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k largest logits (ties at the cut go to the lower id); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[0]:
        return logits
    out = np.full_like(logits, -np.inf)
    keep = top_k_indices(logits, k)
    out[keep] = logits[keep]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits; -inf entries get probability 0."""
    z = np.exp(logits - np.max(logits))
    return z / z.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (logprobs, perplexity)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches p
    (always at least one); p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    cum = np.cumsum(softmax(logits[order]))
    n_keep = min(int(np.searchsorted(cum, p, side="left")) + 1, logits.shape[0])
    out = np.full_like(logits, -np.inf)
    keep = order[:n_keep]
    out[keep] = logits[keep]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the most likely token's probability.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), so no softmax is needed.
    """
    if min_p <= 0.0:
        return logits
    return np.where(logits >= np.max(logits) + np.log(min_p), logits, -np.inf).astype(logits.dtype, copy=False)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide logits by temperature (> 0), in float64 so tiny temperatures do not overflow."""
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 to scale logits (use greedy for {temperature})")
    return logits.astype(np.float64) / temperature


def greedy(logits: np.ndarray) -> int:
    """Most likely token; ties go to the lowest id."""
    return int(np.argmax(logits))


def draw(probs: np.ndarray, u: float) -> int:
    """Index sampled from `probs` (need not be normalised) by inverse CDF at uniform u in [0, 1).

    Zero-probability entries are never returned.
    """
    cum = probs.cumsum()
    return min(int(cum.searchsorted(u * cum[-1], side="right")), probs.shape[0] - 1)


# ------------------------------------------------------------------------------------- sampler
class Sampler:
    """Picks the next token from a logits vector with a fixed `SamplingParams` and its own RNG.

    Two samplers built from params with the same seed return the same sequence for the same inputs.
    """

    def __init__(self, params: SamplingParams | None = None, rng: np.random.Generator | None = None):
        self.params = params if params is not None else SamplingParams()
        self.rng = rng if rng is not None else np.random.default_rng(self.params.seed)

    def penalise(self, logits: np.ndarray, recent_ids: IdsLike) -> np.ndarray:
        p = self.params
        logits = apply_logit_bias(logits, p.logit_bias)
        if p.repeat_last_n == 0 or len(recent_ids) == 0:
            return logits
        if p.repeat_last_n > 0:
            recent_ids = recent_ids[-p.repeat_last_n :]
        logits = apply_repetition_penalty(logits, recent_ids, p.repeat_penalty)
        return apply_frequency_presence(logits, recent_ids, p.frequency_penalty, p.presence_penalty)

    def sample(self, logits: np.ndarray, recent_ids: IdsLike = (), allowed: np.ndarray | None = None) -> int:
        """Next token id from `logits` (n_vocab,), penalising repeats of `recent_ids` (oldest first).

        `allowed` (bool, (n_vocab,)) is a grammar's mask: other tokens are never returned."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"logits must be a non-empty vector (n_vocab,), got shape {logits.shape}")
        top = int(np.argmax(logits))
        if np.isnan(logits[top]):  # argmax names the first NaN when there is one (no mask array)
            raise ValueError("logits contain NaN (the forward pass produced invalid values)")
        p = self.params
        given = logits
        logits = self.penalise(logits, recent_ids)
        if allowed is not None:
            if not allowed.any():
                raise ValueError("the grammar allows no token here")
            logits = np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)
        if p.is_greedy:  # the check's argmax is the answer when no bias, penalty or grammar made new logits
            return top if logits is given else greedy(logits)
        ids = top_k_indices(logits, p.top_k)  # (k,) survivors, most likely first
        cand = logits[ids]                    # (k,)
        cand = top_p_filter(cand, p.top_p)
        cand = min_p_filter(cand, p.min_p)
        z = apply_temperature(cand, p.temperature)
        weights = np.exp(z - z[0])  # cand[0] is the maximum and survives every filter
        return int(ids[draw(weights, self.rng.random())])

    __call__ = sample


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Full-vocabulary distribution the sampler draws from (before penalties): a slow, obviously
    correct composition of the filters over the whole vector, for tests and inspection."""
    x = np.asarray(logits, dtype=np.float32)
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return softmax(apply_temperature(x, params.temperature))
