"""Issue 25 item 4: TAR only at FARs the impostor count resolves, and confidence intervals on accuracy and TAR."""

import time
from statistics import NormalDist

import numpy as np
import pytest

from edgekd.eval.metrics import (
    MIN_FALSE_ACCEPTS,
    _false_accepts,
    accuracy_ci,
    resolvable_fars,
    tar_at_far,
    tar_at_far_ci,
)


def test_far_rule_literal_cases():
    assert MIN_FALSE_ACCEPTS == 5
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    kept, dropped = resolvable_fars(150, fars)
    assert 1e-3 not in kept and kept == [1e-1] and dropped == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    kept, dropped = resolvable_fars(6000, fars)
    assert 1e-3 in kept and 1e-4 not in kept and kept == [1e-3, 1e-2, 1e-1]
    assert resolvable_fars(500, (1e-2,))[0] == [1e-2]  # exactly 5 false accepts: resolvable (float-safe)
    assert resolvable_fars(499, (1e-2,))[0] == []
    assert resolvable_fars(0, fars) == ([], list(fars))


def _scores(rng, n_gen, n_imp, mu=2.0):
    s = np.r_[rng.normal(mu, 1.0, n_gen), rng.normal(0.0, 1.0, n_imp)]
    y = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    return s, y


def test_bootstrap_interval_contains_point_estimate_and_shrinks():
    rng = np.random.default_rng(1)
    widths = []
    for n in (600, 6000, 60000):
        s, y = _scores(rng, n // 2, n // 2)
        point = tar_at_far(s, y, (1e-2, 1e-1))
        ci = tar_at_far_ci(s, y, (1e-2, 1e-1))
        for far in (1e-2, 1e-1):
            lo, hi = ci[far]
            assert lo <= point[far] <= hi
        widths.append(ci[1e-1][1] - ci[1e-1][0])
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.3)  # width ~ 1/sqrt(n)


def test_bootstrap_deterministic_with_seed():
    s, y = _scores(np.random.default_rng(2), 1000, 1000)
    # exact: the same draws and arithmetic on the same inputs, twice in one process
    assert tar_at_far_ci(s, y, (1e-2,), seed=3) == tar_at_far_ci(s, y, (1e-2,), seed=3)
    assert tar_at_far_ci(s, y, (1e-2,), seed=3) != tar_at_far_ci(s, y, (1e-2,), seed=4)


def test_bootstrap_identity_resample_is_the_point_estimate():
    """The bootstrap statistic, on the sample itself, reproduces tar_at_far (same ROC-point rule), ties included."""
    rng = np.random.default_rng(5)
    s = np.round(np.r_[rng.normal(1.5, 1, 400), rng.normal(0, 1, 700)], 1)  # many ties
    y = np.r_[np.ones(400, bool), np.zeros(700, bool)]
    fars = (1e-2, 3e-2, 1e-1, 0.5)
    point = tar_at_far(s, y, fars)
    imp_desc = np.sort(s[~y])[::-1]
    for far, k in zip(fars, _false_accepts(s, y, fars), strict=True):
        assert np.mean(s[y] > imp_desc[k]) == pytest.approx(point[far])  # the same count over 400 on both sides


def test_bootstrap_matches_materialized_resampling():
    """The Beta/Binomial shortcut against resampling the pairs for real: genuine and impostor scores drawn with
    replacement, TAR = genuine fraction above the (k+1)-th highest resampled impostor, k the sample's false accepts.

    (Re-running tar_at_far on each resample is not the same statistic: duplicated impostors make the FPR jump in
    steps and the nearest-point rule drifts to more false accepts, raising the interval by about 0.015 here.)
    Tolerance: with 4,000 resamples on each side the 2.5 % and 97.5 % quantiles of a TAR with sd ≈ 0.06 carry a
    Monte-Carlo error of ≈ 0.004 each; 0.02 is four combined standard errors plus one step of 1/300."""
    rng = np.random.default_rng(8)
    s, y = _scores(rng, 300, 500)
    gen, imp = s[y], s[~y]
    far, n_boot = 2e-2, 4000
    (k,) = _false_accepts(s, y, (far,))
    assert k == 10
    tars = [np.mean(rng.choice(gen, len(gen)) > np.sort(rng.choice(imp, len(imp)))[::-1][k]) for _ in range(n_boot)]
    want = np.quantile(tars, [0.025, 0.975])
    got = tar_at_far_ci(s, y, (far,), n_boot=n_boot)[far]
    assert got == pytest.approx(tuple(want), abs=0.02)


@pytest.mark.parametrize("n_gen,n_imp", [(3000, 300000), (3000, 3000)])
def test_bootstrap_matches_delta_method(n_gen, n_imp):
    """Against the normal approximation: genuine ~ N(mu, 1), impostor ~ N(0, 1), threshold t = Φ⁻¹(1 − FAR);
    Var(TAR̂) = TAR(1−TAR)/n_gen (binomial, fixed threshold) + φ(t−mu)²·FAR(1−FAR)/(n_imp·φ(t)²) (the threshold is an
    impostor quantile). With 1,000 resamples the 95 % percentile half-width has a Monte-Carlo error of a few per
    cent, and the sample's own tar differs from the population's; 15 % covers both."""
    nd, mu, far = NormalDist(), 2.0, 1e-2
    s, y = _scores(np.random.default_rng(6), n_gen, n_imp, mu)
    t = nd.inv_cdf(1 - far)
    tar = 1 - nd.cdf(t - mu)
    var = tar * (1 - tar) / n_gen + nd.pdf(t - mu) ** 2 * far * (1 - far) / (n_imp * nd.pdf(t) ** 2)
    lo, hi = tar_at_far_ci(s, y, (far,), n_boot=1000)[far]
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(var), rel=0.15)


def test_bootstrap_is_fast():
    s, y = _scores(np.random.default_rng(7), 3000, 3000)
    start = time.perf_counter()
    tar_at_far_ci(s, y, (1e-3, 1e-2, 1e-1))
    assert time.perf_counter() - start < 1.0


def test_accuracy_ci_from_fold_spread():
    folds = [0.9, 0.92, 0.88, 0.91, 0.89, 0.9, 0.93, 0.87, 0.9, 0.9]
    lo, hi = accuracy_ci(folds)
    m, s = np.mean(folds), np.std(folds, ddof=1)
    half = 2.2621571627409915 * s / np.sqrt(10)  # Student t, 9 degrees of freedom, 97.5 %
    # float64 means and deviations of 10 numbers ~0.9, another order of the same sums: ~1e-16, default rel 1e-6
    assert (lo, hi) == pytest.approx((m - half, m + half))
    assert accuracy_ci([1.0] * 10) == pytest.approx((1.0, 1.0))
