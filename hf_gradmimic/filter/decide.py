"""The decide step: per-window values and signals -> votes -> ``P(keep)`` -> the filter's per-sample table and summary.

Identification runs window by window (each vectorised over its samples), aggregation over the
whole vote matrix, or, with ``aggregate="mixture"``, the keep posterior over the continuous signals
and the votes together (`hf_gradmimic.filter.posterior`); a sample is kept when ``P(keep) >= 0.5``
(Huang et al., arXiv 2501.06708, Section 4.2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..fileio import json_safe
from .aggregation import ABSTAIN, AGGREGATES, aggregate_votes
from .agreement import agreement_gate
from .identification import METHODS, identify
from .labeling import LabelingVotes
from .matrices import list_column
from .posterior import DEFAULT_DEGREES_OF_FREEDOM, check_degrees_of_freedom, keep_posterior
from .reduction import WindowedScores
from .rowblocks import matrix_column, row_blocks
from .signals import VALUE_DTYPE, LabelingScores, mean_over_windows
from .warning import warn
from .windows import WindowsLike

__all__ = ["check_settings", "decide", "log_odds"]


def check_settings(
    method: str,
    aggregate: str,
    threshold: float | None,
    topk: float,
    mixture_degrees_of_freedom: float = DEFAULT_DEGREES_OF_FREEDOM,
) -> None:
    """Refuse an unknown method or aggregate, a non-finite threshold, a topk outside (0, 100] or degrees of freedom
    of the mixture's classes that are not positive."""
    check_degrees_of_freedom(mixture_degrees_of_freedom, "mixture_degrees_of_freedom")
    if method not in METHODS:
        raise ValueError(f"Unknown identification method {method!r}; expected one of {METHODS}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"Unknown aggregate {aggregate!r}; expected one of {AGGREGATES}.")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
    if not (isinstance(topk, (int, float, np.integer, np.floating)) and 0 < float(topk) <= 100):
        raise ValueError(f"topk is a percentage in (0, 100], got {topk!r}.")


def decide(
    windowed: WindowedScores,
    *,
    method: str,
    aggregate: str,
    windows: WindowsLike,
    threshold: float | None,
    topk: float,
    seed: int,
    extra_votes: Sequence[LabelingVotes] = (),
    mimic_votes: bool = True,
    extra_scores: Sequence[LabelingScores] = (),
    discard_requires_disagreement: bool = True,
    mixture_degrees_of_freedom: float = DEFAULT_DEGREES_OF_FREEDOM,
) -> tuple[pa.Table, dict[str, Any]]:
    """Identification per window + aggregation, from the per-window values.

    ``extra_votes`` are the other labeling functions' votes (`hf_gradmimic.filter.labeling`), aggregated
    beside the mimic windows' and stored in the table's ``lf_votes`` column. With ``mimic_votes=False`` only they
    vote; the mimic windows' votes are still computed and stored (``votes``), for reading and for `rebuild`.
    ``extra_scores`` are the continuous labeling functions' values (`hf_gradmimic.filter.signals`), stored in
    ``lf_scores``: ``aggregate="mixture"`` reads them as they are; a vote aggregate cuts each column into votes
    by a 2-component GMM first.

    With ``aggregate="mixture"`` and ``discard_requires_disagreement``, a sample whose student predicts its given
    label (a mean margin of at least 0, when the log records the margin) is kept (`hf_gradmimic.filter.agreement`).
    ``mixture_degrees_of_freedom``: of the mixture's Student t classes (`hf_gradmimic.filter.posterior`).

    Returns ``(table, summary)``, the two halves of a `MimicFilter` (see its docstring).
    """
    warn_list = list(windowed.warnings)
    votes, window_info = _vote_per_window(windowed, method, threshold=threshold, topk=topk)
    degenerate = [w["name"] for w in window_info if w["degenerate"]]
    if degenerate:
        warn(
            f"{len(degenerate)} window(s) hold fewer than two distinct b*w values ({degenerate[:5]}"
            f"{'...' if len(degenerate) > 5 else ''}): no sample can be ranked there, so every sample in them "
            "is kept (vote 1).",
            warn_list,
        )
    lf_votes = np.hstack([lf.votes for lf in extra_votes]) if extra_votes else None
    # A continuous function that abstains everywhere (its column is not in the log: it warned) carries nothing.
    given = [lf.name for lf in extra_votes] + [lf.name for lf in extra_scores]
    extra_scores = [lf for lf in extra_scores if np.isfinite(lf.values).any()]
    lf_scores = np.hstack([lf.values for lf in extra_scores]) if extra_scores else None
    column = 0
    for lf in extra_scores:  # each function's values become a view of its columns: one copy in memory, not two
        lf.values = lf_scores[:, column : column + lf.values.shape[1]]
        column += lf.values.shape[1]
    if not mimic_votes and lf_votes is None and lf_scores is None:
        raise ValueError(
            f"Every labeling function abstains on every sample ({given or 'none given'}): the score log holds none of "
            "their columns (the filter's warnings say which), so there is nothing to filter on. Pass "
            "labeling_functions=['mimic'] (the windows' votes of b * w, which every log has) or a source the log has."
        )
    voting = [v for v in (votes if mimic_votes else None, lf_votes) if v is not None]
    score_votes = None
    if lf_scores is not None and aggregate != "mixture":
        score_votes = _votes_from_scores(lf_scores)
        voting.append(score_votes)
    all_votes = np.hstack(voting) if voting else np.zeros((votes.shape[0], 0), dtype=np.int8)
    student_margin = _student_margin(windowed)  # the agreement gate's input, and a column of the table
    gate_margins = _reference_margins(extra_scores)
    keep_prob, keep_log_odds, keep, info, status_counts = _aggregate_with_status(
        windowed,
        all_votes,
        lf_scores if aggregate == "mixture" else None,
        functools.partial(
            _keep_prob,
            aggregate=aggregate,
            seed=seed,
            degrees_of_freedom=mixture_degrees_of_freedom,
            warn_list=warn_list,
        ),
        warn_list,
        [lf.name for lf in extra_votes] + [lf.name for lf in extra_scores] + ["mimic"] * mimic_votes,
        student_margin if aggregate == "mixture" and discard_requires_disagreement else None,
        gate_margins,
    )
    all_accuracies = info["estimated_accuracies"]
    offset = votes.shape[1] if mimic_votes else 0
    accuracies = None if all_accuracies is None or not mimic_votes else all_accuracies[:offset]
    for j, w in enumerate(window_info):
        w["estimated_accuracy"] = None if accuracies is None else accuracies[j]
    if not keep.any():
        warn(
            f"The filter keeps no sample (of {keep.size}): every labeling function votes mostly discard "
            f"({aggregate!r} over {all_votes.shape[1]} vote column(s)). The split cannot tell two groups apart here "
            "(a short run, or a skewed per-window distribution); look at the windows' kept fractions in the summary, "
            "and try method='gmm' or 'threshold', or fewer windows.",
            warn_list,
        )
    table = _filter_table(windowed, votes, keep_prob, keep_log_odds, keep)
    if student_margin is not None:  # what the agreement gate read, for `MimicFilter.rebuild`
        table = table.append_column("student_margin", _float_column(student_margin))
    if lf_votes is not None:
        table = table.append_column("lf_votes", list_column(lf_votes, pa.int8()))
    if lf_scores is not None:
        table = table.append_column(
            "lf_scores", list_column(lf_scores, pa.from_numpy_dtype(VALUE_DTYPE), nan_as_null=True)
        )
    mean_mimic_score = _nan_mean(windowed.mean_score)
    summary = {
        "n_samples": int(votes.shape[0]),
        **status_counts,
        "n_records": int(windowed.total_records),
        "n_windows": int(votes.shape[1]),
        "retained_fraction": float(keep.mean()),
        "mean_mimic_score": mean_mimic_score,
        "n_nan_scores": int(windowed.n_nan_scores),
        "window_names": list(windowed.window_names),
        "thresholds": [w["threshold"] for w in window_info],
        "estimated_accuracies": accuracies,
        "degenerate_windows": degenerate,
        "windows": window_info,
        "aggregate_used": info["aggregate_used"],
        "label_model": info.get("label_model"),
        "mixture": info.get("mixture"),
        "agreement_gate": info.get("agreement_gate"),
        "labeling_functions": _labeling_summary(extra_votes, all_accuracies, offset)
        + _scores_summary(
            extra_scores,
            lf_scores,
            all_accuracies,
            all_votes.shape[1] - (0 if score_votes is None else score_votes.shape[1]),
        ),
        "settings": {
            "method": method,
            "aggregate": aggregate,
            "windows": windows if isinstance(windows, str) else int(windows),
            "threshold": (1.0 if threshold is None else float(threshold)) if method == "threshold" else threshold,
            "topk": float(topk),
            "seed": int(seed),
            "labeling_functions": ["mimic"] * mimic_votes
            + [lf.name for lf in extra_votes]
            + [lf.name for lf in extra_scores],
            "discard_requires_disagreement": bool(discard_requires_disagreement),
            # json_safe writes an infinite value (Gaussian classes) as None
            "mixture_degrees_of_freedom": float(mixture_degrees_of_freedom),
        },
        "warnings": warn_list,
    }
    return table, json_safe(summary)


def _aggregate_with_status(
    windowed: WindowedScores,
    votes: np.ndarray,
    scores: np.ndarray | None,
    keep_prob_of: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    warn_list: list[str],
    sources: list[str],
    student_margin: np.ndarray | None = None,
    reference_margins: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], dict[str, int]]:
    """``(keep_prob, keep_log_odds, keep, aggregation info, status counts for the summary)``.

    ``keep_prob_of(votes, scores)`` aggregates the samples that have some evidence (`_keep_prob` with the filter's
    settings). ``scores`` (``n x k`` continuous values, NaN abstaining) are read by ``aggregate="mixture"`` only. With a
    ``student_margin`` per sample, the agreement gate (`hf_gradmimic.filter.agreement`) follows the aggregation,
    reading the ``reference_margins`` (by column name) too.

    The score log's ``status`` (`hf_gradmimic.score_log_io`) decides two cases before the votes do:

    - a sample with a non-finite record (status 1) is discarded: ``keep = False``, ``keep_prob = 0`` (log-odds
      ``-inf``).
      Its loss or score was NaN or inf once, so its data is suspect (issue: one such row used to
      poison training);
    - a sample with no scored record at all (only status-2 records: no supervised label) has no
      vote in any window, so it is left out of the aggregation and gets the prior: ``keep_prob`` is
      the share of the voted samples that the filter keeps (the class balance it found), and it is
      kept when that share is at least 0.5.
    """
    n = votes.shape[0]
    voted = (votes != ABSTAIN).any(axis=1)
    if scores is not None:
        voted |= np.isfinite(scores).any(axis=1)
    n_unscored = int(n - voted.sum())
    if n_unscored == n:
        raise ValueError(
            f"No sample of the score log has a vote or a finite signal from any labeling function ({sources}): each "
            "abstains everywhere (no scored record, status 0, in any window, and no value in the signals' columns; "
            "the filter's warnings say which columns are missing). Nothing to filter on."
        )
    if n_unscored:
        keep_prob, keep_log_odds = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
        keep_prob[voted], keep_log_odds[voted], info = keep_prob_of(
            votes[voted], None if scores is None else scores[voted]
        )
    else:  # every sample voted: no copy of the votes and signals
        keep_prob, keep_log_odds, info = keep_prob_of(votes, scores)
    info["agreement_gate"] = None
    if student_margin is not None:
        margins = list((reference_margins or {}).values())
        if n_unscored:
            gate = agreement_gate(
                keep_prob[voted], keep_log_odds[voted], student_margin[voted], [m[voted] for m in margins]
            )
            keep_prob[voted], keep_log_odds[voted] = gate.keep_prob, gate.keep_log_odds
        else:  # every sample voted: in place
            gate = agreement_gate(keep_prob, keep_log_odds, student_margin, margins)
        info["agreement_gate"] = {
            "n_gated": gate.n_gated,
            "n_with_margin": gate.n_with_margin,
            "reference_margins": list(reference_margins or {}),
            "n_reference_disagrees": gate.n_reference_disagrees,
        }
    nonfinite = np.zeros(n, dtype=bool) if windowed.n_nonfinite is None else windowed.n_nonfinite > 0
    n_nonfinite = int(nonfinite.sum())
    if n_nonfinite:
        keep_prob[nonfinite] = 0.0
        keep_log_odds[nonfinite] = -np.inf
        warn(
            f"{n_nonfinite} sample(s) had a non-finite loss or score (status 1) in the score log; the filter "
            "discards them.",
            warn_list,
        )
    if n_unscored:
        prior = float((keep_prob[voted] >= 0.5).mean())
        keep_prob[~voted & ~nonfinite] = prior
        keep_log_odds[~voted & ~nonfinite] = log_odds(np.array([prior]))[0]
        warn(
            f"{n_unscored} sample(s) have no vote and no finite signal value from any labeling function (no scored "
            "record, only unlabeled ones with status 2, or scored records whose signal values are all missing or "
            f"non-finite): they abstain and get the prior keep_prob={prior:.3f}, the share of the other samples kept.",
            warn_list,
        )
    keep = keep_prob >= 0.5
    counts = {
        "n_nonfinite_samples": n_nonfinite,
        "n_unscored_samples": n_unscored,
        "n_unlabeled_records": int(windowed.n_unlabeled_records),
    }
    return keep_prob, keep_log_odds, keep, info, counts


