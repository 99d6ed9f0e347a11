"""Tests of the label-noise baselines (`hf_gradmimic.baselines`) against scikit-learn, torch and planted noise."""

from __future__ import annotations

import numpy as np
import torch

from hf_gradmimic.baselines import (
    area_under_margin,
    confident_learning,
    confident_learning_from_probs,
    cross_entropy_per_row,
    margins,
    reference_disagreement,
    small_loss_gmm,
)


def blobs(n=600, classes=3, noise=0.2, seed=0):
    """Separable Gaussian blobs with a ``noise`` fraction of labels moved to another class."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    features = rng.normal(0, 1, (n, 8)) + 4 * np.eye(classes, 8)[truth]
    flipped = rng.random(n) < noise
    given = np.where(flipped, (truth + rng.integers(1, classes, n)) % classes, truth)
    return features, given, flipped


def test_cross_entropy_per_row_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 30, (50, 7)), rng.integers(0, 7, 50)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels), reduction="none")
    np.testing.assert_allclose(cross_entropy_per_row(logits, labels), expected.numpy(), rtol=1e-10, atol=1e-10)


def test_confident_learning_finds_planted_flips():
    features, given, flipped = blobs()
    detection = confident_learning(features, given)
    precision = (detection.issues & flipped).sum() / detection.issues.sum()
    recall = (detection.issues & flipped).sum() / flipped.sum()
    assert precision > 0.9 and recall > 0.9
    # clean_score is the out-of-sample probability of the given label, so it ranks the flips last.
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(~flipped, detection.clean_score) > 0.97


def test_reference_disagreement_flags_where_the_argmax_differs():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    detection = reference_disagreement(logits, [0, 0, 1])
    assert detection.issues.tolist() == [False, True, True]
    np.testing.assert_allclose(detection.clean_score, -cross_entropy_per_row(logits, [0, 0, 1]))


def test_small_loss_gmm_cuts_between_two_modes_without_the_noise_rate():
    rng = np.random.default_rng(0)
    for noise in (0.2, 0.5):
        noisy = rng.random(2000) < noise
        losses = np.where(noisy, rng.normal(3.0, 0.5, 2000), np.abs(rng.normal(0.2, 0.15, 2000)))
        detection = small_loss_gmm(losses, transform="minmax")
        assert (detection.issues == noisy).mean() > 0.98
        assert abs(detection.issues.mean() - noise) < 0.02
        np.testing.assert_array_equal(detection.clean_score, -losses)


def test_margins_are_the_given_logit_minus_the_best_other():
    logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 2.5], [1.0, 0.5, 4.0]])
    np.testing.assert_allclose(margins(logits, [0, 2, 1]), [2.0 - 1.0, 2.5 - 3.0, 0.5 - 4.0])


def test_area_under_margin_averages_over_training_and_flags_the_low_mode():
    rng = np.random.default_rng(1)
    flipped = rng.random(800) < 0.3
    history = np.where(flipped[:, None], rng.normal(-2.0, 0.7, (800, 5)), rng.normal(3.0, 0.7, (800, 5)))
    detection = area_under_margin(history)
    np.testing.assert_allclose(detection.clean_score, history.mean(axis=1))
    assert (detection.issues == flipped).mean() > 0.98


def test_cleanlab_on_given_probabilities_is_find_label_issues_itself():
    from cleanlab.filter import find_label_issues

    features, given, flipped = blobs(seed=2)
    logits = 3.0 * features[:, :3]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    detection = confident_learning_from_probs(probs, given)
    np.testing.assert_array_equal(detection.issues, find_label_issues(given, probs))
    np.testing.assert_allclose(detection.clean_score, probs[np.arange(len(given)), given])


def test_small_loss_gmm_on_the_log_loss_is_sklearns_gmm_there():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(3)
    losses = np.exp(np.where(rng.random(1000) < 0.4, rng.normal(1.0, 0.4, 1000), rng.normal(-3.0, 1.0, 1000)))
    values = np.log(losses + 1e-6)[:, None]
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0).fit(values)
    low = int(np.argmin(gmm.means_.ravel()))
    np.testing.assert_array_equal(small_loss_gmm(losses).issues, gmm.predict_proba(values)[:, low] <= 0.5)
