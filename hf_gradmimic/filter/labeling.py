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
# digits probing and fine-tuning, BBC; the held-out task left out): the reweighted student's mean log-loss and mean
# margin, combined by the keep posterior, against the best of five baselines per setting (docs/results.md). Adding
# the reference's loss lowered it (12 settings at or above the best baseline against 17), and so did the paper's
# mimic-window votes.
DEFAULT_LABELING_FUNCTIONS: tuple[str, ...] = ("mean_loss", "mean_margin")

# A log without the student's margin (a contrastive or language-model run) has the loss alone. There the default is
# the loss of the last window on a linear scale, by measurement on the captioned-digits CLIP stand-in
# (scripts/clip_curation_benchmark.py; design seeds 0 and 4-8, not the reported ones): a student trained from its
# initialisation learns little in the first windows (on seeds 0, 4, 5 the first ranks mismatched pairs at AUROC 0.52-0.58,
# the last 0.95-0.97), so the mean over windows dilutes the last one; and a contrastive term stays above ~1 nat,
# where the log only skews the two classes (discard F1 of the last window 80.9-86.7 on a linear scale, 71.1-85.7 on
# the log scale, 51.0-83.0 for the mean log-loss; the reference's CLIP score 75.6-81.8).
DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN: tuple[str, ...] = ("last_loss_linear",)


def default_labeling_functions(has_margin: bool) -> tuple[str, ...]:
    """`build_filter`'s labeling functions when none are given: `DEFAULT_LABELING_FUNCTIONS` for a log that records
    the student's margin (single-label classification), `DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN` otherwise."""
    return DEFAULT_LABELING_FUNCTIONS if has_margin else DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN


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
        ids = context.windowed.sample_ids
        agree = (self.predicted == self.labels).astype(np.int8)
        if self.sample_ids is None:
            rows = pc.cast(ids, pa.int64()).to_numpy() if pa.types.is_integer(ids.type) else None
            if rows is None:
                raise ValueError(
                    f"PredictorAgreement {self.name!r}: the sample ids are not row indices; pass sample_ids=."
                )
        else:
            rows = pc.index_in(ids, value_set=self.sample_ids).to_numpy(zero_copy_only=False)
            rows = np.where(np.isnan(rows.astype(np.float64)), -1, rows).astype(np.int64)
        votes = np.full((len(ids), 1), ABSTAIN, dtype=np.int8)
        valid = (rows >= 0) & (rows < agree.size)
        votes[valid, 0] = agree[rows[valid]]
        return LabelingVotes(self.name, [self.name], votes)


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
