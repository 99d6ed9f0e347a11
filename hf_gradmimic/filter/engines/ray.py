"""The Ray engine (``engine="ray"``): the score log's shards read and reduced per (sample, window) by Ray tasks.

For logs beyond one machine. The same reduction as the out-of-core engine (`hf_gradmimic.filter.engines.outofcore`),
spread over a cluster with Ray's tasks and object store (``pip install "hf-gradmimic[ray]"``), as a map-reduce
shuffle (Ray's "simple shuffle" pattern):

1. one task per shard reads it once (the shard checks of `hf_gradmimic.filter.shards` hold: unreadable
   shards named or skipped, duplicated records dropped) and returns its distinct steps and id range, and its
   records split by sample-id range (step, id, ``b * w``, score, status, signals), each range one object;
2. the driver makes the step -> window map from the steps (Huang et al., arXiv 2501.06708, Section 4.2);
3. one task per sample-id range takes that range's object of every shard, in shard order (the log order, so the
   sums are made in it), and reduces them with the same `reduce_records` as the other engines;
4. the driver gathers the per-sample window means, which `build_filter` then decides on
   (`hf_gradmimic.filter.decide`): identification per window and Snorkel's LabelModel.

The result equals the single-machine one (the same sums in the same order; for sample ids too sparse to
be coded densely, a (sample, window) cell with 8 or more records may be summed pairwise on one side and
sequentially on the other, a last-bit difference). The driver writes each range's result to a spill folder as it
arrives and then appends the ranges in sample-id order to the memory-mapped output of the other engines
(`WindowedScoresBuilder`), so its memory is one range's result, not the pool's: the spill folder needs about 8 bytes
per (sample, window) cell (and 4 per cell and signal) plus 28 per sample, twice. The shards' split records live
in Ray's object store (which spills to disk when full) until the range tasks have read them.
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
import pyarrow.parquet as pq

from ...progress import progress_bar
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
    except ImportError as error:  # pragma: no cover - the message is the point
        raise ImportError(
            'engine="ray" needs Ray: pip install "hf-gradmimic[ray]" (or "ray"), then connect to your cluster with '
            "ray.init(address=...) before build_filter (without it, a local Ray instance is started)."
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
    lo, hi = column_range(source, "sample_id")
    lo, hi = int(lo), int(hi)
    if n_ranges is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_ranges = max(cpus, math.ceil(_footer_rows(source) / RECORDS_PER_RANGE))
    width = -(-(hi - lo + 1) // n_ranges)
    split = ray.remote(_split_shard).options(num_returns=n_ranges + 1)
    # Each shard's [summary, range 0, ..., range n_ranges - 1], in shard (log) order.
    shard_refs = [
        split.remote(
            {
                "path": str(path),
                "drop": source.plan.drop_rows.get(path, np.zeros(0, np.int64)),
                "on_bad_shard": source.on_bad_shard,
            },
            columns,
            windows,
            signals,
            lo,
            width,
            n_ranges,
        )
        for path in source.shards
    ]
    shard_info = ray.get([refs[0] for refs in shard_refs])
    unreadable = [path for path, row in zip(source.shards, shard_info) if row["unreadable"]]
    if unreadable:
        message = skipped_message([(path, "its data cannot be read") for path in unreadable])
        warn_list.append(message)
        warn(message)
    step_map, stats = _step_map(shard_info, windows, warn_list, source.description)
    m = len(step_map.names)
    dense = dense_ids(stats["id_min"], stats["id_max"], stats["count"])
    n_codes = (
        stats["id_max"] - stats["id_min"] + 1 if dense else min(stats["count"], stats["id_max"] - stats["id_min"] + 1)
    )
    settings = {
        "step_map": step_map,
        "dense": dense,
        "bincount": bincount_cells(n_codes * m, stats["count"]),
        "signals": signals,
    }
    range_counts = np.sum([row["range_counts"] for row in shard_info], axis=0)
    reduce = ray.remote(_reduce_range)
    pending = [
        reduce.remote(
            settings, *[refs[1 + index] for refs, row in zip(shard_refs, shard_info) if row["range_counts"][index]]
        )
        for index in np.flatnonzero(range_counts)
    ]
    del shard_refs  # each shard's split records are freed once the range tasks that read them are done
    folder = Path(tempfile.mkdtemp(prefix="gradmimic-ray-", dir=spill_dir))
    try:
        spilled = _RangeSpill(folder, lo, width)
        with progress_bar(desc="Reducing sample-id ranges", total=len(pending), unit="range") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                spilled.add(ray.get(done[0]))
                bar.update(1)
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


def _footer_rows(source: ScoreSource) -> int:
    """The shards' record count from their footers (no data read): it only sizes the ranges."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in source.shards)


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


