"""Matching a filter's sample ids with a dataset's rows: by row index, or by an id column.

The filter decides about exactly the samples that were trained on, so a scored sample missing
from the dataset and a dataset row without a score are both errors, each named with examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..tables import Rows, dataset_signature, id_kind, row_signature

__all__ = ["check_row_index_dataset", "comparable_ids", "row_positions"]


def check_row_index_dataset(recorded: Mapping[str, Any] | None, dataset: Any) -> None:
    """Refuse a dataset that is not the training set whose row indices the score log holds.

    ``recorded`` is the score log's ``provenance["sample_ids"]``: the id column, or the training set's length and
    `dataset_signature` (``train_content``; older logs: `row_signature`). A shuffled, filtered, re-selected or other
    dataset would silently get the wrong rows kept: every row is compared, not a sample of them.
    """
    if not recorded:
        return
    if recorded.get("column"):
        raise ValueError(
            f"The score log's sample ids are the values of the column {recorded['column']!r} "
            f"(mimic_id_column), not row indices: pass id_column={recorded['column']!r} (`gradmimic push --id-column "
            f"{recorded['column']}`)."
        )
    if recorded.get("train_content") is not None:
        expected, got, where = recorded["train_content"], dataset_signature(dataset) or {}, "in some row"
    else:  # a log written before every row was hashed
        expected, got, where = recorded.get("train_signature") or {}, row_signature(dataset) or {}, "at sampled rows"
    shared = [name for name in expected if name in got]
    changed = [name for name in shared if expected[name] != got[name]]
    if changed or (expected and got and not shared):
        raise ValueError(
            f"The score log's sample ids are row indices of the training set ({recorded.get('train_rows')} rows), but "
            f"this dataset's rows differ from it (column(s) {changed or sorted(got)} {where}): a shuffled, "
            "filtered, re-selected or different dataset would get the wrong rows kept. Pass the dataset the trainer "
            "was given (any format, any columns), train with mimic_id_column to match by id, or pass "
            "check_dataset=False (MimicFilter.apply, push_scored_dataset; `gradmimic push --no-check-dataset`) if you "
            "know its rows are the same and in the same order."
        )


UNSCORED_HINT = (
    "the trainer never trained on them: a trainer that drops rows (MimicSFTTrainer, as trl's SFTTrainer, drops a row "
    "too long for max_length or left without a completion), or a run that stopped (max_steps) before a full epoch. "
    "Pass unscored='keep' to keep such rows, or unscored='drop' to drop them, if that is what you want"
)


def row_positions(ids: pa.Array, rows: Rows, id_column: str | None, *, allow_unscored: bool = False) -> np.ndarray:
    """Row position in ``rows`` of every id in ``ids`` (the filter's unique sample ids, in table order).

    With ``id_column=None`` the ids are row indices; otherwise they are looked up in that column.
    Raises ValueError when a scored sample is not in the dataset, or (unless ``allow_unscored``) when a dataset row
    was never scored.
    """
    if id_column is None:
        return _positions_by_row_index(ids, rows.num_rows, allow_unscored)
    return _positions_by_id_column(ids, rows.column(id_column), id_column, allow_unscored)


def _positions_by_row_index(ids: pa.Array, n_rows: int, allow_unscored: bool = False) -> np.ndarray:
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
    if positions.size != n_rows and not allow_unscored:  # ids are unique: only a count mismatch leaves rows unscored
        scored = np.zeros(n_rows, dtype=bool)
        scored[positions] = True
        unscored = np.flatnonzero(~scored)
        raise ValueError(
            f"{unscored.size} row(s) of the dataset have no score (e.g. rows {unscored[:5].tolist()}): {UNSCORED_HINT}."
        )
    return positions


def comparable_ids(dataset_ids: pa.Array, id_type: pa.DataType, id_column: str) -> pa.Array:
    """The dataset's ``id_column`` values cast to the score log's ``sample_id`` type, or a ValueError: null ids, or
    ids of another kind (integers against text), which a cast would match wrongly."""
    if dataset_ids.null_count:
        raise ValueError(f"Column {id_column!r} of the dataset holds null ids.")
    if id_kind(dataset_ids.type) != id_kind(id_type):
        raise ValueError(
            f"Column {id_column!r} holds {dataset_ids.type} ids, the score log's sample_id {id_type}: matching them "
            "would convert one into the other, so that e.g. the string '00100' would match the integer 100. Give the "
            f"dataset's {id_column!r} column the type the trainer saw (the one in the score log)."
        )
    try:
        return dataset_ids.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ValueError(
            f"Column {id_column!r} ({dataset_ids.type}) cannot be matched with the score log's sample_id ({id_type})."
        ) from error


def _positions_by_id_column(
    ids: pa.Array, dataset_ids: pa.Array, id_column: str, allow_unscored: bool = False
) -> np.ndarray:
    dataset_ids = comparable_ids(dataset_ids, ids.type, id_column)
    if pc.count_distinct(dataset_ids).as_py() != len(dataset_ids):
        raise ValueError(f"Column {id_column!r} of the dataset holds duplicate ids.")
    positions = pc.index_in(ids, value_set=dataset_ids)
    if positions.null_count:
        missing = ids.filter(pc.is_null(positions))
        raise ValueError(
            f"{len(missing)} sample id(s) in the scores are not in the dataset's {id_column!r} column, "
            f"e.g. {missing[:5].to_pylist()}."
        )
    if len(ids) != len(dataset_ids) and not allow_unscored:
        unscored = dataset_ids.filter(pc.invert(pc.is_in(dataset_ids, value_set=ids)))
        raise ValueError(
            f"{len(unscored)} row(s) of the dataset have no score (e.g. {id_column}={unscored[:5].to_pylist()}): "
            f"{UNSCORED_HINT}."
        )
    return positions.to_numpy()
