"""Bootstrap intervals: coverage of known answers, pairing, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from saap.errors import DataError
from saap.evaluation.intervals import (
    mean_interval,
    paired_difference,
    paired_ratio,
    paired_speedup,
    perplexity_ratio,
)

pytestmark = pytest.mark.unit


def test_identical_models_have_a_degenerate_interval():
    rng = np.random.default_rng(0)
    docs = {t: rng.integers(0, 2, 200).astype(float) for t in ("a", "b")}
    ratio = paired_ratio(docs, docs)
    assert ratio.value == ratio.lower == ratio.upper == pytest.approx(1.0)
    diff = paired_difference(docs, docs)
    assert diff.value == diff.lower == diff.upper == 0.0


def test_pairing_narrows_the_interval_of_correlated_models():
    # the candidate agrees with the reference on all but 5% of documents:
    # paired, the difference is known to about +-0.03; unpaired it would be
    # about +-0.06 (two independent +-0.044 binomial intervals at n=500)
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 2, 500).astype(float)
    flip = rng.random(500) < 0.05
    candidate = np.where(flip, 1 - reference, reference)
    diff = paired_difference({"t": candidate}, {"t": reference})
    assert diff.lower <= diff.value <= diff.upper
    assert diff.half_width < 0.03


def test_interval_covers_the_truth_at_its_level_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    covered = [
        mean_interval(rng.normal(1.0, 1.0, 100), resamples=400, seed=trial)
        for trial in range(200)
    ]
    coverage = np.mean([i.lower < 1.0 < i.upper for i in covered])
    # a 95% percentile bootstrap at n=100 covers 93-95%; 200 trials add +-3%
    assert 0.88 <= coverage <= 0.99
    small = mean_interval(rng.normal(1.0, 1.0, 100))
    large = mean_interval(rng.normal(1.0, 1.0, 2500))
    # half-width ~ 1.96 / sqrt(n): 0.196 and 0.039
    assert small.half_width == pytest.approx(0.196, rel=0.2)
    assert large.half_width == pytest.approx(0.039, rel=0.2)


def test_seeded_resampling_is_deterministic():
    docs = {"t": np.arange(50) % 2}
    assert paired_ratio(docs, docs, seed=3) == paired_ratio(docs, docs, seed=3)
    values = np.linspace(0, 1, 40)
    assert mean_interval(values, seed=1) == mean_interval(values, seed=1)
    assert mean_interval(values, seed=1) != mean_interval(values, seed=2)


def test_perplexity_ratio_is_exp_of_mean_nll_difference():
    reference = np.full(10, 3.0)
    candidate = reference + 0.5  # every window 0.5 nats worse
    ratio = perplexity_ratio(candidate, reference)
    assert ratio.value == ratio.lower == ratio.upper == pytest.approx(np.exp(0.5))


def test_paired_speedup_contains_one_for_the_same_timings():
    rng = np.random.default_rng(4)
    timings = rng.normal(20.0, 1.0, 12)
    noisy = timings * rng.normal(1.0, 0.02, 12)
    speedup = paired_speedup(noisy, timings)
    assert speedup.lower < 1.0 < speedup.upper


def test_paired_speedup_resists_an_interrupted_round():
    rng = np.random.default_rng(5)
    reference = rng.normal(130.0, 3.0, 12)
    candidate = reference * 1.2 * rng.normal(1.0, 0.02, 12)
    clean = paired_speedup(candidate, reference)
    assert clean.lower < 1.2 < clean.upper
    hit = candidate.copy()
    hit[[3, 8]] *= 0.4  # two runs interrupted by another process
    disturbed = paired_speedup(hit, reference)
    assert disturbed.value == pytest.approx(clean.value, abs=0.03)
    assert disturbed.lower > 1.1
    # the mean of the log-ratios would have fallen to about 1.03
    assert np.exp(np.log(hit / reference).mean()) < 1.05
    # a whole-sample shift still moves it: it is a location, not a constant
    assert paired_speedup(candidate * 0.8, reference).value == pytest.approx(
        0.8 * clean.value, rel=1e-9
    )


def test_mismatched_documents_are_refused():
    with pytest.raises(DataError, match="same documents of t"):
        paired_ratio({"t": np.ones(5)}, {"t": np.ones(6)})
    with pytest.raises(DataError, match="same tasks"):
        paired_ratio({"t": np.ones(5)}, {"u": np.ones(5)})
    with pytest.raises(DataError, match="same windows"):
        perplexity_ratio(np.ones(3), np.ones(4))
    with pytest.raises(DataError, match="at least 2 paired repeats"):
        paired_speedup(np.ones(1), np.ones(1))
