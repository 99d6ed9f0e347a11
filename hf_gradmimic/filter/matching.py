"""Matching a filter's sample ids with a dataset's rows: by row index, or by an id column.

The filter decides about exactly the samples that were trained on, so a scored sample missing
from the dataset and a dataset row without a score are both errors, each named with examples.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .inputs import Rows

__all__ = ["row_positions"]


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
