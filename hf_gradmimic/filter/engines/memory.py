"""The in-memory engine: every record of the score log held in compact numpy arrays, reduced in one pass.

24 bytes per record (plus 4 per signal column) and then the (samples x windows) cell sums: the simplest
engine and the reference the others are tested against; `build_filter` streams by default
(`hf_gradmimic.filter.engines.outofcore`), which gives the same result in bounded memory.
"""

from __future__ import annotations

import os

from ..inputs import ScoresLike, ScoreSource
from ..records import open_source, read_records
from ..reduction import WindowedScores, completed, reduce_records
from ..shards import BadShardPolicy
from ..warning import warn
from ..windows import StepWindows, WindowsLike, check_windows
from .base import Engine

__all__ = ["MAX_MATRIX_CELLS", "MemoryEngine", "collect_windows", "reduce_in_memory"]

# The (samples x windows) matrices are dense; beyond this many cells (e.g. windows="step" on a
# large run) ask for fewer windows instead of allocating gigabytes.
MAX_MATRIX_CELLS = 400_000_000


def collect_windows(
    scores: ScoresLike | ScoreSource, windows: WindowsLike = "epoch", *, on_bad_shard: BadShardPolicy = "error"
) -> WindowedScores:
    """Read the score log into memory and reduce it to per-(sample, window) means of ``b * w``, mimic score and signals.

    The records are read one shard (or 4M-row slice) at a time into compact numpy arrays, then
    grouped with one ``bincount`` per statistic over the flat key ``sample * m + window`` (or a
    sort + ``reduceat`` when the sample ids are too sparse for a dense key space). Records that a
    distributed sampler repeated (``repeated == True``) are dropped, as `load_scores` does.
    NaN mimic scores are left out of the score means (their weights still count) with a warning.

    The ``status`` column (`hf_gradmimic.score_log_io`), when present: records of status 1 (non-finite)
    and 2 (no supervised label) are left out of the means, so a sample abstains in a window where
    it has no scored record; ``n_nonfinite`` counts each sample's status-1 records (the filter
    discards those samples). Logs written before the column existed read as all scored.

    The signal columns the log has (`hf_gradmimic.filter.records.SIGNAL_COLUMNS`) are reduced in the
    same pass to ``WindowedScores.signals``; a scored record whose value is not finite abstains for
    that signal, with one warning naming how many and their first sample ids.
    """
    check_windows(windows)
    source = scores if isinstance(scores, ScoreSource) else open_source(scores, windows, on_bad_shard)
    return reduce_in_memory(source, windows)


def reduce_in_memory(source: ScoreSource, windows: WindowsLike) -> WindowedScores:
    """`collect_windows` on an opened `ScoreSource`."""
    warn_list: list[str] = source.warnings
    for message in warn_list:
        warn(message)
    records = read_records(source, windows)
    step_map = StepWindows.of(records.step_epochs, windows, warn_list)
    return completed(reduce_records(records, step_map, max_cells=MAX_MATRIX_CELLS), warn_list)


class MemoryEngine(Engine):
    """``engine="memory"``: `collect_windows`."""

    name = "memory"

    def reduce_log(
        self,
        scores: ScoresLike | ScoreSource,
        windows: WindowsLike,
        on_bad_shard: BadShardPolicy,
        spill_dir: str | os.PathLike | None,
    ) -> WindowedScores:
        return collect_windows(scores, windows, on_bad_shard=on_bad_shard)
