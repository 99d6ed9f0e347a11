"""The Ray engine (``engine="ray"``): the score log's shards read and reduced per (sample, window) by Ray Data.

For logs beyond one machine. The same reduction as the out-of-core engine (`hf_gradmimic.filter.engines.outofcore`),
spread over a cluster with Ray Data (``pip install "hf-gradmimic[ray]"``):

1. one task per shard reads it (the shard checks of `hf_gradmimic.filter.shards` hold: unreadable
   shards named or skipped, duplicated records dropped) and returns its distinct steps and id range;
   the driver makes the step -> window map (Huang et al., arXiv 2501.06708, Section 4.2);
2. one task per shard turns its records into (sample-id range, log position, step, id, ``b * w``,
   score, status, signals) rows;
3. Ray Data shuffles them by sample-id range (``groupby(...).map_groups``); each range is put back in
   log order and reduced by the same `reduce_records` as the other engines;
4. the driver gathers the per-sample window means, which `build_filter` then decides on
   (`hf_gradmimic.filter.decide`): identification per window and Snorkel's LabelModel.

The result equals the single-machine one (the same sums in the same order; for sample ids too sparse to
be coded densely, a (sample, window) cell with 8 or more records may be summed pairwise on one side and
sequentially on the other, a last-bit difference). The driver writes each range's result to a spill folder as it
arrives and then appends the ranges in sample-id order to the memory-mapped output of the other engines
(`WindowedScoresBuilder`), so its memory is one range's result, not the pool's: the spill folder needs about 8 bytes
per (sample, window) cell (and 4 per cell and signal) plus 28 per sample, twice.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..inputs import ScoresLike, ScoreSource
from ..records import OPTIONAL_COLUMNS, Records, column_range, columns_to_read, open_source, record_chunk, signals_of
from ..reduction import (
    MAX_LISTED_IDS,
    WindowedScores,
    WindowedScoresBuilder,
    bincount_cells,
    completed,
    dense_ids,
    reduce_records,
)
from ..shards import BadShardError, BadShardPolicy, read_shard, skipped_message, without_rows
from ..warning import warn
from ..windows import StepWindows, WindowsLike, check_windows
from .base import Engine

__all__ = ["RECORDS_PER_RANGE", "RayEngine", "collect_windows_ray"]

RECORDS_PER_RANGE = 8_000_000
"""Records per sample-id range that one reduce task takes (its working set is about 64 bytes each)."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:  # pragma: no cover - the message is the point
        raise ImportError(
            'engine="ray" needs Ray Data: pip install "hf-gradmimic[ray]" (or "ray[data]"), then connect to your '
            "cluster with ray.init(address=...) before build_filter (without it, a local Ray instance is started)."
        ) from error
    return ray


