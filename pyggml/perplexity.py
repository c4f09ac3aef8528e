"""Perplexity and KL divergence over a text, measured the way llama.cpp's perplexity tool does.

The text is tokenized once (BOS first, as the model asks) and cut into non-overlapping chunks of
n_ctx tokens; the first token of every chunk is replaced by BOS. Each chunk is evaluated from
position 0, and only its second half is scored: the log-probability of token i+1 given the
logits at position i, for i = n_ctx/2 .. n_ctx-2, so every scored token sees at least n_ctx/2
tokens of context. PPL = exp(mean NLL); its uncertainty is the delta-method estimate
PPL * sqrt(var(NLL) / (N - 1)).

KL divergence evaluates a base model (e.g. f16) and a quantized model on the same chunks and
compares their full next-token distributions at the same scored positions: KL(base || quant),
top-1 agreement and the change in the probability of the right token. Unlike llama.cpp, the base
log-probabilities are kept exactly (llama.cpp stores them as 16-bit numbers and drops those
below e^-16 from the sum).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .api import Llama
from .sampling import log_softmax

log = logging.getLogger(__name__)


class PerplexityError(ValueError):
    """The text or the models cannot be measured as asked."""


class Estimate(NamedTuple):
    """A mean and the standard error of that mean."""

    value: float
    uncertainty: float


# ---------------------------------------------------------------------------- statistics
def mean_and_uncertainty(values: np.ndarray) -> Estimate:
    """Mean and its standard error sqrt(var / (N - 1)) with var = E[x^2] - E[x]^2 (llama.cpp's)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Estimate(math.nan, math.nan)
    if values.size == 1:
        return Estimate(float(values[0]), 0.0)
    return Estimate(float(values.mean()), float(math.sqrt(values.var() / (values.size - 1))))


def exp_estimate(e: Estimate) -> Estimate:
    """exp of an estimate, its uncertainty carried to first order: d exp(x) = exp(x) dx."""
    v = math.exp(e.value)
    return Estimate(v, v * e.uncertainty)


def fraction_estimate(hits: np.ndarray) -> Estimate:
    """The share of True values with its binomial standard error sqrt(p (1 - p) / (N - 1))."""
    n = hits.size
    p = float(hits.mean()) if n else math.nan
    return Estimate(p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


# ------------------------------------------------------------------------------ results
@dataclass
class PerplexityResult:
    """Per-token NLL of the scored positions, chunk by chunk (grows while the run goes on)."""

    n_ctx: int
    n_text_tokens: int  # tokens in the whole text
    n_chunks: int  # chunks the run evaluates
    nll: list[np.ndarray] = field(default_factory=list)  # per chunk: (n_ctx - n_ctx//2 - 1,) float64

    @property
    def n_done(self) -> int:
        return len(self.nll)

    @property
    def n_scored(self) -> int:
        return sum(a.size for a in self.nll)

    def ppl(self) -> Estimate:
        return exp_estimate(mean_and_uncertainty(np.concatenate(self.nll)))


@dataclass
class KLDivergenceResult(PerplexityResult):
    """`nll` is the quantized model's; the base model's and the comparisons sit beside it."""

    nll_base: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)  # KL(base || quant) per scored position
    p_diff: list[np.ndarray] = field(default_factory=list)  # p_quant(right token) - p_base(right token)
    same_top: list[np.ndarray] = field(default_factory=list)  # bool: both models' argmax agree

    def ppl_base(self) -> Estimate:
        return exp_estimate(mean_and_uncertainty(np.concatenate(self.nll_base)))

    def ln_ppl_ratio(self) -> Estimate:
        """ln(PPL(quant) / PPL(base)); its uncertainty counts the correlation of the two NLLs."""
        return mean_and_uncertainty(np.concatenate(self.nll) - np.concatenate(self.nll_base))

    def mean_kld(self) -> Estimate:
        return mean_and_uncertainty(np.concatenate(self.kld))

    def kld_percentile(self, q: float) -> float:
        """The q-th percentile (0..100, linear interpolation) of the per-token KL divergence."""
        return float(np.percentile(np.concatenate(self.kld), q))

    def rms_p_diff(self) -> Estimate:
        mse = mean_and_uncertainty(np.concatenate(self.p_diff) ** 2)
        rms = math.sqrt(mse.value)
        return Estimate(rms, 0.5 / rms * mse.uncertainty if rms > 0 else 0.0)

    def same_top_fraction(self) -> Estimate:
        return fraction_estimate(np.concatenate(self.same_top))


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path` to score; a binary or non-UTF-8 file is a PerplexityError naming the byte."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        raise PerplexityError(f"{path}: a binary file (NUL byte at offset {data.index(0)}); perplexity needs UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PerplexityError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


# ---------------------------------------------------------------------------- evaluation
def text_chunks(llm: Llama, text: str, n_ctx: int, n_chunks: int | None = None) -> tuple[np.ndarray, int]:
    """The text's tokens as (n_chunks, n_ctx) chunks, each starting with BOS when the model adds
    BOS; also the number of tokens in the whole text. Needs at least 2 * n_ctx tokens."""
    if n_ctx - n_ctx // 2 - 1 < 1:
        raise PerplexityError(f"a context of {n_ctx} tokens leaves nothing to score; use at least 3")
    tokens = np.array(llm.tokenize(text), dtype=np.int64)
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(f"the text tokenizes to only {len(tokens)} tokens; perplexity with a context of "
                              f"{n_ctx} needs at least {2 * n_ctx} (use a longer text or a smaller -c/--ctx-size)")
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks <= 0 else min(n_chunks, n_max)
    chunks = tokens[: n * n_ctx].reshape(n, n_ctx).copy()
    bos = llm.token_bos()
    if llm.tokenizer.add_bos and bos is not None:
        chunks[:, 0] = bos
    return chunks, len(tokens)


def scored_logits(llm: Llama, chunk: np.ndarray) -> np.ndarray:
    """Logits (n_scored, n_vocab) at positions n_ctx/2 .. n_ctx-2 of `chunk`, evaluated from
    position 0 in pieces of llm.n_batch tokens; pieces wholly before n_ctx/2 only fill the cache."""
    first, last = len(chunk) // 2, len(chunk) - 2
    llm.reset()  # the chunk overwrites the KV cache from position 0
    rows = []
    for start in range(0, len(chunk), llm.n_batch):
        piece = chunk[start : start + llm.n_batch]
        end = start + len(piece)  # one past the piece's last position
        if end <= first:
            llm.model.forward(piece, start, llm.kv_cache)
        else:
            logits = llm.model.forward(piece, start, llm.kv_cache, all_logits=True)
            rows.append(logits[max(first - start, 0) : last + 1 - start])
    return np.concatenate(rows)


def _check_n_ctx(llm: Llama, n_ctx: int | None) -> int:
    n_ctx = llm.n_ctx() if n_ctx is None else n_ctx
    if n_ctx > llm.n_ctx():
        raise PerplexityError(f"chunks of {n_ctx} tokens do not fit the model's context of {llm.n_ctx()}")
    return n_ctx


def perplexity(llm: Llama, text: str, n_ctx: int | None = None, n_chunks: int | None = None,
               on_chunk: Callable[[PerplexityResult], None] | None = None) -> PerplexityResult:
    """Perplexity of `llm` over `text` in chunks of n_ctx tokens (default: the context's size);
    n_chunks limits the chunks evaluated. `on_chunk(result)` is called after every chunk."""
    n_ctx = _check_n_ctx(llm, n_ctx)
    chunks, n_tokens = text_chunks(llm, text, n_ctx, n_chunks)
    log.info("%d tokens: perplexity over %d chunks of %d", n_tokens, len(chunks), n_ctx)
    result = PerplexityResult(n_ctx, n_tokens, len(chunks))
    for chunk in chunks:
        logp = log_softmax(scored_logits(llm, chunk))
        targets = chunk[n_ctx // 2 + 1 :]
        result.nll.append(-logp[np.arange(len(targets)), targets])
        if on_chunk is not None:
            on_chunk(result)
    return result


def check_same_vocab(llm: Llama, base: Llama) -> None:
    """KL divergence compares distributions token by token: both models need one vocabulary."""
    a, b = llm.tokenizer.tokens, base.tokenizer.tokens
    if llm.n_vocab() != base.n_vocab() or len(a) != len(b):
        raise PerplexityError(f"{llm.model_path} has {llm.n_vocab()} tokens but {base.model_path} has "
                              f"{base.n_vocab()}: KL divergence needs models with the same vocabulary")
    differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if differ is not None:
        raise PerplexityError(f"{llm.model_path} and {base.model_path} have different vocabularies "
                              f"(token {differ} is {a[differ]!r} vs {b[differ]!r})")


def kl_divergence(llm: Llama, base: Llama, text: str, n_ctx: int | None = None, n_chunks: int | None = None,
                  on_chunk: Callable[[KLDivergenceResult], None] | None = None) -> KLDivergenceResult:
    """Evaluate `base` and `llm` (the quantized model) on the same chunks of `text` and compare
    their next-token distributions at the scored positions: KL(base || llm), PPL of both, top-1
    agreement. The text is tokenized by `llm`; both models must share one vocabulary."""
    check_same_vocab(llm, base)
    n_ctx = _check_n_ctx(llm, n_ctx)
    _check_n_ctx(base, n_ctx)
    chunks, n_tokens = text_chunks(llm, text, n_ctx, n_chunks)
    log.info("%d tokens: KL divergence over %d chunks of %d", n_tokens, len(chunks), n_ctx)
    result = KLDivergenceResult(n_ctx, n_tokens, len(chunks))
    for chunk in chunks:
        logits, logits_base = scored_logits(llm, chunk), scored_logits(base, chunk)
        logp, logp_base = log_softmax(logits), log_softmax(logits_base)
        targets = chunk[n_ctx // 2 + 1 :]
        rows = np.arange(len(targets))
        result.nll.append(-logp[rows, targets])
        result.nll_base.append(-logp_base[rows, targets])
        result.kld.append((np.exp(logp_base) * (logp_base - logp)).sum(axis=-1))
        result.p_diff.append(np.exp(logp[rows, targets]) - np.exp(logp_base[rows, targets]))
        result.same_top.append(logits.argmax(axis=-1) == logits_base.argmax(axis=-1))
        if on_chunk is not None:
            on_chunk(result)
    return result


# ----------------------------------------------------------------------------- reports
KL_CHUNK_HEADER = "chunk        PPL(Q)           ln(PPL(Q)/PPL(base))        KL divergence          Same top p"


def kl_chunk_line(r: KLDivergenceResult) -> str:
    """One row of running figures after the latest chunk (under KL_CHUNK_HEADER)."""
    ppl, ratio, kld, top = r.ppl(), r.ln_ppl_ratio(), r.mean_kld(), r.same_top_fraction()
    return (f"{r.n_done:4d}  {ppl.value:9.4f} ± {ppl.uncertainty:8.4f}  {ratio.value:10.5f} ± {ratio.uncertainty:9.5f}"
            f"  {kld.value:10.5f} ± {kld.uncertainty:9.5f}  {100 * top.value:7.3f} ± {100 * top.uncertainty:6.3f} %")


def perplexity_summary(r: PerplexityResult) -> list[str]:
    ppl = r.ppl()
    return [f"Final estimate: PPL = {ppl.value:.4f} +/- {ppl.uncertainty:.5f}"]


def kl_summary(r: KLDivergenceResult) -> list[str]:
    """The closing statistics, laid out like llama.cpp's."""
    ppl, base, ratio, kld = r.ppl(), r.ppl_base(), r.ln_ppl_ratio(), r.mean_kld()
    ppl_ratio = exp_estimate(ratio)
    dp, top = r.rms_p_diff(), r.same_top_fraction()
    return [
        f"scored {r.n_scored} tokens in {r.n_done} chunks of {r.n_ctx}",
        "",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {ppl.value:10.6f} ± {ppl.uncertainty:10.6f}",
        f"Mean PPL(base)                : {base.value:10.6f} ± {base.uncertainty:10.6f}",
        f"Mean ln(PPL(Q)/PPL(base))     : {ratio.value:10.6f} ± {ratio.uncertainty:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {ppl_ratio.value:10.6f} ± {ppl_ratio.uncertainty:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {kld.value:10.6f} ± {kld.uncertainty:10.6f}",
        f"Maximum KLD: {r.kld_percentile(100):10.6f}",
        f"99.9%   KLD: {r.kld_percentile(99.9):10.6f}",
        f"99.0%   KLD: {r.kld_percentile(99):10.6f}",
        f"Median  KLD: {r.kld_percentile(50):10.6f}",
        "",
        "====== Token probability statistics ======",
        f"RMS Δp    : {100 * dp.value:6.3f} ± {100 * dp.uncertainty:5.3f} %",
        f"Same top p: {100 * top.value:6.3f} ± {100 * top.uncertainty:5.3f} %",
        "",
        *perplexity_summary(r),
    ]