def _float_column(values: np.ndarray) -> pa.Array:
    """A float64 column over ``values`` without a copy (NaN stays NaN, not null)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    return pa.Array.from_buffers(pa.float64(), len(values), [None, pa.py_buffer(values)])


def _student_margin(windowed: WindowedScores) -> np.ndarray | None:
    """The student's mean margin on each sample's given label over its windows; None when the log has no margin."""
    per_window = windowed.signals.get("margin")
    return None if per_window is None else mean_over_windows(per_window)


def _reference_margins(extra_scores: Sequence[LabelingScores]) -> dict[str, np.ndarray]:
    """The references' margins among the continuous labeling functions, by column name: what the agreement gate
    reads beside the student's margin. Views, not copies."""
    return {
        column: lf.values[:, j] for lf in extra_scores if lf.reference_margin for j, column in enumerate(lf.columns)
    }


def log_odds(keep_prob: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` (``±inf`` at 0 and 1): the ranking of a ``P(keep)`` that has no finer one (a vote
    aggregate's, or a saved filter's from before ``keep_log_odds`` was stored)."""
    from scipy.special import logit

    return logit(np.asarray(keep_prob, dtype=np.float64))


def _keep_prob(
    votes: np.ndarray,
    scores: np.ndarray | None,
    *,
    aggregate: str,
    seed: int,
    degrees_of_freedom: float,
    warn_list: list[str],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``P(keep)`` and its log-odds, of samples that each have some evidence: the mixture posterior (whose
    log-odds do not round to ``±inf`` where ``P(keep)`` rounds to 1), or a vote aggregate."""
    if aggregate != "mixture":
        keep_prob, info = aggregate_votes(votes, aggregate, seed=seed, collected_warnings=warn_list)
        keep_prob = np.asarray(keep_prob, dtype=np.float64)
        return keep_prob, log_odds(keep_prob), info
    fit = keep_posterior(scores, votes, seed=seed, degrees_of_freedom=degrees_of_freedom)
    summary = fit.summary()
    if not fit.converged:
        warn(
            f"The keep posterior's EM did not converge in {fit.iterations} iterations; its keep_prob is its last "
            "estimate.",
            warn_list,
        )
    return (
        fit.keep_prob,
        fit.keep_log_odds,
        {
            "aggregate_used": "mixture",
            "estimated_accuracies": summary["vote_accuracies"],
            "mixture": summary,
        },
    )


def _nan_mean(values: np.ndarray) -> float:
    """The mean of the non-NaN entries (NaN when there is none), read block by block (a mapped column stays out of memory)."""
    total, count = 0.0, 0
    for _, block in row_blocks(values):
        present = ~np.isnan(block)
        total += float(np.add.reduce(block, where=present))
        count += int(present.sum())
    return total / count if count else float("nan")


def _votes_from_scores(scores: np.ndarray) -> np.ndarray:
    """Each continuous column cut into keep / discard by a 2-component GMM (DivideMix's split); NaN abstains."""
    votes = np.full(scores.shape, ABSTAIN, dtype=np.int8)
    for j in range(scores.shape[1]):
        present = np.isfinite(scores[:, j])
        if present.any():
            votes[present, j] = identify(scores[present, j], "gmm", threshold=None, topk=50).keep
    return votes


def _scores_summary(
    extra_scores: Sequence[LabelingScores], values: np.ndarray | None, accuracies: list[float] | None, offset: int
) -> list[dict[str, Any]]:
    """One entry per continuous column: its name, how many samples it scored, and its accuracy when it voted."""
    entries = []
    column = 0
    for lf in extra_scores:
        for name in lf.columns:
            present = np.isfinite(values[:, column])
            entries.append(
                {
                    "labeling_function": lf.name,
                    "name": name,
                    "kind": "score",
                    "reference_margin": lf.reference_margin,
                    "n_samples": int(present.sum()),
                    "mean": float(np.mean(values[:, column], where=present, dtype=np.float64))
                    if present.any()
                    else float("nan"),
                    "estimated_accuracy": None
                    if accuracies is None or offset + column >= len(accuracies)
                    else accuracies[offset + column],
                }
            )
            column += 1
    return entries


def _labeling_summary(
    extra_votes: Sequence[LabelingVotes], accuracies: list[float] | None, offset: int
) -> list[dict[str, Any]]:
    """One entry per vote column of the other labeling functions: its name, boundary, kept fraction and
    the LabelModel's estimated accuracy (None without Snorkel)."""
    entries = []
    column = offset
    for lf in extra_votes:
        for j, name in enumerate(lf.columns):
            voted = lf.votes[:, j][lf.votes[:, j] != ABSTAIN]
            entries.append(
                {
                    "labeling_function": lf.name,
                    "name": name,
                    "boundary": lf.boundaries[j],
                    "n_samples": int(voted.size),
                    "kept_fraction": float(voted.mean()) if voted.size else float("nan"),
                    "estimated_accuracy": None if accuracies is None else accuracies[column],
                }
            )
            column += 1
    return entries


def _vote_per_window(
    windowed: WindowedScores, method: str, *, threshold: float | None, topk: float
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The ``n x m`` int8 vote matrix (-1 where a sample abstains) and one summary entry per window."""
    values = windowed.values
    n, m = values.shape
    votes = np.full((n, m), ABSTAIN, dtype=np.int8)
    window_info = []
    for j in range(m):  # loop over windows, each one vectorised over its samples
        column = matrix_column(values, j)  # block by block: a mapped matrix is not read into memory whole
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
    return votes, window_info


def _filter_table(
    windowed: WindowedScores, votes: np.ndarray, keep_prob: np.ndarray, keep_log_odds: np.ndarray, keep: np.ndarray
) -> pa.Table:
    """The per-sample table of a `MimicFilter`, one row per sample in ``windowed`` order."""
    return pa.table(
        {
            "sample_id": windowed.sample_ids,
            "mean_mimic_score": pa.array(windowed.mean_score, type=pa.float64()),
            "mean_weight": pa.array(windowed.mean_weight, type=pa.float64()),
            "n_records": pa.array(windowed.n_records, type=pa.int32()),
            "votes": list_column(votes, pa.int8()),
            "window_values": list_column(windowed.values, pa.float32()),
            "window_scores": list_column(windowed.scores, pa.float32()),
            "keep_prob": pa.array(np.asarray(keep_prob, dtype=np.float64)),
            "keep_log_odds": _float_column(keep_log_odds),
            "keep": pa.array(keep),
            **(
                {} if windowed.n_nonfinite is None else {"n_nonfinite": pa.array(windowed.n_nonfinite, type=pa.int32())}
            ),
        }
    )
