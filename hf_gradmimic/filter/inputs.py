"""The one place that turns the filter's inputs into Arrow: score logs and the datasets a filter is applied to.

A score log is a path (an ``output_dir`` or its ``mimic_scores/`` folder, read shard by shard), a
`pyarrow.Table`, a `pandas.DataFrame` or a `datasets.Dataset`; a dataset to filter or audit is one
of the last three. Everything else in the filter sees them through `ScoreSource` and `hf_gradmimic.tables.Rows`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..progress import progress_bar
from ..score_log_io import score_shard_paths, scores_dir
from ..tables import as_rows
from .shards import BadShardError, BadShardPolicy, ShardPlan, plan_shards, read_shard, skipped_message, without_rows
from .warning import warn

__all__ = ["ScoreSource", "ScoresLike", "fill_null_scores", "score_source"]

ScoresLike = Union[str, os.PathLike, pa.Table, "datasets.Dataset", "pandas.DataFrame"]  # noqa: F821

# In-memory score logs are reduced in slices of this many records, like shards on disk.
_CHUNK_ROWS = 4_000_000


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
        return (
            self.plan.columns if self.plan is not None and self.plan.columns else pq.read_schema(self.shards[0]).names
        )

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
            for shard in progress_bar(self.shards, desc="Reading the score log", unit="shard"):
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


def score_source(
    scores: ScoresLike, *, on_bad_shard: BadShardPolicy = "error", needed: Sequence[str] = ()
) -> ScoreSource:
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
        return ScoreSource(
            shards=plan.shards, description=str(scores_dir(scores)), plan=plan, on_bad_shard=on_bad_shard
        )
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
