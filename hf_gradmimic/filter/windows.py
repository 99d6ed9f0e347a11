"""The windows of Stage 2: which window of optimizer steps each step of the score log falls in.

Grad-Mimic's Stage 2 (Huang et al., arXiv 2501.06708, Section 4.2) cuts the training run into windows
of optimizer steps, one labeling function each: one per epoch (default), one per step, or ``N`` equal
ranges of steps. `StepWindows` maps every distinct step of the log to its window, from the distinct
steps (and epochs) of each chunk of records (`distinct_steps`), so that no engine holds a step per
record to make it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .warning import warn

__all__ = ["StepWindows", "WindowsLike", "check_windows", "distinct_steps"]

WindowsLike = Literal["epoch", "step"] | int


def check_windows(windows: Any) -> None:
    """Refuse anything but ``"epoch"``, ``"step"`` or a positive int."""
    if isinstance(windows, str):
        if windows not in ("epoch", "step"):
            raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")
    elif isinstance(windows, bool) or not isinstance(windows, (int, np.integer)) or windows < 1:
        raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")


def distinct_steps(steps: np.ndarray, epochs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One ``(step, epoch)`` pair per distinct step of a chunk's records (``epochs`` None unless ``windows="epoch"``)."""
    # Shards are step-ordered, so a diff finds the distinct steps without sorting.
    if steps.size > 1 and (np.diff(steps) >= 0).all():
        starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    else:
        _, starts = np.unique(steps, return_index=True)
    return steps[starts], None if epochs is None else epochs[starts]


@dataclass(frozen=True)
class StepWindows:
    """The window of every distinct optimizer step of the log, with the windows' names and step ranges."""

    steps: np.ndarray  # sorted distinct steps
    window: np.ndarray  # window index per step
    names: list[str]
    ranges: list[tuple[int, int]]

    @classmethod
    def of(
        cls, step_epochs: list[tuple[np.ndarray, np.ndarray | None]], windows: WindowsLike, warn_list: list[str]
    ) -> StepWindows:
        """From the ``(distinct steps, epochs)`` of every chunk (`distinct_steps`)."""
        all_steps = np.concatenate([s for s, _ in step_epochs])
        unique_steps, first = np.unique(all_steps, return_index=True)
        unique_epochs = np.concatenate([e for _, e in step_epochs])[first] if windows == "epoch" else None
        window, names, ranges = _window_of_steps(unique_steps, unique_epochs, windows, warn_list)
        return cls(unique_steps, window, names, ranges)

    def of_records(self, steps: np.ndarray) -> np.ndarray:
        """The int32 window of each record's step (``steps`` is modified in place)."""
        unique_steps, step_window = self.steps, self.window
        span = int(unique_steps[-1] - unique_steps[0]) + 1
        if span <= 4 * unique_steps.size + 1_000_000:
            # A dense lookup table over the step span beats a binary search per record.
            lookup = np.full(span, -1, dtype=np.int32)
            lookup[unique_steps - unique_steps[0]] = step_window
            steps -= unique_steps[0]
            return lookup[steps]
        return step_window[np.searchsorted(unique_steps, steps)].astype(np.int32)


def _window_of_steps(
    steps: np.ndarray, epochs: np.ndarray | None, windows: WindowsLike, warn_list: list[str]
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Map the distinct optimizer steps (sorted) to window indices.

    Returns ``(window_index_per_step, names, (first_step, last_step) per window)``; windows cut
    into equal step ranges are named after their ranges, ``steps_<first>-<last>``.
    """
    if windows == "step":
        index, names = np.arange(steps.size), [f"step_{int(s)}" for s in steps]
    elif windows == "epoch":
        index, names = _epoch_windows(epochs)
    else:
        index, names = _equal_step_windows(steps, int(windows), warn_list), []
    n_windows = int(index.max()) + 1
    first_step = np.full(n_windows, np.iinfo(np.int64).max)
    last_step = np.full(n_windows, np.iinfo(np.int64).min)
    np.minimum.at(first_step, index, steps)  # small: one entry per distinct step
    np.maximum.at(last_step, index, steps)
    ranges = [(int(a), int(b)) for a, b in zip(first_step, last_step)]
    if not names:
        names = [f"steps_{a}-{b}" for a, b in ranges]
    return index, names, ranges


def _epoch_windows(epochs: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """One window per epoch: ``(window index per step, names)``.

    A record's ``epoch`` is the fractional epoch *after* its step, so the last step of epoch 1 has
    ``epoch == 1.0`` exactly (``floor`` would put it in the next epoch). The window is
    ``ceil(epoch - tol) - 1`` with a tolerance ``tol`` far below one step's share of an epoch
    (half the smallest epoch increment between consecutive steps, at most 1e-6), which absorbs
    float rounding such as ``1.0000000000000002``. Windows are named ``epoch_<k>`` with ``k``
    0-based (``epoch_0`` holds the steps with ``0 < epoch <= 1``).
    """
    if epochs is None or not np.isfinite(epochs).all():
        raise ValueError("windows='epoch' needs a finite `epoch` column in the score log.")
    increments = np.diff(epochs)
    positive = increments[increments > 0]
    tol = min(1e-6, 0.5 * float(positive.min())) if positive.size else 1e-6
    epoch_index = np.maximum(np.ceil(epochs - tol).astype(np.int64) - 1, 0)
    labels, index = np.unique(epoch_index, return_inverse=True)
    return index, [f"epoch_{int(e)}" for e in labels]


def _equal_step_windows(steps: np.ndarray, windows: int, warn_list: list[str]) -> np.ndarray:
    """``windows`` windows of equal step ranges over the run; the index per step (empty windows dropped)."""
    first, last = int(steps[0]), int(steps[-1])
    span = last - first + 1
    if windows > span:
        raise ValueError(
            f"windows={windows} is more than the {span} optimizer steps ({first}..{last}) in the score log."
        )
    raw = (steps - first) * windows // span
    labels, index = np.unique(raw, return_inverse=True)
    if labels.size < windows:
        warn(
            f"{windows - labels.size} of the {windows} step windows hold no record (gaps in global_step) "
            "and were dropped.",
            warn_list,
        )
    return index
