"""Aggregation: an ``n x m`` vote matrix -> ``P(keep)`` per sample (Snorkel's LabelModel, majority, all, any).

The windows' votes (Huang et al., arXiv 2501.06708, Section 4.2) are weak labels without ground
truth; Snorkel's LabelModel estimates each window's accuracy from their agreements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .warning import warn

__all__ = ["ABSTAIN", "AGGREGATES", "DEFAULT_AGGREGATE", "DISCARD", "KEEP", "VOTE_AGGREGATES", "aggregate_votes"]

# One assignment each, so that the API reference (griffe) documents them.
ABSTAIN = -1
"""The vote of a labeling function that has no opinion on a sample (e.g. a window that did not see it)."""
DISCARD = 0
"""The vote for dropping a sample."""
KEEP = 1
"""The vote for keeping a sample."""

# Snorkel's LabelModel only sees the data through the overlap matrix O = L_ind^T L_ind / n and
# the per-window coverage, which are functions of the vote-pattern counts. Up to this many
# samples it is fitted on every sample (exact); above, on the distinct patterns repeated in
# proportion to their counts so that the fit costs the same at 10M samples as at 1M.
LABEL_MODEL_FIT_ROWS = 1_000_000
LABEL_MODEL_EPOCHS = 500
LABEL_MODEL_LR = 0.01

# The rules that need no model: (keep votes, non-abstaining votes) per sample -> P(keep).
_VOTE_RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "majority": lambda n_keep, n_votes: n_keep / n_votes,
    "all": lambda n_keep, n_votes: (n_keep == n_votes).astype(np.float64),
    "any": lambda n_keep, n_votes: (n_keep > 0).astype(np.float64),
}
VOTE_AGGREGATES: tuple[str, ...] = ("snorkel", *_VOTE_RULES)
"""The aggregates of votes alone (`aggregate_votes`)."""
AGGREGATES: tuple[str, ...] = ("mixture", *VOTE_AGGREGATES)
"""Every aggregate of `build_filter`: ``mixture`` is the two-class latent model of `hf_gradmimic.filter.posterior`
over continuous signals and votes; with the others a continuous labeling function votes by its own 2-component
GMM cut."""
DEFAULT_AGGREGATE = "mixture"
"""`build_filter`'s aggregate when none is given."""