def collect_windows_ray(
    scores: str | os.PathLike | ScoreSource,
    windows: WindowsLike = "epoch",
    *,
    on_bad_shard: BadShardPolicy = "error",
    n_ranges: int | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> WindowedScores:
    """`collect_windows` on the current Ray cluster: the same `WindowedScores` as on one machine.

    Args:
        scores: an ``output_dir`` or its ``mimic_scores/`` folder, on storage every Ray node can read
            (or the `ScoreSource` of its shards).
        windows: ``"epoch"``, ``"step"`` or an int, as for `build_filter`.
        on_bad_shard: ``"error"`` or ``"skip"`` (see `hf_gradmimic.filter.shards`).
        n_ranges: how many sample-id ranges the records are shuffled into (default: one per
            `RECORDS_PER_RANGE` records, at least the cluster's CPU count).
        spill_dir: where the driver's spill folder goes (removed at the end; its output files stay mapped until
            the result is released); default: the system's temporary folder.
    """
    ray = _ray()
    check_windows(windows)
    if isinstance(scores, ScoreSource) and scores.shards is not None:
        source = scores
    elif isinstance(scores, (str, os.PathLike)):
        source = open_source(scores, windows, on_bad_shard)
    else:
        raise TypeError("engine='ray' reads the score log's shards: pass an output_dir or its mimic_scores/ folder.")
    if not pa.types.is_integer(source.schema().field("sample_id").type):
        raise ValueError("engine='ray' needs integer sample ids; use engine='streaming' for other id types.")
    warn_list: list[str] = source.warnings
    for message in warn_list:
        warn(message)
    columns = columns_to_read(source, windows)
    signals = signals_of(columns)
    tasks = [
        {
            "index": i,
            "path": str(path),
            "drop": source.plan.drop_rows.get(path, np.zeros(0, np.int64)).tolist(),
            "on_bad_shard": source.on_bad_shard,
        }
        for i, path in enumerate(source.shards)
    ]
    shard_info = (
        ray.data.from_items(tasks)
        .map_batches(_shard_summary, fn_kwargs={"columns": columns, "windows": windows}, batch_size=1)
        .take_all()
    )
    unreadable = [source.shards[int(row["index"])] for row in shard_info if row["unreadable"]]
    if unreadable:
        message = skipped_message([(path, "its data cannot be read") for path in unreadable])
        warn_list.append(message)
        warn(message)
    step_map, stats = _step_map(shard_info, windows, warn_list, source.description)
    lo, hi = column_range(source, "sample_id")
    lo, hi = int(lo), int(hi)
    if n_ranges is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_ranges = max(cpus, math.ceil(stats["count"] / RECORDS_PER_RANGE))
    width = -(-(hi - lo + 1) // n_ranges)
    m = len(step_map.names)
    dense = dense_ids(stats["id_min"], stats["id_max"], stats["count"])
    n_codes = (
        stats["id_max"] - stats["id_min"] + 1 if dense else min(stats["count"], stats["id_max"] - stats["id_min"] + 1)
    )
    settings = {
        "step_map": step_map,
        "dense": dense,
        "bincount": bincount_cells(n_codes * m, stats["count"]),
        "has_status": "status" in columns,
        "signals": signals,
    }
    records = ray.data.from_items(tasks).map_batches(
        _shard_records,
        fn_kwargs={"columns": columns, "windows": windows, "lo": lo, "width": width, "signals": signals},
        batch_size=1,
    )
    # One shuffle partition per range (Ray's default of 200 would make mostly empty reduce tasks).
    reduced = records.groupby("range", num_partitions=n_ranges).map_groups(
        _reduce_range, fn_kwargs=settings, batch_format="numpy"
    )
    folder = Path(tempfile.mkdtemp(prefix="gradmimic-ray-", dir=spill_dir))
    try:
        spilled = _RangeSpill(folder, lo, width)
        for part in reduced.iter_batches(batch_format="numpy", batch_size=None):
            spilled.add(part)
        capacity = max(1, min(n_codes, stats["count"]))  # the most samples there can be
        return completed(spilled.gather(step_map, signals, stats["count"], capacity), warn_list)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RayEngine(Engine):
    """``engine="ray"``: `collect_windows_ray` on the current Ray cluster (a local one is started without it)."""

    name = "ray"

    def reduce_log(
        self,
        scores: ScoresLike | ScoreSource,
        windows: WindowsLike,
        on_bad_shard: BadShardPolicy,
        spill_dir: str | os.PathLike | None,
    ) -> WindowedScores:
        return collect_windows_ray(scores, windows, on_bad_shard=on_bad_shard, spill_dir=spill_dir)


def _shard_table(task: dict[str, Any], columns: list[str]) -> pa.Table | None:
    """The shard's records (duplicated ones dropped); None when it is unreadable and skipped."""
    path = Path(task["path"])
    try:
        table = read_shard(path, columns, OPTIONAL_COLUMNS)
    except BadShardError:
        # A footer can be intact over a corrupt page: only reading finds it.
        if task["on_bad_shard"] == "error":
            raise
        return None
    return without_rows(table, np.asarray(task["drop"], dtype=np.int64))


def _shard_summary(batch: dict[str, np.ndarray], columns: list[str], windows: WindowsLike) -> dict[str, np.ndarray]:
    """A Ray task: one shard's distinct steps (and epochs), record count and id range."""
    task = {name: batch[name][0] for name in _TASK_FIELDS}
    table = _shard_table(task, columns)
    chunk = None if table is None else record_chunk(table, windows, signals_of(columns))
    if chunk is None or chunk.size == 0:
        return {
            "index": np.array([task["index"]]),
            "count": np.array([0]),
            "id_min": np.array([0]),
            "id_max": np.array([0]),
            "steps": np.array([np.zeros(0, np.int64)], dtype=object),
            "epochs": np.array([np.zeros(0)], dtype=object),
            "unreadable": np.array([table is None]),
        }
    steps, epochs = chunk.step_epochs
    ids = chunk.int_ids()
    return {
        "index": np.array([task["index"]]),
        "count": np.array([chunk.size]),
        "id_min": np.array([int(ids.min())]),
        "id_max": np.array([int(ids.max())]),
        "steps": np.array([steps], dtype=object),
        "epochs": np.array([np.zeros(0) if epochs is None else epochs], dtype=object),
        "unreadable": np.array([False]),
    }


def _step_map(
    shard_info: list[dict[str, Any]], windows: WindowsLike, warn_list: list[str], description: str
) -> tuple[StepWindows, dict[str, int]]:
    """The driver's step -> window map and the record statistics, from every shard's summary (in log order)."""
    shard_info = sorted((row for row in shard_info if row["count"] > 0), key=lambda row: row["index"])
    if not shard_info:
        raise ValueError(f"The score log ({description}) is empty once repeated records are dropped.")
    step_epochs = [
        (np.asarray(row["steps"], np.int64), np.asarray(row["epochs"]) if windows == "epoch" else None)
        for row in shard_info
    ]
    stats = {
        "count": int(sum(row["count"] for row in shard_info)),
        "id_min": int(min(row["id_min"] for row in shard_info)),
        "id_max": int(max(row["id_max"] for row in shard_info)),
    }
    return StepWindows.of(step_epochs, windows, warn_list), stats


_TASK_FIELDS = ("index", "path", "drop", "on_bad_shard")
_RECORD_COLUMNS = (
    ("range", np.int32),
    ("position", np.int64),
    ("step", np.int64),
    ("id", np.int64),
    ("bw", np.float32),
    ("score", np.float32),
    ("status", np.int8),
)


def _shard_records(
    batch: dict[str, np.ndarray],
    columns: list[str],
    windows: WindowsLike,
    lo: int,
    width: int,
    signals: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """A Ray task: one shard's records as rows (sample-id range, log position, step, id, b*w, score, status, signals)."""
    task = {name: batch[name][0] for name in _TASK_FIELDS}
    table = _shard_table(task, columns)
    if table is None:  # skipped (on_bad_shard="skip"); the summary step already warned
        return {name: np.zeros(0, dtype) for name, dtype in _RECORD_COLUMNS} | {
            f"signal.{name}": np.zeros(0, np.float32) for name in signals
        }
    chunk = record_chunk(table, windows, signals)
    ids = chunk.int_ids()
    return {
        "range": ((ids - lo) // width).astype(np.int32),
        # Shard index and row: the log order, restored before reducing so the sums are made in it.
        "position": (np.int64(task["index"]) << 32) + np.arange(ids.size, dtype=np.int64),
        "step": chunk.steps,
        "id": ids,
        "bw": chunk.bw,
        "score": chunk.scores,
        "status": np.zeros(ids.size, np.int8) if chunk.status is None else chunk.status,
    } | {f"signal.{name}": values for name, values in chunk.signals.items()}


def _reduce_range(
    batch: dict[str, np.ndarray],
    step_map: StepWindows,
    dense: bool,
    bincount: bool,
    has_status: bool,
    signals: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """A Ray task: one sample-id range's records, in log order, reduced to per-sample window means."""
    order = np.argsort(batch["position"], kind="stable")
    status = batch["status"][order] if has_status else None
    records = Records(
        count=int(order.size),
        steps=batch["step"][order],
        bw=batch["bw"][order],
        scores=batch["score"][order],
        int_ids=batch["id"][order].copy(),
        status=status if status is not None and (status != 0).any() else None,
        signals={name: batch[f"signal.{name}"][order] for name in signals},
    )
    part = reduce_records(records, step_map, dense=dense, bincount=bincount)
    ids = part.sample_ids.to_numpy()
    n = ids.size
    # Per-range counts, carried by the range's first row: NaN scores, samples without a score, unlabeled
    # records, records (scored, whose signal is not finite) per signal.
    counters = np.zeros((n, 3 + len(signals)), dtype=np.int64)
    counters[0, :3] = (part.n_nan_scores, part.n_without_score, part.n_unlabeled_records)
    out = {
        "sample_id": ids,
        "values": part.values,
        "scores": part.scores,
        "mean_weight": part.mean_weight,
        "mean_score": part.mean_score,
        "n_records": part.n_records,
        "n_nonfinite": np.zeros(n, np.int32) if part.n_nonfinite is None else part.n_nonfinite,
        "has_nonfinite": np.full(n, part.n_nonfinite is not None),
    }
    for k, name in enumerate(signals):
        out[f"signal.{name}"] = part.signals[name]
        count, listed = part.nonfinite_signals.get(name, (0, []))
        counters[0, 3 + k] = count
        out[f"listed.{name}"] = np.isin(ids, listed)  # the range's first samples with a non-finite value
    out["counters"] = counters
    return out


class _RangeSpill:
    """The reduce tasks' results, written to ``folder`` range by range as they reach the driver, then appended in
    sample-id order to a memory-mapped `WindowedScoresBuilder`: the driver holds one batch at a time. A batch may
    hold several ranges (Ray Data coalesces groups into blocks), so each is split by sample-id range first: the
    ranges' ids are disjoint intervals, and ordering the ranges, then each range within, orders every id."""

    def __init__(self, folder: Path, lo: int, width: int) -> None:
        self.folder, self.lo, self.width = folder, lo, width
        self.parts: list[tuple[int, int, list[str]]] = []  # (range, index, column names)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ids = np.asarray(batch["sample_id"])
        if not ids.size:
            return
        ranges = (ids - self.lo) // self.width
        for range_index in np.unique(ranges):
            rows = np.flatnonzero(ranges == range_index)
            index = len(self.parts)
            for name, values in batch.items():
                # rows x (windows or 1); per-range counters ride on a range's first row, which stays in its range
                part = np.asarray(values).reshape(ids.size, -1)[rows]
                np.save(self.folder / f"part{index:06d}.{name}.npy", part, allow_pickle=False)
            self.parts.append((int(range_index), index, list(batch)))

    def _load(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        loaded = {}
        for name in names:
            path = self.folder / f"part{index:06d}.{name}.npy"
            loaded[name] = np.load(path, allow_pickle=False)
            path.unlink()  # read once: the spill shrinks as the output grows
        return loaded

    def gather(
        self, step_map: StepWindows, signals: tuple[str, ...], total_records: int, capacity: int
    ) -> WindowedScores:
        """The ranges' results in sample-id order, as one `WindowedScores` of ``total_records`` records."""
        m = len(step_map.names)
        per_window = {"values", "scores", *(f"signal.{name}" for name in signals)}
        output = WindowedScoresBuilder(capacity, step_map, signals, self.folder)
        for position, (_, index, names) in enumerate(sorted(self.parts)):
            part = self._load(index, names)
            ids = part["sample_id"].ravel()
            order = np.argsort(ids, kind="stable")

            def column(name: str, part=part, order=order, n=ids.size) -> np.ndarray:
                values = np.asarray(part[name])
                return (values.reshape(-1, m) if name in per_window else values.reshape(n, -1).squeeze(-1))[order]

            counters = part["counters"].sum(axis=0)
            sorted_ids = ids[order]
            nonfinite_signals = {
                name: (int(counters[3 + k]), sorted_ids[column(f"listed.{name}")][:MAX_LISTED_IDS].tolist())
                for k, name in enumerate(signals)
                if counters[3 + k]
            }
            output.add(
                WindowedScores(
                    sample_ids=pa.array(sorted_ids),
                    values=column("values"),
                    scores=column("scores"),
                    mean_weight=column("mean_weight"),
                    mean_score=column("mean_score"),
                    n_records=column("n_records"),
                    window_names=step_map.names,
                    window_steps=step_map.ranges,
                    total_records=total_records if position == 0 else 0,  # the log's count, added once
                    n_nan_scores=int(counters[0]),
                    n_without_score=int(counters[1]),
                    n_unlabeled_records=int(counters[2]),
                    n_nonfinite=column("n_nonfinite") if bool(part["has_nonfinite"].any()) else None,
                    signals={name: column(f"signal.{name}") for name in signals},
                    nonfinite_signals=nonfinite_signals,
                )
            )
        return output.build()
