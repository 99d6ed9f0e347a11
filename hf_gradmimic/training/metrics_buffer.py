"""Metrics gathered at every step and averaged into the Trainer's logs at each logging step (trl's pattern)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

LAST_VALUE_KEYS = frozenset({"mimic/fallback_count", "mimic/nonfinite_samples", "mimic/unlabeled_samples"})
"""Running counts: the log shows their latest value, not a mean over the logging interval."""


class MetricsBuffer:
    """Values per metric name since the last log."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, key: str, value: float) -> None:
        self.values[key].append(float(value))

    def update(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.add(key, value)

    def drain(self) -> dict[str, float]:
        """The interval's value of each metric (mean of the finite values, NaN when none), and a fresh buffer."""
        logs = {}
        for key, values in self.values.items():
            finite = [value for value in values if np.isfinite(value)]
            if key in LAST_VALUE_KEYS:
                logs[key] = values[-1]
            else:
                logs[key] = float(np.mean(finite)) if finite else float("nan")
        self.values.clear()
        return logs

    def __bool__(self) -> bool:
        return bool(self.values)
