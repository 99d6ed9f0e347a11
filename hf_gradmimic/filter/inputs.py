"""The one place that turns the filter's inputs into Arrow: score logs and the datasets a filter is applied to.

A score log is a path (an ``output_dir`` or its ``mimic_scores/`` folder, read shard by shard), a
`pyarrow.Table`, a `pandas.DataFrame` or a `datasets.Dataset`; a dataset to filter or audit is one
of the last three. Everything else in the filter sees them through `ScoreSource` and `Rows`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..score_log_io import score_shard_paths, scores_dir
from .shards import BadShardError, BadShardPolicy, ShardPlan, plan_shards, read_shard, skipped_message, without_rows
from .warning import warn

__all__ = ["Rows", "ScoreSource", "ScoresLike", "as_rows", "fill_null_scores", "score_source"]

ScoresLike = Union[str, os.PathLike, pa.Table, "datasets.Dataset", "pandas.DataFrame"]  # noqa: F821

# In-memory score logs are reduced in slices of this many records, like shards on disk.
_CHUNK_ROWS = 4_000_000

RowsKind = Literal["pyarrow.Table", "pandas.DataFrame", "datasets.Dataset"]


@dataclass(frozen=True)
class Rows:
    """A table-like input seen through Arrow: a `pyarrow.Table`, a `pandas.DataFrame` or a `datasets.Dataset`."""

    data: Any
    kind: RowsKind

    @property
    def num_rows(self) -> int:
        return self.data.num_rows if self.kind == "pyarrow.Table" else len(self.data)

    @property
    def column_names(self) -> list[str]:
        if self.kind == "pandas.DataFrame":
            return [str(name) for name in self.data.columns]
        return list(self.data.column_names)

    def column(self, name: str) -> pa.Array:
        """One column as a single Arrow array (a `datasets.Dataset` honours its indices mapping)."""
        if name not in self.column_names:
            raise KeyError(f"The dataset has no column {name!r}; columns: {self.column_names}.")
        if self.kind == "pandas.DataFrame":
            return pa.array(self.data[name].to_numpy())
        column = self.data.column(name) if self.kind == "pyarrow.Table" else self.data.with_format("arrow")[name]
        return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    def table(self) -> pa.Table:
        """All the rows as one `pyarrow.Table` (the index of a DataFrame is not kept)."""
        if self.kind == "pyarrow.Table":
            return self.data
        if self.kind == "pandas.DataFrame":
            return pa.Table.from_pandas(self.data, preserve_index=False)
        # The arrow format honours an indices mapping (after .select/.shuffle/.filter).
        return self.data.with_format("arrow")[:]

    def slice(self, start: int, stop: int) -> pa.Table:
        """The rows ``start:stop`` as a `pyarrow.Table`, reading only them (a `datasets.Dataset` honours its indices
        mapping): what lets a pass over every row stay in bounded memory."""
        if self.kind == "pyarrow.Table":
            return self.data.slice(start, stop - start)
        if self.kind == "pandas.DataFrame":
            return pa.Table.from_pandas(self.data.iloc[start:stop], preserve_index=False)
        indices, table = getattr(self.data, "_indices", None), getattr(self.data, "data", None)
        if indices is not None and isinstance(getattr(table, "table", None), pa.Table):
            # After .shuffle/.select/.filter: one vectorised take (datasets' own slicing gathers row by row).
            return _gather(table.table, indices.column(0).slice(start, stop - start).to_numpy().astype(np.int64))
        return self.data.with_format("arrow")[start:stop]

    def take(self, rows: np.ndarray) -> Any:
        """The rows at positions ``rows``, in that order, as the input's own type."""
        if self.kind == "pandas.DataFrame":
            return self.data.iloc[rows]
        if self.kind == "pyarrow.Table":
            return self.data.take(pa.array(rows))
        return self.data.select(rows)


