"""Continuous labeling functions for Stage 2: per-sample scores from the score log, not only votes.

Per-window binary votes (a cut per window, then a vote model over their patterns) throw away the ranking inside
each window. These labeling functions give every sample a value instead, oriented so that higher means keep, which
the keep posterior (`hf_gradmimic.filter.posterior`) combines with any votes:

- ``"mean_loss"`` / `LogLossSignal("loss")`: minus the log of the student's mean loss over the run. Under Grad-Mimic's
  reweighting (Huang et al., arXiv 2501.06708) the student fits the flipped labels less than a plain model does,
  so its own loss separates them better than a plain model's (the small-loss criterion of co-teaching, Han et al.
  2018, and DivideMix, Li et al. 2020, on a student that does not memorise them);
- ``"last_loss"`` / `LogLossSignal("loss", window="last")`: the same in the sample's last window only, the student
  at its best; beside the mean, the pair is a short trajectory (a flipped sample's loss stays high);
- ``"window_loss"`` / `LogLossSignal("loss", window="each")`: one column per window, the whole trajectory;
- ``"reference_loss"`` / `LogLossSignal("reference_loss")`: minus the log of the reference's mean loss on the
  student's features (the score log's ``reference_loss``, `hf_gradmimic.training.reference_verdict`): the
  reference's verdict, "reference argmax ≠ label" made continuous.

The log is read once: these read the per-(sample, window) means that the filter's engine already reduced
(`WindowedScores.signals`). A log without the column (written before it existed, or by a run that did not
record it) abstains, with one warning; a sample without a finite value abstains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .warning import warn

if TYPE_CHECKING:  # labeling.py resolves the names below, so it imports this module
    from .labeling import LabelingContext

__all__ = ["LOSS_FLOOR", "LabelingScores", "LogLossSignal", "SIGNAL_NAMES"]

LOSS_FLOOR = 1e-4
"""Added to a loss before its log, so that a fitted sample's near-zero loss does not make a far tail of its own."""

SIGNAL_NAMES: dict[str, tuple[str, str]] = {
    "mean_loss": ("loss", "mean"),
    "last_loss": ("loss", "last"),
    "window_loss": ("loss", "each"),
    "reference_loss": ("reference_loss", "mean"),
}
"""The continuous labeling functions named by a string in ``build_filter(labeling_functions=...)``:
name -> (score-log column, window summary)."""


@dataclass
class LabelingScores:
    """What a continuous labeling function says: ``values`` (``n x k`` float64, NaN abstains, higher means keep)
    in the filter's sample order, with a name per column."""

    name: str
    columns: list[str]
    values: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape[1] != len(self.columns):
            raise ValueError(
                f"Labeling function {self.name!r}: values of shape {self.values.shape} for {len(self.columns)} column(s)."
            )


class LogLossSignal:
    """Minus the log of a per-sample loss column of the score log, over the run's windows.

    Args:
        column: the score-log column: ``"loss"`` (the student's own) or ``"reference_loss"`` (the reference's).
        window: ``"mean"`` (the mean of the sample's window means), ``"last"`` (its last window with a value) or
            ``"each"`` (one column per window).
        name: the labeling function's name (default: ``"<window>_loss"`` for the student's loss, else the column's).
    """

    def __init__(self, column: str = "loss", window: str = "mean", name: str | None = None) -> None:
        if window not in ("mean", "last", "each"):
            raise ValueError(f"window must be 'mean', 'last' or 'each', got {window!r}.")
        self.column, self.window = column, window
        self.name = name or (f"{window}_loss" if column == "loss" else column)

    def __repr__(self) -> str:
        return f"LogLossSignal(column={self.column!r}, window={self.window!r})"

    def scores(self, context: LabelingContext) -> LabelingScores:
        windowed = context.windowed
        n = len(windowed.sample_ids)
        per_window = windowed.signals.get(self.column)
        if per_window is None:
            warn(
                f"The score log has no `{self.column}` column (written before it existed, or by a run that did not "
                f"record it): the {self.name!r} labeling function abstains.",
                context.windowed.warnings,
            )
            return LabelingScores(self.name, [self.name], np.full((n, 1), np.nan))
        if self.window == "each":
            values = -np.log(np.maximum(per_window.astype(np.float64), 0.0) + LOSS_FLOOR)
            names = [f"{self.name}/{window}" for window in windowed.window_names]
            return LabelingScores(self.name, names, values)
        if self.window == "last":
            present = np.isfinite(per_window)
            last = per_window.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
            loss = np.where(present.any(axis=1), per_window[np.arange(n), last], np.nan).astype(np.float64)
        else:
            with np.errstate(invalid="ignore"), _quiet_empty_means():
                loss = np.nanmean(per_window, axis=1, dtype=np.float64)
        values = -np.log(np.maximum(loss, 0.0) + LOSS_FLOOR)
        return LabelingScores(self.name, [self.name], values[:, None])


class _quiet_empty_means:
    """``np.nanmean`` of a sample absent from every window is NaN (it abstains): no RuntimeWarning for it."""

    def __enter__(self) -> None:
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)
