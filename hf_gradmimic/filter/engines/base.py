"""The interface of a Stage-2 engine: a score log -> its `WindowedScores` (per-sample window means and signals)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from ..inputs import ScoresLike, ScoreSource
from ..reduction import WindowedScores
from ..shards import BadShardPolicy
from ..windows import WindowsLike

__all__ = ["Engine"]


class Engine(ABC):
    """Reduces a score log to per-(sample, window) means in one read, as every other engine does, bit for bit.

    Subclasses differ in where the records go between reading and reducing: memory, spill files, a Ray cluster.
    """

    name: str

    def collect(
        self,
        scores: ScoresLike | ScoreSource,
        windows: WindowsLike = "epoch",
        *,
        on_bad_shard: BadShardPolicy = "error",
        spill_dir: str | os.PathLike | None = None,
    ) -> WindowedScores:
        """The log's `WindowedScores`; ``spill_dir`` is where an engine that spills writes (others ignore it)."""
        return self.reduce_log(scores, windows, on_bad_shard, spill_dir)

    @abstractmethod
    def reduce_log(
        self,
        scores: ScoresLike | ScoreSource,
        windows: WindowsLike,
        on_bad_shard: BadShardPolicy,
        spill_dir: str | os.PathLike | None,
    ) -> WindowedScores:
        """What `collect` runs: the engine's own entry point."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
