"""Stage 2 of Grad-Mimic: an automated ensemble filter built from the score log.

Grad-Mimic (Huang et al., "Evaluating Sample Utility for Data Selection by Mimicking Model
Weights", arXiv 2501.06708) re-weights every batch during training (Stage 1) and then, after
training, turns the recorded weights into a data filter (Stage 2, Section 4.2):

1. **Windows as labeling functions.** The training run is cut into windows of optimizer steps
   (by default one per epoch). In window ``j`` a sample ``i`` gets the value

       v_ij = mean over its records in window j of  b * w_i

   where ``w_i`` is the softmax weight the sample received and ``b`` the size of the batch the
   softmax ran over, so ``v_ij = 1`` means "uniform weight, no opinion", ``v_ij > 1`` "up-weighted"
   (its negative gradient points toward the reference model) and ``v_ij < 1`` "down-weighted".
   A sample that has no record in window ``j`` abstains there.

2. **Identification per window.** Each window votes keep (1) / discard (0) for the samples it saw:

   - ``threshold``: keep when ``v_ij > t``; the paper's rule is ``t = 1``, i.e. ``w_i > 1/b``;
   - ``kmeans``: the exact optimal 1-D 2-means split of the window's values (sort + prefix sums,
     O(n log n)); keep the cluster with the higher centre;
   - ``gmm``: a two-component 1-D Gaussian mixture fitted by EM (initialised from the k-means split,
     so it is deterministic); keep the values above the point, between the two means, where the
     weighted component densities cross;
   - ``topk``: keep the top ``k`` percent of the window's values.

3. **Aggregation.** The ``n x m`` vote matrix (``-1`` abstain, ``0`` discard, ``1`` keep) is combined
   into a keep probability per sample, by default with Snorkel's `LabelModel` (weak supervision:
   it estimates each window's accuracy from the agreements between windows, without labels), or
   by majority vote, ``all`` or ``any``. A sample is kept when ``P(keep) >= 0.5``.

Section 5.1 of the paper also uses two dataset-level quality estimators, which
`estimate_quality` returns: the retained fraction ``|kept| / n`` and the mean mimic score
``(1/n) sum_i m_i`` (``m_i`` being sample ``i``'s mean mimic score over its records).

Everything is vectorised (numpy ``bincount`` / sort + prefix sums over the records of the
score log, read shard by shard); there are no Python loops over samples or records.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .scores import score_shard_paths, scores_dir

__all__ = [
    "AGGREGATES",
    "METHODS",
    "FilterWarning",
    "GaussianMixture1D",
    "MimicFilter",
    "aggregate_votes",
    "build_filter",
    "estimate_quality",
    "fit_gmm_1d",
    "identify",
    "identify_gmm",
    "identify_kmeans",
    "identify_threshold",
    "identify_topk",
    "kmeans_1d",
]

METHODS: tuple[str, ...] = ("threshold", "kmeans", "gmm", "topk")
AGGREGATES: tuple[str, ...] = ("snorkel", "majority", "all", "any")

ABSTAIN, DISCARD, KEEP = -1, 0, 1

TABLE_FILENAME = "filter.parquet"
SUMMARY_FILENAME = "summary.json"

# Snorkel's LabelModel only sees the data through the overlap matrix O = L_ind^T L_ind / n and
# the per-window coverage, which are functions of the vote-pattern counts. Up to this many
# samples it is fitted on every sample (exact); above, on the distinct patterns repeated in
# proportion to their counts so that the fit costs the same at 10M samples as at 1M.
LABEL_MODEL_FIT_ROWS = 1_000_000
LABEL_MODEL_EPOCHS = 500
LABEL_MODEL_LR = 0.01
# The (samples x windows) matrices are dense; beyond this many cells (e.g. windows="step" on a
# large run) ask for fewer windows instead of allocating gigabytes.
MAX_MATRIX_CELLS = 400_000_000

_SCORE_COLUMNS_NEEDED = ("global_step", "sample_id", "mimic_score", "weight", "batch_size")
_CHUNK_ROWS = 4_000_000

ScoresLike = Union[str, os.PathLike, pa.Table, "datasets.Dataset", "pandas.DataFrame"]  # noqa: F821
WindowsLike = Union[Literal["epoch", "step"], int]


class FilterWarning(UserWarning):
    """Warnings about the filter's input or a fallback it took (degenerate window, 2 windows...)."""


