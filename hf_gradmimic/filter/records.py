"""Score-log chunks -> compact per-record numpy arrays: the columns checked, repeated rows dropped, status read.

Every engine reads the log through `record_chunk` (one shard or slice at a time) so that a record means
the same on each: its optimizer step, sample id, ``b * w`` (``b`` the size of the batch the softmax ran
over, ``w`` the sample's weight; Huang et al., arXiv 2501.06708, Section 4.2), mimic score, status
(`hf_gradmimic.score_log_io`) and the per-record signals (`SIGNAL_COLUMNS`) that the log holds. The in-memory
engine keeps them in preallocated buffers (`read_records`, `Records`); the others spill or shuffle
them by sample-id range first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..score_log_io import STATUS_SCORED, STATUS_UNLABELED, read_shard_table
from .inputs import ScoresLike, ScoreSource, score_source
from .shards import BadShardPolicy
from .windows import WindowsLike, distinct_steps

__all__ = [
    "OPTIONAL_COLUMNS",
    "SCORE_COLUMNS",
    "SIGNAL_COLUMNS",
    "RecordChunk",
    "Records",
    "chunk_status",
    "column_range",
    "columns_to_read",
    "open_source",
    "read_records",
    "record_chunk",
    "signals_of",
    "without_repeated",
]

SCORE_COLUMNS: tuple[str, ...] = ("global_step", "sample_id", "mimic_score", "weight", "batch_size")
"""The columns every reduction reads (``epoch`` too for ``windows="epoch"``)."""

SIGNAL_COLUMNS: tuple[str, ...] = ("loss", "reference_loss", "margin", "reference_margin")
"""Optional per-record values of the log, reduced to per-(sample, window) means when present (`WindowedScores.signals`)."""

OPTIONAL_COLUMNS: tuple[str, ...] = ("repeated", "status", *SIGNAL_COLUMNS)
"""Columns read when the log has them; a shard without one (written before it existed) reads as all not
repeated, all scored, or with its signal values missing."""


def _needed(windows: WindowsLike) -> list[str]:
    return list(SCORE_COLUMNS) + (["epoch"] if windows == "epoch" else [])


def open_source(scores: ScoresLike, windows: WindowsLike, on_bad_shard: BadShardPolicy) -> ScoreSource:
    """The score log as a `ScoreSource`, its shards checked for the columns the reduction reads."""
    return score_source(scores, on_bad_shard=on_bad_shard, needed=_needed(windows))


def columns_to_read(source: ScoreSource, windows: WindowsLike) -> list[str]:
    """The score-log columns the reduction reads, the optional ones the log has included; a ValueError names the missing ones."""
    available = source.column_names()
    needed = _needed(windows)
    missing = [c for c in needed if c not in available]
    if missing:
        raise ValueError(f"The score log ({source.description}) lacks the column(s) {missing}; found {available}.")
    return needed + [c for c in OPTIONAL_COLUMNS if c in available]


def signals_of(columns: list[str]) -> tuple[str, ...]:
    """The signal columns among ``columns``, in `SIGNAL_COLUMNS` order."""
    return tuple(name for name in SIGNAL_COLUMNS if name in columns)


@dataclass
class RecordChunk:
    """One chunk's records (repeated ones dropped) as numpy arrays; ``ids`` stays Arrow (it may hold strings)."""

    steps: np.ndarray  # int64 global_step
    ids: pa.ChunkedArray  # sample_id, no nulls
    bw: np.ndarray  # float32 b * w (0 for unscored records)
    scores: np.ndarray  # float32 mimic_score, NaN allowed
    status: np.ndarray | None  # int8, None when every record is scored
    signals: dict[str, np.ndarray]  # float32 per signal column, NaN where missing
    step_epochs: tuple[np.ndarray, np.ndarray | None]  # `distinct_steps` of the chunk

    @property
    def size(self) -> int:
        return self.steps.size

    def int_ids(self) -> np.ndarray:
        """The ids as int64 (integer ids only)."""
        return self.ids.to_numpy().astype(np.int64, copy=False)