def _gather(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)`` touching only the record batches that hold ``rows``: Arrow's take over a chunked
    table first concatenates every chunk of a string or list column (the whole dataset in memory)."""
    bounds = np.cumsum([0, *(batch.num_rows for batch in table.to_batches())])
    batches = table.to_batches()
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    chunk_of = np.searchsorted(bounds, ordered, side="right") - 1
    pieces = [batches[chunk].take(pa.array(ordered[chunk_of == chunk] - bounds[chunk]))
              for chunk in np.unique(chunk_of)]
    gathered = pa.Table.from_batches(pieces, schema=table.schema).combine_chunks()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return gathered.take(pa.array(inverse))


def as_rows(data: Any) -> Rows:
    """Wrap a `pyarrow.Table`, `pandas.DataFrame` or `datasets.Dataset`; a TypeError names anything else."""
    if isinstance(data, pa.Table):
        return Rows(data, "pyarrow.Table")
    module = type(data).__module__
    if module.startswith("pandas") and hasattr(data, "iloc"):
        return Rows(data, "pandas.DataFrame")
    if isinstance(data, dict) and module.startswith("datasets"):
        raise TypeError(
            f"got a {type(data).__name__} of the splits {list(data)}; pass one split, "
            f"e.g. data[{next(iter(data), 'train')!r}]."
        )
    # Duck-typed: any object with the datasets.Dataset API the filter uses works.
    if all(hasattr(data, attribute) for attribute in ("__len__", "column_names", "select", "with_format")):
        return Rows(data, "datasets.Dataset")
    raise TypeError(
        "expected a datasets.Dataset (e.g. from load_scores), a pyarrow.Table or a pandas.DataFrame, "
        f"got {type(data).__name__}."
    )


@dataclass
class ScoreSource:
    """Where the records come from: Parquet shards read one at a time, or an in-memory table.

    Shards come with their `ShardPlan` (`hf_gradmimic.filter.shards`): unreadable ones already left
    out (``on_bad_shard="skip"``), duplicated records dropped as each shard is read, and the
    warnings about both, which the reduction adds to the filter's summary.
    """

    shards: list[Path] | None = None
    table: pa.Table | None = None
    description: str = ""
    plan: ShardPlan | None = None

    on_bad_shard: BadShardPolicy = "error"

    @property
    def warnings(self) -> list[str]:
        """The plan's warnings: the list itself, so that a shard skipped while reading joins the summary."""
        return [] if self.plan is None else self.plan.warnings

    def column_names(self) -> list[str]:
        """The columns of the records; for shards, every column that some shard has."""
        if self.table is not None:
            return self.table.column_names
        return self.plan.columns if self.plan is not None and self.plan.columns else pq.read_schema(self.shards[0]).names

    def schema(self) -> pa.Schema:
        if self.table is not None:
            return self.table.schema
        return pq.read_schema(self.shards[0])

    def num_rows(self) -> int:
        if self.table is not None:
            return self.table.num_rows
        return self.plan.num_rows

    def chunks(self, columns: list[str], optional: Sequence[str] = ()) -> Iterator[pa.Table]:
        """The records' ``columns``, one shard (or slice of a table) at a time; a shard without some of the
        ``optional`` columns (written before they existed) yields a table without them."""
        if self.table is not None:
            table = self.table.select(columns)
            for start in range(0, table.num_rows, _CHUNK_ROWS):
                yield table.slice(start, _CHUNK_ROWS)
        else:
            # One shard at a time keeps memory at one shard's worth of Arrow data on top of the
            # compact numpy arrays being filled.
            for shard in self.shards:
                try:
                    table = read_shard(shard, columns, optional)
                except BadShardError as error:
                    # A footer can be intact over a corrupt page: only reading finds it.
                    if self.on_bad_shard == "error":
                        raise
                    self.plan.skipped.append((shard, str(error)))
                    message = skipped_message([(shard, "its data cannot be read")])
                    self.plan.warnings.append(message)
                    warn(message)
                    continue
                yield without_rows(table, self.plan.drop_rows.get(shard))


def score_source(scores: ScoresLike, *, on_bad_shard: BadShardPolicy = "error", needed: Sequence[str] = ()) -> ScoreSource:
    """The records of a score log: the checked shards under a path, or the rows of an in-memory table.

    Args:
        scores: an ``output_dir`` or its ``mimic_scores/`` folder, or a table of records.
        on_bad_shard: ``"error"`` (a `BadShardError` names an unreadable shard) or ``"skip"``.
        needed: the columns every shard must have (a shard without them is a bad shard).
    """
    if isinstance(scores, ScoreSource):  # already resolved (e.g. a view of the log made by a labeling function)
        return scores
    if isinstance(scores, (str, os.PathLike)):
        shards = score_shard_paths(scores)
        if not shards:
            raise ValueError(f"The score log at {scores_dir(scores)} is empty: no shard has been written.")
        plan = plan_shards(shards, needed=needed, on_bad_shard=on_bad_shard)
        if not plan.shards:
            raise ValueError(f"Every shard of the score log at {scores_dir(scores)} is unreadable: {plan.warnings[0]}")
        return ScoreSource(shards=plan.shards, description=str(scores_dir(scores)), plan=plan, on_bad_shard=on_bad_shard)
    try:
        rows = as_rows(scores)
    except TypeError as error:
        raise TypeError(
            f"scores must be a path to an output_dir or its mimic_scores/ folder, or a table of records: {error}"
        ) from None
    return ScoreSource(table=fill_null_scores(rows.table()), description=rows.kind)


def fill_null_scores(table: pa.Table) -> pa.Table:
    """Null mimic scores as NaN, as the log writes them: a pandas frame's NaN becomes null in Arrow.

    So a `pandas.DataFrame` of the log gives the same filter as the `datasets.Dataset` of it.
    """
    if "mimic_score" not in table.column_names or table.column("mimic_score").null_count == 0:
        return table
    column = table.column("mimic_score")
    if not pa.types.is_floating(column.type):
        column = column.cast(pa.float64())
    filled = pc.fill_null(column, pa.scalar(float("nan"), column.type))
    return table.set_column(table.column_names.index("mimic_score"), "mimic_score", filled)