def _split_shard(
    task: dict[str, Any],
    columns: list[str],
    windows: WindowsLike,
    signals: tuple[str, ...],
    lo: int,
    width: int,
    n_ranges: int,
) -> list[dict[str, Any]]:
    """A Ray task: one shard read once, as its summary (distinct steps and epochs, record count, id range, records per
    range) followed by its records split by sample-id range, each in the shard's order."""
    table = _shard_table(task, columns)
    chunk = None if table is None else record_chunk(table, windows, signals)
    if chunk is None or chunk.size == 0:
        summary = {"count": 0, "unreadable": table is None, "range_counts": np.zeros(n_ranges, np.int64)}
        return [summary] + [{}] * n_ranges
    steps, epochs = chunk.step_epochs
    ids = chunk.int_ids()
    ranges = (ids - lo) // width
    order = np.argsort(ranges, kind="stable")  # within a range, the shard's order
    counts = np.bincount(ranges, minlength=n_ranges)
    summary = {
        "count": chunk.size,
        "id_min": int(ids.min()),
        "id_max": int(ids.max()),
        "steps": steps,
        "epochs": np.zeros(0) if epochs is None else epochs,
        "unreadable": False,
        "range_counts": counts,
    }
    columns_of = {"step": chunk.steps, "id": ids, "bw": chunk.bw, "score": chunk.scores}
    if chunk.status is not None:
        columns_of["status"] = chunk.status
    columns_of |= {f"signal.{name}": values for name, values in chunk.signals.items()}
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = [
        {name: values[order[start:stop]] for name, values in columns_of.items()} if stop > start else {}
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]
    return [summary, *parts]


def _step_map(
    shard_info: list[dict[str, Any]], windows: WindowsLike, warn_list: list[str], description: str
) -> tuple[StepWindows, dict[str, int]]:
    """The driver's step -> window map and the record statistics, from every shard's summary (in log order)."""
    shard_info = [row for row in shard_info if row["count"] > 0]
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


def _reduce_range(
    settings: dict[str, Any],
    *parts: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """A Ray task: one sample-id range's records, each shard's in log order, reduced to per-sample window means."""
    signals = settings["signals"]

    def joined(name: str) -> np.ndarray:
        return np.concatenate([part[name] for part in parts])

    # a shard's status is left out when every record of it is scored (0), and so is the range's
    with_status = any("status" in part for part in parts)
    status = (
        np.concatenate([part.get("status", np.zeros(part["id"].size, np.int8)) for part in parts])
        if with_status
        else None
    )
    records = Records(
        count=sum(part["id"].size for part in parts),
        steps=joined("step"),
        bw=joined("bw"),
        scores=joined("score"),
        int_ids=joined("id"),
        status=status if status is not None and (status != 0).any() else None,
        signals={name: joined(f"signal.{name}") for name in signals},
    )
    part = reduce_records(records, settings["step_map"], dense=settings["dense"], bincount=settings["bincount"])
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
    """The range tasks' results (one range each), written to ``folder`` as they reach the driver, then appended in
    sample-id order to a memory-mapped `WindowedScoresBuilder`: the driver holds one range's result at a time. The
    ranges' ids are disjoint intervals, so ordering the ranges, then each range within, orders every id."""

    def __init__(self, folder: Path, lo: int, width: int) -> None:
        self.folder, self.lo, self.width = folder, lo, width
        self.parts: list[tuple[int, int, list[str]]] = []  # (range, index, column names)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ids = np.asarray(batch["sample_id"])
        if not ids.size:
            return
        index = len(self.parts)
        for name, values in batch.items():
            np.save(self.folder / f"part{index:06d}.{name}.npy", np.asarray(values), allow_pickle=False)
        self.parts.append((int((ids[0] - self.lo) // self.width), index, list(batch)))  # one range per task

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