def record_chunk(chunk: pa.Table, windows: WindowsLike, signals: tuple[str, ...]) -> RecordChunk:
    """A chunk of the log read with `columns_to_read` -> its records as arrays (repeated records dropped).

    ``signals`` are the log's signal columns (`signals_of`); one that the chunk lacks reads as missing values.
    """
    chunk = without_repeated(chunk)
    steps = _column_numpy(chunk, "global_step").astype(np.int64, copy=False)
    ids = chunk.column("sample_id")
    if ids.null_count:
        raise ValueError(f"Column 'sample_id' of the score log holds {ids.null_count} null value(s).")
    status = chunk_status(chunk)
    epochs = _column_numpy(chunk, "epoch") if windows == "epoch" else None
    return RecordChunk(
        steps=steps,
        ids=ids,
        bw=_b_times_w(chunk, status).astype(np.float32),
        scores=_column_numpy(chunk, "mimic_score").astype(np.float32, copy=False),
        status=status,
        # A missing value (null, or no column) reads as NaN: the record abstains for that signal.
        signals={
            name: np.asarray(chunk.column(name).to_numpy(zero_copy_only=False), dtype=np.float32)
            if name in chunk.column_names
            else np.full(steps.size, np.nan, dtype=np.float32)
            for name in signals
        },
        step_epochs=distinct_steps(steps, epochs) if steps.size else (steps, epochs),
    )


@dataclass
class Records:
    """The score log's records as compact numpy arrays, repeated records dropped.

    The reduction sets a buffer to None (or pops it) once it is done with it, so that its memory is
    returned before the next step allocates (the arrays are one entry per record).
    """

    count: int
    steps: np.ndarray | None  # int64 global_step
    bw: np.ndarray | None  # float32 b * w
    scores: np.ndarray | None  # float32 mimic_score, NaN allowed
    int_ids: np.ndarray | None  # int64 sample_id, when the ids are integers
    other_ids: list[pa.Array] = field(default_factory=list)  # the sample_id chunks otherwise (strings...)
    step_epochs: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    status: np.ndarray | None = None  # int8 status, allocated once a chunk holds a non-scored record
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # float32 per signal column of the log


def read_records(source: ScoreSource, windows: WindowsLike) -> Records:
    """Fill preallocated numpy buffers chunk by chunk (one shard or slice in memory at a time)."""
    columns = columns_to_read(source, windows)
    signals = signals_of(columns)
    capacity = source.num_rows()
    if capacity == 0:
        raise ValueError(f"The score log ({source.description}) is empty: it holds no record.")
    records = Records(
        count=0,
        steps=np.empty(capacity, dtype=np.int64),
        bw=np.empty(capacity, dtype=np.float32),
        scores=np.empty(capacity, dtype=np.float32),
        int_ids=None,
        signals={name: np.empty(capacity, dtype=np.float32) for name in signals},
    )
    for table in source.chunks(columns, OPTIONAL_COLUMNS):
        chunk = record_chunk(table, windows, signals)
        if chunk.size == 0:
            continue
        sl = slice(records.count, records.count + chunk.size)
        records.steps[sl] = chunk.steps
        records.bw[sl] = chunk.bw
        records.scores[sl] = chunk.scores
        for name, values in chunk.signals.items():
            records.signals[name][sl] = values
        if chunk.status is not None:
            if records.status is None:
                records.status = np.zeros(capacity, dtype=np.int8)
            records.status[sl] = chunk.status
        _store_ids(records, chunk.ids, sl, capacity)
        records.step_epochs.append(chunk.step_epochs)
        records.count += chunk.size
    if records.count == 0:
        raise ValueError(f"The score log ({source.description}) is empty once repeated records are dropped.")
    if records.int_ids is not None and records.other_ids:
        raise ValueError("The score log mixes integer and non-integer sample_id types across shards.")
    filled = records.count
    records.steps, records.bw, records.scores = records.steps[:filled], records.bw[:filled], records.scores[:filled]
    records.signals = {name: values[:filled] for name, values in records.signals.items()}
    if records.int_ids is not None:
        records.int_ids = records.int_ids[:filled]
    if records.status is not None:
        records.status = records.status[:filled]
    return records


