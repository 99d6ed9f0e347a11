"""The out-of-core engine (``engine="streaming"``): the score log reduced to per-(sample, window) means in bounded memory.

Stage 2 of Grad-Mimic (Huang et al., arXiv 2501.06708, Section 4.2) needs, per sample ``i`` and
window ``j``, the mean of ``b * w`` (and of the mimic score, and of each signal column) over the
sample's records there. The in-memory engine (`hf_gradmimic.filter.engines.memory`) holds every record
(24 bytes each) and then (samples x windows) sums: 6.8 GiB at 24M samples x 5 epochs. This engine streams:

1. the shards are read one at a time; each record's (step, sample id, ``b * w``, score, status,
   signals) is appended to the spill files of its *sample-id range* (a partition), keeping log order;
2. the step -> window map is made from the distinct steps seen;
3. each partition is reduced alone, by the same `reduce_records` as the in-memory engine, and its
   means are appended to the output (`WindowedScoresBuilder`).

Every record of a sample lands in one partition, in log order, and the partition is summed with
the same method (``bincount`` or sort + ``reduceat``) that the in-memory engine would pick for the
whole log, so every sum is the same left fold: the result is bit-identical to `collect_windows`.
Memory is one partition's working set (``memory_budget``); the output (window values and scores, signals:
4 bytes per cell each; ids, means and counts: 28 per sample) goes to memory-mapped files of the spill
folder, which the decision reads in row blocks (`hf_gradmimic.filter.rowblocks`), so that their pages stay
in the page cache (reclaimable) and out of the process's memory. The files are unlinked at once and freed
with the filter's table that maps them. When the whole
log fits the budget there is one partition, nothing is spilled, and the output is in memory.

Why chunked NumPy and not an embedded engine (DuckDB or Polars streaming; their group-by alone is
measured on the same logs by ``scripts/bench_filter.py --engines streaming,duckdb,polars``, figures in
docs/filter_scaling.md): their parallel aggregation fixes no summation order, so where a (sample,
window) cell holds several records (``windows`` < epochs, repeated samples) their means can differ from
the in-memory engine's in the last bits and flip a vote at a boundary, while this path is exact by
construction; they would be a new 25-55 MB dependency of the default path; and the group-by is not
where the memory goes (the per-sample output and the decision are, and an engine does not shrink them).

Integer sample ids only (row indices, or integer ``mimic_id_column`` values); other id types go
to the in-memory engine, because partitioning them by range would need a sort of every id.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from ...progress import progress_bar
from ..inputs import ScoresLike, ScoreSource
from ..records import (
    OPTIONAL_COLUMNS,
    RecordChunk,
    Records,
    column_range,
    columns_to_read,
    open_source,
    record_chunk,
    signals_of,
)
from ..reduction import WindowedScores, WindowedScoresBuilder, bincount_cells, completed, dense_ids, reduce_records
from ..shards import BadShardPolicy
from ..warning import warn
from ..windows import StepWindows, WindowsLike, check_windows
from .base import Engine
from .memory import reduce_in_memory

__all__ = ["DEFAULT_MEMORY_BUDGET", "MAX_STREAMING_CELLS", "OutOfCoreEngine", "collect_windows_streaming"]

DEFAULT_MEMORY_BUDGET = 256 << 20
"""Bytes that one partition's reduction may use (records, keys, cell sums and their temporaries)."""

MAX_STREAMING_CELLS = 4_000_000_000
"""The output is a dense (samples x windows) pair of float32 matrices: past this many cells, ask for fewer windows."""

# Working bytes per record of a partition: the spilled columns (25), the int64 key and the
# temporaries of the bincounts (masks, float64 copies). Measured peak, rounded up.
_RECORD_BYTES = 64
# Per (sample, window) cell of a partition: five int64/float64 sums, two float32 means, masks.
_CELL_BYTES = 64
# What each signal column adds: 4 bytes per record spilled and loaded; per cell its sum, count and mean.
_SIGNAL_RECORD_BYTES = 4
_SIGNAL_CELL_BYTES = 24

# The spilled columns, in this order: the arrays the in-memory engine fills per record (signals: float32 each).
_SPILL = (("step", np.int64), ("id", np.int64), ("bw", np.float32), ("score", np.float32), ("status", np.int8))


