"""The keep posterior of Stage 2: a two-class mixture over continuous signals and votes, fit without labels.

Each sample is clean ("keep") or not, a latent class ``c``. Given it, the sample's continuous signals (oriented
so that higher means keep: e.g. minus the log of the reweighted student's mean loss, minus the log of the
reference's loss) follow a multivariate Student t with a full scale matrix of their own (the signals are
correlated, and a naive product would count the same evidence twice) and `DEFAULT_DEGREES_OF_FREEDOM` degrees of
freedom: the robust mixture of Peel and McLachlan (Statistics and Computing, 2000). Margins in logits are heavy-tailed (a
flipped sample of a well-separated class sits far below zero), and Gaussian classes let that tail drag the
discard class's mean away from the boundary, or turn the discard class into a wide one that also claims the
clearest samples; in a t each sample's weight in the fit falls as its distance grows. Each vote source (a
labeling function's keep/discard column: the mimic windows of Huang et al., arXiv 2501.06708, a reference's
agreement) votes keep with its own probability ``a_jc``, independently of the signals, abstaining at random. It
is the latent-class model of Dawid and Skene (1979) with continuous features beside the votes; with votes only it
is the model Snorkel's LabelModel (Ratner et al. 2017) approximates, and with one signal and
``degrees_of_freedom=math.inf`` it is DivideMix's 2-component GMM on the loss (Li et al., ICLR 2020). EM
(Dempster et al. 1977) fits it, the t through its scale-mixture form (each sample weighted by ``(nu + p) / (nu +
distance)``); ``P(keep | signals, votes)`` is the filter's ``keep_prob``, and a sample is kept when it is at least
0.5. The ranking is its log-odds, ``keep_log_odds``: it ties only where the evidence ties, whereas ``keep_prob``
rounds to exactly 1.0 in float64 beyond log-odds of about 37, which the clearest samples of a well-separated pool
reach.

Missing values are marginalised: a sample's likelihood uses the signals and votes it has. The keep class is the
component with the higher mean on the first signal (or, without signals, the higher keep-vote rate). At scale
the parameters are fit on a seeded random subset of `FIT_ROWS` samples and the posterior computed in chunks, so
memory is the result plus a chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..progress import progress_bar
from .aggregation import ABSTAIN, KEEP

__all__ = ["DEFAULT_DEGREES_OF_FREEDOM", "FIT_ROWS", "MixtureFit", "check_degrees_of_freedom", "keep_posterior"]

# Chosen on the realistic suite's saved runs with the default signals, from 3, 4, 5, 7, 10, 30 and the Gaussian
# (`scripts/stage2_search.py`, its "default, t ... dof" candidates): 3 to 7 score alike on digits and BBC, the small
# breast-cancer pools gain the most at 3 to 5, the held-out penguins lose a little at every finite value;
# docs/results.md has the figures of this default.
DEFAULT_DEGREES_OF_FREEDOM = 4.0
"""The Student t's degrees of freedom of each class's signals in the keep posterior (``math.inf``: Gaussian)."""

FIT_ROWS = 500_000
"""Samples the mixture's parameters are fit on (a seeded random subset beyond that); the posterior covers all."""

_CHUNK = 1 << 20
_REG = 1e-6  # covariance ridge, relative to each signal's variance
_ITERATION_BUDGET = 150_000_000  # EM's sample-iterations: 300 iterations at FIT_ROWS, more on fewer samples
_MAX_ITER = (300, 20_000)  # the fewest and the most iterations allowed, whatever the samples
_TOL = 1e-9  # on the mean log-likelihood per sample: its distance from the limit (`_aitken_gap`)


