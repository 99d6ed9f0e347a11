"""Applying a filter to data streamed batch by batch (a `datasets.IterableDataset`), without materialising it.

The filter (Huang et al., arXiv 2501.06708, Section 4.2) decides per sample id; a streamed dataset
is matched to those ids one batch of rows at a time, by row index (counted as the rows go by) or
by an id column. Only the filter's own per-sample table is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .matching import comparable_ids

if TYPE_CHECKING:  # pragma: no cover
    import datasets


__all__ = ["KeepLookup", "filter_iterable", "scored_batches"]


class KeepLookup:
    """The filter's table row of each streamed row: by running row index, or by the values of ``id_column``."""

    def __init__(self, filter_table: pa.Table, id_column: str | None) -> None:
        self.table = filter_table
        self.ids = self.table.column("sample_id").combine_chunks()
        self.id_column = id_column
        if id_column is None:
            if not pa.types.is_integer(self.ids.type):
                raise ValueError(
                    f"The filter's sample ids are {self.ids.type}, not row indices: pass id_column= to match them."
                )
            ids = self.ids.to_numpy()
            # Row index -> table row (ids are sorted and unique); -1 where a row index was never scored.
            self.by_index = np.full(int(ids.max()) + 1 if ids.size else 0, -1, dtype=np.int64)
            self.by_index[ids] = np.arange(ids.size)

    def rows(self, batch: Mapping[str, Any] | pa.Table, start: int, n: int) -> np.ndarray:
        """Table rows of the ``n`` streamed rows starting at row index ``start``; a ValueError names unscored rows."""
        if self.id_column is None:
            index = np.arange(start, start + n)
            rows = np.where(
                index < self.by_index.size, self.by_index[np.minimum(index, max(self.by_index.size - 1, 0))], -1
            )
            missing = index[rows < 0]
            what = "rows"
        else:
            if self.id_column not in (batch.column_names if isinstance(batch, pa.Table) else batch):
                raise KeyError(f"The streamed dataset has no column {self.id_column!r} (id_column).")
            if isinstance(batch, pa.Table):
                values = batch.column(self.id_column).combine_chunks()
            else:  # a formatted stream's batch: a list, or one tensor or array of ids (``with_format("torch")``)
                column = batch[self.id_column]
                values = pa.array(column if isinstance(column, list) else np.asarray(column))
            values = comparable_ids(values, self.ids.type, self.id_column)
            found = pc.index_in(values, value_set=self.ids)
            rows = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            missing = np.asarray(values.filter(pc.is_null(found)).to_pylist())
            what = f"{self.id_column}="
        if missing.size:
            raise ValueError(
                f"{missing.size} streamed row(s) have no score (e.g. {what} {missing[:5].tolist()}); the filter can only "
                "decide about samples that were trained on (is this the dataset the scores were recorded on?)."
            )
        return rows


def filter_iterable(
    filter_table: pa.Table, dataset: datasets.IterableDataset, id_column: str | None = None, batch_size: int = 1000
) -> datasets.IterableDataset:
    """The rows of a streamed ``dataset`` that the filter keeps, as a lazy `datasets.IterableDataset`.

    ``filter_table`` is a `MimicFilter`'s per-sample ``table`` (``sample_id``, ``keep`` and the score columns).

    Rows are matched batch by batch as they are read; a row that the filter has no score for raises a
    ValueError naming it when it is reached. (A scored sample absent from the stream cannot be noticed
    before the stream ends, so, unlike `MimicFilter.apply` on a `datasets.Dataset`, that is not checked.)

    Without ``id_column`` a row's index is its position in the whole stream, so the stream must be read by one
    reader: a stream split by `datasets.distributed.split_dataset_by_node`, or a DataLoader worker of several
    reading some of its shards, counts its own rows from 0, and is refused. (A stream split by node after this
    filter cannot be told from a whole one: split it before, with ``id_column``.)
    """
    lookup = KeepLookup(filter_table, id_column)
    keep = filter_table.column("keep").to_numpy()
    if id_column is None:
        _check_one_reader(dataset)

    def keep_rows(batch: dict[str, list], indices: list[int]) -> list[bool]:
        if not indices:
            return []
        if id_column is None:
            _check_one_reader()
        rows = lookup.rows(batch, indices[0], len(indices))
        return keep[rows].tolist()

    return dataset.filter(keep_rows, with_indices=True, batched=True, batch_size=batch_size)


def _check_one_reader(dataset: Any = None) -> None:
    """Refuse to match rows by index in a stream read in parts, whose parts count their rows from 0: ``dataset``
    (by default the one this DataLoader worker reads) split by node, or read by several workers."""
    import torch.utils.data

    worker = torch.utils.data.get_worker_info()
    if dataset is None and worker is not None:
        dataset = worker.dataset
    if getattr(dataset, "_distributed", None) is not None:  # `split_dataset_by_node` sets it
        raise ValueError(
            "This stream is split by node (split_dataset_by_node): each node counts its rows from 0, so they cannot "
            "be matched with the score log's row indices. Pass id_column= (a column holding each row's sample id)."
        )
    if worker is not None and worker.num_workers > 1 and getattr(dataset, "num_shards", 1) > 1:
        raise ValueError(
            "This stream is read by several DataLoader workers, each counting its shards' rows from 0, so they "
            "cannot be matched with the score log's row indices. Pass id_column= (a column holding each row's "
            "sample id), or read it with num_workers=0."
        )


def scored_batches(
    filter_table: pa.Table,
    dataset: datasets.IterableDataset,
    columns: Mapping[str, tuple[str, pa.DataType]],
    id_column: str | None = None,
    batch_rows: int = 100_000,
) -> Iterator[pa.Table]:
    """The streamed rows in Arrow batches of up to ``batch_rows``, each with the filter's ``columns`` added.

    ``columns`` maps a new column name to (the column of ``filter_table``, a `MimicFilter`'s ``table``, it comes
    from, its type),
    e.g. `hf_gradmimic.hub.MIMIC_COLUMNS`.
    """
    lookup = KeepLookup(filter_table, id_column)
    start = 0
    for batch in dataset.with_format("arrow").iter(batch_size=batch_rows):
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
        clashing = [name for name in columns if name in table.column_names]
        if clashing:
            raise ValueError(f"The dataset already has the column(s) {clashing}; drop them before scoring it again.")
        take = pa.array(lookup.rows(table, start, table.num_rows))
        for name, (source, arrow_type) in columns.items():
            table = table.append_column(name, filter_table.column(source).take(take).combine_chunks().cast(arrow_type))
        start += table.num_rows
        yield table
