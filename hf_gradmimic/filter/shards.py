"""Checking a score log's shards before they are read: unreadable files, gaps in the step ranges, duplicated records.

`MimicTrainer` writes each rank's records as Parquet shards named after the optimizer steps they
hold (`hf_gradmimic.score_log_io`). Before Stage 2 (Huang et al., arXiv 2501.06708, Section 4.2) reduces
them, `plan_shards` looks at every shard once, cheaply (its footer, and the ids of the few steps
that two shards of one rank share), so that:

- a corrupt, truncated or empty file is named (`BadShardError`), or skipped with a warning listing
  every skipped file when ``on_bad_shard="skip"``;
- a gap in a rank's step ranges (a lost shard) is warned about;
- records held twice (the same rank, step and sample in two shards, e.g. a shard copied in from
  another run, or twice in one shard, e.g. two runs that wrote into one file) are warned about and read
  once: the later copies are dropped row by row. Two shards of one rank may legitimately share a
  boundary step (the writer flushed mid-step, then again at a checkpoint) with *different* samples;
  those records are all kept, and so are the records flagged ``repeated`` (a sample a distributed
  sampler repeated within a step).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..progress import progress_bar
from ..score_log_io import read_shard_table

__all__ = ["BAD_SHARD_POLICIES", "BadShardError", "ShardPlan", "plan_shards", "read_shard"]

BadShardPolicy = Literal["error", "skip"]
BAD_SHARD_POLICIES: tuple[str, ...] = ("error", "skip")

_NAME = re.compile(r"^rank(?P<rank>\d+)-steps(?P<first>\d+)-(?P<last>\d+)\.parquet$")


class BadShardError(ValueError):
    """A score-log shard cannot be read (corrupt, truncated, empty, or lacking columns); ``path`` names it."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:
        # Pickled by a Ray task that raises it: the default rebuilds it from ``args`` (the message) alone.
        return type(self), (str(self), self.path)


@dataclass
class ShardPlan:
    """What to read: the readable shards in step order, rows to drop from some of them, what was skipped."""

    shards: list[Path]
    drop_rows: dict[Path, np.ndarray] = field(default_factory=dict)  # row positions of duplicated records
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_rows: int = 0
    # Every column that some readable shard has, in first-seen order: a run resumed across versions of the
    # writer has shards with and shards without a newer optional column.
    columns: list[str] = field(default_factory=list)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _bad(path: Path, error: BaseException | str) -> BadShardError:
    reason = error if isinstance(error, str) else _describe(error)
    return BadShardError(
        f"Score-log shard {path} cannot be read ({reason}). Remove or restore that file, or pass "
        "on_bad_shard='skip' (CLI: --on-bad-shard skip) to build the filter without it.",
        path,
    )


def read_shard(path: Path, columns: Sequence[str] | None = None, optional: Sequence[str] = ()) -> pa.Table:
    """Read one shard; any failure is a `BadShardError` naming the file.

    ``optional`` names columns of ``columns`` that a shard may lack (one written before they existed):
    its table then has none of them.
    """
    try:
        if columns is not None and optional:
            names = pq.read_schema(path).names
            columns = [c for c in columns if c in names or c not in optional]
        return read_shard_table(path, columns)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise _bad(path, error) from error


def _footer(path: Path, needed: Sequence[str]) -> tuple[int, list[str]]:
    """Rows and column names of a shard, from its footer; a `BadShardError` when it is empty, truncated, not
    Parquet or lacks columns."""
    if path.stat().st_size == 0:
        raise _bad(path, "the file is empty (0 bytes)")
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        rows = parquet.metadata.num_rows
    except (OSError, pa.ArrowException, ValueError) as error:
        raise _bad(path, error) from error
    missing = [name for name in needed if name not in names]
    if missing:
        raise _bad(path, f"it lacks the column(s) {missing}; found {names}")
    return rows, names


