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

__all__ = ["check_row_index_dataset", "dataset_signature", "id_kind", "row_positions", "row_signature"]


SIGNATURE_ROWS = 64
"""How many evenly spaced rows `row_signature` (the check of logs written before `dataset_signature`) hashes."""

SIGNATURE_CHUNK_ROWS = 65_536
"""Rows read at a time by `dataset_signature`: its memory is one such slice, whatever the dataset's size. The
hashes depend on it (each slice is hashed as one array): changing it changes every recorded signature."""


def _canonical_type(dtype: pa.DataType) -> pa.DataType:
    """One type per kind of value, so that the same rows hash alike whichever of Arrow's layouts hold them (a pandas
    frame's strings or lists may come back with 64-bit offsets, a category column as a dictionary)."""
    if pa.types.is_dictionary(dtype):
        return _canonical_type(dtype.value_type)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.large_string()
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.large_binary()
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return pa.large_list(_canonical_type(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([pa.field(field.name, _canonical_type(field.type)) for field in dtype])
    return dtype


def _update_with_array(digest: Any, array: pa.Array) -> None:
    """Hash an array's values and nulls, not its buffers: a slice, a take or a chunk boundary may leave other bytes
    around them (capacity, offsets not starting at 0), which must not change the hash."""
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    digest.update(f"{len(array)}:{int(nulls.sum())}|".encode())
    if nulls.any():
        digest.update(np.packbits(nulls).tobytes())
    if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=len(array) + 1, offset=array.offset * 8)
        digest.update(np.diff(offsets).tobytes())
        if len(array) and array.buffers()[2] is not None:
            digest.update(memoryview(array.buffers()[2])[offsets[0]: offsets[-1]])
    elif pa.types.is_large_list(array.type):
        digest.update(pc.fill_null(array.value_lengths(), -1).to_numpy(zero_copy_only=False).tobytes())
        _update_with_array(digest, array.flatten())
    elif pa.types.is_struct(array.type):
        for field in array.flatten():
            _update_with_array(digest, field)
    elif pa.types.is_primitive(array.type) and not pa.types.is_boolean(array.type):
        digest.update(array.fill_null(0).to_numpy(zero_copy_only=False).tobytes() if nulls.any()
                      else array.to_numpy(zero_copy_only=False).tobytes())
    else:  # booleans and rarer types: through Python values
        digest.update(repr(array.to_pylist()).encode())


def _update_with_column(digest: Any, column: pa.ChunkedArray | pa.Array) -> None:
    """Hash a column slice in the canonical type of its values (`_canonical_type`)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    canonical = _canonical_type(column.type)
    _update_with_array(digest, pa.concat_arrays([chunk.cast(canonical) for chunk in chunks]) if chunks
                       else pa.array([], canonical))


def dataset_signature(data: Any) -> dict[str, str] | None:
    """Per-column SHA-256 of every row of a table-like dataset, in order: which rows stand where.

    Read ``SIGNATURE_CHUNK_ROWS`` rows at a time, so memory stays bounded whatever the size. Unlike a `datasets`
    fingerprint it ignores the output format (``with_format``) and which columns are present, and it changes when any
    row is reordered, filtered or replaced. None for inputs that are not tables.
    """
    try:
        rows = as_rows(data)
    except TypeError:
        return None
    digests: dict[str, Any] = {}
    for start in range(0, rows.num_rows, SIGNATURE_CHUNK_ROWS):
        chunk = rows.slice(start, min(start + SIGNATURE_CHUNK_ROWS, rows.num_rows))
        for name in chunk.column_names:
            _update_with_column(digests.setdefault(str(name), hashlib.sha256()), chunk.column(name))
    return {name: digest.hexdigest()[:32] for name, digest in digests.items()}


def row_signature(data: Any) -> dict[str, str] | None:
    """Per-column hashes of ``SIGNATURE_ROWS`` evenly spaced rows of a table-like dataset: what score logs written
    before `dataset_signature` recorded (``train_signature``), kept to check a dataset against them.
    None for inputs that are not tables.
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


def id_kind(dtype: pa.DataType) -> str:
    """Integers, text or something else: ids are matched within one kind only (int32 with int64, string with
    large_string), never across kinds."""
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    return str(dtype)


def _positions_by_id_column(ids: pa.Array, dataset_ids: pa.Array, id_column: str,
                            allow_unscored: bool = False) -> np.ndarray:
    if dataset_ids.null_count:
        raise ValueError(f"Column {id_column!r} of the dataset holds null ids.")
    if id_kind(dataset_ids.type) != id_kind(ids.type):
        raise ValueError(
            f"Column {id_column!r} holds {dataset_ids.type} ids, the score log's sample_id {ids.type}: matching them "
            "would convert one into the other, so that e.g. the string '00100' would match the integer 100. Give the "
            f"dataset's {id_column!r} column the type the trainer saw (the one in the score log)."
        )
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
    if len(ids) != len(dataset_ids) and not allow_unscored:
        unscored = dataset_ids.filter(pc.invert(pc.is_in(dataset_ids, value_set=ids)))
        raise ValueError(
            f"{len(unscored)} row(s) of the dataset have no score (e.g. {id_column}={unscored[:5].to_pylist()}): "
            f"{UNSCORED_HINT}."
        )
    return positions.to_numpy()
