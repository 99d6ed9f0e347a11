"""Label-noise detectors to compare Grad-Mimic's Stage-2 filter against: confident learning, reference
disagreement and the small-loss GMM.

Each returns a `Detection`: the samples flagged as mislabelled and a continuous clean score (higher
means more likely clean) for threshold-free metrics (AUROC / AP). They need no training loop of
their own, only arrays: features, logits or losses that the caller computed.

- `confident_learning`: Northcutt, Jiang, Chuang, "Confident Learning: Estimating Uncertainty in
  Dataset Labels", JAIR 2021, through cleanlab's ``find_label_issues`` with its documented recipe:
  out-of-sample predicted probabilities from K-fold cross-validation (here a logistic regression on
  frozen features). cleanlab is a dev / bench dependency (``pip install cleanlab``).
- `reference_disagreement`: flag a sample when a trusted reference classifier's argmax is not its label.
- `small_loss_gmm`: DivideMix (Li, Socher, Hoi, ICLR 2020): a 2-component GMM on the per-sample loss,
  min-max normalised, with DivideMix's settings (``max_iter=10, tol=1e-2, reg_covar=5e-4``); a sample is
  clean when the posterior of the low-mean component exceeds 0.5. The cut adapts to the data, unlike
  keeping the ``(1 - noise rate)`` smallest losses, which needs the true noise rate.

RHO-LOSS (Mindermann et al., ICML 2022) is a training method, not a detector here: it is the
``rho_loss`` scorer of `MimicTrainer` (`hf_gradmimic.scorers.rho_loss`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["Detection", "confident_learning", "per_sample_loss", "reference_disagreement", "small_loss_gmm"]


class Detection(NamedTuple):
    """``issues``: True for the samples flagged as mislabelled; ``clean_score``: higher = more likely clean."""

    issues: np.ndarray
    clean_score: np.ndarray


def per_sample_loss(logits: Any, labels: Any) -> np.ndarray:
    """Cross-entropy of each row of ``logits`` (``n x classes``) at its given label (a stable log-softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return log_norm - shifted[np.arange(labels.size), labels]


def confident_learning(
    features: Any,
    labels: Any,
    *,
    n_splits: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
    filter_by: str = "prune_by_noise_rate",
) -> Detection:
    """cleanlab's ``find_label_issues`` on out-of-sample ``pred_probs`` (Northcutt et al., JAIR 2021).

    The predicted probabilities come from ``n_splits``-fold stratified cross-validation of a
    scikit-learn ``LogisticRegression(C=C)`` on ``features`` (e.g. a frozen encoder's embeddings), as
    cleanlab documents: each sample is scored by a model that did not train on it. The clean score is
    the out-of-sample probability of the given label (cleanlab's ``self_confidence``).
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as error:  # a bench / dev dependency, not a runtime one
        raise ImportError("confident_learning needs cleanlab: `pip install cleanlab` (a dev extra: `make install` does it).") from error
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred_probs = cross_val_predict(
        LogisticRegression(C=C, max_iter=max_iter), features, labels, cv=folds, method="predict_proba"
    )
    issues = find_label_issues(labels, pred_probs, filter_by=filter_by)
    return Detection(np.asarray(issues, dtype=bool), pred_probs[np.arange(labels.size), labels])


def reference_disagreement(reference_logits: Any, labels: Any) -> Detection:
    """Flag the samples whose label the reference does not predict (its argmax); the clean score is the
    reference's log-probability of the given label."""
    logits = np.asarray(reference_logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return Detection(logits.argmax(axis=1) != labels, -per_sample_loss(logits, labels))


def small_loss_gmm(losses: Any, *, seed: int = 0) -> Detection:
    """DivideMix's clean/noisy split (Li et al., ICLR 2020): a 2-component GMM on the normalised losses.

    ``issues`` where the posterior of the lower-mean component is at most 0.5; ``clean_score`` is ``-loss``
    (the ranking the GMM cuts; the posterior itself can tie or turn in the far tails).
    """
    from sklearn.mixture import GaussianMixture

    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    span = losses.max() - losses.min()
    normalised = (losses - losses.min()) / (span if span > 0 else 1.0)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(normalised[:, None])
    clean_component = int(np.argmin(gmm.means_.ravel()))
    clean_prob = gmm.predict_proba(normalised[:, None])[:, clean_component]
    return Detection(clean_prob <= 0.5, -losses)
