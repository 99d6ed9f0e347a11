"""What a Stage-2 labeling function may read: `LabelingContext` (the score log, its reduced windows and the settings)."""

from __future__ import annotations

from dataclasses import dataclass

from .inputs import ScoresLike
from .reduction import WindowedScores
from .shards import BadShardPolicy
from .windows import WindowsLike

__all__ = ["LabelingContext"]


@dataclass
class LabelingContext:
    """What a labeling function may read: the score log, its windows (with the per-window means of the log's
    signal columns, ``windowed.signals``, reduced in the same read) and the filter's settings."""

    scores: ScoresLike
    windowed: WindowedScores
    windows: WindowsLike
    method: str
    threshold: float | None
    topk: float
    on_bad_shard: BadShardPolicy = "error"
