import numpy as np
import pytest

from pyggml.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    filtered_probs,
    greedy,
    min_p_filter,
    softmax,
    top_k_filter,
    top_k_indices,
    top_p_filter,
)

N_VOCAB = 32000


def random_logits(seed: int = 0, n: int = N_VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, n).astype(np.float32)


def kept(x: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


# ----------------------------------------------------------------------------------- greedy
def test_greedy_is_argmax():
    x = random_logits(1)
    assert greedy(x) == int(np.argmax(x))
    assert greedy(np.array([1.0, 5.0, 5.0, 2.0], np.float32)) == 1  # tie -> lowest id


def test_sampler_greedy_when_temperature_not_positive():
    x = random_logits(2)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.0))
    assert all(s.sample(x) == int(np.argmax(x)) for _ in range(5))


def test_temperature_to_zero_equals_greedy():
    for seed in range(10):
        x = random_logits(seed)
        s = Sampler(SamplingParams(temperature=1e-6, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=seed))
        assert s.sample(x) == greedy(x)


def test_apply_temperature_rejects_non_positive():
    with pytest.raises(ValueError):
        apply_temperature(np.zeros(3, np.float32), 0.0)


# ------------------------------------------------------------------------------------ top-k
@pytest.mark.parametrize("k", [1, 2, 40, 31999])
def test_top_k_keeps_exactly_k_largest(k):
    x = random_logits(3)
    out = top_k_filter(x, k)
    assert len(kept(out)) == k
    assert set(kept(out)) == set(np.argsort(-x)[:k].tolist())
    np.testing.assert_array_equal(out[kept(out)], x[kept(out)])


def test_top_k_ties_at_cut_go_to_lowest_ids():
    x = np.array([0.0, 3.0, 1.0, 1.0, 1.0, 2.0], np.float32)
    assert kept(top_k_filter(x, 3)) == [1, 2, 5]
    assert top_k_indices(x, 4).tolist() == [1, 5, 2, 3]


@pytest.mark.parametrize("k", [0, -1, 6, 100])
def test_top_k_disabled(k):
    x = np.arange(6, dtype=np.float32)
    assert kept(top_k_filter(x, k)) == list(range(6))


def test_top_k_does_not_modify_input():
    x = random_logits(4)
    before = x.copy()
    top_k_filter(x, 5)
    top_p_filter(x, 0.5)
    min_p_filter(x, 0.5)
    apply_repetition_penalty(x, [1, 2, 3], 1.3)
    np.testing.assert_array_equal(x, before)


# ------------------------------------------------------------------------------------ top-p
def test_top_p_known_distribution():
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 1 (.4) 3 (.3) 4 (.15) 0 (.1) 2 (.05)
    x = np.log(probs).astype(np.float32)
    assert kept(top_p_filter(x, 0.5)) == [1, 3]  # .4 < .5, .7 >= .5
    assert kept(top_p_filter(x, 0.69)) == [1, 3]
    assert kept(top_p_filter(x, 0.71)) == [1, 3, 4]
    assert kept(top_p_filter(x, 0.9)) == [0, 1, 3, 4]
    assert kept(top_p_filter(x, 0.99)) == [0, 1, 2, 3, 4]
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3, 4]


def test_top_p_always_keeps_one():
    x = np.array([10.0, 0.0, 0.0], np.float32)  # p_max ~ 0.99991
    assert kept(top_p_filter(x, 1e-9)) == [0]
    assert kept(top_p_filter(x, 0.5)) == [0]


# ------------------------------------------------------------------------------------ min-p
def test_min_p_drops_below_fraction_of_max():
    probs = np.array([0.5, 0.2, 0.05, 0.15, 0.1])
    x = np.log(probs).astype(np.float32)
    assert kept(min_p_filter(x, 0.29)) == [0, 1, 3]  # threshold .145: .15 stays, .1 and .05 go
    assert kept(min_p_filter(x, 0.31)) == [0, 1]
    assert kept(min_p_filter(x, 0.19)) == [0, 1, 3, 4]
    assert kept(min_p_filter(x, 1.0)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------- penalties
def test_repetition_penalty_positive_and_negative_logits():
    x = np.array([2.0, -2.0, 1.0, -1.0, 0.0], np.float32)
    out = apply_repetition_penalty(x, [0, 1, 0, 0, 4], 2.0)  # repeats count once
    np.testing.assert_array_equal(out, np.array([1.0, -4.0, 1.0, -1.0, 0.0], np.float32))
    np.testing.assert_array_equal(apply_repetition_penalty(x, [], 2.0), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1], 1.0), x)


