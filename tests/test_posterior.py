"""The keep posterior (`hf_gradmimic.filter.posterior`) against scikit-learn's GaussianMixture (Gaussian classes),
SciPy's multivariate t density and an EM step written out here (t classes, the default), and the exact Bayes
posterior of a known model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_t
from scipy.stats import t as student_t
from sklearn.mixture import GaussianMixture

from hf_gradmimic.filter.posterior import DEFAULT_DEGREES_OF_FREEDOM, keep_posterior


def two_groups(n=3000, keep_fraction=0.6, seed=0):
    """Correlated 2-D signals: keep samples around (1, 1), discard ones around (-1.5, -1)."""
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < keep_fraction
    cov_keep = np.array([[0.3, 0.15], [0.15, 0.4]])
    cov_discard = np.array([[0.6, -0.1], [-0.1, 0.5]])
    signals = np.where(
        keep[:, None],
        rng.multivariate_normal([1.0, 1.0], cov_keep, n),
        rng.multivariate_normal([-1.5, -1.0], cov_discard, n),
    )
    return signals, keep


def heavy_tailed_groups(n, seed, df=3.0):
    """Keep samples around (2, 2) and discard ones around (-1, -1.5), each class a t with ``df`` degrees of freedom
    (the heavy tails of margins in logits), and the exact Bayes log-odds of the model they are drawn from."""
    rng = np.random.default_rng(seed)
    classes = (
        ([2.0, 2.0], np.array([[0.5, 0.2], [0.2, 0.6]])),
        ([-1.0, -1.5], np.array([[0.4, -0.1], [-0.1, 0.5]])),
    )
    keep = rng.random(n) < 0.6
    draws = [multivariate_t(mean, scale, df=df, seed=rng).rvs(n) for mean, scale in classes]
    signals = np.where(keep[:, None], draws[0], draws[1])
    bayes = np.log(0.6 / 0.4) + np.subtract(*[multivariate_t(m, c, df=df).logpdf(signals) for m, c in classes])
    return signals, keep, bayes


def t_log_density(fit, signals, c):
    return multivariate_t(fit.means[c], fit.scales[c], df=fit.degrees_of_freedom).logpdf(signals)


def overlapping_groups(n=3000, seed=0):
    """One signal, two close classes (keep 30% around 1.3, discard around 0.7 with a wider spread): EM's likelihood
    is flat there, and it converges slowly."""
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < 0.3
    return np.where(keep, rng.normal(1.3, 0.25, n), rng.normal(0.7, 0.4, n))[:, None], keep


@pytest.mark.parametrize("groups", [two_groups, overlapping_groups])
def test_gaussian_classes_give_scikit_learns_full_covariance_gmm_posterior(groups):
    """Also where EM converges slowly: stopped at 300 iterations, 156 of the overlapping groups' 3,000 keep
    decisions differed from scikit-learn's."""
    signals, _ = groups()
    fit = keep_posterior(signals, None, seed=0, degrees_of_freedom=math.inf)
    gmm = GaussianMixture(
        n_components=2, covariance_type="full", tol=1e-12, max_iter=100_000, reg_covar=1e-9, random_state=0
    ).fit(signals)
    high = int(np.argmax(gmm.means_[:, 0]))
    expected = gmm.predict_proba(signals)[:, high]
    np.testing.assert_allclose(fit.keep_prob, expected, atol=2e-3)
    np.testing.assert_allclose(fit.means[0], gmm.means_[high], atol=1e-3)
    assert fit.converged


def test_t_classes_are_the_bayes_rule_of_their_fitted_t_densities():
    """``keep_log_odds`` is the log prior ratio plus SciPy's multivariate t log-densities at the fitted parameters."""
    signals, _, _ = heavy_tailed_groups(2000, seed=1)
    fit = keep_posterior(signals, None, seed=0)
    assert fit.degrees_of_freedom == DEFAULT_DEGREES_OF_FREEDOM
    expected = (
        np.log(fit.keep_fraction / (1 - fit.keep_fraction))
        + t_log_density(fit, signals, 0)
        - t_log_density(fit, signals, 1)
    )
    np.testing.assert_allclose(fit.keep_log_odds, expected, rtol=1e-9, atol=1e-9)
    # the summary's standard deviations are the fitted t's (SciPy's variance of each signal's 1-D marginal)
    spread = np.sqrt(np.diagonal(fit.scales, axis1=1, axis2=2))
    np.testing.assert_allclose(
        fit.summary()["signal_std"], np.sqrt(student_t.var(fit.degrees_of_freedom, scale=spread)), rtol=1e-12
    )


