"""Table-like datasets (a `pyarrow.Table`, a `pandas.DataFrame`, a `datasets.Dataset`) as Arrow rows, and what names their rows.

`as_rows` reads them; `dataset_signature` hashes every row in order (which rows stand where); `id_kind` says which
kind of values an id column holds. Both stages need them: the score log records a training set's signature and its
ids' kind (Stage 1, `hf_gradmimic.training.score_log`), and the filter checks a dataset against them (Stage 2,
`hf_gradmimic.filter.matching`). So they live here, below both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Rows", "as_rows", "dataset_signature", "id_kind", "row_signature"]

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
    pieces = [
        batches[chunk].take(pa.array(ordered[chunk_of == chunk] - bounds[chunk])) for chunk in np.unique(chunk_of)
    ]
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
            digest.update(memoryview(array.buffers()[2])[offsets[0] : offsets[-1]])
    elif pa.types.is_large_list(array.type):
        digest.update(pc.fill_null(array.value_lengths(), -1).to_numpy(zero_copy_only=False).tobytes())
        _update_with_array(digest, array.flatten())
    elif pa.types.is_struct(array.type):
        for field in array.flatten():
            _update_with_array(digest, field)
    elif pa.types.is_primitive(array.type) and not pa.types.is_boolean(array.type):
        digest.update(
            array.fill_null(0).to_numpy(zero_copy_only=False).tobytes()
            if nulls.any()
            else array.to_numpy(zero_copy_only=False).tobytes()
        )
    else:  # booleans and rarer types: through Python values
        digest.update(repr(array.to_pylist()).encode())


def _update_with_column(digest: Any, column: pa.ChunkedArray | pa.Array) -> None:
    """Hash a column slice in the canonical type of its values (`_canonical_type`)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    canonical = _canonical_type(column.type)
    _update_with_array(
        digest, pa.concat_arrays([chunk.cast(canonical) for chunk in chunks]) if chunks else pa.array([], canonical)
    )


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
    return {
        name: hashlib.sha256(repr(sample.column(name).to_pylist()).encode()).hexdigest()[:16]
        for name in sample.column_names
    }


def id_kind(dtype: pa.DataType) -> str:
    """Integers, text or something else: ids are matched within one kind only (int32 with int64, string with
    large_string), never across kinds."""
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    return str(dtype)