def aggregate_votes(
    votes: np.ndarray,
    aggregate: str = "snorkel",
    *,
    seed: int = 0,
    fit_rows: int = LABEL_MODEL_FIT_ROWS,
    class_balance: str | Sequence[float] | None = "majority",
    collected_warnings: list[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Combine an ``n x m`` vote matrix (-1 abstain, 0 discard, 1 keep) into ``P(keep)`` per row.

    - ``snorkel``: ``snorkel.labeling.model.LabelModel(cardinality=2)`` fitted with a fixed seed;
      ``P(keep) = predict_proba(L)[:, 1]`` and the per-window accuracies are ``get_weights()``.
      Snorkel 0.10's ``fit`` takes no sample weights, but the model only depends on the data through
      the pattern counts (overlap matrix and coverages), so it is fitted on the distinct vote
      patterns: each repeated by its exact count when ``n <= fit_rows`` (an exact fit, identical to
      fitting on ``L``), otherwise by its count scaled to ``fit_rows`` rows (largest-remainder
      rounding; ``mu_eps`` is set from the true ``n`` as Snorkel would). The resulting error on the
      overlap matrix is reported as ``max_abs_overlap_error``. Predictions are computed once per
      pattern and broadcast back, which is exact since ``predict_proba`` is row-wise. With fewer
      than 3 windows the LabelModel is not identifiable: majority vote is used, with a warning.
      ``class_balance`` is the prior ``[P(discard), P(keep)]`` given to ``fit``: by default
      (``"majority"``) the fraction of samples that majority vote keeps (clipped to [0.01, 0.99]).
      Snorkel's own default, a uniform prior, is badly off when most data are clean: to match the
      vote marginals it then makes ``P(vote = discard | keep) ~ 0``, so a single discard vote
      discards a sample (on a synthetic 70 % clean log: discard F1 0.78 with the uniform prior,
      0.98 with the majority-vote prior). Pass ``None`` for Snorkel's uniform prior.
    - ``majority``: ``P(keep)`` = fraction of the non-abstaining votes that are keep.
    - ``all`` / ``any``: 1 when all / any of the non-abstaining votes are keep, else 0.

    Returns:
        ``(keep_prob, info)``: ``info`` holds ``aggregate_used``, ``estimated_accuracies`` (snorkel
        only, else None) and, for snorkel, the fit details.
    """
    if aggregate not in VOTE_AGGREGATES:
        raise ValueError(f"Unknown vote aggregate {aggregate!r}; expected one of {VOTE_AGGREGATES}.")
    votes = _checked_votes(votes)
    m = votes.shape[1]
    n_votes = (votes != ABSTAIN).sum(axis=1)
    n_keep = (votes == KEEP).sum(axis=1)
    info: dict[str, Any] = {"aggregate_used": aggregate, "estimated_accuracies": None}
    if aggregate == "snorkel" and m < 3:
        warn(
            f"Snorkel's LabelModel needs at least 3 labeling functions (windows) to be identifiable, got {m}; "
            "falling back to majority vote (aggregate='majority').",
            collected_warnings,
        )
        aggregate = info["aggregate_used"] = "majority"
    if aggregate in _VOTE_RULES:
        return _VOTE_RULES[aggregate](n_keep, n_votes), info

    majority = _VOTE_RULES["majority"](n_keep, n_votes)
    return _label_model_keep_prob(
        votes,
        majority,
        info,
        seed=seed,
        fit_rows=fit_rows,
        class_balance=class_balance,
        collected_warnings=collected_warnings,
    )


def _checked_votes(votes: Any) -> np.ndarray:
    """``votes`` as a 2-D array in which every row has at least one non-abstaining vote."""
    votes = np.asarray(votes)
    if votes.ndim != 2:
        raise ValueError(f"The vote matrix must be 2-D (samples x windows), got shape {votes.shape}.")
    if votes.shape[0] == 0:
        raise ValueError("The vote matrix is empty: no sample to aggregate.")
    n_votes = (votes != ABSTAIN).sum(axis=1)
    if (n_votes == 0).any():
        bad = np.flatnonzero(n_votes == 0)
        raise ValueError(
            f"{bad.size} row(s) of the vote matrix abstain in every window (first rows: {bad[:5].tolist()}); "
            "a sample must be seen in at least one window."
        )
    return votes


def _label_model_keep_prob(
    votes: np.ndarray,
    majority: np.ndarray,
    info: dict[str, Any],
    *,
    seed: int,
    fit_rows: int,
    class_balance: str | Sequence[float] | None,
    collected_warnings: list[str] | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Snorkel's ``P(keep)`` per row, fitted and predicted on the distinct vote patterns (see `aggregate_votes`).

    Falls back to ``majority`` (with a warning) when the LabelModel diverges.
    """
    n, m = votes.shape
    patterns, inverse, counts = _encode_patterns(votes)
    exact = n <= fit_rows
    repeats = counts if exact else _proportional_counts(counts, fit_rows)
    fit_matrix = np.repeat(patterns.astype(np.int64), repeats, axis=0)
    fit_kwargs: dict[str, Any] = dict(
        n_epochs=LABEL_MODEL_EPOCHS, lr=LABEL_MODEL_LR, seed=seed, log_freq=LABEL_MODEL_EPOCHS, progress_bar=False
    )
    if not exact:
        # Snorkel clamps mu to [mu_eps, 1 - mu_eps] with mu_eps derived from n; use the true n.
        fit_kwargs["mu_eps"] = min(0.01, 1 / 10 ** math.ceil(math.log10(n)))
    class_balance = _class_balance(class_balance, majority)
    model = _fit_label_model(fit_matrix, class_balance, fit_kwargs)
    if model is None:
        warn(
            f"Snorkel's LabelModel diverged (NaN loss) on the {m} windows, also with a 10x smaller learning rate; "
            "falling back to majority vote (aggregate='majority').",
            collected_warnings,
        )
        info["aggregate_used"] = "majority"
        return majority, info
    pattern_prob = model.predict_proba(patterns.astype(np.int64))[:, 1]
    keep_prob = pattern_prob[inverse]
    overlap_error = (
        0.0 if exact else float(np.abs(_overlap_matrix(patterns, counts) - _overlap_matrix(patterns, repeats)).max())
    )
    info.update(
        estimated_accuracies=[float(a) for a in model.get_weights()],
        label_model={
            "n_patterns": int(patterns.shape[0]),
            "fit_rows": int(fit_matrix.shape[0]),
            "exact": bool(exact),
            "max_abs_overlap_error": overlap_error,
            "class_balance": class_balance,
            "n_epochs": LABEL_MODEL_EPOCHS,
            "lr": LABEL_MODEL_LR,
            "seed": int(seed),
        },
    )
    return keep_prob, info


def _class_balance(class_balance: str | Sequence[float] | None, majority: np.ndarray) -> list[float] | None:
    """The prior ``[P(discard), P(keep)]`` for the LabelModel: ``"majority"`` -> the share majority vote keeps."""
    if isinstance(class_balance, str):
        if class_balance != "majority":
            raise ValueError(f"class_balance must be 'majority', None or [P(discard), P(keep)], got {class_balance!r}.")
        kept = float(np.clip((majority >= 0.5).mean(), 0.01, 0.99))
        return [1.0 - kept, kept]
    if class_balance is not None:
        return [float(c) for c in class_balance]
    return None


def _encode_patterns(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of ``votes`` as ``(patterns, inverse, counts)``; vectorised.

    With at most 12 windows every row is a base-3 number below 3^12, so the distinct patterns come
    from a `bincount` (no sort); otherwise from ``np.unique(axis=0)``.
    """
    n, m = votes.shape
    if m <= 12:
        codes = np.zeros(n, dtype=np.int64)
        for j in range(m):  # loop over windows (<= 12), not over rows
            codes *= 3
            codes += votes[:, j].astype(np.int64) + 1
        counts_all = np.bincount(codes, minlength=3**m)
        present = np.flatnonzero(counts_all)
        lookup = np.full(3**m, -1, dtype=np.int64)
        lookup[present] = np.arange(present.size)
        inverse = lookup[codes]
        digits = np.empty((present.size, m), dtype=np.int8)
        rest = present.copy()
        for j in range(m - 1, -1, -1):
            digits[:, j] = rest % 3 - 1
            rest //= 3
        return digits, inverse, counts_all[present]
    patterns, inverse, counts = np.unique(votes, axis=0, return_inverse=True, return_counts=True)
    return patterns.astype(np.int8), inverse.reshape(-1), counts


def _proportional_counts(counts: np.ndarray, budget: int) -> np.ndarray:
    """Largest-remainder rounding of ``counts * budget / counts.sum()`` (sums to ``budget``)."""
    exact = counts * (budget / counts.sum())
    rounded = np.floor(exact).astype(np.int64)
    short = budget - int(rounded.sum())
    if short > 0:
        rounded[np.argsort(-(exact - rounded), kind="stable")[:short]] += 1
    return rounded


def _overlap_matrix(patterns: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Snorkel's O = L_ind^T L_ind / n from pattern counts (L_ind: one-hot of the non-abstain votes)."""
    one_hot = np.concatenate([(patterns == DISCARD), (patterns == KEEP)], axis=1).astype(np.float64)
    return (one_hot * counts[:, None]).T @ one_hot / counts.sum()


def _fit_label_model(fit_matrix: np.ndarray, class_balance: Any, fit_kwargs: dict[str, Any]) -> Any:
    """LabelModel fitted on ``fit_matrix``; retried once with a 10x smaller learning rate when its loss goes NaN
    (seen with many windows, e.g. a select-mode run's ~50 epochs); None when it diverges again."""
    from snorkel.labeling.model import LabelModel

    for lr in (fit_kwargs["lr"], fit_kwargs["lr"] / 10):
        model = LabelModel(cardinality=2, verbose=False)
        try:
            model.fit(fit_matrix, class_balance=class_balance, **{**fit_kwargs, "lr": lr})
        except Exception as error:  # snorkel raises a bare Exception("Loss is NaN ...")
            if "nan" not in str(error).lower():
                raise
            continue
        return model
    return None