def check_degrees_of_freedom(degrees_of_freedom: float, name: str = "degrees_of_freedom") -> None:
    """Refuse degrees of freedom that are not a positive number (``math.inf`` is allowed: Gaussian classes)."""
    if isinstance(degrees_of_freedom, bool) or not isinstance(
        degrees_of_freedom, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{name} must be a positive number (math.inf: Gaussian classes); got {degrees_of_freedom!r}.")
    if not degrees_of_freedom > 0:  # NaN fails too
        raise ValueError(f"{name} must be positive (math.inf: Gaussian classes); got {degrees_of_freedom!r}.")


@dataclass
class MixtureFit:
    """The fitted mixture and the posterior it gives.

    ``keep_prob``: ``P(keep)`` per sample, the logistic of ``keep_log_odds``, ``log P(keep) - log P(discard)`` (the
    ranking: no rounding to 1.0 where the evidence grows). ``keep_fraction``: the prior of the keep class. ``means``
    and ``scales``: each class's location and scale matrix (keep first) over the signals, of a t with
    ``degrees_of_freedom`` (`covariances`: the covariances they imply). ``vote_keep_rates``: ``P(vote = keep |
    class)`` per vote column (``columns x 2``, keep first); a source's accuracy is ``rate_keep * prior + (1 -
    rate_discard) * (1 - prior)``. ``iterations``, ``converged`` and ``log_likelihood`` (mean per fitted sample)
    describe EM.
    """

    keep_prob: np.ndarray
    keep_log_odds: np.ndarray
    keep_fraction: float
    means: np.ndarray
    scales: np.ndarray
    degrees_of_freedom: float
    vote_keep_rates: np.ndarray
    iterations: int
    converged: bool
    log_likelihood: float

    @property
    def covariances(self) -> np.ndarray:
        """Each class's covariance over the signals (keep first): ``scales * nu / (nu - 2)``, the scales themselves
        for Gaussians (``nu = inf``), infinite for ``nu <= 2``."""
        nu = self.degrees_of_freedom
        if math.isinf(nu):
            return self.scales
        if nu <= 2:
            return np.full_like(self.scales, math.inf)
        return self.scales * (nu / (nu - 2))

    def summary(self) -> dict[str, Any]:
        """JSON-ready parameters for the filter's summary."""
        prior = self.keep_fraction
        accuracy = self.vote_keep_rates[:, 0] * prior + (1 - self.vote_keep_rates[:, 1]) * (1 - prior)
        return {
            "keep_fraction": prior,
            "signal_means": self.means.tolist(),
            "signal_std": np.sqrt(np.diagonal(self.covariances, axis1=1, axis2=2)).tolist(),
            "signal_scale": np.sqrt(np.diagonal(self.scales, axis1=1, axis2=2)).tolist(),
            "degrees_of_freedom": self.degrees_of_freedom,
            "vote_keep_rates": self.vote_keep_rates.tolist(),
            "vote_accuracies": accuracy.tolist(),
            "iterations": self.iterations,
            "converged": self.converged,
            "log_likelihood": self.log_likelihood,
        }


def keep_posterior(
    signals: np.ndarray | None,
    votes: np.ndarray | None,
    *,
    seed: int = 0,
    fit_rows: int = FIT_ROWS,
    degrees_of_freedom: float = DEFAULT_DEGREES_OF_FREEDOM,
) -> MixtureFit:
    """Fit the two-class mixture to ``signals`` (``n x d`` float32 or float64, NaN missing, higher = keep) and ``votes``
    (``n x k`` int8: -1 abstain, 0 discard, 1 keep) and return ``P(keep)`` per sample.

    Either may be None (or have no column). Every sample needs at least one finite signal or one vote. A signal
    column without any finite value (a source that abstains everywhere) is left out, as are vote columns that
    only abstain; ``means`` and ``scales`` describe the signal columns kept, and ``vote_keep_rates`` is NaN
    for a vote column left out. ``degrees_of_freedom``: of each class's Student t (``math.inf``: Gaussian classes).
    """
    check_degrees_of_freedom(degrees_of_freedom)
    signals = np.zeros((_rows(signals, votes), 0)) if signals is None else _floating(signals)
    usable = np.isfinite(signals).any(axis=0)
    if not usable.all():  # a copy only when a column is left out
        signals = signals[:, usable]
    votes = np.zeros((signals.shape[0], 0), dtype=np.int8) if votes is None else np.asarray(votes)
    voting = (votes != ABSTAIN).any(axis=0)
    if not voting.all():
        votes = votes[:, voting]
    n = signals.shape[0]
    if votes.shape[0] != n:
        raise ValueError(f"{n} rows of signals but {votes.shape[0]} rows of votes.")
    if signals.shape[1] == 0 and votes.shape[1] == 0:
        raise ValueError("The keep posterior needs at least one signal or one vote column.")
    evidence = np.isfinite(signals).any(axis=1) | (votes != ABSTAIN).any(axis=1)
    if not evidence.all():
        raise ValueError(
            f"{int((~evidence).sum())} sample(s) have neither a finite signal nor a vote (first rows: "
            f"{np.flatnonzero(~evidence)[:5].tolist()}); every sample needs some evidence."
        )
    if n < 2:
        raise ValueError(
            f"The keep posterior tells two classes of samples apart and needs at least 2 samples with a signal or a "
            f"vote; {n} of the log's samples has one. Nothing can be filtered on one sample: keep it, or build the "
            "paper's filter (`labeling_functions=['mimic'], method='gmm', aggregate='snorkel'`), which keeps it."
        )
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, size=fit_rows, replace=False)) if n > fit_rows else slice(None)
    params, iterations, converged, log_likelihood = _em(
        signals[fit].astype(np.float64), votes[fit], seed, float(degrees_of_freedom)
    )
    from scipy.special import expit

    keep_log_odds = np.empty(n, dtype=np.float64)
    keep_prob = np.empty(n, dtype=np.float64)
    for start in progress_bar(range(0, n, _CHUNK), desc="Keep posterior", unit="chunk"):
        part = slice(start, min(n, start + _CHUNK))
        chunk = signals[part].astype(np.float64)
        log_joint, _ = _log_joint(params, chunk, votes[part], _missing_patterns(chunk))
        np.subtract(log_joint[:, 0], log_joint[:, 1], out=keep_log_odds[part])
        expit(keep_log_odds[part], out=keep_prob[part])
    rates = np.full((voting.size, 2), np.nan)
    rates[voting] = params.rates
    return MixtureFit(
        keep_prob,
        keep_log_odds,
        float(params.prior[0]),
        params.means,
        params.scales,
        params.degrees_of_freedom,
        rates,
        iterations,
        converged,
        log_likelihood,
    )