def plan_shards(
    paths: Sequence[Path], *, needed: Sequence[str] = (), on_bad_shard: BadShardPolicy = "error"
) -> ShardPlan:
    """Check the shards ``paths`` (in step order) and plan how to read them.

    Args:
        paths: the shards, as `hf_gradmimic.score_log_io.score_shard_paths` lists them.
        needed: columns every shard must have.
        on_bad_shard: ``"error"`` raises `BadShardError` at the first unreadable shard; ``"skip"``
            leaves such shards out and warns once with the list.
    """
    if on_bad_shard not in BAD_SHARD_POLICIES:
        raise ValueError(f"on_bad_shard must be one of {BAD_SHARD_POLICIES}, got {on_bad_shard!r}.")
    plan = ShardPlan(shards=[])
    rows: dict[Path, int] = {}
    columns: dict[str, None] = {}
    for path in paths:
        try:
            rows[path], names = _footer(path, needed)
            columns.update(dict.fromkeys(names))
        except BadShardError as error:
            if on_bad_shard == "error":
                raise
            plan.skipped.append((path, _reason(error)))
            continue
        plan.shards.append(path)
    plan.columns = list(columns)
    while True:
        plan.num_rows = sum(rows[path] for path in plan.shards)
        plan.warnings, plan.drop_rows = [skipped_message(plan.skipped)] if plan.skipped else [], {}
        try:
            _check_step_ranges(plan)
            return plan
        except BadShardError as error:
            # Comparing overlapping shards reads them: a corrupt page under an intact footer shows here.
            if on_bad_shard == "error":
                raise
            plan.shards.remove(error.path)
            plan.skipped.append((error.path, _reason(error)))


def _reason(error: BadShardError) -> str:
    """What is wrong with the shard, as `_bad` put it in the message."""
    return str(error).split(" cannot be read (", 1)[-1].split("). Remove", 1)[0]


def skipped_message(skipped: list[tuple[Path, str]]) -> str:
    """The warning listing the shards that ``on_bad_shard="skip"`` left out."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in skipped)
    return f"Skipped {len(skipped)} unreadable score-log shard(s) (on_bad_shard='skip'), their records are missing: {listed}."


def _check_step_ranges(plan: ShardPlan) -> None:
    """Warn about gaps between a rank's shards; find the records that overlapping shards hold twice."""
    by_rank: dict[int, list[tuple[int, int, Path]]] = {}
    for path in plan.shards:
        match = _NAME.match(path.name)
        if match:
            by_rank.setdefault(int(match["rank"]), []).append((int(match["first"]), int(match["last"]), path))
    for rank, shards in sorted(by_rank.items()):
        shards.sort()
        for _, _, path in progress_bar(shards, desc=f"Checking the score log's shards (rank {rank})", unit="shard"):
            _drop_duplicates_within(plan, rank, path)
        covered_until = None
        earlier: list[tuple[int, int, Path]] = []
        for first, last, path in shards:
            if covered_until is not None and first > covered_until + 1:
                plan.warnings.append(
                    f"Gap in the score log of rank {rank}: no shard holds steps {covered_until + 1}..{first - 1} "
                    f"(between {earlier[-1][2].name} and {path.name}); the records of those steps are missing "
                    "(a lost or deleted shard?)."
                )
            overlapping = [entry for entry in earlier if entry[1] >= first]
            if overlapping:
                _drop_duplicates(plan, rank, (first, last, path), overlapping)
            earlier.append((first, last, path))
            covered_until = last if covered_until is None else max(covered_until, last)


def _step_ids(path: Path, lo: int, hi: int) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """``(row positions, sample ids, steps)`` of the records of ``path`` with ``lo <= global_step <= hi``."""
    table = read_shard(path, ["global_step", "sample_id"])
    steps = table.column("global_step").to_numpy()
    rows = np.flatnonzero((steps >= lo) & (steps <= hi))
    return rows, table.column("sample_id").take(pa.array(rows)).combine_chunks(), steps[rows]


