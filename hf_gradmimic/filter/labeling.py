"""Labeling functions for Stage 2: sources of keep / discard votes besides the mimic windows.

Grad-Mimic's Stage 2 (Huang et al., arXiv 2501.06708, Section 4.2) treats each training window as a
labeling function and combines their votes with Snorkel's LabelModel (Ratner et al., "Snorkel: Rapid
Training Data Creation with Weak Supervision", VLDB 2017). The LabelModel is built to weigh
*heterogeneous* sources whose accuracies it does not know, so any other weak signal about a label
can vote beside the windows:

- ``"mimic"``: the per-window ``b * w`` votes of the paper (computed by `decide`; always present);
- ``"loss"`` / `LossWindows`: the per-window mean of the student's own loss from the score log, low
  loss voting keep. Clean samples are learnt first, so their loss is small early and stays small:
  the small-loss criterion of co-teaching and DivideMix (Li, Socher, Hoi, ICLR 2020), which fit a
  2-component GMM to the per-sample loss; here each window's split is the same identification as
  the mimic windows (``gmm`` by default);
- `PredictorAgreement`: one vote per sample from any classifier's logits: keep when its argmax is the
  given label. With the Grad-Mimic reference's logits this is *reference disagreement*; with a
  zero-shot model's (`hf_gradmimic.zero_shot`) a zero-shot labeling function.
- `PredictorMargin`: the continuous counterpart, a classifier's margin on the given label (a value for the
  keep posterior, `hf_gradmimic.filter.posterior`, and a sign for the agreement gate).

Each labeling function returns a `LabelingVotes`: a ``samples x columns`` int8 matrix (-1 abstain,
0 discard, 1 keep) aligned with the filter's samples, which `decide` appends to the mimic windows'
votes before aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..baselines import margins
from ..score_log_io import scores_provenance
from .aggregation import ABSTAIN
from .context import LabelingContext
from .identification import METHODS, identify
from .inputs import score_source
from .rowblocks import matrix_column
from .signals import SIGNAL_NAMES, LabelingScores, WindowSignal

__all__ = [
    "DEFAULT_LABELING_FUNCTIONS",
    "DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN",
    "LabelingContext",
    "LabelingFunction",
    "LabelingFunctionLike",
    "LabelingVotes",
    "LossWindows",
    "PredictorAgreement",
    "PredictorMargin",
    "ScoringFunction",
    "default_labeling_functions",
    "labeling_scores",
    "labeling_votes",
    "resolve_labeling_functions",
]


@dataclass
class LabelingVotes:
    """What one labeling function says: ``votes`` (``n x k`` int8, -1 abstain, 0 discard, 1 keep) in the
    filter's sample order, a name per column, and per column the decision boundary and kept fraction."""

    name: str
    columns: list[str]
    votes: np.ndarray
    boundaries: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.votes = np.asarray(self.votes, dtype=np.int8)
        if self.votes.ndim != 2 or self.votes.shape[1] != len(self.columns):
            raise ValueError(
                f"Labeling function {self.name!r}: votes of shape {self.votes.shape} for {len(self.columns)} column(s)."
            )
        if not self.boundaries:
            self.boundaries = [float("nan")] * len(self.columns)


@runtime_checkable
class LabelingFunction(Protocol):
    """A source of keep / discard votes: ``name`` and ``votes(context) -> LabelingVotes``."""

    name: str

    def votes(self, context: LabelingContext) -> LabelingVotes: ...


@runtime_checkable
class ScoringFunction(Protocol):
    """A continuous source: ``name`` and ``scores(context) -> LabelingScores`` (`hf_gradmimic.filter.signals`)."""

    name: str

    def scores(self, context: LabelingContext) -> LabelingScores: ...


LabelingFunctionLike = str | LabelingFunction | ScoringFunction

# Chosen by measurement on the realistic suite's saved runs (scripts/stage2_search.py over the 27 tuned-on settings:
# digits probing and fine-tuning, BBC, 3 seeds): the reweighted student's mean log-loss and mean margin and the
# reference's mean margin from the log, fit jointly by the keep posterior, with the agreement gate reading both
# margins: at or above the best of five baselines in 23 of 27 settings, against 17 without the reference's margin
# (the 1a13b99 runs, whose fine-tuning logs hold the head's verdict on the moving features; docs/results.md renders
# the current runs, whose fine-tuning logs hold the reference model's, `mimic_log_reference_loss="reference_model"`);
# with the reference's margin but the student's alone in the gate, 20 (a
# NumPy re-analysis of the same runs' signals, not a stage2_search candidate). The reference's
# loss in place of its margin did worse (12 of 27, measured before the gate existed), and so did the paper's
# mimic-window votes. A log without the reference's margin (a reference that is not a classification head) gets
# the student's two signals.
DEFAULT_LABELING_FUNCTIONS: tuple[str, ...] = ("mean_loss", "mean_margin", "reference_margin")