# ----------------------------------------------------------------------------------------------


@dataclass
class _Params:
    prior: np.ndarray  # [2]: keep, discard
    means: np.ndarray  # [2, d]
    scales: np.ndarray  # [2, d, d]
    rates: np.ndarray  # [k, 2]: P(vote = keep | class)
    degrees_of_freedom: float


def _floating(signals: Any) -> np.ndarray:
    """``signals`` as a float array without a copy when it is one already (float32 labeling-function values are
    widened to float64 a chunk at a time, not whole); float64 otherwise."""
    signals = np.asarray(signals)
    return signals if signals.dtype in (np.float32, np.float64) else signals.astype(np.float64)


def _rows(signals: Any, votes: Any) -> int:
    if votes is None:
        raise ValueError("The keep posterior needs signals or votes.")
    return np.asarray(votes).shape[0]


def _em(
    signals: np.ndarray, votes: np.ndarray, seed: int, degrees_of_freedom: float
) -> tuple[_Params, int, bool, float]:
    responsibility = _initial_responsibilities(signals, votes, seed)
    sample_weight = np.ones_like(responsibility)  # the first M-step fits Gaussians to the initial split
    patterns = _missing_patterns(signals)  # once: grouping the rows is most of an E-step's cost
    history = [-math.inf, -math.inf]  # the two log-likelihoods before the last
    log_likelihood = -math.inf
    converged = False
    iterations = 0
    params = None
    # Overlapping classes converge slowly (a flat likelihood): stopped at 300 iterations on 3,000 samples, the fit
    # was far from scikit-learn's GaussianMixture (156 keep decisions differed). EM is cheap on few samples.
    max_iter = min(max(_ITERATION_BUDGET // max(len(signals), 1), _MAX_ITER[0]), _MAX_ITER[1])
    for iterations in range(1, max_iter + 1):  # noqa: B007 (returned: the iterations run)
        params = _m_step(signals, votes, responsibility, sample_weight, degrees_of_freedom, params, patterns)
        responsibility, sample_weight, log_likelihood = _e_step(params, signals, votes, patterns)
        if _aitken_gap(*history, log_likelihood) < _TOL * max(1.0, abs(log_likelihood)):
            converged = True
            break
        history = [history[1], log_likelihood]
    params = _oriented(params, signals, votes)
    return params, iterations, converged, log_likelihood


def _aitken_gap(before: float, previous: float, current: float) -> float:
    """How far the log-likelihood still is from its limit, by Aitken's acceleration (McLachlan and Krishnan, The EM
    Algorithm and Extensions, 2008, Section 4.9): EM's increments shrink by a rate ``a``, so the limit is about
    ``current + (current − previous) · a / (1 − a)``. The last increment alone says "converged" far too early where
    EM crawls (overlapping classes, ``a`` near 1)."""
    step = current - previous
    if not math.isfinite(before) or not math.isfinite(step):
        return math.inf
    rate = step / (previous - before) if previous != before else 0.0
    if not 0.0 <= rate < 1.0:  # not (yet) a shrinking sequence: the increment itself
        return abs(step)
    return abs(step) / (1.0 - rate)


def _initial_responsibilities(signals: np.ndarray, votes: np.ndarray, seed: int) -> np.ndarray:
    """Start from a 1-D 2-component GMM on the mean standardised signal (DivideMix's split), or on the vote
    average when there is no signal: EM then refines it with every signal and vote."""
    from sklearn.mixture import GaussianMixture

    if signals.shape[1]:
        spread = np.nanstd(signals, axis=0)
        standard = (signals - np.nanmean(signals, axis=0)) / np.where(spread > 0, spread, 1.0)
        summary = np.nanmean(np.where(np.isfinite(standard), standard, np.nan), axis=1)
    else:
        summary = np.full(votes.shape[0], np.nan)
    if votes.shape[1]:
        voted = votes != ABSTAIN
        vote_mean = np.where(voted.any(axis=1), (votes == KEEP).sum(axis=1) / np.maximum(voted.sum(axis=1), 1), np.nan)
        summary = np.where(np.isfinite(summary), summary, vote_mean - 0.5)
    gmm = GaussianMixture(n_components=2, reg_covar=1e-4, random_state=seed).fit(summary[:, None])
    high = int(np.argmax(gmm.means_.ravel()))
    keep = gmm.predict_proba(summary[:, None])[:, high]
    keep = np.clip(keep, 1e-3, 1 - 1e-3)
    return np.stack([keep, 1 - keep], axis=1)


def _m_step(
    signals: np.ndarray,
    votes: np.ndarray,
    responsibility: np.ndarray,
    sample_weight: np.ndarray,
    degrees_of_freedom: float,
    previous: _Params | None = None,
    patterns: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> _Params:
    """Weighted maximum-likelihood parameters. Each class's location and scale: each sample counted by its
    responsibility times its t weight ``sample_weight`` in both, and by its responsibility alone in the scale's
    normaliser (Peel and McLachlan 2000; every t weight is 1 for Gaussians). A sample missing some signals takes part
    through their expectation given the signals it has under the ``previous`` parameters, and that expectation's
    covariance (the EM of Little and Rubin for missing values: `_expected_moments`); the first M-step of a log with
    missing values, without ``previous``, fits each signal alone on the samples that have it. The vote rates on each
    column's non-abstaining votes (Laplace-smoothed)."""
    prior = responsibility.mean(axis=0)
    d = signals.shape[1]
    observed = np.isfinite(signals)
    means = np.zeros((2, d))
    scales = np.zeros((2, d, d))
    if d:
        x = np.where(observed, signals, np.nan)
        variance = np.nanvar(x, axis=0) if len(x) > 1 else np.ones(d)
        variance = np.where(np.isfinite(variance) & (variance > 0), variance, 1.0)
        ridge = _REG * np.diag(variance) + 1e-12 * np.eye(d)
        if observed.all():
            for c in range(2):
                weight = responsibility[:, c] * sample_weight[:, c]
                means[c] = weight @ signals / max(weight.sum(), 1e-12)
                centred = signals - means[c]
                scales[c] = (centred * weight[:, None]).T @ centred / max(responsibility[:, c].sum(), 1e-12)
        elif previous is None:
            for c in range(2):
                weight = np.where(observed, (responsibility[:, c] * sample_weight[:, c])[:, None], 0.0)
                means[c] = np.nansum(weight * x, axis=0) / np.maximum(weight.sum(axis=0), 1e-12)
                spread = np.where(observed, np.square(x - means[c]), 0.0)
                counts = np.where(observed, responsibility[:, [c]], 0.0).sum(axis=0)
                scales[c] = np.diag((weight * spread).sum(axis=0) / np.maximum(counts, 1e-12))
        else:
            if patterns is None:
                patterns = _missing_patterns(signals)
            for c in range(2):
                means[c], scales[c] = _expected_moments(
                    signals, patterns, responsibility[:, c], sample_weight[:, c], previous.means[c], previous.scales[c]
                )
        scales += ridge
    k = votes.shape[1]
    rates = np.zeros((k, 2))
    for j in range(k):
        voted = votes[:, j] != ABSTAIN
        kept = votes[voted, j] == KEEP
        for c in range(2):
            w = responsibility[voted, c]
            rates[j, c] = (w @ kept + 1.0) / (w.sum() + 2.0)
    return _Params(prior, means, scales, rates, degrees_of_freedom)


def _expected_moments(
    signals: np.ndarray,
    patterns: list[tuple[np.ndarray, np.ndarray]],
    responsibility: np.ndarray,
    sample_weight: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One class's location and scale from samples with missing signals (Little and Rubin, "Statistical Analysis
    with Missing Data", ch. 11; for the t, Liu and Rubin 1995): a sample's missing block is replaced by its
    conditional mean ``μ_m + Σ_mo Σ_oo⁻¹ (x_o − μ_o)`` under ``mean`` and ``scale``, and the scale also takes the
    conditional covariance ``Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om``, counted by the responsibility alone (the t weight cancels
    in it). Samples with no signal (only votes) take no part."""
    d = signals.shape[1]
    parts, weights, counts = [], [], []
    conditional = np.zeros((d, d))
    for pattern, rows in patterns:
        known, missing = np.flatnonzero(pattern), np.flatnonzero(~pattern)
        x = np.empty((len(rows), d))
        x[:, known] = signals[np.ix_(rows, known)]
        if missing.size:
            gain = np.linalg.solve(scale[np.ix_(known, known)], scale[np.ix_(known, missing)]).T  # Σ_mo Σ_oo⁻¹
            x[:, missing] = mean[missing] + (x[:, known] - mean[known]) @ gain.T
            block = scale[np.ix_(missing, missing)] - gain @ scale[np.ix_(known, missing)]
            conditional[np.ix_(missing, missing)] += responsibility[rows].sum() * block
        parts.append(x)
        weights.append(responsibility[rows] * sample_weight[rows])
        counts.append(responsibility[rows])
    if not parts:  # no sample has a signal (votes only): nothing to fit, keep the class's parameters
        return mean, scale
    filled, weight, count = np.concatenate(parts), np.concatenate(weights), np.concatenate(counts)
    location = weight @ filled / max(weight.sum(), 1e-12)
    centred = filled - location
    spread = (centred * weight[:, None]).T @ centred + conditional
    return location, spread / max(count.sum(), 1e-12)


def _missing_patterns(signals: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of ``signals`` grouped by which signals they have: ``(observed mask, rows)`` per pattern that has
    at least one signal."""
    n, d = signals.shape
    if n == 0 or d == 0:
        return []
    observed = np.isfinite(signals)
    order = np.lexsort(observed.T)  # rows sorted by pattern; far faster than a unique over rows
    starts = np.flatnonzero(np.r_[True, (observed[order[1:]] != observed[order[:-1]]).any(axis=1)])
    return [(observed[rows[0]], rows) for rows in np.split(order, starts[1:]) if observed[rows[0]].any()]


def _log_joint(
    params: _Params, signals: np.ndarray, votes: np.ndarray, patterns: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """``log P(class, evidence)`` per sample, ``n x 2`` (keep first), and each sample's t weight per class;
    ``patterns``: `_missing_patterns` of ``signals``."""
    signal_log_likelihood, sample_weight = _signal_log_likelihood(params, signals, patterns)
    log_joint = np.log(np.maximum(params.prior, 1e-300))[None, :] + signal_log_likelihood
    return log_joint + _vote_log_likelihood(params, votes), sample_weight


def _e_step(
    params: _Params, signals: np.ndarray, votes: np.ndarray, patterns: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, float]:
    """``P(class | evidence)`` per sample (keep first), each sample's t weight per class, and the mean
    log-likelihood."""
    log_joint, sample_weight = _log_joint(params, signals, votes, patterns)
    top = log_joint.max(axis=1, keepdims=True)
    log_norm = top + np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True))
    return np.exp(log_joint - log_norm), sample_weight, float(log_norm.mean())


def _signal_log_likelihood(
    params: _Params, signals: np.ndarray, patterns: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """``log p(observed signals | class)``, ``n x 2``, and each sample's t weight per class, ``(nu + p) / (nu +
    distance)`` (1 for Gaussians), where ``distance`` is its squared Mahalanobis distance over its ``p`` observed
    signals. Each pattern of missing signals uses its marginal: a t with the same degrees of freedom and the
    observed signals' block of the scale matrix."""
    n = signals.shape[0]
    out = np.zeros((n, 2))
    sample_weight = np.ones((n, 2))
    nu = params.degrees_of_freedom
    for pattern, rows in patterns:
        x = signals[np.ix_(rows, np.flatnonzero(pattern))]
        observed_count = int(pattern.sum())
        for c in range(2):
            chol = np.linalg.cholesky(params.scales[c][np.ix_(pattern, pattern)])
            distance = np.square(np.linalg.solve(chol, (x - params.means[c, pattern]).T)).sum(axis=0)
            log_det = 2 * np.log(np.diagonal(chol)).sum()
            if math.isinf(nu):
                out[rows, c] = -0.5 * (distance + log_det + observed_count * math.log(2 * math.pi))
                continue
            out[rows, c] = (
                math.lgamma((nu + observed_count) / 2)
                - math.lgamma(nu / 2)
                - 0.5 * (observed_count * math.log(nu * math.pi) + log_det)
                - 0.5 * (nu + observed_count) * np.log1p(distance / nu)
            )
            sample_weight[rows, c] = (nu + observed_count) / (nu + distance)
    return out, sample_weight


def _vote_log_likelihood(params: _Params, votes: np.ndarray) -> np.ndarray:
    """``log P(votes | class)``, ``n x 2``; abstentions carry no information."""
    out = np.zeros((votes.shape[0], 2))
    for j in range(votes.shape[1]):
        column = votes[:, j]
        for c in range(2):
            rate = params.rates[j, c]
            out[:, c] += np.where(column == KEEP, math.log(rate), np.where(column == ABSTAIN, 0.0, math.log(1 - rate)))
    return out


def _oriented(params: _Params, signals: np.ndarray, votes: np.ndarray) -> _Params:
    """The keep class first: the higher mean on the first signal that has a value, else the higher keep-vote rate.
    Where the two are equal up to rounding (evidence that does not separate the samples, such as a constant
    signal), the larger class is the keep class: a filter that cannot tell the samples apart keeps them."""
    if signals.shape[1]:
        first, second = params.means[0, 0], params.means[1, 0]
        spread = math.sqrt(max(params.scales[0, 0, 0], params.scales[1, 0, 0]))
    else:
        first, second = params.rates[:, 0].mean(), params.rates[:, 1].mean()
        spread = 1.0
    tied = abs(first - second) <= 1e-9 * max(spread, abs(first), abs(second))
    swap = params.prior[0] < params.prior[1] if tied else first < second
    if not swap:
        return params
    return _Params(
        params.prior[::-1].copy(),
        params.means[::-1].copy(),
        params.scales[::-1].copy(),
        params.rates[:, ::-1].copy(),
        params.degrees_of_freedom,
    )
