"""Perplexity and KL divergence against plain numpy computations on the real stories260K model;
a file whose output head is Q6_K (as llama.cpp's quantizer writes) against the gguf package."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import functools

from pyggml import Llama as _Llama

# compared with float64 numpy forwards: the KV cache in f32 (the default f16 adds its own rounding,
# covered by tests/test_kvtypes.py)
Llama = functools.partial(_Llama, type_k="f32", type_v="f32")
from pyggml.cli import main
from pyggml.gguf import GGMLType
from pyggml.gguf.constants import QUANTIZATION_VERSION, Keys, TensorNames
from pyggml.gguf.writer import TensorPlan, write_gguf
from pyggml.perplexity import PerplexityError, kl_divergence, perplexity, text_chunks
from pyggml.quant import codecs
from pyggml.quantize import quantize_file
from pyggml.synthetic import Shape, llama_metadata, random_weight, synthetic_vocab, tensor_shapes, write_random_model

from conftest import random_q6_k
from pyggml.convert import convert_hf_to_gguf
from test_model import numpy_llama_logits

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "tests" / "data" / "ppl_text.txt").read_text(encoding="utf-8")

N_CTX = 64
N_CHUNKS = 4


@pytest.fixture(scope="module")
def stories(stories_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    files = {"f32": convert_hf_to_gguf(stories_dir, d / "s-f32.gguf", outtype="f32")}
    for t in ("q8_0", "q4_0"):
        files[t] = quantize_file(files["f32"], t, d / f"s-{t}.gguf").out_path
    return files


def _numpy_scores(path, chunks):
    """Per-token NLL and log-probabilities of the scored positions, from the numpy LLaMA."""
    nll, logps = [], []
    for chunk in chunks:
        logits = numpy_llama_logits(path, chunk)[N_CTX // 2 : N_CTX - 1]  # predicts tokens N_CTX/2+1 ..
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        targets = chunk[N_CTX // 2 + 1 :]
        nll.append(-logp[np.arange(len(targets)), targets])
        logps.append(logp)
    return np.concatenate(nll), np.concatenate(logps)


def test_chunks_start_with_bos_and_split_the_text(stories):
    llm = Llama(stories["f32"], n_ctx=N_CTX)
    tokens = llm.tokenize(TEXT)
    chunks, n = text_chunks(llm, TEXT, N_CTX)
    assert n == len(tokens) and chunks.shape == (len(tokens) // N_CTX, N_CTX)
    assert (chunks[:, 0] == llm.token_bos()).all()
    assert np.array_equal(chunks[:, 1:], np.array(tokens[: chunks.size]).reshape(-1, N_CTX)[:, 1:])
    assert text_chunks(llm, TEXT, N_CTX, n_chunks=3)[0].shape == (3, N_CTX)


def test_perplexity_equals_numpy_reference(stories):
    llm = Llama(stories["f32"], n_ctx=N_CTX, n_batch=24)  # pieces of 24 tokens: 24 + 24 + 16
    seen = []
    r = perplexity(llm, TEXT, n_chunks=N_CHUNKS, on_chunk=lambda res: seen.append(res.ppl().value))
    chunks, _ = text_chunks(llm, TEXT, N_CTX, N_CHUNKS)
    nll, _ = _numpy_scores(stories["f32"], chunks)
    got = np.concatenate(r.nll)
    assert r.n_done == N_CHUNKS and got.shape == nll.shape == (N_CHUNKS * (N_CTX // 2 - 1),)
    np.testing.assert_allclose(got, nll, rtol=0, atol=1e-4)
    ppl = r.ppl()
    assert ppl.value == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    # llama.cpp's estimate: PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1))
    var = (nll**2).mean() - nll.mean() ** 2
    assert ppl.uncertainty == pytest.approx(math.exp(nll.mean()) * math.sqrt(var / (nll.size - 1)), rel=1e-4)
    assert len(seen) == N_CHUNKS and seen[-1] == ppl.value and seen[0] == pytest.approx(math.exp(nll[: N_CTX // 2 - 1].mean()), rel=1e-5)
    # One batch per chunk gives the same figures up to float32 rounding. Both runs evaluate the same
    # float32 path and differ only in summation order (BLAS tiles, attention pieces), so each is as far
    # from the float64 reference as this path's rounding takes it: their difference is bounded by twice
    # the largest error of the path measured above (triangle inequality), not by a figure one CPU gave.
    path_error = float(np.abs(got - nll).max())
    whole = perplexity(Llama(stories["f32"], n_ctx=N_CTX), TEXT, n_chunks=N_CHUNKS)
    np.testing.assert_allclose(np.concatenate(whole.nll), got, rtol=0, atol=2 * path_error)


def test_kl_of_a_model_with_itself_is_zero(stories):
    r = kl_divergence(Llama(stories["f32"], n_ctx=N_CTX), Llama(stories["f32"], n_ctx=N_CTX), TEXT, n_chunks=2)
    assert r.mean_kld().value == pytest.approx(0, abs=1e-12) and r.kld_percentile(100) == pytest.approx(0, abs=1e-12)
    assert r.same_top_fraction() == (1.0, 0.0)
    assert r.ppl() == r.ppl_base() and r.ln_ppl_ratio().value == 0


def test_kl_divergence_orders_quant_types_and_matches_numpy(stories):
    base = Llama(stories["f32"], n_ctx=N_CTX)
    q8 = kl_divergence(Llama(stories["q8_0"], n_ctx=N_CTX), base, TEXT, n_chunks=N_CHUNKS)
    q4 = kl_divergence(Llama(stories["q4_0"], n_ctx=N_CTX), base, TEXT, n_chunks=N_CHUNKS)
    assert q4.mean_kld().value > q8.mean_kld().value > 0
    assert q4.same_top_fraction().value < 1
    plain = perplexity(Llama(stories["f32"], n_ctx=N_CTX), TEXT, n_chunks=N_CHUNKS)
    assert q4.ppl_base().value == pytest.approx(plain.ppl().value, rel=1e-6)

    # KL(base || q4_0) written out plainly from each model's own logits over the whole chunk
    chunks, _ = text_chunks(base, TEXT, N_CTX, N_CHUNKS)
    quant = Llama(stories["q4_0"], n_ctx=N_CTX)
    kld, same = [], []
    for chunk in chunks:
        rows = slice(N_CTX // 2, N_CTX - 1)
        p = _softmax(base.model.forward(chunk, 0, base.kv_cache, all_logits=True)[rows])
        q = _softmax(quant.model.forward(chunk, 0, quant.kv_cache, all_logits=True)[rows])
        kld.append((p * np.log(p / q)).sum(1))
        same.append(p.argmax(1) == q.argmax(1))
    kld, same = np.concatenate(kld), np.concatenate(same)
    np.testing.assert_allclose(np.concatenate(q4.kld), kld, rtol=1e-6, atol=1e-9)
    assert q4.same_top_fraction().value == same.mean()
    # and against the numpy LLaMA: its int8 activation blocks round a value on a .5 boundary the
    # other way now and then, which moves single positions by up to ~0.2 logits; the mean holds
    _, logp = _numpy_scores(stories["q4_0"], chunks)
    _, logp_base = _numpy_scores(stories["f32"], chunks)
    assert q4.mean_kld().value == pytest.approx((np.exp(logp_base) * (logp_base - logp)).sum(1).mean(), rel=0.01)


def _softmax(logits):
    e = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_short_text_and_other_vocab_are_errors(stories, tmp_path):
    llm = Llama(stories["f32"], n_ctx=N_CTX)
    with pytest.raises(PerplexityError, match=rf"only 5 tokens.*at least {2 * N_CTX}"):
        perplexity(llm, "Once upon a time")
    with pytest.raises(PerplexityError, match="do not fit"):
        perplexity(llm, TEXT, n_ctx=2 * N_CTX)
    other = tmp_path / "other.gguf"
    write_random_model(other, Shape(64, 1, 4, 2, 64, 300, ctx=N_CTX), GGMLType.F32)
    with pytest.raises(PerplexityError, match="512 tokens but .* has 300"):
        kl_divergence(llm, Llama(other, n_ctx=N_CTX), TEXT)


def test_cli_perplexity_and_kl(stories, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    runner = CliRunner()
    r = runner.invoke(main, ["perplexity", "-m", str(stories["q8_0"]), "-f", str(text), "-c", str(N_CTX),
                             "--chunks", "3", "-b", "40", "-t", "2"])
    assert r.exit_code == 0, r.output
    want = perplexity(_Llama(stories["q8_0"], n_ctx=N_CTX), TEXT, n_chunks=3).ppl()  # the CLI's default f16 cache
    assert "[1]" in r.output and "[3]" in r.output and "[4]" not in r.output
    assert f"Final estimate: PPL = {want.value:.4f} +/- {want.uncertainty:.5f}" in r.output

    r = runner.invoke(main, ["perplexity", "-m", str(stories["q4_0"]), "--kl-base", str(stories["f32"]),
                             "-f", str(text), "-c", str(N_CTX), "--chunks", "2"])
    assert r.exit_code == 0, r.output
    assert "Mean    KLD:" in r.output and "Same top p:" in r.output and "Mean PPL(base)" in r.output

    text.write_text("Once upon a time", encoding="utf-8")
    r = runner.invoke(main, ["perplexity", "-m", str(stories["f32"]), "-f", str(text), "-c", str(N_CTX)])
    assert r.exit_code == 1 and "needs at least 128" in r.output and "Traceback" not in r.output


def test_tools_script_help():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "perplexity.py"), "--help"], capture_output=True,
                       text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert "--kl-base" in r.stdout and "--ctx-size" in r.stdout


# --------------------------------------------------------------------- Q6_K output head
Q6_K_SHAPE = Shape(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=300, ctx=32)


def _write(path, output_plan):
    meta = llama_metadata(Q6_K_SHAPE, "q6_k-head", GGMLType.F32)
    meta.update(synthetic_vocab(Q6_K_SHAPE.vocab))
    meta[Keys.QUANTIZATION_VERSION] = QUANTIZATION_VERSION
    plans = [TensorPlan(n, s, GGMLType.F32, lambda n=n, s=s: random_weight(n, s, 11))
             for n, s in tensor_shapes(Q6_K_SHAPE).items() if n != TensorNames.OUTPUT]
    write_gguf(path, meta, plans + [output_plan])


def test_q6_k_output_head_runs_against_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    shape = (Q6_K_SHAPE.vocab, Q6_K_SHAPE.dim)
    raw = random_q6_k(np.random.default_rng(2), *shape, 5e-5, 1.5e-4)  # weights near N(0, 0.1)
    q6 = tmp_path / "q6_k-head.gguf"
    _write(q6, TensorPlan(TensorNames.OUTPUT, shape, GGMLType.Q6_K, lambda: raw))
    # the head as the gguf package dequantizes it is what the numpy forward multiplies by (bit for bit);
    # the numpy forward rounds the head's input to int8 blocks, as the CPU's Q6_K product does
    head = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).astype(np.float32)
    assert head.shape == shape and np.isfinite(head).all() and 0.01 < head.std() < 1
    assert np.array_equal(codecs.dequantize(raw, GGMLType.Q6_K).view(np.uint32), head.view(np.uint32))

    tokens = [1, 17, 299, 5, 42, 42, 100, 3]
    llm = Llama(q6, n_ctx=Q6_K_SHAPE.ctx)
    assert llm.model.file.tensors[TensorNames.OUTPUT].ggml_type is GGMLType.Q6_K
    got = llm.model.forward(np.array(tokens), 0, llm.kv_cache, all_logits=True)
    want = numpy_llama_logits(q6, tokens)
    assert got.shape == want.shape == (len(tokens), Q6_K_SHAPE.vocab)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