def test_t_classes_are_a_fixed_point_of_the_t_mixtures_em():
    """At convergence one more EM step of the t mixture (Peel and McLachlan 2000; the responsibilities from SciPy's
    density, each sample's weight ``(nu + p) / (nu + distance)``, written out here) leaves the parameters where
    they are."""
    signals, _, _ = heavy_tailed_groups(2000, seed=2)
    fit = keep_posterior(signals, None, seed=0)
    assert fit.converged
    nu, p = fit.degrees_of_freedom, signals.shape[1]
    prior = np.array([fit.keep_fraction, 1 - fit.keep_fraction])
    log_joint = np.stack([np.log(prior[c]) + t_log_density(fit, signals, c) for c in range(2)], axis=1)
    responsibility = np.exp(log_joint - np.logaddexp(log_joint[:, :1], log_joint[:, 1:]))
    np.testing.assert_allclose(responsibility.mean(axis=0), prior, atol=1e-4)
    for c in range(2):
        centred = signals - fit.means[c]
        distance = np.einsum("ni,ij,nj->n", centred, np.linalg.inv(fit.scales[c]), centred)
        weight = responsibility[:, c] * (nu + p) / (nu + distance)
        mean = weight @ signals / weight.sum()
        scale = (signals - mean).T @ ((signals - mean) * weight[:, None]) / responsibility[:, c].sum()
        np.testing.assert_allclose(fit.means[c], mean, atol=1e-4)
        np.testing.assert_allclose(fit.scales[c], scale, atol=1e-4)


def test_t_classes_reach_the_bayes_error_on_small_heavy_tailed_pools_where_gaussians_do_not():
    """Pools of 300 drawn from two t classes (3 degrees of freedom): over 20 pools the default's error is within half
    a point of the exact Bayes rule's; Gaussian classes, pulled by the tails, are more than a point above it."""
    errors = []
    for seed in range(20):
        signals, keep, bayes = heavy_tailed_groups(300, seed=seed)
        errors.append(
            [
                ((bayes >= 0) != keep).mean(),
                ((keep_posterior(signals, None, seed=0).keep_prob >= 0.5) != keep).mean(),
                ((keep_posterior(signals, None, seed=0, degrees_of_freedom=math.inf).keep_prob >= 0.5) != keep).mean(),
            ]
        )
    bayes_error, t_error, gaussian_error = np.mean(errors, axis=0)
    assert t_error - bayes_error < 0.005
    assert gaussian_error - bayes_error > 0.01


def test_a_missing_signal_is_marginalised():
    """A sample without its second signal gets the posterior of the fitted model's 1-D marginal: a t with the same
    degrees of freedom and the first signal's scale (SciPy's density, Bayes rule written out here)."""
    signals, _ = two_groups(seed=1)
    signals[::7, 1] = np.nan
    fit = keep_posterior(signals, None, seed=0)
    rows = np.arange(0, len(signals), 7)
    x = signals[rows, 0]
    density = [
        student_t.pdf(x, df=fit.degrees_of_freedom, loc=fit.means[c, 0], scale=np.sqrt(fit.scales[c, 0, 0]))
        for c in range(2)
    ]
    prior = np.array([fit.keep_fraction, 1 - fit.keep_fraction])
    expected = prior[0] * density[0] / (prior[0] * density[0] + prior[1] * density[1])
    np.testing.assert_allclose(fit.keep_prob[rows], expected, rtol=1e-9, atol=1e-12)
    log_odds = np.log(prior[0] / prior[1]) + np.log(density[0]) - np.log(density[1])
    np.testing.assert_allclose(fit.keep_log_odds[rows], log_odds, rtol=1e-9, atol=1e-9)


def test_every_pattern_of_missing_signals_gets_its_marginal_t():
    """Three signals, each missing at random: every row's log-odds is Bayes rule with SciPy's t density of the
    signals it has (the fitted locations and the observed block of the fitted scales), whatever its pattern."""
    signals, _, _ = heavy_tailed_groups(3000, seed=4)
    signals = np.column_stack([signals, signals.sum(axis=1) + np.random.default_rng(5).normal(0, 1, 3000)])
    signals[np.random.default_rng(6).random(signals.shape) < 0.3] = np.nan
    signals = signals[np.isfinite(signals).any(axis=1)]
    fit = keep_posterior(signals, None, seed=0)
    expected = np.full(len(signals), np.log(fit.keep_fraction / (1 - fit.keep_fraction)))
    for row, values in enumerate(signals):
        seen = np.isfinite(values)
        for c, sign in ((0, 1), (1, -1)):
            block = fit.scales[c][np.ix_(seen, seen)]
            density = multivariate_t(fit.means[c, seen], block, df=fit.degrees_of_freedom)
            expected[row] += sign * density.logpdf(values[seen])
    assert len({tuple(np.isfinite(v)) for v in signals}) == 7
    np.testing.assert_allclose(fit.keep_log_odds, expected, rtol=1e-9, atol=1e-9)