def test_repetition_penalty_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="out of range"):
        apply_repetition_penalty(np.zeros(4, np.float32), [4], 1.1)


def test_sampler_penalises_only_last_n():
    # token 0 leads by a hair; penalising it makes 1 the greedy choice, unless 0 is outside the window
    x = np.array([1.05, 1.0, -5.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=2))
    assert s.sample(x, [0]) == 1
    assert s.sample(x, [0, 2, 2]) == 0
    assert Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=0)).sample(x, [0]) == 0
    assert Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=-1)).sample(x, [0, 2, 2]) == 1


# --------------------------------------------------------------------------------- sampler
def test_seeded_sampler_is_reproducible():
    x = random_logits(5)
    params = SamplingParams(temperature=1.0, seed=1234)
    history = [3, 17, 3, 99]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(x, history) for _ in range(200)]
    seq2 = [s2.sample(x, history) for _ in range(200)]
    assert seq1 == seq2
    assert len(set(seq1)) > 1  # it really samples
    s3 = Sampler(SamplingParams(temperature=1.0, seed=4321))
    assert [s3.sample(x, history) for _ in range(200)] != seq1


def test_samples_stay_in_filtered_set():
    x = random_logits(6)
    params = SamplingParams(temperature=1.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.0, seed=7)
    allowed = set(np.flatnonzero(filtered_probs(x, params) > 0).tolist())
    assert 1 < len(allowed) <= 40
    s = Sampler(params)
    assert {s.sample(x) for _ in range(500)} <= allowed


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=6, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=12),
        SamplingParams(temperature=1.3, top_k=8, top_p=0.8, min_p=0.05, repeat_penalty=1.0, seed=13),
    ],
)
def test_sample_frequencies_match_filtered_softmax(params):
    # a small vocab with a spread of probabilities; compare 20k draws with the full-vector reference
    # composition by Pearson's chi-square (df < 8; 40 is far beyond the 0.9999 quantile)
    x = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -0.5, -1.0, -1.3, -2.0, -3.0, -6.0], np.float32)
    expected = filtered_probs(x, params)
    assert 3 < np.count_nonzero(expected) <= params.top_k < x.size  # filters bite, a few tokens stay
    s = Sampler(params)
    n = 20000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=x.size)
    assert np.all(counts[expected == 0] == 0)
    live = expected > 0
    e = expected[live] * n
    chi2 = float(np.sum((counts[live] - e) ** 2 / e))
    assert chi2 < 40.0, (chi2, counts, e)


def test_filtered_probs_agrees_with_sampler_pipeline_order():
    # top-p/min-p are measured before temperature (llama.cpp order), so a high temperature does not
    # widen the candidate set: only the 2 tokens covering p=0.6 at T=1 survive
    x = np.log(np.array([0.5, 0.3, 0.1, 0.1])).astype(np.float32)
    params = SamplingParams(temperature=5.0, top_k=0, top_p=0.6, min_p=0.0, repeat_penalty=1.0, seed=0)
    assert np.flatnonzero(filtered_probs(x, params)).tolist() == [0, 1]
    s = Sampler(params)
    assert {s.sample(x) for _ in range(500)} == {0, 1}


def test_softmax_handles_masked_entries():
    p = softmax(np.array([0.0, -np.inf, 0.0], np.float32))
    np.testing.assert_allclose(p, [0.5, 0.0, 0.5])


def test_sampler_rejects_bad_logits():
    s = Sampler(SamplingParams(seed=0))
    with pytest.raises(ValueError, match="NaN"):
        s.sample(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="shape"):
        s.sample(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("kwargs", [{"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"repeat_penalty": 0.0},
                                    {"repeat_last_n": -2}])
def test_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
