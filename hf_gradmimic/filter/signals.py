"""Continuous labeling functions for Stage 2: per-sample scores from the score log, not only votes.

Per-window binary votes (a cut per window, then a vote model over their patterns) throw away the ranking inside
each window. These labeling functions give every sample a value instead, oriented so that higher means keep, which
the keep posterior (`hf_gradmimic.filter.posterior`) combines with any votes. Each reads one per-record column of
the log, reduced by the filter's engine to per-(sample, window) means in the same read (`WindowedScores.signals`),
and summarises a sample's windows:

- ``"mean_loss"`` / ``WindowSignal("loss")``: minus the mean over windows of the log of the student's window mean
  loss. Under Grad-Mimic's reweighting (Huang et al., arXiv 2501.06708) the student fits the flipped labels less
  than a plain model does, so its own loss separates them better than a plain model's (the small-loss criterion of
  co-teaching, Han et al. 2018, and DivideMix, Li et al. 2020, on a student that does not memorise them). The mean
  of logs (a geometric mean) keeps the first windows' large losses from drowning the rest;
- ``"last_loss"`` / ``WindowSignal("loss", window="last")``: the same in the sample's last window only;
- ``"last_loss_linear"`` / ``WindowSignal("loss", window="last", transform="neg")``: minus the loss itself in the
  last window, for a loss that does not span orders of magnitude (a contrastive term is at least ~1 nat where a
  fitted classification sample's falls towards 0), where the log would skew the classes' distributions;
- ``"window_loss"`` / ``WindowSignal("loss", window="each")``: one column per window, the whole trajectory;
- ``"mean_margin"`` / ``WindowSignal("margin", transform="identity")``: the student's mean margin over the run (its
  given label's logit minus the largest other; the area under the margin of Pleiss et al., NeurIPS 2020, of the
  reweighted student);
- ``"reference_loss"`` / ``WindowSignal("reference_loss")``: the same summary of the reference's loss on the
  student's features (`hf_gradmimic.training.reference_verdict`), "reference argmax ≠ label" made continuous;
- ``"reference_margin"`` / ``WindowSignal("reference_margin", transform="identity")``: the reference's mean margin
  there (its given label's logit minus the largest other; negative where the reference's argmax is another class),
  recorded beside ``reference_loss`` for a head making single-label classification logits.

A log without the column (written before it existed, or by a run that did not record it) abstains, with one
warning; a sample without a finite value abstains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import LabelingContext
from .rowblocks import row_blocks
from .warning import warn

__all__ = ["LOSS_FLOOR", "SIGNAL_NAMES", "VALUE_DTYPE", "LabelingScores", "WindowSignal", "mean_over_windows"]

LOSS_FLOOR = 1e-4
"""Added to a loss before its log, so that a fitted sample's near-zero loss does not make a far tail of its own."""

SIGNAL_NAMES: dict[str, tuple[str, str, str]] = {
    "mean_loss": ("loss", "mean", "neg_log"),
    "last_loss": ("loss", "last", "neg_log"),
    "last_loss_linear": ("loss", "last", "neg"),
    "window_loss": ("loss", "each", "neg_log"),
    "mean_margin": ("margin", "mean", "identity"),
    "reference_loss": ("reference_loss", "mean", "neg_log"),
    "reference_margin": ("reference_margin", "mean", "identity"),
}
"""The continuous labeling functions named by a string in ``build_filter(labeling_functions=...)``:
name -> (score-log column, window summary, transform)."""

VALUE_DTYPE = np.float32
"""The dtype of the continuous labeling functions' values (`LabelingScores`), in memory and in the table."""

_TRANSFORMS = ("neg_log", "neg", "identity")
_WHY_MISSING = {
    "margin": "the margin is recorded for single-label classification logits only",
    "reference_loss": "see MimicConfig.mimic_log_reference_loss",
    "reference_margin": "recorded with reference_loss where the reference is a classification head",
}
_WINDOWS = ("mean", "last", "each")


@dataclass
class LabelingScores:
    """What a continuous labeling function says: ``values`` (``n x k``, NaN abstains, higher means keep) in the
    filter's sample order, with a name per column. The values are stored as `VALUE_DTYPE` (float32: the precision of
    the score log's own columns; at hundreds of millions of samples they are the filter's largest per-sample arrays).
    ``reference_margin``: the values are a reference classifier's margin on the given label (negative where it
    predicts another class), which the agreement gate reads beside the student's (`hf_gradmimic.filter.agreement`)."""

    name: str
    columns: list[str]
    values: np.ndarray
    reference_margin: bool = False

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=VALUE_DTYPE)
        if self.values.ndim != 2 or self.values.shape[1] != len(self.columns):
            raise ValueError(
                f"Labeling function {self.name!r}: values of shape {self.values.shape} for {len(self.columns)} column(s)."
            )


