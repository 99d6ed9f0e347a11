"""The agreement gate of Stage 2: a sample that every classifier predicts as its given label is not discarded.

The keep posterior (`hf_gradmimic.filter.posterior`) ranks well but can place its cut badly where its classes fit
badly: on small pools and with two classes, the clean samples' log-losses spread far (a well-fitted sample's loss
goes to zero) and the mixture splits them, discarding clean samples the student classifies correctly. A label is
only suspect when the model disagrees with it, so a discard needs both: the posterior's ``P(keep) < 0.5`` and a
negative mean margin of the student on the given label (its predicted class is another one). It is cleanlab's
``filter_by="both"``, which flags a sample only when it is both among the ``prune_by_noise_rate`` issues and
``predicted_neq_given`` (Northcutt, Jiang and Chuang, "Confident Learning", JAIR 2021), with the posterior in the first
role and the student of Grad-Mimic's reweighted run (Huang et al., arXiv 2501.06708) in the second. Where a reference's
margin is among the labeling functions (the log's ``reference_margin``, `PredictorMargin`), a sample is protected only
when the reference predicts its label too: the reference reads trusted labels, and its disagreement is evidence the
student (which fits the pool) may lack. A NaN margin does not object.

A gated sample's ``keep_prob`` becomes ``0.5 + 0.5 * P(keep)``: kept, and still ordered by the posterior among the
gated samples. Its ``keep_log_odds`` ``z`` becomes that probability's log-odds, ``log(1 + p) - log(1 - p)``, formed as
``log1p(p) + log(1 + e^z)`` (``1 - p = σ(-z)``) so that it keeps ranking where ``p`` rounds to 1. A sample without a
margin (not a single-label classification log) is not gated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AgreementGate", "agreement_gate"]


_CHUNK = 1 << 20  # samples per block of the log-odds update: its temporaries stay small at any pool size


@dataclass
class AgreementGate:
    """``keep_prob`` and ``keep_log_odds`` after the gate, and how many samples the gate kept that the posterior
    alone would discard."""

    keep_prob: np.ndarray
    keep_log_odds: np.ndarray
    n_gated: int
    n_with_margin: int
    n_reference_disagrees: int = 0


def agreement_gate(
    keep_prob: np.ndarray,
    keep_log_odds: np.ndarray,
    student_margin: np.ndarray,
    reference_margins: Sequence[np.ndarray] = (),
) -> AgreementGate:
    """Keep every sample whose ``student_margin`` (its given label's logit minus the largest other, averaged over
    the run) is at least 0 and whose ``reference_margins`` (each a reference's margin on the given label) are not
    negative: ``keep_prob`` of such a sample becomes ``0.5 + 0.5 * keep_prob`` and ``keep_log_odds`` that
    probability's log-odds; the others' are unchanged. A NaN student margin is not gated; a NaN reference margin does
    not object. Float64 arrays are updated in place (no copy of a pool-sized array: the filter runs on hundreds of
    millions of samples) and returned in the result, with how many samples the gate kept that the posterior alone
    would discard (``n_gated``) and how many the student agrees with but a reference does not
    (``n_reference_disagrees``)."""
    keep_prob = np.asarray(keep_prob, dtype=np.float64)
    keep_log_odds = np.asarray(keep_log_odds, dtype=np.float64)
    student_margin = np.asarray(student_margin, dtype=np.float64)
    shapes = [np.shape(margin) for margin in reference_margins]
    if any(shape != keep_prob.shape for shape in [student_margin.shape, keep_log_odds.shape, *shapes]):
        raise ValueError(
            f"{student_margin.shape} student margins, reference margins of shapes {shapes} and "
            f"{keep_log_odds.shape} log-odds for {keep_prob.shape} keep probabilities."
        )
    agrees = student_margin >= 0  # False for NaN
    student_agrees = int(np.count_nonzero(agrees))
    for margin in reference_margins:
        agrees &= ~(np.asarray(margin) < 0)  # NaN does not object
    n_gated = int(np.count_nonzero(agrees & (keep_prob < 0.5)))
    for start in range(0, keep_prob.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        gated, log_odds = agrees[part], keep_log_odds[part]
        # log((1 + p) / (1 - p)) with 1 - p = σ(-z): log1p(p) + softplus(z), exact where p has rounded to 1.
        np.logaddexp(0.0, log_odds, out=log_odds, where=gated)
        np.add(log_odds, np.log1p(keep_prob[part]), out=log_odds, where=gated)
    np.multiply(keep_prob, 0.5, out=keep_prob, where=agrees)
    np.add(keep_prob, 0.5, out=keep_prob, where=agrees)
    return AgreementGate(
        keep_prob,
        keep_log_odds,
        n_gated,
        int(np.count_nonzero(np.isfinite(student_margin))),
        student_agrees - int(np.count_nonzero(agrees)),
    )