def collect_windows_streaming(
    scores: ScoresLike | ScoreSource,
    windows: WindowsLike = "epoch",
    *,
    on_bad_shard: BadShardPolicy = "error",
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
) -> WindowedScores:
    """`collect_windows` in bounded memory: the same `WindowedScores`, bit for bit.

    Args:
        scores: a score log, as for `build_filter` (or an opened `ScoreSource`).
        windows: ``"epoch"``, ``"step"`` or an int, as for `build_filter`.
        on_bad_shard: ``"error"`` or ``"skip"`` (see `hf_gradmimic.filter.shards`).
        memory_budget: bytes one partition's reduction may use (default `DEFAULT_MEMORY_BUDGET`);
            the log is cut into as many sample-id ranges as that needs.
        spill_dir: where the partitions' spill files go (a temporary folder inside it, removed at
            the end); default: the system's temporary folder. Needs about 25 bytes per record (and 4 per
            signal column).
    """
    check_windows(windows)
    source = scores if isinstance(scores, ScoreSource) else open_source(scores, windows, on_bad_shard)
    if not pa.types.is_integer(source.schema().field("sample_id").type):
        return reduce_in_memory(source, windows)
    columns = columns_to_read(source, windows)
    capacity = source.num_rows()
    if capacity == 0:
        raise ValueError(f"The score log ({source.description}) is empty: it holds no record.")
    lo, hi = _id_range(source)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    n_partitions = _partition_count(
        capacity, hi - lo + 1, _window_estimate(source, windows), len(signals_of(columns)), budget
    )
    if n_partitions == 1:
        return reduce_in_memory(source, windows)
    warn_list: list[str] = source.warnings
    for message in warn_list:
        warn(message)
    folder = Path(tempfile.mkdtemp(prefix="gradmimic-spill-", dir=spill_dir))
    try:
        spill = _spill(source, columns, windows, lo, hi, n_partitions, folder)
        step_map = StepWindows.of(spill.step_epochs, windows, warn_list)
        return completed(_reduce_partitions(spill, step_map), warn_list)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class OutOfCoreEngine(Engine):
    """``engine="streaming"`` (the default): `collect_windows_streaming`."""

    name = "streaming"

    def reduce_log(
        self,
        scores: ScoresLike | ScoreSource,
        windows: WindowsLike,
        on_bad_shard: BadShardPolicy,
        spill_dir: str | os.PathLike | None,
    ) -> WindowedScores:
        return collect_windows_streaming(scores, windows, on_bad_shard=on_bad_shard, spill_dir=spill_dir)


# ----------------------------------------------------------------------------------------------
# Planning: how many sample-id ranges
# ----------------------------------------------------------------------------------------------


def _id_range(source: ScoreSource) -> tuple[int, int]:
    found = column_range(source, "sample_id")
    if found is None:
        raise ValueError(f"The score log ({source.description}) is empty: it holds no record.")
    return int(found[0]), int(found[1])


def _window_estimate(source: ScoreSource, windows: WindowsLike) -> int:
    """An upper estimate of the number of windows, for sizing the partitions."""
    if windows == "epoch":
        found = column_range(source, "epoch")
        return max(1, math.ceil(found[1])) if found and math.isfinite(found[1]) else 1
    found = column_range(source, "global_step")
    span = int(found[1] - found[0] + 1) if found else 1
    # More windows than steps is refused later, with the in-memory engine's message.
    return span if windows == "step" else min(int(windows), span)


def _partition_count(records: int, id_span: int, m: int, n_signals: int, memory_budget: int) -> int:
    """Partitions so that each one's records and cells fit ``memory_budget``."""
    cells = min(id_span, records) * m
    if cells > MAX_STREAMING_CELLS:
        raise ValueError(
            f"About {min(id_span, records)} samples x {m} windows is too large for the dense vote matrix "
            f"(limit {MAX_STREAMING_CELLS} cells); use fewer windows, e.g. windows=<int>."
        )
    need = records * (_RECORD_BYTES + n_signals * _SIGNAL_RECORD_BYTES) + cells * (
        _CELL_BYTES + n_signals * _SIGNAL_CELL_BYTES
    )
    return max(1, min(math.ceil(need / max(1, memory_budget)), id_span))


# ----------------------------------------------------------------------------------------------
# Spilling: records -> one file per column and partition, in log order
# ----------------------------------------------------------------------------------------------


@dataclass
class _Spill:
    folder: Path
    lo: int
    width: int
    n_partitions: int
    counts: np.ndarray
    signals: tuple[str, ...] = ()
    has_status: bool = False
    step_epochs: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    total: int = 0
    id_min: int = np.iinfo(np.int64).max  # of the spilled (non-repeated) records
    id_max: int = np.iinfo(np.int64).min

    def path(self, partition: int, column: str) -> Path:
        return self.folder / f"part{partition:05d}.{column}"


