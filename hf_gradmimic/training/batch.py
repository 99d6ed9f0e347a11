"""Sample ids through batching: the row-index column, and the bookkeeping columns taken off a batch before the model sees it.

Every training example carries its row index in ``train_dataset`` as ``mimic_row_index``; the score log
records it (or the ``mimic_id_column`` value of that row). A stream has no row index: its examples carry
their id instead (`hf_gradmimic.training.stream_ids`). Our columns (row index or stream id, clean flags,
the scorer's columns) are popped from each batch before the forward, so they never reach the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

ROW_INDEX_KEY = "mimic_row_index"
"""Batch key carrying each sample's row index in ``train_dataset``; popped before the model sees the batch."""

STREAM_ID_KEY = "mimic_sample_id"
"""Batch key carrying each stream example's id (`hf_gradmimic.training.stream_ids`); popped like the row index."""


class _RowIndexedDataset(torch.utils.data.Dataset):
    """Adds the row index to each example of a map-style dataset of dicts."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        if not isinstance(example, Mapping):
            raise TypeError(
                f"MimicTrainer needs dataset examples that are mappings of column to value (a dict, a tokenizer's "
                f"BatchEncoding), got {type(example).__name__} at row {index}: each example carries its row index "
                "under a key of its own. Return a dict from the dataset, and let the collator make the batch."
            )
        return {**example, ROW_INDEX_KEY: index}


def with_row_index(dataset: Any) -> Any:
    """The training set with a ``mimic_row_index`` column, so sample ids survive batching."""
    import datasets

    if dataset is None:
        return None
    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") != "custom":
        if ROW_INDEX_KEY in dataset.column_names:
            _check_row_index_column(dataset)
            return dataset
        return dataset.add_column(ROW_INDEX_KEY, np.arange(len(dataset), dtype=np.int64))
    if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
        raise TypeError(
            f"with_row_index takes a map-style dataset; a stream ({type(dataset).__name__}) carries its ids instead "
            "(hf_gradmimic.training.stream_ids.keyed_stream)."
        )
    # A dataset with an on-the-fly transform (`with_transform`) returns only what the transform makes, so a column
    # added underneath would not reach the batch: the index is added to each transformed example instead.
    indexed = _RowIndexedDataset(dataset)
    if len(indexed):
        indexed[0]  # a dataset whose examples are not mappings is refused now, not at the first training step
    return indexed


def _check_row_index_column(dataset: Any) -> None:
    """A map-style dataset that already has a ``mimic_row_index`` column (an earlier MimicTrainer's
    ``train_dataset``) is used as it is only when the column still holds its row positions; otherwise the log would
    name samples by stale positions while the filter reads them as rows."""
    values = np.asarray(dataset.with_format(None)[ROW_INDEX_KEY])
    if not np.array_equal(values, np.arange(len(dataset))):
        raise ValueError(
            f"train_dataset has a {ROW_INDEX_KEY!r} column whose values are not its row positions 0..{len(dataset) - 1} "
            f"(first values: {values[:5].tolist()}): a dataset shuffled or selected after an earlier MimicTrainer added "
            f"the column, or ids put there for a stream. MimicTrainer names the samples of a map-style dataset by row "
            f"position in that column. Drop it (`dataset.remove_columns({ROW_INDEX_KEY!r})`) to name samples by row, "
            "or rename it and pass the new name as `mimic_id_column` to name them by its values."
        )


def read_column(dataset: Any, column: str) -> np.ndarray:
    """A whole column of ``train_dataset`` (``mimic_id_column``, ``mimic_clean_column``) as a NumPy array."""
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise ValueError(f"Column {column!r} (MimicConfig) is not a column of train_dataset; columns: {names}.")
    try:
        return np.asarray(dataset[column])
    except (KeyError, TypeError) as error:
        raise ValueError(f"Cannot read column {column!r} (MimicConfig) from train_dataset: {error}") from error


def check_sample_ids(ids: np.ndarray, column: str, dataset: Any) -> np.ndarray:
    """The ``mimic_id_column`` values, refused early when they cannot identify samples in the score log: lists or
    other non-scalar values, missing values (None, NaN), or duplicates (two rows would become one sample)."""
    feature = (getattr(dataset, "features", None) or {}).get(column)
    described = str(feature) if feature is not None else f"dtype {ids.dtype}"
    values = ids.tolist() if ids.ndim == 1 and ids.dtype == object else []
    if ids.ndim != 1 or any(isinstance(value, (list, tuple, dict, np.ndarray)) for value in values):
        raise TypeError(
            f"`mimic_id_column={column!r}` holds non-scalar values ({described}); sample ids must be one integer or "
            "string per row."
        )
    if ids.dtype == object or ids.dtype.kind == "f":
        missing = np.flatnonzero([value is None or value != value for value in ids.tolist()])
        if missing.size:
            raise ValueError(
                f"`mimic_id_column={column!r}` has {missing.size} missing id(s) (None or NaN) at rows "
                f"{missing[:5].tolist()}; every row needs an id."
            )
    unique, counts = np.unique(ids.astype(str) if ids.dtype == object else ids, return_counts=True)
    if (counts > 1).any():
        duplicated = unique[counts > 1]
        raise ValueError(
            f"`mimic_id_column={column!r}` has {duplicated.size} duplicated id(s), e.g. {duplicated[:5].tolist()}: two "
            "different rows would become one sample in the score log and the filter. Give every row its own id."
        )
    return ids


class Bookkeeping:
    """The batch columns that are ours, not the model's: popped from every batch before a forward.

    Args:
        clean_column: `MimicConfig.mimic_clean_column` (ground truth for audits), or None.
        scorer_columns: the columns the scorer reads (``SampleScorer.extra_columns``).
        id_column: `MimicConfig.mimic_id_column`: read from the dataset once, never a model input.
        stream_ids: for a stream, what decodes its batches' ids into sample keys
            (`hf_gradmimic.training.stream_ids.StreamIds`); the rows returned are then those keys.
    """

    def __init__(
        self,
        clean_column: str | None,
        scorer_columns: tuple[str, ...],
        id_column: str | None = None,
        stream_ids: Any = None,
    ) -> None:
        self.clean_column = clean_column
        self.scorer_columns = tuple(scorer_columns)
        self.id_column = id_column
        self.stream_ids = stream_ids

    @property
    def kept_columns(self) -> list[str]:
        """Columns that `remove_unused_columns` must keep: they are not forward arguments of the model."""
        return [STREAM_ID_KEY if self.stream_ids is not None else ROW_INDEX_KEY, *self.scorer_columns]

    def pop(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Removes our columns from ``inputs`` in place; returns the rows (a stream's sample keys) and the scorer's
        columns."""
        for column in (self.clean_column, self.id_column):
            if column and column not in self.scorer_columns:
                inputs.pop(column, None)
        extras = {column: inputs.pop(column) for column in self.scorer_columns if column in inputs}
        if self.stream_ids is not None:
            return self.stream_ids.pop(inputs), extras
        return inputs.pop(ROW_INDEX_KEY, None), extras