def _drop_duplicates(
    plan: ShardPlan, rank: int, shard: tuple[int, int, Path], overlapping: list[tuple[int, int, Path]]
) -> None:
    """Rows of ``shard`` whose (step, sample) an earlier shard of the same rank already holds are dropped."""
    first, last, path = shard
    hi = min(last, max(entry[1] for entry in overlapping))
    rows, ids, steps = _step_ids(path, first, hi)
    seen_ids, seen_steps = [], []
    for _, _, earlier_path in overlapping:
        _, earlier_ids, earlier_steps = _step_ids(earlier_path, first, hi)
        seen_ids.append(earlier_ids.cast(ids.type) if earlier_ids.type != ids.type else earlier_ids)
        seen_steps.append(earlier_steps)
    seen = pa.concat_arrays(seen_ids)
    # One code per distinct id over both sides, then one int key per (step, id) pair.
    encoded = pa.concat_arrays([ids, seen]).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_codes = len(encoded.dictionary)
    keys = (np.concatenate([steps, *seen_steps]) - first) * n_codes + codes
    duplicate = np.isin(keys[: len(ids)], keys[len(ids) :])
    if not duplicate.any():
        return  # a shared boundary step holding other samples: a mid-step flush, nothing duplicated
    for _, _, earlier_path in overlapping:
        # The copies here are dropped for the earlier shard's: read it whole first, so that a corrupt page in a
        # column not read above is found now (and the shard skipped, keeping these copies) rather than at reading.
        read_shard(earlier_path)
    _add_drops(plan, path, rows[duplicate])
    names = ", ".join(p.name for _, _, p in overlapping)
    plan.warnings.append(
        f"Duplicated records in the score log of rank {rank}: {int(duplicate.sum())} record(s) of steps {first}..{hi} "
        f"in {path} are already in {names} (the same step and sample_id); each is counted once, the copies in "
        f"{path.name} are dropped."
    )


def _add_drops(plan: ShardPlan, path: Path, rows: np.ndarray) -> None:
    earlier = plan.drop_rows.get(path)
    plan.drop_rows[path] = rows if earlier is None else np.union1d(earlier, rows)


def _drop_duplicates_within(plan: ShardPlan, rank: int, path: Path) -> None:
    """Rows of ``path`` whose (step, sample) an earlier row of the same shard holds, both not flagged ``repeated``."""
    names = pq.read_schema(path).names
    try:
        table = read_shard(path, ["global_step", "sample_id", *(["repeated"] if "repeated" in names else [])])
    except BadShardError:
        return  # a corrupt page: reading the shard names it (or skips it, with on_bad_shard="skip")
    rows = np.arange(table.num_rows)
    if "repeated" in names:
        rows = rows[~table.column("repeated").to_numpy(zero_copy_only=False).astype(bool)]
    steps = table.column("global_step").to_numpy()[rows].astype(np.int64)
    codes, n_codes = _id_codes(table.column("sample_id"), rows, int(steps.max(initial=0)))
    keys = steps * n_codes + codes
    ordered = np.sort(keys)  # the common case, no duplicate, costs one in-place sort and no stable argsort
    if not (ordered[1:] == ordered[:-1]).any():
        return
    del ordered
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    _add_drops(plan, path, rows[~first])
    plan.warnings.append(
        f"Duplicated records in the score log of rank {rank}: {int((~first).sum())} record(s) in {path} repeat a "
        "(step, sample_id) the same shard already holds (two runs writing into one output_dir at once?); each is "
        "counted once, the later copies are dropped."
    )


def _id_codes(sample_ids: pa.ChunkedArray, rows: np.ndarray, max_step: int) -> tuple[np.ndarray, int]:
    """``(a code per row of rows, the number of codes)``: integer ids minus their minimum when ``step * codes``
    cannot overflow (no hashing), else dictionary codes."""
    if pa.types.is_integer(sample_ids.type) and sample_ids.null_count == 0 and rows.size:
        ids = sample_ids.to_numpy()[rows].astype(np.int64)
        lo, hi = int(ids.min()), int(ids.max())
        if (max_step + 1) * (hi - lo + 1) < 2**62:
            ids -= lo
            return ids, hi - lo + 1
    encoded = sample_ids.combine_chunks().take(pa.array(rows)).dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), max(len(encoded.dictionary), 1)


def without_rows(table: pa.Table, drop: np.ndarray | None) -> pa.Table:
    """``table`` without the row positions ``drop`` (order kept)."""
    if drop is None or drop.size == 0:
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    keep[drop] = False
    return table.filter(pa.array(keep))