# A log without the student's margin (a contrastive or language-model run) has the loss alone. There the default is
# the loss of the last window on a linear scale, by measurement on the captioned-digits CLIP stand-in
# (scripts/clip_curation_benchmark.py; design seeds 0 and 4-8, not the reported ones): a student trained from its
# initialisation learns little in the first windows (on seeds 0, 4, 5 the first ranks mismatched pairs at AUROC 0.52-0.58,
# the last 0.95-0.97), so the mean over windows dilutes the last one; and a contrastive term stays above ~1 nat,
# where the log only skews the two classes (discard F1 of the last window 80.9-86.7 on a linear scale, 71.1-85.7 on
# the log scale, 51.0-83.0 for the mean log-loss; the reference's CLIP score 75.6-81.8).
DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN: tuple[str, ...] = ("last_loss_linear",)


def default_labeling_functions(has_margin: bool, has_reference_margin: bool = True) -> tuple[str, ...]:
    """`build_filter`'s labeling functions when none are given, by what the log records: `DEFAULT_LABELING_FUNCTIONS`
    for a log with the student's margin (single-label classification) and the reference's; without the reference's
    margin, those without ``"reference_margin"`` (no warning: the log was never going to have it);
    `DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN` without the student's."""
    if not has_margin:
        return DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN
    if has_reference_margin:
        return DEFAULT_LABELING_FUNCTIONS
    return tuple(name for name in DEFAULT_LABELING_FUNCTIONS if name != "reference_margin")


class LossWindows:
    """Per-window votes from the student's own per-sample loss in the score log: low loss votes keep.

    The small-loss criterion (DivideMix, Li et al. 2020: a 2-component GMM on the per-sample loss;
    co-teaching, Han et al. 2018): networks fit clean labels before they memorise noisy ones. In each
    window a sample's value is its mean ``loss`` over its records there; the window is split by the
    identification ``method`` on ``-loss``. By default (``method=None``) that is the filter's own method,
    except ``threshold``, for which the loss windows use ``gmm``: a loss has no natural threshold such as
    ``b * w = 1``. `MimicFilter.rebuild` re-splits only the mimic windows. Records whose loss is not finite,
    or whose ``status`` is not 0 (scored), abstain.
    """

    name = "loss"

    def __init__(self, method: str | None = None) -> None:
        if method is not None and method not in METHODS:
            raise ValueError(f"Unknown identification method {method!r}; expected one of {METHODS}.")
        self.method = method

    def __repr__(self) -> str:
        return f"LossWindows(method={self.method!r})"

    def votes(self, context: LabelingContext) -> LabelingVotes:
        method = self.method or ("gmm" if context.method == "threshold" else context.method)
        # Reduced with b * w in the same read of the log, so the windows line up with the mimic ones.
        loss = context.windowed.signals.get("loss")
        if loss is None:
            description = score_source(context.scores, on_bad_shard=context.on_bad_shard).description
            raise ValueError(
                f"The 'loss' labeling function needs a `loss` column in the score log ({description}); "
                "pass labeling_functions=['mimic'] for a log without one."
            )
        n, m = loss.shape
        votes = np.full((n, m), ABSTAIN, dtype=np.int8)
        boundaries = []
        for j in range(m):  # loop over windows, each vectorised over its samples
            column = matrix_column(loss, j)  # block by block: a mapped matrix is not read into memory whole
            present = ~np.isnan(column)
            decision = identify(
                -column[present], method, threshold=None if method != "threshold" else 0.0, topk=context.topk
            )
            votes[present, j] = decision.keep
            boundaries.append(-decision.boundary)  # kept when loss < boundary
        names = [f"loss/{name}" for name in context.windowed.window_names]
        return LabelingVotes(self.name, names, votes, boundaries)