class KeepColumns:
    """A data collator that lets our columns through any other: it takes them off each example, collates the rest
    with the wrapped collator, and stacks them back into the batch.

    Collators that build a fixed set of keys (trl's ``DataCollatorForLanguageModeling`` returns ``input_ids``,
    ``labels`` and ``attention_mask`` only) would otherwise drop the sample ids the score log needs.

    Args:
        collator: the trainer's data collator.
        columns: our columns (`Bookkeeping.kept_columns`); only those present in every example are kept.
    """

    def __init__(self, collator: Any, columns: list[str]) -> None:
        self.collator = collator
        self.columns = list(columns)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [column for column in self.columns if all(column in example for example in examples)]
        batch = self.collator([{k: v for k, v in example.items() if k not in kept} for example in examples])
        for column in kept:
            batch[column] = torch.stack([torch.as_tensor(example[column]) for example in examples])
        return batch


def rows_of(inputs: dict[str, Any], positions: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The batch restricted to the samples at ``positions`` (every tensor whose first dimension is the batch)."""
    return {
        key: value[positions.to(value.device)]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
        else value
        for key, value in inputs.items()
    }


def shown_ids(rows: np.ndarray, sample_ids: Any, limit: int = 10) -> list[Any]:
    """The score-log ids of dataset ``rows`` (the rows themselves without an id column), at most ``limit``, as
    Python values for a message."""
    rows = np.asarray(rows)[:limit]
    ids = rows if sample_ids is None else sample_ids[rows]
    return [value.item() if hasattr(value, "item") else value for value in ids]
