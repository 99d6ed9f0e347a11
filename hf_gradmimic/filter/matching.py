"""Matching a filter's sample ids with a dataset's rows: by row index, or by an id column.

The filter decides about exactly the samples that were trained on, so a scored sample missing
from the dataset and a dataset row without a score are both errors, each named with examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .inputs import Rows, as_rows

__all__ = ["check_row_index_dataset", "row_positions", "row_signature"]


SIGNATURE_ROWS = 64
"""How many evenly spaced rows `row_signature` hashes."""


def row_signature(data: Any) -> dict[str, str] | None:
    """Per-column hashes of ``SIGNATURE_ROWS`` evenly spaced rows of a table-like dataset: which rows stand where.

    Unlike a `datasets` fingerprint it ignores the output format (``with_format``) and which columns are present,
    and it changes when rows are reordered, filtered or replaced. None for inputs that are not tables.
    """
    try:
        rows = as_rows(data)
    except TypeError:
        return None
    n = rows.num_rows
    positions = np.unique(np.linspace(0, max(n - 1, 0), min(SIGNATURE_ROWS, n)).astype(np.int64))
    sample = as_rows(rows.take(positions)).table()
    return {name: hashlib.sha256(repr(sample.column(name).to_pylist()).encode()).hexdigest()[:16]
            for name in sample.column_names}


def check_row_index_dataset(recorded: Mapping[str, Any] | None, dataset: Any) -> None:
    """Refuse a dataset that is not the training set whose row indices the score log holds.

    ``recorded`` is the score log's ``provenance["sample_ids"]``: the id column, or the training set's length and
    `row_signature`. A shuffled, filtered, re-selected or other dataset would silently get the wrong rows kept.
    """
    if not recorded:
        return
    if recorded.get("column"):
        raise ValueError(
            f"The score log's sample ids are the values of the column {recorded['column']!r} "
            f"(mimic_id_column), not row indices: pass id_column={recorded['column']!r} (`gradmimic push --id-column "
            f"{recorded['column']}`)."
        )
    expected = recorded.get("train_signature") or {}
    got = row_signature(dataset) or {}
    shared = [name for name in expected if name in got]
    changed = [name for name in shared if expected[name] != got[name]]
    if changed or (expected and got and not shared):
        raise ValueError(
            f"The score log's sample ids are row indices of the training set ({recorded.get('train_rows')} rows), but "
            f"this dataset's rows differ from it (column(s) {changed or sorted(got)} at sampled rows): a shuffled, "
            "filtered, re-selected or different dataset would get the wrong rows kept. Pass the dataset the trainer "
            "was given (any format, any columns), train with mimic_id_column to match by id, or pass "
            "check_dataset=False (MimicFilter.apply, push_scored_dataset; `gradmimic push --no-check-dataset`) if you "
            "know its rows are the same and in the same order."
        )


def row_positions(ids: pa.Array, rows: Rows, id_column: str | None) -> np.ndarray:
    """Row position in ``rows`` of every id in ``ids`` (the filter's unique sample ids, in table order).

    With ``id_column=None`` the ids are row indices; otherwise they are looked up in that column.
    Raises ValueError when a scored sample is not in the dataset or a dataset row was never scored.
    """
    if id_column is None:
        return _positions_by_row_index(ids, rows.num_rows)
    return _positions_by_id_column(ids, rows.column(id_column), id_column)


def _positions_by_row_index(ids: pa.Array, n_rows: int) -> np.ndarray:
    if not pa.types.is_integer(ids.type):
        raise ValueError(f"The filter's sample ids are {ids.type}, not row indices: pass id_column= to match them.")
    positions = ids.to_numpy()
    outside = (positions < 0) | (positions >= n_rows)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} sample id(s) in the scores are not row indices of the dataset "
            f"({n_rows} rows), e.g. {positions[outside][:5].tolist()}; was the score log written for "
            "another dataset, or should id_column= be set?"
        )
    if positions.size != n_rows:  # ids are unique, so only a count mismatch can leave rows unscored
        scored = np.zeros(n_rows, dtype=bool)
        scored[positions] = True
        unscored = np.flatnonzero(~scored)
        raise ValueError(
            f"{unscored.size} row(s) of the dataset have no score (e.g. rows {unscored[:5].tolist()}); "
            "the filter can only decide about samples that were trained on."
        )
    return positions


def _positions_by_id_column(ids: pa.Array, dataset_ids: pa.Array, id_column: str) -> np.ndarray:
    if dataset_ids.null_count:
        raise ValueError(f"Column {id_column!r} of the dataset holds null ids.")
    try:
        dataset_ids = dataset_ids.cast(ids.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ValueError(
            f"Column {id_column!r} ({dataset_ids.type}) cannot be matched with the score log's sample_id ({ids.type})."
        ) from error
    if pc.count_distinct(dataset_ids).as_py() != len(dataset_ids):
        raise ValueError(f"Column {id_column!r} of the dataset holds duplicate ids.")
    positions = pc.index_in(ids, value_set=dataset_ids)
    if positions.null_count:
        missing = ids.filter(pc.is_null(positions))
        raise ValueError(
            f"{len(missing)} sample id(s) in the scores are not in the dataset's {id_column!r} column, "
            f"e.g. {missing[:5].to_pylist()}."
        )
    if len(ids) != len(dataset_ids):
        unscored = dataset_ids.filter(pc.invert(pc.is_in(dataset_ids, value_set=ids)))
        raise ValueError(
            f"{len(unscored)} row(s) of the dataset have no score (e.g. {id_column}={unscored[:5].to_pylist()}); "
            "the filter can only decide about samples that were trained on."
        )
    return positions.to_numpy()