class PredictorAgreement:
    """One vote per sample from a classifier: keep when its predicted class is the given label.

    With the Grad-Mimic reference's logits this is the *reference disagreement* detector (discard when
    the reference disagrees with the label); with a zero-shot model's logits a zero-shot labeling
    function. Snorkel's LabelModel (Ratner et al. 2017) then estimates how far to trust it from its
    agreement with the windows.

    Args:
        logits: ``n x classes`` scores (or ``n`` predicted classes) of the classifier on the training samples.
        labels: the ``n`` given (possibly noisy) labels.
        sample_ids: the sample id of each row (the trainer's ``sample_id``: the row index of
            ``train_dataset`` by default); None means ``0 .. n-1``. Samples of the filter without a
            row abstain.
        name: the labeling function's name in the summary (``"reference"``, ``"zero_shot"``, ...).
    """

    def __init__(self, logits: Any, labels: Any, sample_ids: Any = None, name: str = "reference") -> None:
        logits = np.asarray(logits)
        self.predicted = logits.argmax(axis=1) if logits.ndim == 2 else logits.astype(np.int64)
        self.labels = np.asarray(labels).astype(np.int64)
        if self.labels.shape != self.predicted.shape:
            raise ValueError(
                f"PredictorAgreement {name!r}: {self.predicted.shape[0]} predictions for {self.labels.shape[0]} labels."
            )
        self.sample_ids = None if sample_ids is None else pa.array(np.asarray(sample_ids))
        self.name = name

    def __repr__(self) -> str:
        return f"PredictorAgreement(name={self.name!r}, n={self.labels.size})"

    def votes(self, context: LabelingContext) -> LabelingVotes:
        agree = (self.predicted == self.labels).astype(np.int8)
        rows, valid = _predictor_rows(context, self.sample_ids, agree.size, f"PredictorAgreement {self.name!r}")
        votes = np.full((len(rows), 1), ABSTAIN, dtype=np.int8)
        votes[valid, 0] = agree[rows[valid]]
        return LabelingVotes(self.name, [self.name], votes)


class PredictorMargin:
    """A continuous signal from a classifier: its margin on each sample's given label, the label's logit minus the
    largest other (negative where its argmax is another class), higher meaning keep.

    With the Grad-Mimic reference's own logits (Huang et al., arXiv 2501.06708) this is "reference argmax ≠ label"
    made continuous; the keep posterior weighs it beside the student's signals, and the agreement gate reads its sign
    (`hf_gradmimic.filter.agreement`). Use it in place of the score log's ``"reference_margin"`` (the reference's head
    on the student's *current* features) where that drifts from the reference's own verdict: a student whose
    features move under fine-tuning. Without the logits at hand, ``MimicConfig(mimic_log_reference_loss=
    "reference_model")`` records the reference model's verdict in the log instead.

    Args:
        logits: ``n x classes`` logits of the classifier on the training samples.
        labels: the ``n`` given (possibly noisy) labels.
        sample_ids: the sample id of each row, as for `PredictorAgreement`; None means ``0 .. n-1``. Samples of the
            filter without a row abstain (NaN).
        name: the labeling function's name in the summary.
    """

    def __init__(self, logits: Any, labels: Any, sample_ids: Any = None, name: str = "reference") -> None:
        logits = np.asarray(logits, dtype=np.float64)
        labels = np.asarray(labels).astype(np.int64)
        if labels.ndim != 1 or logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"PredictorMargin {name!r}: expected n x classes logits (at least 2 classes) and n labels, got logits "
                f"of shape {logits.shape} and labels of shape {labels.shape}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(
                f"PredictorMargin {name!r}: labels must index the {logits.shape[1]} classes, got values in "
                f"[{labels.min()}, {labels.max()}]."
            )
        bad = ~np.isfinite(logits).all(axis=1)
        if bad.any():
            raise ValueError(
                f"PredictorMargin {name!r}: {int(bad.sum())} row(s) of logits are not finite, e.g. row(s) "
                f"{np.flatnonzero(bad)[:5].tolist()}."
            )
        self.margin = margins(logits, labels)
        self.sample_ids = None if sample_ids is None else pa.array(np.asarray(sample_ids))
        self.name = name

    def __repr__(self) -> str:
        return f"PredictorMargin(name={self.name!r}, n={self.margin.size})"

    def scores(self, context: LabelingContext) -> LabelingScores:
        rows, valid = _predictor_rows(context, self.sample_ids, self.margin.size, f"PredictorMargin {self.name!r}")
        values = np.full((len(rows), 1), np.nan)
        values[valid, 0] = self.margin[rows[valid]]
        return LabelingScores(self.name, [self.name], values, reference_margin=True)