def _warn(message: str, collected: list[str] | None = None) -> None:
    if collected is not None:
        collected.append(message)
    warnings.warn(message, FilterWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Identification: one window's values -> keep / discard votes
# ----------------------------------------------------------------------------------------------


class Identification(NamedTuple):
    """One window's decision: ``keep`` per value, the decision ``boundary`` and whether the window
    was degenerate (fewer than two distinct values: everyone kept, boundary ``nan``)."""

    keep: np.ndarray
    boundary: float
    degenerate: bool


def identify_threshold(values: np.ndarray, threshold: float = 1.0) -> tuple[np.ndarray, float]:
    """Keep the values strictly above ``threshold``.

    With ``values = b * w`` and the default ``threshold=1.0`` this is the paper's rule ``w > 1/b``:
    a sample is kept when it received more than the uniform weight.
    """
    values = np.asarray(values)
    return values > threshold, float(threshold)


def _kmeans_split_sorted(x: np.ndarray) -> int:
    """Size of the low cluster of the optimal 2-means split of the sorted float64 array ``x``."""
    n = x.size
    centred = x - x.mean()
    prefix = np.cumsum(centred)
    total = prefix[-1]
    left = prefix[:-1]  # S_k for k = 1 .. n-1
    k = np.arange(1, n, dtype=np.float64)
    between = left * left / k + (total - left) ** 2 / (n - k)
    between[x[1:] == x[:-1]] = -np.inf  # a cut inside a run of ties is not a valid split
    return int(np.argmax(between)) + 1


def kmeans_1d(values: np.ndarray) -> tuple[float, float, float]:
    """Exact optimal 1-D 2-means.

    In one dimension the optimal 2-means partition is contiguous in sorted order, so it is the
    split ``k`` of the sorted values ``x_(1) <= ... <= x_(n)`` that minimises the within-cluster
    sum of squares, i.e. maximises the between-cluster term

        B(k) = S_k^2 / k + (S_n - S_k)^2 / (n - k),     S_k = sum_{i <= k} (x_(i) - mean(x)),

    (centring keeps the prefix sums small, so there is no catastrophic cancellation). Only splits
    between distinct values are considered, so tied values always share a cluster. O(n log n) for
    the sort, O(n) for the scan. Unlike Lloyd's algorithm (scikit-learn's `KMeans`) it cannot stop
    in a local optimum, so where the two disagree this split has the lower inertia.

    Returns:
        ``(cut, low_centre, high_centre)``: the high cluster is ``values >= cut``. Raises
        ``ValueError`` when there are fewer than two distinct values.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size < 2 or x[0] == x[-1]:
        raise ValueError("kmeans_1d needs at least two distinct values.")
    split = _kmeans_split_sorted(x)
    return float(x[split]), float(x[:split].mean()), float(x[split:].mean())


def identify_kmeans(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Keep the higher of the two exact 1-D k-means clusters.

    The reported boundary is the midpoint of the two centres (the nearest-centre rule); the keep
    mask itself comes from the optimal split, so it matches scikit-learn's labels exactly.
    """
    values = np.asarray(values)
    cut, low_centre, high_centre = kmeans_1d(values)
    return values >= cut, 0.5 * (low_centre + high_centre)


class GaussianMixture1D(NamedTuple):
    """A fitted two-component 1-D Gaussian mixture; component 0 has the lower mean."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    log_likelihood: float  # mean per-value log-likelihood at the last iteration
    n_iter: int
    converged: bool

    def boundary(self) -> float | None:
        """The point between the two means where ``pi_0 N(x; 0) == pi_1 N(x; 1)``, or None.

        ``log(pi_1 N_1(x)) - log(pi_0 N_0(x))`` is a quadratic ``a x^2 + b x + c``; a root inside
        ``[mu_0, mu_1]`` is the decision boundary between the two components.
        """
        (p0, p1), (m0, m1), (v0, v1) = self.weights, self.means, self.variances
        a = 0.5 / v0 - 0.5 / v1
        b = m1 / v1 - m0 / v0
        c = math.log(p1 / p0) - 0.5 * math.log(v1 / v0) - 0.5 * m1 * m1 / v1 + 0.5 * m0 * m0 / v0
        if abs(a) < 1e-12 * max(abs(b), 1e-300):
            roots = [] if b == 0 else [-c / b]
        else:
            disc = b * b - 4 * a * c
            if disc < 0:
                roots = []
            else:
                sq = math.sqrt(disc)
                # Numerically stable quadratic roots.
                q = -0.5 * (b + math.copysign(sq, b))
                roots = [q / a] + ([c / q] if q != 0 else [])
        inside = [r for r in roots if m0 <= r <= m1]
        return float(inside[0]) if len(inside) == 1 else None


def fit_gmm_1d(
    values: np.ndarray,
    *,
    max_iter: int = 10_000,
    tol: float = 1e-10,
    reg_var: float = 1e-6,
    max_groups: int = 4096,
) -> GaussianMixture1D:
    """Fit a two-component 1-D Gaussian mixture by EM, vectorised in numpy.

    EM runs on the standardised values ``z = (x - mean) / std`` (so ``tol`` and ``reg_var`` are
    scale free, as scikit-learn's ``reg_covar``) and starts from the exact 2-means split
    (`kmeans_1d`), which makes the fit deterministic:

        E-step: r_i = pi_1 N(z_i; mu_1, s_1) / (pi_0 N(z_i; mu_0, s_0) + pi_1 N(z_i; mu_1, s_1))
        M-step: pi_1 = sum_i r_i / n,  mu_1 = sum_i r_i z_i / sum_i r_i,
                s_1 = sum_i r_i z_i^2 / sum_i r_i - mu_1^2 + reg_var   (and 1 - r_i for component 0)

    Iterations stop when the mean log-likelihood gains less than ``tol`` (EM converges slowly,
    linearly, when the components overlap, hence the small default and the large ``max_iter``).

    To keep that affordable on millions of values, windows with more than ``max_groups`` values
    are cut, in sorted order, into ``max_groups`` groups of (nearly) equal size: the E-step
    evaluates ``r`` once per group, at the group's mean, and the M-step uses each group's exact
    count, sum and sum of squares. The only approximation is ``r`` being constant within a group
    (a group holds 1/4096 of the values; on 100k values from N(0.7, 0.25) / N(1.3, 0.25) the
    boundary moves by 2e-5 against exact EM, at 1/70 of the cost); windows with at most
    ``max_groups`` values get exact EM.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = x.size
    if n < 2 or x[0] == x[-1]:
        raise ValueError("fit_gmm_1d needs at least two distinct values.")
    split = _kmeans_split_sorted(x)
    loc, scale = float(x.mean()), float(x.std())
    x -= loc
    x /= scale  # x is now z, sorted

    if n <= max_groups:
        counts = np.ones(n)
        sums, squares, centres = x, x * x, x
        init_high = np.arange(n) >= split
    else:
        starts = (np.arange(max_groups, dtype=np.int64) * n) // max_groups
        counts = np.diff(np.r_[starts, n]).astype(np.float64)
        sums = np.add.reduceat(x, starts)
        squares = np.add.reduceat(x * x, starts)
        centres = sums / counts
        # A group straddling the k-means cut starts on the side holding most of it.
        init_high = starts + counts / 2 >= split
    del x
    total, total_sq = float(sums.sum()), float(squares.sum())

    r1 = init_high.astype(np.float64)  # responsibilities of the high component, per group
    previous = -np.inf
    log_likelihood = -np.inf
    converged = False
    n_iter = 0
    params = None
    for n_iter in range(1, max_iter + 1):
        params = _gmm_m_step(r1, counts, sums, squares, n, total, total_sq, reg_var)
        (pi0, pi1), (mu0, mu1), (var0, var1) = params
        a0 = math.log(pi0) - 0.5 * math.log(2 * math.pi * var0) - 0.5 * (centres - mu0) ** 2 / var0
        a1 = math.log(pi1) - 0.5 * math.log(2 * math.pi * var1) - 0.5 * (centres - mu1) ** 2 / var1
        log_norm = np.logaddexp(a0, a1)
        log_likelihood = float(counts @ log_norm) / n
        r1 = np.exp(a1 - log_norm)
        if log_likelihood - previous < tol:
            converged = True
            break
        previous = log_likelihood

    (pi0, pi1), (mu0, mu1), (var0, var1) = _gmm_m_step(r1, counts, sums, squares, n, total, total_sq, reg_var)
    weights = np.array([pi0, pi1])
    means = np.array([mu0, mu1]) * scale + loc
    variances = np.array([var0, var1]) * scale * scale
    if means[0] > means[1]:  # EM may swap the components; report the lower mean first
        weights, means, variances = weights[::-1].copy(), means[::-1].copy(), variances[::-1].copy()
    return GaussianMixture1D(weights, means, variances, log_likelihood, n_iter, converged)


def _gmm_m_step(r1, counts, sums, squares, n, total, total_sq, reg_var):
    """M-step from per-group responsibilities ``r1`` and exact per-group count / sum / sum of squares."""
    n1 = float(counts @ r1)
    n1 = min(max(n1, 1e-10), n - 1e-10)
    n0 = n - n1
    s1, q1 = float(r1 @ sums), float(r1 @ squares)
    mu1, mu0 = s1 / n1, (total - s1) / n0
    var1 = max(q1 / n1 - mu1 * mu1, 0.0) + reg_var
    var0 = max((total_sq - q1) / n0 - mu0 * mu0, 0.0) + reg_var
    return (n0 / n, n1 / n), (mu0, mu1), (var0, var1)


def identify_gmm(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Keep the values that the higher-mean component of a 2-component GMM explains best.

    The rule is made monotone in the value: keep ``values > boundary``, where the boundary is the
    crossing of the two weighted component densities between the means (`GaussianMixture1D.boundary`).
    A plain ``argmax`` of the posterior would also hand the far upper tail to a wide low-mean
    component, i.e. discard the most up-weighted samples. When the densities do not cross between
    the means (one component dominates there), the midpoint of the means is used.
    """
    values = np.asarray(values)
    mixture = fit_gmm_1d(values)
    boundary = mixture.boundary()
    if boundary is None:
        boundary = float(0.5 * (mixture.means[0] + mixture.means[1]))
    return values > boundary, boundary


def identify_topk(values: np.ndarray, topk: float = 50.0) -> tuple[np.ndarray, float]:
    """Keep the top ``topk`` percent of the values (``ceil(topk * n / 100)`` of them).

    Values tied with the cut-off are all kept, so slightly more than ``topk`` percent may be kept.
    The boundary is the cut-off value (kept when ``value >= boundary``).
    """
    values = np.asarray(values)
    n = values.size
    n_keep = min(n, max(1, math.ceil(topk * n / 100.0 - 1e-9)))
    cutoff = float(np.partition(values, n - n_keep)[n - n_keep])
    return values >= cutoff, cutoff


def identify(
    values: np.ndarray,
    method: str = "gmm",
    *,
    threshold: float | None = None,
    topk: float = 50.0,
) -> Identification:
    """Run one identification ``method`` on one window's values (no NaN).

    Degenerate windows (fewer than two distinct values, e.g. every sample got exactly the uniform
    weight) carry no information to rank samples, so everyone in them is kept (vote 1) and the
    boundary is ``nan``; `build_filter` records such windows in its summary and warns.
    """
    values = np.asarray(values)
    if values.size == 0 or values.min() == values.max():
        return Identification(np.ones(values.shape, dtype=bool), float("nan"), True)
    if method == "threshold":
        keep, boundary = identify_threshold(values, 1.0 if threshold is None else threshold)
    elif method == "kmeans":
        keep, boundary = identify_kmeans(values)
    elif method == "gmm":
        keep, boundary = identify_gmm(values)
    elif method == "topk":
        keep, boundary = identify_topk(values, topk)
    else:
        raise ValueError(f"Unknown identification method {method!r}; expected one of {METHODS}.")
    return Identification(keep, boundary, False)


# ----------------------------------------------------------------------------------------------
# Aggregation: n x m vote matrix -> P(keep)
# ----------------------------------------------------------------------------------------------


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
    if aggregate not in AGGREGATES:
        raise ValueError(f"Unknown aggregate {aggregate!r}; expected one of {AGGREGATES}.")
    votes = np.asarray(votes)
    if votes.ndim != 2:
        raise ValueError(f"The vote matrix must be 2-D (samples x windows), got shape {votes.shape}.")
    n, m = votes.shape
    voted = votes != ABSTAIN
    n_votes = voted.sum(axis=1)
    if n == 0:
        raise ValueError("The vote matrix is empty: no sample to aggregate.")
    if (n_votes == 0).any():
        bad = np.flatnonzero(n_votes == 0)
        raise ValueError(
            f"{bad.size} row(s) of the vote matrix abstain in every window (first rows: {bad[:5].tolist()}); "
            "a sample must be seen in at least one window."
        )
    n_keep = (votes == KEEP).sum(axis=1)
    info: dict[str, Any] = {"aggregate_used": aggregate, "estimated_accuracies": None}

    if aggregate == "snorkel" and m < 3:
        _warn(
            f"Snorkel's LabelModel needs at least 3 labeling functions (windows) to be identifiable, got {m}; "
            "falling back to majority vote (aggregate='majority').",
            collected_warnings,
        )
        aggregate = info["aggregate_used"] = "majority"

    majority = n_keep / n_votes
    if aggregate == "majority":
        return majority, info
    if aggregate == "all":
        return (n_keep == n_votes).astype(np.float64), info
    if aggregate == "any":
        return (n_keep > 0).astype(np.float64), info

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
    if isinstance(class_balance, str):
        if class_balance != "majority":
            raise ValueError(f"class_balance must be 'majority', None or [P(discard), P(keep)], got {class_balance!r}.")
        kept = float(np.clip((majority >= 0.5).mean(), 0.01, 0.99))
        class_balance = [1.0 - kept, kept]
    elif class_balance is not None:
        class_balance = [float(c) for c in class_balance]
    model = _fit_label_model(fit_matrix, class_balance, fit_kwargs)
    if model is None:
        _warn(
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


# ----------------------------------------------------------------------------------------------
# Reading the score log: records -> (samples x windows) matrices
# ----------------------------------------------------------------------------------------------


@dataclass
class _ScoreSource:
    """Where the records come from: Parquet shards read one at a time, or an in-memory table."""

    shards: list[Path] | None = None
    table: pa.Table | None = None
    description: str = ""

    def column_names(self) -> list[str]:
        if self.table is not None:
            return self.table.column_names
        return pq.read_schema(self.shards[0]).names

    def num_rows(self) -> int:
        if self.table is not None:
            return self.table.num_rows
        return sum(pq.ParquetFile(shard).metadata.num_rows for shard in self.shards)

    def chunks(self, columns: list[str]) -> Iterator[pa.Table]:
        if self.table is not None:
            table = self.table.select(columns)
            for start in range(0, table.num_rows, _CHUNK_ROWS):
                yield table.slice(start, _CHUNK_ROWS)
        else:
            # One shard at a time keeps memory at one shard's worth of Arrow data on top of the
            # compact numpy arrays being filled.
            for shard in self.shards:
                yield pq.read_table(shard, columns=columns)


def _as_source(scores: ScoresLike) -> _ScoreSource:
    if isinstance(scores, (str, os.PathLike)):
        shards = score_shard_paths(scores)
        if not shards:
            raise ValueError(f"The score log at {scores_dir(scores)} is empty: no shard has been written.")
        return _ScoreSource(shards=shards, description=str(scores_dir(scores)))
    if isinstance(scores, pa.Table):
        return _ScoreSource(table=scores, description="pyarrow.Table")
    module = type(scores).__module__
    if module.startswith("pandas"):
        return _ScoreSource(table=pa.Table.from_pandas(scores, preserve_index=False), description="pandas.DataFrame")
    if module.startswith("datasets"):
        # The arrow format honours an indices mapping (after .select/.shuffle/.filter).
        return _ScoreSource(table=scores.with_format("arrow")[:], description="datasets.Dataset")
    raise TypeError(
        "scores must be a path to an output_dir or its mimic_scores/ folder, a datasets.Dataset from "
        f"load_scores, a pyarrow.Table or a pandas.DataFrame; got {type(scores).__name__}."
    )


def _column_numpy(chunk: pa.Table, name: str) -> np.ndarray:
    column = chunk.column(name)
    if column.null_count:
        raise ValueError(f"Column {name!r} of the score log holds {column.null_count} null value(s).")
    return column.to_numpy()


def _window_of_steps(steps: np.ndarray, epochs: np.ndarray | None, windows: WindowsLike, warn_list: list[str]):
    """Map the distinct optimizer steps (sorted) to window indices.

    Returns ``(window_index_per_step, names, (first_step, last_step) per window)``.

    ``"epoch"``: a record's ``epoch`` is the fractional epoch *after* its step, so the last step of
    epoch 1 has ``epoch == 1.0`` exactly (``floor`` would put it in the next epoch). The window is
    ``ceil(epoch - tol) - 1`` with a tolerance ``tol`` far below one step's share of an epoch
    (half the smallest epoch increment between consecutive steps, at most 1e-6), which absorbs
    float rounding such as ``1.0000000000000002``. Windows are named ``epoch_<k>`` with ``k``
    0-based (``epoch_0`` holds the steps with ``0 < epoch <= 1``).
    """
    if windows == "step":
        index = np.arange(steps.size)
        names = [f"step_{int(s)}" for s in steps]
    elif windows == "epoch":
        if epochs is None or not np.isfinite(epochs).all():
            raise ValueError("windows='epoch' needs a finite `epoch` column in the score log.")
        increments = np.diff(epochs)
        positive = increments[increments > 0]
        tol = min(1e-6, 0.5 * float(positive.min())) if positive.size else 1e-6
        epoch_index = np.maximum(np.ceil(epochs - tol).astype(np.int64) - 1, 0)
        labels, index = np.unique(epoch_index, return_inverse=True)
        names = [f"epoch_{int(e)}" for e in labels]
    else:
        first, last = int(steps[0]), int(steps[-1])
        span = last - first + 1
        if windows > span:
            raise ValueError(
                f"windows={windows} is more than the {span} optimizer steps ({first}..{last}) in the score log."
            )
        raw = (steps - first) * windows // span
        labels, index = np.unique(raw, return_inverse=True)
        if labels.size < windows:
            _warn(
                f"{windows - labels.size} of the {windows} step windows hold no record (gaps in global_step) "
                "and were dropped.",
                warn_list,
            )
        names = []
    n_windows = int(index.max()) + 1
    first_step = np.full(n_windows, np.iinfo(np.int64).max)
    last_step = np.full(n_windows, np.iinfo(np.int64).min)
    np.minimum.at(first_step, index, steps)  # small: one entry per distinct step
    np.maximum.at(last_step, index, steps)
    ranges = [(int(a), int(b)) for a, b in zip(first_step, last_step)]
    if not names:
        names = [f"steps_{a}-{b}" for a, b in ranges]
    return index, names, ranges


@dataclass
class WindowedScores:
    """Per-sample, per-window aggregates of the score log (the input of identification).

    ``values[i, j]`` is the mean ``b * w`` of sample ``i`` in window ``j`` and ``scores[i, j]`` its
    mean mimic score there (both ``nan`` where the sample is absent, i.e. abstains).
    """

    sample_ids: pa.Array
    values: np.ndarray
    scores: np.ndarray
    mean_weight: np.ndarray
    mean_score: np.ndarray
    n_records: np.ndarray
    window_names: list[str]
    window_steps: list[tuple[int, int]]
    total_records: int
    n_nan_scores: int
    warnings: list[str] = field(default_factory=list)


def collect_windows(scores: ScoresLike, windows: WindowsLike = "epoch") -> WindowedScores:
    """Read the score log and reduce it to per-(sample, window) means of ``b * w`` and mimic score.

    The records are read one shard (or 4M-row slice) at a time into compact numpy arrays, then
    grouped with one ``bincount`` per statistic over the flat key ``sample * m + window`` (or a
    sort + ``reduceat`` when the sample ids are too sparse for a dense key space). Records that a
    distributed sampler repeated (``repeated == True``) are dropped, as `load_scores` does.
    NaN mimic scores are left out of the score means (their weights still count) with a warning.
    """
    _check_windows(windows)
    source = _as_source(scores)
    warn_list: list[str] = []
    available = source.column_names()
    needed = list(_SCORE_COLUMNS_NEEDED) + (["epoch"] if windows == "epoch" else [])
    missing = [c for c in needed if c not in available]
    if missing:
        raise ValueError(f"The score log ({source.description}) lacks the column(s) {missing}; found {available}.")
    columns = needed + (["repeated"] if "repeated" in available else [])

    capacity = source.num_rows()
    if capacity == 0:
        raise ValueError(f"The score log ({source.description}) is empty: it holds no record.")
    step_buf = np.empty(capacity, dtype=np.int64)
    bw_buf = np.empty(capacity, dtype=np.float32)
    score_buf = np.empty(capacity, dtype=np.float32)
    id_buf: np.ndarray | None = None
    id_chunks: list[pa.Array] = []
    step_epoch: list[tuple[np.ndarray, np.ndarray]] = []
    filled = 0
    for chunk in source.chunks(columns):
        if "repeated" in chunk.column_names:
            repeated = chunk.column("repeated")
            if pc.any(repeated).as_py():
                chunk = chunk.filter(pc.invert(repeated))
        rows = chunk.num_rows
        if rows == 0:
            continue
        sl = slice(filled, filled + rows)
        steps = _column_numpy(chunk, "global_step")
        step_buf[sl] = steps
        weight = _column_numpy(chunk, "weight").astype(np.float64)
        if not np.isfinite(weight).all():
            raise ValueError(
                f"The score log holds {int((~np.isfinite(weight)).sum())} non-finite weight(s); "
                "weights must be finite (NaN is only allowed in mimic_score)."
            )
        weight *= _column_numpy(chunk, "batch_size")
        bw_buf[sl] = weight
        score_buf[sl] = _column_numpy(chunk, "mimic_score")
        ids = chunk.column("sample_id")
        if ids.null_count:
            raise ValueError(f"Column 'sample_id' of the score log holds {ids.null_count} null value(s).")
        if pa.types.is_integer(ids.type):
            if id_buf is None:
                id_buf = np.empty(capacity, dtype=np.int64)
            id_buf[sl] = ids.to_numpy()
        else:
            id_chunks.extend(ids.chunks)
        if windows == "epoch":
            epochs = _column_numpy(chunk, "epoch")
            # One (step, epoch) pair per distinct step of the chunk; shards are step-ordered, so
            # a diff finds them without sorting.
            if steps.size > 1 and (np.diff(steps) >= 0).all():
                starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
            else:
                _, starts = np.unique(steps, return_index=True)
            step_epoch.append((steps[starts], epochs[starts]))
        filled += rows
    if filled == 0:
        raise ValueError(f"The score log ({source.description}) is empty once repeated records are dropped.")
    if id_buf is not None and id_chunks:
        raise ValueError("The score log mixes integer and non-integer sample_id types across shards.")
    step_buf, bw_buf, score_buf = step_buf[:filled], bw_buf[:filled], score_buf[:filled]

    # Windows from the distinct steps.
    if windows == "epoch":
        all_steps = np.concatenate([s for s, _ in step_epoch])
        all_epochs = np.concatenate([e for _, e in step_epoch])
        unique_steps, first = np.unique(all_steps, return_index=True)
        unique_epochs = all_epochs[first]
    else:
        unique_steps = np.unique(step_buf)
        unique_epochs = None
    step_window, names, ranges = _window_of_steps(unique_steps, unique_epochs, windows, warn_list)
    m = len(names)
    span = int(unique_steps[-1] - unique_steps[0]) + 1
    if span <= 4 * unique_steps.size + 1_000_000:
        lookup = np.full(span, -1, dtype=np.int32)
        lookup[unique_steps - unique_steps[0]] = step_window
        step_buf -= unique_steps[0]
        record_window = lookup[step_buf]
    else:
        record_window = step_window[np.searchsorted(unique_steps, step_buf)].astype(np.int32)
    del step_buf

    # Samples: a dense integer code per record.
    if id_buf is not None:
        id_buf = id_buf[:filled]
        lo, hi = int(id_buf.min()), int(id_buf.max())
        if hi - lo + 1 <= 2 * filled:
            id_buf -= lo  # dense codes: sample_id - min
            codes, n_codes, code_ids = id_buf, hi - lo + 1, None
        else:
            encoded = pa.array(id_buf).dictionary_encode()
            codes, n_codes, code_ids = _sorted_codes(encoded)
            del id_buf
    else:
        encoded = pa.chunked_array(id_chunks).combine_chunks().dictionary_encode()
        del id_chunks
        codes, n_codes, code_ids = _sorted_codes(encoded)

    if n_codes * m > MAX_MATRIX_CELLS:
        raise ValueError(
            f"{n_codes} samples x {m} windows is too large for the dense vote matrix "
            f"(limit {MAX_MATRIX_CELLS} cells); use fewer windows, e.g. windows=<int>."
        )

    # Group by (sample, window). The key reuses the codes buffer in place.
    key = codes
    key *= m
    key += record_window
    del record_window
    nan_scores = np.isnan(score_buf)
    n_nan = int(nan_scores.sum())
    cells = n_codes * m
    if cells <= 4 * filled:
        count = np.bincount(key, minlength=cells)
        sum_bw = np.bincount(key, weights=bw_buf, minlength=cells)
        del bw_buf
        if n_nan:
            score_buf[nan_scores] = 0.0
            count_score = np.bincount(key[~nan_scores], minlength=cells)
        else:
            count_score = count
        sum_score = np.bincount(key, weights=score_buf, minlength=cells)
        del score_buf, key
    else:
        # Sparse key space (e.g. windows="step"): sort the keys and reduce the runs.
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        cell = sorted_key[starts]
        count = np.zeros(cells, dtype=np.int64)
        sum_bw = np.zeros(cells)
        sum_score = np.zeros(cells)
        count[cell] = np.diff(np.r_[starts, sorted_key.size])
        sum_bw[cell] = np.add.reduceat(bw_buf[order].astype(np.float64), starts)
        score_sorted = score_buf[order].astype(np.float64)
        valid_sorted = ~np.isnan(score_sorted)
        score_sorted[~valid_sorted] = 0.0
        sum_score[cell] = np.add.reduceat(score_sorted, starts)
        if n_nan:
            count_score = np.zeros(cells, dtype=np.int64)
            count_score[cell] = np.add.reduceat(valid_sorted.astype(np.int64), starts)
        else:
            count_score = count
        del order, sorted_key, score_sorted, valid_sorted, key, bw_buf, score_buf

    count = count.reshape(n_codes, m)
    count_score = count_score.reshape(n_codes, m)
    sum_bw = sum_bw.reshape(n_codes, m)
    sum_score = sum_score.reshape(n_codes, m)
    n_records = count.sum(axis=1)
    present = n_records > 0
    if not present.all():  # dense codes leave gaps where an id in [min, max] never occurs
        count, count_score, sum_bw, sum_score, n_records = (
            count[present], count_score[present], sum_bw[present], sum_score[present], n_records[present]
        )
    if code_ids is None:
        sample_ids = pa.array(np.flatnonzero(present) + lo, type=pa.int64())
    else:
        sample_ids = code_ids

    with np.errstate(invalid="ignore", divide="ignore"):
        values = (sum_bw / count).astype(np.float32)  # nan where absent (0 / 0)
        window_scores = (sum_score / count_score).astype(np.float32)
        mean_weight = sum_bw.sum(axis=1) / n_records
        n_valid_scores = count_score.sum(axis=1)
        mean_score = sum_score.sum(axis=1) / n_valid_scores
    mean_score[n_valid_scores == 0] = np.nan
    if n_nan:
        if n_nan == filled:
            raise ValueError(
                f"Every mimic_score in the score log ({filled} records) is NaN: there is nothing to filter on. "
                "Check the reference model and the trainer's score logging."
            )
        _warn(
            f"{n_nan} of {filled} records have a NaN mimic_score; they are left out of the mean scores "
            f"({int((n_valid_scores == 0).sum())} sample(s) have no finite score at all), their weights still count.",
            warn_list,
        )
    return WindowedScores(
        sample_ids=sample_ids,
        values=values,
        scores=window_scores,
        mean_weight=mean_weight,
        mean_score=mean_score,
        n_records=n_records.astype(np.int32),
        window_names=names,
        window_steps=ranges,
        total_records=filled,
        n_nan_scores=n_nan,
        warnings=warn_list,
    )


def _sorted_codes(encoded: pa.DictionaryArray) -> tuple[np.ndarray, int, pa.Array]:
    """Dense codes ordered like the sorted distinct ids (so the output is sorted by sample_id)."""
    dictionary = encoded.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, order.size, dictionary.take(pa.array(order))


# ----------------------------------------------------------------------------------------------
# The filter
# ----------------------------------------------------------------------------------------------


def _check_windows(windows: Any) -> None:
    if isinstance(windows, str):
        if windows not in ("epoch", "step"):
            raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")
    elif isinstance(windows, bool) or not isinstance(windows, (int, np.integer)) or windows < 1:
        raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")


def _check_settings(method: str, aggregate: str, threshold: float | None, topk: float) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown identification method {method!r}; expected one of {METHODS}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"Unknown aggregate {aggregate!r}; expected one of {AGGREGATES}.")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
    if not (isinstance(topk, (int, float, np.integer, np.floating)) and 0 < float(topk) <= 100):
        raise ValueError(f"topk is a percentage in (0, 100], got {topk!r}.")


def _list_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """An ``n x m`` matrix as a list column (zero-copy values, one offsets array)."""
    n, m = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    if n * m < 2**31:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * m + 1, m, dtype=np.int32)), flat)
    return pa.LargeListArray.from_arrays(pa.array(np.arange(0, n * m + 1, m, dtype=np.int64)), flat)


def _matrix(column: pa.ChunkedArray | pa.Array, m: int, dtype) -> np.ndarray:
    flat = pc.list_flatten(column)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, m)


def _jsonable(value: Any) -> Any:
    """Summary values as plain JSON (NaN -> None, numpy scalars -> Python, tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _atomic_write(destination: Path, write) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.replace(tmp_name, destination)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _decide(
    windowed: WindowedScores,
    *,
    method: str,
    aggregate: str,
    windows: WindowsLike,
    threshold: float | None,
    topk: float,
    seed: int,
) -> "MimicFilter":
    """Identification per window + aggregation, from the per-window values."""
    warn_list = list(windowed.warnings)
    values = windowed.values
    n, m = values.shape
    votes = np.full((n, m), ABSTAIN, dtype=np.int8)
    window_info = []
    for j in range(m):  # loop over windows, each one vectorised over its samples
        column = values[:, j]
        present = ~np.isnan(column)
        decision = identify(column[present], method, threshold=threshold, topk=topk)
        votes[present, j] = decision.keep
        window_info.append(
            {
                "name": windowed.window_names[j],
                "first_step": windowed.window_steps[j][0],
                "last_step": windowed.window_steps[j][1],
                "n_samples": int(present.sum()),
                "threshold": decision.boundary,
                "kept_fraction": float(decision.keep.mean()) if decision.keep.size else float("nan"),
                "degenerate": decision.degenerate,
            }
        )
    degenerate = [w["name"] for w in window_info if w["degenerate"]]
    if degenerate:
        _warn(
            f"{len(degenerate)} window(s) hold fewer than two distinct b*w values ({degenerate[:5]}"
            f"{'...' if len(degenerate) > 5 else ''}): no sample can be ranked there, so every sample in them "
            "is kept (vote 1).",
            warn_list,
        )
    keep_prob, info = aggregate_votes(votes, aggregate, seed=seed, collected_warnings=warn_list)
    accuracies = info["estimated_accuracies"]
    for j, w in enumerate(window_info):
        w["estimated_accuracy"] = None if accuracies is None else accuracies[j]
    keep = keep_prob >= 0.5

    table = pa.table(
        {
            "sample_id": windowed.sample_ids,
            "mean_mimic_score": pa.array(windowed.mean_score, type=pa.float64()),
            "mean_weight": pa.array(windowed.mean_weight, type=pa.float64()),
            "n_records": pa.array(windowed.n_records, type=pa.int32()),
            "votes": _list_column(votes, pa.int8()),
            "window_values": _list_column(values, pa.float32()),
            "window_scores": _list_column(windowed.scores, pa.float32()),
            "keep_prob": pa.array(np.asarray(keep_prob, dtype=np.float64)),
            "keep": pa.array(keep),
        }
    )
    finite_scores = windowed.mean_score[~np.isnan(windowed.mean_score)]
    summary = {
        "n_samples": int(n),
        "n_records": int(windowed.total_records),
        "n_windows": int(m),
        "retained_fraction": float(keep.mean()),
        "mean_mimic_score": float(finite_scores.mean()) if finite_scores.size else float("nan"),
        "n_nan_scores": int(windowed.n_nan_scores),
        "window_names": list(windowed.window_names),
        "thresholds": [w["threshold"] for w in window_info],
        "estimated_accuracies": accuracies,
        "degenerate_windows": degenerate,
        "windows": window_info,
        "aggregate_used": info["aggregate_used"],
        "label_model": info.get("label_model"),
        "settings": {
            "method": method,
            "aggregate": aggregate,
            "windows": windows if isinstance(windows, str) else int(windows),
            "threshold": (1.0 if threshold is None else float(threshold)) if method == "threshold" else threshold,
            "topk": float(topk),
            "seed": int(seed),
        },
        "warnings": warn_list,
    }
    return MimicFilter(table=table, summary=_jsonable(summary))


def build_filter(
    scores: ScoresLike,
    method: str = "gmm",
    aggregate: str = "snorkel",
    windows: WindowsLike = "epoch",
    *,
    threshold: float | None = None,
    topk: float = 50,
    seed: int = 0,
) -> "MimicFilter":
    """Build Grad-Mimic's Stage-2 ensemble filter from a score log.

    Args:
        scores: the score log: an ``output_dir`` (or its ``mimic_scores/`` folder), the
            `datasets.Dataset` that `load_scores` returns, a `pyarrow.Table` or a `pandas.DataFrame`
            with the score-log columns. Records flagged ``repeated`` are dropped.
        method: per-window identification, one of ``"threshold"``, ``"kmeans"``, ``"gmm"``, ``"topk"``.
        aggregate: vote aggregation, one of ``"snorkel"``, ``"majority"``, ``"all"``, ``"any"``.
        windows: the labeling functions: ``"epoch"`` (one per epoch), ``"step"`` (one per optimizer
            step) or an int ``N`` (``N`` equal windows of consecutive global steps). Epoch windows
            use ``ceil(epoch) - 1`` (with a tolerance for float rounding), because a record's
            ``epoch`` is the fractional epoch *after* its step: the last step of the first epoch
            has ``epoch == 1.0`` and belongs to window ``epoch_0``, which ``floor`` would get wrong.
        threshold: for ``method="threshold"``: keep when ``b * w > threshold`` (default 1.0, i.e. ``w > 1/b``).
        topk: for ``method="topk"``: the percentage of each window's samples to keep (default 50).
        seed: the LabelModel's seed.

    Returns:
        A `MimicFilter`: ``table`` has one row per sample (sorted by ``sample_id``) with its mean
        mimic score, mean ``b * w``, per-window votes / values / scores, ``keep_prob`` and ``keep``;
        ``summary`` has the retained fraction, per-window thresholds and estimated accuracies,
        degenerate windows and the settings used.

    Example:
        >>> mimic_filter = build_filter("outputs/run1", method="gmm", aggregate="snorkel")
        >>> clean_train = mimic_filter.apply(train_dataset)
    """
    _check_settings(method, aggregate, threshold, topk)
    _check_windows(windows)
    if threshold is not None and method != "threshold":
        warnings.warn(f"threshold={threshold} is only used by method='threshold' (method={method!r}).", FilterWarning, stacklevel=2)
    windowed = collect_windows(scores, windows)
    return _decide(
        windowed, method=method, aggregate=aggregate, windows=windows, threshold=threshold, topk=topk, seed=seed
    )


@dataclass
class MimicFilter:
    """The result of `build_filter`: a per-sample table and a summary.

    Attributes:
        table: a `pyarrow.Table`, one row per sample sorted by ``sample_id``, with columns
            ``sample_id``, ``mean_mimic_score`` (NaN scores left out), ``mean_weight`` (mean ``b * w``),
            ``n_records``, ``votes`` (list<int8>, one entry per window: -1 abstain, 0 discard, 1 keep),
            ``window_values`` / ``window_scores`` (list<float32>: the sample's mean ``b * w`` / mimic
            score in each window, NaN where it abstains), ``keep_prob`` and ``keep``.
        summary: a JSON-able dict (see `build_filter`).
    """

    table: pa.Table
    summary: dict[str, Any]

    # -- accessors ---------------------------------------------------------------------------

    @property
    def sample_ids(self) -> np.ndarray:
        return self.table.column("sample_id").to_numpy()

    @property
    def keep(self) -> np.ndarray:
        return self.table.column("keep").to_numpy()

    @property
    def keep_prob(self) -> np.ndarray:
        return self.table.column("keep_prob").to_numpy()

    @property
    def kept_ids(self) -> np.ndarray:
        """The ids of the samples the filter keeps."""
        return self.sample_ids[self.keep]

    @property
    def n_windows(self) -> int:
        return int(self.summary["n_windows"])

    def votes(self) -> np.ndarray:
        """The ``n x m`` vote matrix (int8; -1 abstain, 0 discard, 1 keep)."""
        return _matrix(self.table.column("votes"), self.n_windows, np.int8)

    def window_values(self) -> np.ndarray:
        """The ``n x m`` matrix of mean ``b * w`` per window (NaN where the sample abstains)."""
        return _matrix(self.table.column("window_values"), self.n_windows, np.float32)

    def window_scores(self) -> np.ndarray:
        """The ``n x m`` matrix of mean mimic scores per window (NaN where the sample abstains)."""
        return _matrix(self.table.column("window_scores"), self.n_windows, np.float32)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"MimicFilter(n_samples={s['n_samples']}, n_windows={s['n_windows']}, "
            f"retained_fraction={s['retained_fraction']:.4f}, method={s['settings']['method']!r}, "
            f"aggregate={s['aggregate_used']!r})"
        )

    # -- re-deciding without re-reading the log ---------------------------------------------------

    def rebuild(
        self,
        method: str | None = None,
        aggregate: str | None = None,
        *,
        threshold: float | None = None,
        topk: float | None = None,
        seed: int | None = None,
    ) -> "MimicFilter":
        """A new filter from the same per-window values with other settings (the log is not re-read).

        Gives the same result as `build_filter` on the original scores with those settings,
        because identification only uses the per-window means stored in ``table``.
        """
        settings = self.summary["settings"]
        method = settings["method"] if method is None else method
        aggregate = settings["aggregate"] if aggregate is None else aggregate
        topk = settings["topk"] if topk is None else topk
        seed = settings["seed"] if seed is None else seed
        if threshold is None and method == settings["method"]:
            threshold = settings["threshold"]
        _check_settings(method, aggregate, threshold, topk)
        windowed = WindowedScores(
            sample_ids=self.table.column("sample_id").combine_chunks(),
            values=self.window_values(),
            scores=self.window_scores(),
            mean_weight=self.table.column("mean_weight").to_numpy(),
            mean_score=self.table.column("mean_mimic_score").to_numpy(),
            n_records=self.table.column("n_records").to_numpy(),
            window_names=list(self.summary["window_names"]),
            window_steps=[(w["first_step"], w["last_step"]) for w in self.summary["windows"]],
            total_records=self.summary["n_records"],
            n_nan_scores=self.summary["n_nan_scores"],
        )
        return _decide(
            windowed,
            method=method,
            aggregate=aggregate,
            windows=settings["windows"],
            threshold=threshold,
            topk=topk,
            seed=seed,
        )

    # -- persistence -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``filter.parquet`` and ``summary.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / TABLE_FILENAME, lambda tmp: pq.write_table(self.table, tmp))

        def write_summary(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(self.summary, handle, indent=2, allow_nan=False)

        _atomic_write(directory / SUMMARY_FILENAME, write_summary)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MimicFilter":
        """Read a filter written by `save`."""
        directory = Path(directory)
        table_path, summary_path = directory / TABLE_FILENAME, directory / SUMMARY_FILENAME
        for path in (table_path, summary_path):
            if not path.is_file():
                raise FileNotFoundError(f"No saved MimicFilter at {directory}: {path.name} is missing.")
        with open(summary_path, encoding="utf-8") as handle:
            summary = json.load(handle)
        return cls(table=pq.read_table(table_path), summary=summary)

    def to_dataset(self) -> "datasets.Dataset":  # noqa: F821
        """The per-sample table as a `datasets.Dataset`."""
        import datasets

        return datasets.Dataset(self.table)

    # -- using the filter ------------------------------------------------------------------------

    def positions(self, dataset: Any, id_column: str | None = None) -> np.ndarray:
        """Row position in ``dataset`` of every sample of the filter (in table order).

        Raises ValueError when a scored sample is not in the dataset or a dataset row was never scored.
        """
        ids = self.table.column("sample_id").combine_chunks()
        n_rows = _num_rows(dataset)
        if id_column is None:
            if not pa.types.is_integer(ids.type):
                raise ValueError(
                    f"The filter's sample ids are {ids.type}, not row indices: pass id_column= to match them."
                )
            positions = ids.to_numpy()
            outside = (positions < 0) | (positions >= n_rows)
            if outside.any():
                raise ValueError(
                    f"{int(outside.sum())} sample id(s) in the scores are not row indices of the dataset "
                    f"({n_rows} rows), e.g. {positions[outside][:5].tolist()}; was the score log written for "
                    "another dataset, or should id_column= be set?"
                )
            if positions.size != n_rows:  # ids are unique, so only a count mismatch can leave rows unscored
                scored = np.zeros(n_rows, dtype=bool)
                scored[positions] = True
                unscored = np.flatnonzero(~scored)
                raise ValueError(
                    f"{unscored.size} row(s) of the dataset have no score (e.g. rows {unscored[:5].tolist()}); "
                    "the filter can only decide about samples that were trained on."
                )
            return positions
        dataset_ids = _column(dataset, id_column)
        if dataset_ids.null_count:
            raise ValueError(f"Column {id_column!r} of the dataset holds null ids.")
        try:
            dataset_ids = dataset_ids.cast(ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(
                f"Column {id_column!r} ({dataset_ids.type}) cannot be matched with the score log's sample_id ({ids.type})."
            ) from error
        if pc.count_distinct(dataset_ids).as_py() != len(dataset_ids):
            raise ValueError(f"Column {id_column!r} of the dataset holds duplicate ids.")
        positions = pc.index_in(ids, value_set=dataset_ids)
        if positions.null_count:
            missing = ids.filter(pc.is_null(positions))
            raise ValueError(
                f"{len(missing)} sample id(s) in the scores are not in the dataset's {id_column!r} column, "
                f"e.g. {missing[:5].to_pylist()}."
            )
        if len(ids) != len(dataset_ids):
            unscored = dataset_ids.filter(pc.invert(pc.is_in(dataset_ids, value_set=ids)))
            raise ValueError(
                f"{len(unscored)} row(s) of the dataset have no score (e.g. {id_column}={unscored[:5].to_pylist()}); "
                "the filter can only decide about samples that were trained on."
            )
        return positions.to_numpy()

    def apply(self, dataset: Any, id_column: str | None = None) -> Any:
        """Return the rows of ``dataset`` that the filter keeps (the dataset itself is not modified).

        Args:
            dataset: a `datasets.Dataset`, `pandas.DataFrame` or `pyarrow.Table` holding exactly the
                scored samples.
            id_column: the column holding the sample ids the trainer recorded (``mimic_id_column``);
                None when the ids are row indices.

        Returns:
            The same type as ``dataset``, with the kept rows in their original order.
        """
        positions = self.positions(dataset, id_column)
        rows = np.sort(positions[self.keep])
        if type(dataset).__module__.startswith("pandas"):
            return dataset.iloc[rows]
        if isinstance(dataset, pa.Table):
            return dataset.take(pa.array(rows))
        return dataset.select(rows)

    def evaluate(
        self,
        clean_flags: Any,
        id_column: str | None = None,
        *,
        dataset: Any = None,
    ) -> dict[str, float]:
        """Audit the filter against ground-truth clean flags with `compute_filter_metrics`.

        Args:
            clean_flags: either an array of clean flags (1 = clean, 0 = noisy) aligned with the
                filter's samples (``table["sample_id"]`` order, i.e. sorted ids), or the name of a
                column of ``dataset``.
            id_column: with a ``dataset``: the column holding the sample ids (None: row indices).
            dataset: the dataset holding the ``clean_flags`` column.

        Returns:
            ``discard_precision``, ``discard_recall``, ``discard_f1``, ``retained_fraction``,
            ``keep_roc_auc`` and ``keep_average_precision``.
        """
        from .metrics import compute_filter_metrics

        if isinstance(clean_flags, str):
            if dataset is None:
                raise ValueError(f"clean_flags={clean_flags!r} names a column: pass dataset= too.")
            positions = self.positions(dataset, id_column)
            clean = _column(dataset, clean_flags).to_numpy(zero_copy_only=False)[positions]
        else:
            if dataset is not None:
                positions = self.positions(dataset, id_column)
                clean = np.asarray(clean_flags)
                if clean.shape[0] != _num_rows(dataset):
                    raise ValueError("clean_flags must have one entry per dataset row when dataset= is given.")
                clean = clean[positions]
            else:
                clean = np.asarray(clean_flags)
                if clean.shape != (self.table.num_rows,):
                    raise ValueError(
                        f"clean_flags has shape {clean.shape}, expected ({self.table.num_rows},): one flag per "
                        "sample of the filter, in table['sample_id'] order (or pass a column name with dataset=)."
                    )
        return compute_filter_metrics(self.keep, clean, keep_prob=self.keep_prob)


def _num_rows(dataset: Any) -> int:
    if isinstance(dataset, pa.Table):
        return dataset.num_rows
    return len(dataset)


def _column(dataset: Any, name: str) -> pa.Array:
    if isinstance(dataset, pa.Table):
        column = dataset.column(name)
    elif type(dataset).__module__.startswith("pandas"):
        column = pa.array(dataset[name].to_numpy()) if name in dataset.columns else None
        if column is None:
            raise KeyError(f"The dataset has no column {name!r}.")
        return column
    else:
        if name not in dataset.column_names:
            raise KeyError(f"The dataset has no column {name!r}; columns: {dataset.column_names}.")
        column = dataset.with_format("arrow")[name]
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def estimate_quality(scores_or_filter: ScoresLike | MimicFilter, **build_kwargs: Any) -> dict[str, float]:
    """The two dataset-quality estimators of the paper (Section 5.1).

    - ``retained_fraction``: ``|{i : keep_i}| / n``, the share of samples the ensemble filter keeps;
    - ``mean_mimic_score``: ``(1/n) sum_i m_i``, the mean over samples of each sample's mean mimic
      score over its records (samples whose scores are all NaN are left out).

    Args:
        scores_or_filter: a `MimicFilter`, or anything `build_filter` accepts (the filter is then
            built with ``build_kwargs``).
    """
    mimic_filter = (
        scores_or_filter if isinstance(scores_or_filter, MimicFilter) else build_filter(scores_or_filter, **build_kwargs)
    )
    summary = mimic_filter.summary
    mean_score = summary["mean_mimic_score"]
    return {
        "retained_fraction": float(summary["retained_fraction"]),
        "mean_mimic_score": float("nan") if mean_score is None else float(mean_score),
        "n_samples": int(summary["n_samples"]),
    }
