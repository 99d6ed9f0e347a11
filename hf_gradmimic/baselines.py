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
- `confident_learning_from_probs`: the same ``find_label_issues`` on probabilities the caller has, e.g. the
  Grad-Mimic reference's (no cross-validation: the reference never trained on the pool).
- `small_loss_gmm`: DivideMix (Li, Socher, Hoi, ICLR 2020): a 2-component GMM on the per-sample loss, with
  DivideMix's settings (``max_iter=10, tol=1e-2, reg_covar=5e-4``); a sample is clean when the posterior of
  the low-mean component exceeds 0.5. The cut adapts to the data, unlike keeping the ``(1 - noise rate)``
  smallest losses, which needs the true noise rate. By default on the log-loss (``transform="log"``), its
  strongest form here: a cross-entropy's clean mode is squeezed against 0 and its noisy tail is long, which a
  Gaussian fits badly; ``transform="minmax"`` is DivideMix's own normalisation.
- `area_under_margin`: Pleiss, Zhang, Elenberg, Weinberger, "Identifying Mislabeled Data using the Area Under
  the Margin Ranking", NeurIPS 2020: each sample's margin (its given label's logit minus the largest other
  logit) averaged over training; low AUM flags a sample, here cut by a 2-component GMM (the paper's cut needs
  extra "threshold samples" trained with a fake class, which a caller's finished run does not have).

RHO-LOSS (Mindermann et al., ICML 2022) is a training method, not a detector here: it is the
``rho_loss`` scorer of `MimicTrainer` (`hf_gradmimic.scorers.rho_loss`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Detection",
    "area_under_margin",
    "confident_learning",
    "confident_learning_from_probs",
    "cross_entropy_per_row",
    "margins",
    "reference_disagreement",
    "small_loss_gmm",
]


class Detection(NamedTuple):
    """``issues``: True for the samples flagged as mislabelled; ``clean_score``: higher = more likely clean."""

    issues: np.ndarray
    clean_score: np.ndarray


def cross_entropy_per_row(logits: Any, labels: Any) -> np.ndarray:
    """Cross-entropy of each row of ``logits`` (``n x classes``) at its given label (a stable log-softmax), on NumPy
    arrays: not `hf_gradmimic.losses.per_sample_loss`, which reads a model's outputs (any task) as tensors."""
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
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred_probs = cross_val_predict(
        LogisticRegression(C=C, max_iter=max_iter), features, labels, cv=folds, method="predict_proba"
    )
    return confident_learning_from_probs(pred_probs, labels, filter_by=filter_by)


def confident_learning_from_probs(pred_probs: Any, labels: Any, *, filter_by: str = "prune_by_noise_rate") -> Detection:
    """cleanlab's ``find_label_issues`` on given ``n x classes`` probabilities (Northcutt et al., JAIR 2021); the
    clean score is the probability of the given label (cleanlab's ``self_confidence``)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as error:  # a bench / dev dependency, not a runtime one
        raise ImportError(
            "confident_learning needs cleanlab: `pip install cleanlab` (a dev extra: `make install` does it)."
        ) from error
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    issues = find_label_issues(labels, pred_probs, filter_by=filter_by)
    return Detection(np.asarray(issues, dtype=bool), pred_probs[np.arange(labels.size), labels])


def reference_disagreement(reference_logits: Any, labels: Any) -> Detection:
    """Flag the samples whose label the reference does not predict (its argmax); the clean score is the
    reference's log-probability of the given label."""
    logits = np.asarray(reference_logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return Detection(logits.argmax(axis=1) != labels, -cross_entropy_per_row(logits, labels))


def small_loss_gmm(losses: Any, *, seed: int = 0, transform: str = "log") -> Detection:
    """DivideMix's clean/noisy split (Li et al., ICLR 2020): a 2-component GMM on the transformed losses.

    ``transform``: ``"log"`` (default: ``log(loss + 1e-6)``) or ``"minmax"`` (DivideMix's min-max normalisation).
    ``issues`` where the posterior of the lower-mean component is at most 0.5; ``clean_score`` is ``-loss``
    (the ranking the GMM cuts; the posterior itself can tie or turn in the far tails).
    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if transform == "log":
        values = np.log(np.maximum(losses, 0.0) + 1e-6)
    elif transform == "minmax":
        span = losses.max() - losses.min()
        values = (losses - losses.min()) / (span if span > 0 else 1.0)
    else:
        raise ValueError(f"transform must be 'log' or 'minmax', got {transform!r}.")
    return Detection(~_low_component(values, seed), -losses)


def margins(logits: Any, labels: Any) -> np.ndarray:
    """Each row's margin (Pleiss et al., NeurIPS 2020): its given label's logit minus the largest other logit."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(labels.size)
    assigned = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return assigned - others.max(axis=1)


def area_under_margin(margin_history: Any, *, seed: int = 0) -> Detection:
    """AUM (Pleiss et al., NeurIPS 2020) from ``n x epochs`` margins recorded over a plain training run.

    The clean score is the AUM (the mean margin); ``issues`` where a 2-component GMM puts a sample in the
    low-AUM component."""
    aum = np.asarray(margin_history, dtype=np.float64).mean(axis=1)
    return Detection(_low_component(aum, seed), aum)


def _low_component(values: np.ndarray, seed: int) -> np.ndarray:
    """True where a 2-component GMM (DivideMix's settings) puts ``values`` in the component of the lower mean,
    with posterior above 0.5."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(values[:, None])
    low = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(values[:, None])[:, low] > 0.5