def _predictor_rows(
    context: LabelingContext, sample_ids: pa.Array | None, n_rows: int, who: str
) -> tuple[np.ndarray, np.ndarray]:
    """For each sample of the filter, its row in a predictor's arrays of ``n_rows`` rows, and whether it has one:
    the sample id itself when ``sample_ids`` is None (the trainer's default ids are row indices), else the position
    of the sample id in ``sample_ids``."""
    ids = context.windowed.sample_ids
    if sample_ids is None:
        if not pa.types.is_integer(ids.type):
            raise ValueError(f"{who}: the sample ids are not row indices; pass sample_ids=.")
        id_column = ((scores_provenance(context.scores) or {}).get("sample_ids") or {}).get("column")
        if id_column:  # integer ids of a column: read as row indices they would pick other rows, or none
            raise ValueError(
                f"{who}: the score log's sample ids are the values of the column {id_column!r} (mimic_id_column), "
                f"not row indices; pass sample_ids= (the {id_column!r} value of each of the predictor's rows)."
            )
        rows = pc.cast(ids, pa.int64()).to_numpy()
    else:
        rows = pc.index_in(ids, value_set=sample_ids).to_numpy(zero_copy_only=False)
        rows = np.where(np.isnan(rows.astype(np.float64)), -1, rows).astype(np.int64)
    has_row = (rows >= 0) & (rows < n_rows)
    if len(rows) and not has_row.any():  # it would abstain on every sample, and be dropped
        raise ValueError(
            f"{who}: none of the score log's sample ids (e.g. {ids[:3].to_pylist()}) has a row among its "
            f"{n_rows} rows{'' if sample_ids is None else ' (sample_ids=)'}: is it for this dataset?"
        )
    return rows, has_row


def resolve_labeling_functions(
    labeling_functions: Sequence[LabelingFunctionLike] | None,
) -> tuple[list[LabelingFunction | ScoringFunction], bool]:
    """``(the labeling functions besides the mimic windows, from names or objects; whether the mimic windows vote)``.

    Names: ``"mimic"`` (the windows' votes), ``"loss"`` (`LossWindows`' per-window votes) and the continuous ones
    of `hf_gradmimic.filter.signals.SIGNAL_NAMES` (``"mean_loss"``, ``"mean_margin"``, ``"reference_loss"``, ...).
    None: `DEFAULT_LABELING_FUNCTIONS` (`build_filter` picks the default by what the log records, see
    `default_labeling_functions`)."""
    if labeling_functions is None:
        labeling_functions = DEFAULT_LABELING_FUNCTIONS
    if isinstance(labeling_functions, (str, bytes)) or not isinstance(labeling_functions, Sequence):
        raise TypeError(
            f"labeling_functions must be a list, e.g. ['mean_loss', 'reference_loss'], got {labeling_functions!r}."
        )
    if not labeling_functions:
        raise ValueError("labeling_functions is empty: name at least one, e.g. ['mean_loss', 'reference_loss'].")
    resolved: list[LabelingFunction | ScoringFunction] = []
    for lf in labeling_functions:
        if lf == "mimic":
            continue
        if lf == "loss":
            resolved.append(LossWindows())
        elif isinstance(lf, str) and lf in SIGNAL_NAMES:
            column, window, transform = SIGNAL_NAMES[lf]
            resolved.append(WindowSignal(column, window, transform, name=lf))
        elif isinstance(lf, str):
            raise ValueError(
                f"Unknown labeling function {lf!r}: use 'mimic', 'loss', {', '.join(map(repr, SIGNAL_NAMES))} or a "
                "LabelingFunction / ScoringFunction object."
            )
        elif isinstance(lf, (LabelingFunction, ScoringFunction)):
            resolved.append(lf)
        else:
            raise TypeError(
                f"A labeling function needs a `name` and a `votes(context)` or `scores(context)` method, got {lf!r}."
            )
    names = [lf.name for lf in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"Two labeling functions share a name: {names}.")
    return resolved, "mimic" in labeling_functions


def labeling_votes(
    functions: Sequence[LabelingFunction | ScoringFunction], context: LabelingContext
) -> list[LabelingVotes]:
    """Every voting labeling function's votes, each checked to have one row per sample of the filter."""
    out = []
    n = context.windowed.values.shape[0]
    for lf in functions:
        if not isinstance(lf, LabelingFunction):
            continue
        result = lf.votes(context)
        if result.votes.shape[0] != n:
            raise ValueError(f"Labeling function {lf.name!r} returned {result.votes.shape[0]} rows for {n} samples.")
        out.append(result)
    return out


def labeling_scores(
    functions: Sequence[LabelingFunction | ScoringFunction], context: LabelingContext
) -> list[LabelingScores]:
    """Every continuous labeling function's values, each checked: one row per sample, NaN (abstain) or finite."""
    out = []
    ids = context.windowed.sample_ids
    for lf in functions:
        if isinstance(lf, LabelingFunction):
            continue
        result = lf.scores(context)
        if result.values.shape[0] != len(ids):
            raise ValueError(
                f"Labeling function {lf.name!r} returned {result.values.shape[0]} rows for {len(ids)} samples."
            )
        infinite = np.isinf(result.values).any(axis=1)
        if infinite.any():
            shown = ids.take(pa.array(np.flatnonzero(infinite)[:5])).to_pylist()
            raise ValueError(
                f"Labeling function {lf.name!r} gave {int(infinite.sum())} sample(s) an infinite value, e.g. sample_id "
                f"{shown}; give NaN for a sample it has nothing to say about."
            )
        out.append(result)
    return out