class WindowSignal:
    """A per-record column of the score log, per window, summarised into a per-sample value (higher = keep).

    Args:
        column: the score-log column: ``"loss"`` (the student's), ``"reference_loss"``, ``"margin"``, ...
        window: ``"mean"`` (the mean over the sample's windows), ``"last"`` (its last window with a value) or
            ``"each"`` (one column per window).
        transform: ``"neg_log"`` (``-log(value + LOSS_FLOOR)`` of each window mean: a loss), ``"neg"`` (``-value``:
            a loss on a linear scale) or ``"identity"`` (a margin or any score already oriented so that higher
            means keep).
        name: the labeling function's name (default: ``"<window>_<column>"``).
    """

    def __init__(
        self, column: str = "loss", window: str = "mean", transform: str = "neg_log", name: str | None = None
    ) -> None:
        if window not in _WINDOWS:
            raise ValueError(f"window must be one of {_WINDOWS}, got {window!r}.")
        if transform not in _TRANSFORMS:
            raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}.")
        self.column, self.window, self.transform = column, window, transform
        self.name = name or f"{window}_{column}"
        # the reference's margin as it is (not transformed): its sign is the reference's verdict, for the gate
        self.reference_margin = column == "reference_margin" and transform == "identity"

    def __repr__(self) -> str:
        return f"WindowSignal(column={self.column!r}, window={self.window!r}, transform={self.transform!r})"

    def scores(self, context: LabelingContext) -> LabelingScores:
        windowed = context.windowed
        n = len(windowed.sample_ids)
        per_window = windowed.signals.get(self.column)
        if per_window is None:
            warn(
                f"The score log has no `{self.column}` column (a run that does not record it: "
                f"{_WHY_MISSING.get(self.column, 'see hf_gradmimic.score_log_io')}; or a log written before it existed): the "
                f"{self.name!r} labeling function abstains.",
                context.windowed.warnings,
            )
            return LabelingScores(self.name, [self.name], np.full((n, 1), np.nan), self.reference_margin)
        # Row block by row block (`row_blocks`): a mapped per-window matrix is never read into memory whole.
        names = [f"{self.name}/{window}" for window in windowed.window_names] if self.window == "each" else [self.name]
        values = np.empty((n, len(names)), dtype=VALUE_DTYPE)
        for rows, block in row_blocks(per_window):
            values[rows] = self._summary(block)
        return LabelingScores(self.name, names, values, self.reference_margin)

    def _summary(self, per_window: np.ndarray) -> np.ndarray:
        """The values of a block of samples (``rows x windows`` means) -> ``rows x columns``."""
        per_window = np.asarray(per_window, dtype=np.float64)
        n = per_window.shape[0]
        if self.transform == "neg_log":
            per_window = -np.log(np.maximum(per_window, 0.0) + LOSS_FLOOR)
        elif self.transform == "neg":
            per_window = -per_window
        if self.window == "each":
            return per_window
        if self.window == "last":
            present = np.isfinite(per_window)
            last = per_window.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
            values = np.where(present.any(axis=1), per_window[np.arange(n), last], np.nan)
        else:
            values = _block_mean(per_window)
        return values[:, None]


def _block_mean(per_window: np.ndarray) -> np.ndarray:
    """Each row's mean over its finite values (float64), NaN for a row without one (it abstains)."""
    present = np.isfinite(per_window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, per_window, 0.0).sum(axis=1) / present.sum(axis=1)


def mean_over_windows(per_window: np.ndarray) -> np.ndarray:
    """Each sample's mean over the windows where it has a value (NaN where it has none), read in row blocks (a
    memory-mapped matrix stays out of memory: `hf_gradmimic.filter.rowblocks`): the ``"mean"`` summary of
    `WindowSignal` without a transform, e.g. the student's mean margin that the agreement gate reads."""
    out = np.full(per_window.shape[0], np.nan)
    if per_window.shape[1] == 0:
        return out
    for rows, block in row_blocks(per_window):
        out[rows] = _block_mean(np.asarray(block, dtype=np.float64))
    return out