def _spill(
    source: ScoreSource, columns: list[str], windows: WindowsLike, lo: int, hi: int, n_partitions: int, folder: Path
) -> _Spill:
    """Read the log chunk by chunk and append each record to its partition's files (log order kept)."""
    width = -(-(hi - lo + 1) // n_partitions)
    spill = _Spill(folder, lo, width, n_partitions, np.zeros(n_partitions, dtype=np.int64), signals_of(columns))
    handles: dict[tuple[int, str], BinaryIO] = {}
    try:
        for table in source.chunks(columns, OPTIONAL_COLUMNS):
            chunk = record_chunk(table, windows, spill.signals)
            if chunk.size == 0:
                continue
            _spill_chunk(spill, chunk, handles)
    finally:
        for handle in handles.values():
            handle.close()
    if spill.total == 0:
        raise ValueError(f"The score log ({source.description}) is empty once repeated records are dropped.")
    return spill


def _spill_chunk(spill: _Spill, chunk: RecordChunk, handles: dict) -> None:
    ids = chunk.int_ids()
    columns = {"step": chunk.steps, "id": ids, "bw": chunk.bw, "score": chunk.scores}
    if chunk.status is not None:
        if not spill.has_status:
            _backfill_status(spill, handles)
        spill.has_status = True
    if spill.has_status:
        columns["status"] = chunk.status if chunk.status is not None else np.zeros(ids.size, dtype=np.int8)
    columns.update({f"signal.{name}": values for name, values in chunk.signals.items()})
    spill.step_epochs.append(chunk.step_epochs)
    partition = (ids - spill.lo) // spill.width
    counts = np.bincount(partition, minlength=spill.n_partitions)
    order = np.argsort(partition, kind="stable")  # stable: log order inside each partition
    starts = np.r_[0, np.cumsum(counts)]
    for name, values in columns.items():
        ordered = values[order]
        for p in np.flatnonzero(counts):
            key = (int(p), name)
            if key not in handles:
                handles[key] = open(spill.path(int(p), name), "ab")
            handles[key].write(ordered[starts[p] : starts[p + 1]].tobytes())
    spill.counts += counts
    spill.total += ids.size
    spill.id_min, spill.id_max = min(spill.id_min, int(ids.min())), max(spill.id_max, int(ids.max()))


def _backfill_status(spill: _Spill, handles: dict) -> None:
    """The first chunk with a non-scored record: the records spilled before it were all scored (status 0)."""
    for p in np.flatnonzero(spill.counts):
        handle = handles.setdefault((int(p), "status"), open(spill.path(int(p), "status"), "ab"))
        handle.write(np.zeros(int(spill.counts[p]), dtype=np.int8).tobytes())


# ----------------------------------------------------------------------------------------------
# Reducing: one partition at a time, by the in-memory engine's reduction
# ----------------------------------------------------------------------------------------------


def _reduce_partitions(spill: _Spill, step_map: StepWindows) -> WindowedScores:
    m = len(step_map.names)
    total = spill.total
    # The in-memory engine's choices for the whole log, from the ids it would see.
    dense = dense_ids(spill.id_min, spill.id_max, total)
    n_codes = spill.id_max - spill.id_min + 1 if dense else _distinct_ids(spill)
    bincount = bincount_cells(n_codes * m, total)
    output = WindowedScoresBuilder(min(n_codes, total), step_map, spill.signals, spill.folder)
    for p in progress_bar(range(spill.n_partitions), desc="Reducing sample-id ranges", unit="range"):
        if spill.counts[p] == 0:
            continue
        output.add(reduce_records(_load_partition(spill, p), step_map, dense=dense, bincount=bincount))
    return output.build()


def _load_partition(spill: _Spill, p: int) -> Records:
    arrays = {name: np.fromfile(spill.path(p, name), dtype=dtype) for name, dtype in _SPILL if name != "status"}
    status = np.fromfile(spill.path(p, "status"), dtype=np.int8) if spill.has_status else None
    if status is not None and not (status != 0).any():
        status = None
    return Records(
        count=int(spill.counts[p]),
        steps=arrays["step"],
        bw=arrays["bw"],
        scores=arrays["score"],
        int_ids=arrays["id"],
        status=status,
        signals={name: np.fromfile(spill.path(p, f"signal.{name}"), dtype=np.float32) for name in spill.signals},
    )


def _distinct_ids(spill: _Spill) -> int:
    """The number of distinct sample ids (partitions hold disjoint id ranges, so per-partition counts add up)."""
    return sum(
        np.unique(np.fromfile(spill.path(p, "id"), dtype=np.int64)).size
        for p in range(spill.n_partitions)
        if spill.counts[p]
    )
