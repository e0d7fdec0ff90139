"""Bootstrap intervals and ROG's robust-volume rate: scipy.stats.bootstrap as the peer oracle,
hand-computed cases, invariants and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from volattack.metrics.statistics import (
    bootstrap_ci,
    paired_bootstrap_diff,
    robust_volume_indicators,
    robust_volume_rate,
)


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    x = np.random.default_rng(3).beta(5, 2, size=20)
    mean, lo, hi = bootstrap_ci(x, n_boot=4000, seed=1)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(7)).confidence_interval
    width = ref.high - ref.low
    assert mean == pytest.approx(x.mean())
    # two independent Monte Carlo runs of 4000 resamples: endpoints agree within ~5% of the width
    assert lo == pytest.approx(ref.low, abs=0.08 * width) and hi == pytest.approx(ref.high, abs=0.08 * width)
    # and the interval is close to the normal one, mean +- 1.96 s / sqrt(n), for a mean of 20 values
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_ci_hand_computed_and_invariants():
    est = bootstrap_ci([0.5, 0.5, 0.5])  # no spread: every resample has the same mean
    assert tuple(est) == (0.5, 0.5, 0.5) and est.n == 3
    mean, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=2000, seed=0)  # resample means are 0, 0.5, 1
    assert mean == 0.5 and lo == 0.0 and hi == 1.0
    e1, e2 = bootstrap_ci([0.1, 0.4, 0.9, 0.7], seed=5), bootstrap_ci([0.1, 0.4, 0.9, 0.7], seed=5)
    assert tuple(e1) == tuple(e2)  # seeded
    assert e1.lo <= e1.value <= e1.hi
    wide = bootstrap_ci([0.1, 0.4, 0.9, 0.7], level=0.99, seed=5)
    assert wide.lo <= e1.lo and wide.hi >= e1.hi  # higher coverage, no narrower


def test_bootstrap_ci_skips_nan_and_says_why_there_is_no_interval():
    est = bootstrap_ci([0.2, float("nan"), 0.6, None])
    assert est.n == 2 and est.value == pytest.approx(0.4)
    one = bootstrap_ci([0.7, float("nan")])
    assert one.value == 0.7 and math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1 and "one case" in one.reason
    none = bootstrap_ci([float("nan")])
    assert math.isnan(none.value) and none.n == 0 and none.reason
    assert bootstrap_ci(torch.tensor([0.2, 0.4, 0.6])).n == 3  # tensors accepted
    inf = bootstrap_ci([30.0, float("inf")])  # e.g. PSNR of an unperturbed case
    assert inf.value == float("inf") and math.isnan(inf.lo) and "infinite" in inf.reason


def test_paired_bootstrap_removes_shared_case_variance():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.9, size=15)  # hard and easy cases, shared by both models
    a = base + 0.02 + rng.normal(0, 0.005, size=15)
    b = base
    paired = paired_bootstrap_diff(a, b, seed=0)
    assert paired.value == pytest.approx((a - b).mean())
    assert paired.excludes_zero() and paired.lo > 0  # a consistent +0.02 is detected when paired ...
    ia, ib = bootstrap_ci(a, seed=0), bootstrap_ci(b, seed=1)
    assert ia.lo < ib.hi  # ... though the two unpaired intervals overlap
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=2000, method="percentile",
                          random_state=np.random.default_rng(1)).confidence_interval
    w = ref.high - ref.low
    assert paired.lo == pytest.approx(ref.low, abs=0.1 * w) and paired.hi == pytest.approx(ref.high, abs=0.1 * w)


def test_paired_bootstrap_drops_nan_pairs_and_reports_no_difference():
    est = paired_bootstrap_diff([0.5, float("nan"), 0.7, 0.6], [0.5, 0.3, float("nan"), 0.61])
    assert est.n == 2 and est.value == pytest.approx(-0.005)
    same = paired_bootstrap_diff([0.1, 0.5, 0.9], [0.11, 0.49, 0.9], seed=2)
    assert same.lo <= 0 <= same.hi and not same.excludes_zero()


def test_robust_volume_rate_hand_computed():
    clean = [0.8, 0.8, 0.6, 0.0, float("nan"), 0.9]
    adv = [0.4, 0.39, 0.5, 0.0, 0.2, 0.1]
    ind = robust_volume_indicators(clean, adv, 0.5)
    np.testing.assert_array_equal(ind[[0, 1, 2, 5]], [1.0, 0.0, 1.0, 0.0])  # 0.4 >= 0.5 x 0.8 exactly
    assert math.isnan(ind[3]) and math.isnan(ind[4])  # clean 0 and NaN are not counted
    assert robust_volume_rate(clean, adv, 0.5) == pytest.approx(2 / 4)
    assert robust_volume_rate(clean, adv, 1.0) == pytest.approx(0.0)  # stricter t: fewer robust cases
    assert robust_volume_rate(clean, clean, 1.0) == pytest.approx(1.0)  # no attack: every case robust
    assert math.isnan(robust_volume_rate([0.0], [0.0]))


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_ci([0.1, 0.2], n_boot=0), r"n_boot must be a positive integer, got 0"),
    (lambda: bootstrap_ci([0.1, 0.2], level=1.0), r"level must be in \(0, 1\), got 1.0"),
    (lambda: bootstrap_ci([[0.1, 0.2]]), r"values must be a 1-D .* shape \(1, 2\)"),
    (lambda: paired_bootstrap_diff([0.1, 0.2], [0.1]), r"a and b must be paired .* lengths 2 and 1"),
    (lambda: robust_volume_rate([0.5], [0.5], t=0), r"t must be in \(0, 1\], got 0"),
    (lambda: robust_volume_rate([0.5, 0.4], [0.5], t=0.5), r"clean and adv must hold the same cases"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
