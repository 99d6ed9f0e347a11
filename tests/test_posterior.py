"""The keep posterior (`hf_gradmimic.filter.posterior`) against scikit-learn's GaussianMixture and the exact
Bayes posterior of a known vote model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from hf_gradmimic.filter.posterior import keep_posterior


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


def test_signals_alone_give_scikit_learns_full_covariance_gmm_posterior():
    signals, _ = two_groups()
    fit = keep_posterior(signals, None, seed=0)
    gmm = GaussianMixture(
        n_components=2, covariance_type="full", tol=1e-10, max_iter=1000, reg_covar=1e-9, random_state=0
    ).fit(signals)
    high = int(np.argmax(gmm.means_[:, 0]))
    expected = gmm.predict_proba(signals)[:, high]
    np.testing.assert_allclose(fit.keep_prob, expected, atol=2e-3)
    np.testing.assert_allclose(fit.means[0], gmm.means_[high], atol=1e-3)
    assert fit.converged


def test_a_missing_signal_is_marginalised():
    """A sample without its second signal gets the posterior of the fitted model's 1-D marginal (Bayes rule with
    the fitted parameters, written out here)."""
    signals, _ = two_groups(seed=1)
    signals[::7, 1] = np.nan
    fit = keep_posterior(signals, None, seed=0)
    rows = np.arange(0, len(signals), 7)
    x = signals[rows, 0]
    density = [
        np.exp(-0.5 * (x - fit.means[c, 0]) ** 2 / fit.covariances[c, 0, 0]) / np.sqrt(fit.covariances[c, 0, 0])
        for c in range(2)
    ]
    prior = np.array([fit.keep_fraction, 1 - fit.keep_fraction])
    expected = prior[0] * density[0] / (prior[0] * density[0] + prior[1] * density[1])
    np.testing.assert_allclose(fit.keep_prob[rows], expected, rtol=1e-9, atol=1e-12)
    log_odds = np.log(prior[0] / prior[1]) + np.log(density[0]) - np.log(density[1])
    np.testing.assert_allclose(fit.keep_log_odds[rows], log_odds, rtol=1e-9, atol=1e-9)


def test_the_log_odds_rank_where_keep_prob_rounds_to_one():
    """Far inside the keep group P(keep) is 1.0 in float64; the log-odds, the fitted model's Bayes rule written out
    here, still order those samples."""
    signals, _ = two_groups(seed=3)
    far = np.array([[6.0, 6.0], [7.0, 7.0], [8.0, 8.0]])
    fit = keep_posterior(np.vstack([signals, far]), None, seed=0)
    assert (fit.keep_prob[-3:] == 1.0).all()

    def log_density(x, c):
        mean, cov = fit.means[c], fit.covariances[c]
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


def test_a_sample_without_evidence_is_refused_by_row():
    signals = np.array([[0.0], [np.nan], [1.0], [2.0]])
    with pytest.raises(ValueError, match=r"first rows: \[1\]"):
        keep_posterior(signals, np.full((4, 1), -1, dtype=np.int8))


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