def chunk_status(chunk: pa.Table) -> np.ndarray | None:
    """The int8 ``status`` of a chunk's records, or None when every record is scored (or there is no column)."""
    if "status" not in chunk.column_names:
        return None
    status = _column_numpy(chunk, "status").astype(np.int8, copy=False)
    unknown = (status < STATUS_SCORED) | (status > STATUS_UNLABELED)
    if unknown.any():
        raise ValueError(
            f"Column 'status' of the score log holds {int(unknown.sum())} value(s) other than 0 (scored), "
            f"1 (non-finite) or 2 (unlabeled), e.g. {np.unique(status[unknown])[:5].tolist()}."
        )
    return status if (status != STATUS_SCORED).any() else None


def without_repeated(chunk: pa.Table) -> pa.Table:
    """``chunk`` without the records a distributed sampler repeated (as `load_scores` drops them)."""
    if "repeated" in chunk.column_names:
        repeated = chunk.column("repeated")
        if pc.any(repeated).as_py():
            return chunk.filter(pc.invert(repeated))
    return chunk


def _column_numpy(chunk: pa.Table, name: str) -> np.ndarray:
    column = chunk.column(name)
    if column.null_count:
        raise ValueError(f"Column {name!r} of the score log holds {column.null_count} null value(s).")
    return column.to_numpy()


def _b_times_w(chunk: pa.Table, status: np.ndarray | None = None) -> np.ndarray:
    """``b * w`` per record in float64; a ValueError when a scored record's weight is not finite.

    Records that were not scored (``status`` 1 or 2) get 0: the trainer gave them weight 0, and the
    reduction leaves them out of the means anyway.
    """
    weight = _column_numpy(chunk, "weight").astype(np.float64)
    if status is not None:
        weight[status != STATUS_SCORED] = 0.0
    if not np.isfinite(weight).all():
        raise ValueError(
            f"The score log holds {int((~np.isfinite(weight)).sum())} non-finite weight(s); "
            "weights must be finite (NaN is only allowed in mimic_score)."
        )
    weight *= _column_numpy(chunk, "batch_size")
    return weight


def _store_ids(records: Records, ids: pa.ChunkedArray, sl: slice, capacity: int) -> None:
    """Integer ids go into a numpy buffer (allocated on first use); other ids are kept as Arrow chunks."""
    if pa.types.is_integer(ids.type):
        if records.int_ids is None:
            records.int_ids = np.empty(capacity, dtype=np.int64)
        records.int_ids[sl] = ids.to_numpy()
    else:
        records.other_ids.extend(ids.chunks)


def column_range(source: ScoreSource, name: str) -> tuple[float, float] | None:
    """``(min, max)`` of a numeric column, from the shards' footer statistics (no data read) when every
    row group has them, else by reading the column; None when it has no value."""
    if source.table is not None:
        result = pc.min_max(source.table.column(name)).as_py()
        return None if result["min"] is None else (result["min"], result["max"])
    lows, highs = [], []
    for shard in source.shards:
        metadata = pq.ParquetFile(shard).metadata
        index = metadata.schema.to_arrow_schema().get_field_index(name)
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(index).statistics
            if metadata.row_group(group).num_rows == 0:
                continue
            if stats is None or not stats.has_min_max:
                column = read_shard_table(shard, [name]).column(name)
                result = pc.min_max(column).as_py()
                lows.append(result["min"])
                highs.append(result["max"])
                break
            lows.append(stats.min)
            highs.append(stats.max)
    lows = [v for v in lows if v is not None]
    return (min(lows), max(v for v in highs if v is not None)) if lows else None