def test_signals_that_no_sample_has_together_are_fit_from_the_samples_that_have_each():
    """Three Gaussian signals, the second on even rows only and the third on odd rows only, so no sample has all
    three (a log resumed on a newer version): the fitted means are the generating ones, and the samples are told
    apart as well as Bayes rule does with the true parameters on the signals each has (SciPy's densities). Fit on
    the complete rows alone (there are none), the classes collapsed and every sample was kept."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(3)
    n, keep_fraction = 4000, 0.7
    true_means = np.array([[1.0, 1.0, 0.5], [-1.5, -1.0, -1.0]])
    true_covariances = np.array(
        [[[0.5, 0.2, 0.1], [0.2, 0.6, 0.1], [0.1, 0.1, 0.5]], [[0.7, -0.1, 0.1], [-0.1, 0.6, 0.0], [0.1, 0.0, 0.8]]]
    )
    keep = rng.random(n) < keep_fraction
    signals = np.where(
        keep[:, None],
        rng.multivariate_normal(true_means[0], true_covariances[0], n),
        rng.multivariate_normal(true_means[1], true_covariances[1], n),
    )
    signals[1::2, 1] = np.nan
    signals[0::2, 2] = np.nan
    fit = keep_posterior(signals, None, seed=0, degrees_of_freedom=math.inf)
    np.testing.assert_allclose(fit.means, true_means, atol=0.1)
    bayes = np.empty(n, dtype=bool)
    for rows, seen in ((slice(0, None, 2), [0, 1]), (slice(1, None, 2), [0, 2])):
        log_density = [
            multivariate_normal(true_means[c, seen], true_covariances[c][np.ix_(seen, seen)]).logpdf(
                signals[rows][:, seen]
            )
            for c in range(2)
        ]
        bayes[rows] = np.log(keep_fraction / (1 - keep_fraction)) + log_density[0] - log_density[1] > 0
    accuracy, bayes_accuracy = ((fit.keep_prob >= 0.5) == keep).mean(), (bayes == keep).mean()
    assert bayes_accuracy > 0.95 and accuracy >= bayes_accuracy - 0.005


def test_the_log_odds_rank_where_keep_prob_rounds_to_one():
    """Far inside the keep group P(keep) is 1.0 in float64; the log-odds, the fitted model's Bayes rule written out
    here, still order those samples."""
    signals, _ = two_groups(seed=3)
    far = np.array([[6.0, 6.0], [7.0, 7.0], [8.0, 8.0]])
    fit = keep_posterior(np.vstack([signals, far]), None, seed=0, degrees_of_freedom=math.inf)
    assert (fit.keep_prob[-3:] == 1.0).all()

    def log_density(x, c):
        mean, cov = fit.means[c], fit.scales[c]
        z = np.linalg.solve(cov, (x - mean).T).T
        return -0.5 * ((x - mean) * z).sum(axis=1) - 0.5 * np.log(np.linalg.det(cov))

    prior = np.log(fit.keep_fraction) - np.log(1 - fit.keep_fraction)
    expected = prior + log_density(far, 0) - log_density(far, 1)
    np.testing.assert_allclose(fit.keep_log_odds[-3:], expected, rtol=1e-9)
    assert len(np.unique(fit.keep_log_odds[-3:])) == 3


def test_votes_alone_recover_the_sources_and_the_bayes_posterior():
    """Five sources of known keep rates per class, abstaining at random: EM recovers the rates, and keep_prob is
    close to the exact posterior under the true model."""
    rng = np.random.default_rng(2)
    n, prior = 20000, 0.7
    keep = rng.random(n) < prior
    rates = np.array([[0.9, 0.2], [0.85, 0.1], [0.8, 0.3], [0.95, 0.4], [0.7, 0.15]])
    votes = (rng.random((n, 5)) < np.where(keep[:, None], rates[:, 0], rates[:, 1])).astype(np.int8)
    votes[rng.random((n, 5)) < 0.2] = -1
    votes[votes.max(axis=1) < 0, 0] = 1
    fit = keep_posterior(None, votes, seed=0)
    np.testing.assert_allclose(fit.vote_keep_rates[:-1], rates[:-1], atol=0.03)
    log_odds = np.full(n, np.log(prior / (1 - prior)))
    for j in range(5):
        voted = votes[:, j] >= 0
        k = votes[:, j] == 1
        log_odds += np.where(voted & k, np.log(rates[j, 0] / rates[j, 1]), 0.0)
        log_odds += np.where(voted & ~k, np.log((1 - rates[j, 0]) / (1 - rates[j, 1])), 0.0)
    exact = 1 / (1 + np.exp(-log_odds))
    assert np.abs(fit.keep_prob - exact).mean() < 0.02
    assert ((fit.keep_prob >= 0.5) == (exact >= 0.5)).mean() > 0.98


def test_signals_and_votes_together_beat_either_alone():
    signals, keep = two_groups(n=4000, seed=3)
    signals = signals + np.random.default_rng(4).normal(0, 1.0, signals.shape)  # weaker signals
    rng = np.random.default_rng(5)
    votes = (rng.random((4000, 3)) < np.where(keep[:, None], 0.85, 0.2)).astype(np.int8)
    error = {
        name: ((keep_posterior(s, v, seed=0).keep_prob >= 0.5) != keep).mean()
        for name, s, v in (("signals", signals, None), ("votes", None, votes), ("both", signals, votes))
    }
    assert error["both"] < min(error["signals"], error["votes"])


@pytest.mark.parametrize("degrees_of_freedom", [DEFAULT_DEGREES_OF_FREEDOM, math.inf])
def test_evidence_that_does_not_separate_the_samples_keeps_them(degrees_of_freedom):
    """A constant signal, or votes that are all the same, cannot tell two classes apart: every sample is kept
    (rounding in EM used to decide which of two identical classes was called keep)."""
    for signals, votes in ((np.full((100, 2), 3.0), None), (None, np.ones((100, 3), dtype=np.int8))):
        fit = keep_posterior(signals, votes, seed=0, degrees_of_freedom=degrees_of_freedom)
        assert (fit.keep_prob >= 0.5).all()


@pytest.mark.parametrize("degrees_of_freedom", [0.0, -1.0, math.nan])
def test_degrees_of_freedom_that_are_not_positive_are_refused(degrees_of_freedom):
    with pytest.raises(ValueError, match="degrees_of_freedom must be positive"):
        keep_posterior(np.array([[0.0], [1.0]]), None, degrees_of_freedom=degrees_of_freedom)


def test_a_sample_without_evidence_is_refused_by_row():
    signals = np.array([[0.0], [np.nan], [1.0], [2.0]])
    with pytest.raises(ValueError, match=r"first rows: \[1\]"):
        keep_posterior(signals, np.full((4, 1), -1, dtype=np.int8))


def test_a_single_sample_is_refused_in_our_words():
    with pytest.raises(
        ValueError, match="needs at least 2 samples with a signal or a vote; 1 of the log's samples has one"
    ):
        keep_posterior(np.array([[0.5, 1.0]]), None)


def test_large_inputs_fit_on_a_subset_and_score_every_row():
    signals, keep = two_groups(n=5000, seed=6)
    whole = keep_posterior(signals, None, seed=0)
    subset = keep_posterior(signals, None, seed=0, fit_rows=2000)
    assert subset.keep_prob.shape == (5000,)
    assert ((subset.keep_prob >= 0.5) == (whole.keep_prob >= 0.5)).mean() > 0.99


def test_float32_signals_give_the_posterior_of_their_float64_values():
    """Labeling-function values are kept in float32 (`hf_gradmimic.filter.signals.VALUE_DTYPE`); the posterior widens
    them chunk by chunk, so it equals, bit for bit, the posterior of the same values given as float64."""
    signals, _ = two_groups(n=2000, seed=12)
    narrow = signals.astype(np.float32)
    narrow[::11, 1] = np.nan
    from_narrow = keep_posterior(narrow, None, seed=0)
    from_wide = keep_posterior(narrow.astype(np.float64), None, seed=0)
    np.testing.assert_array_equal(from_narrow.keep_log_odds, from_wide.keep_log_odds)
    np.testing.assert_array_equal(from_narrow.means, from_wide.means)
