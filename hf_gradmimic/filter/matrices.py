"""The filter table's list columns: dense ``samples x windows`` matrices <-> Arrow list columns."""

from __future__ import annotations

import weakref

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["list_column", "matrix"]


def list_column(matrix: np.ndarray, value_type: pa.DataType, *, nan_as_null: bool = False) -> pa.Array:
    """An ``n x m`` matrix as a list column (zero-copy values, one offsets array). With ``nan_as_null``, NaN (an
    abstention) is stored as null, which Arrow compares equal to null (NaN is unequal to itself); `matrix` reads
    it back as NaN."""
    n, m = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type, from_pandas=nan_as_null)
    large = n * m >= 2**31
    key = (n, m, large)
    shared = _SHARED_OFFSETS.get(key)
    if shared is not None:
        offsets = shared.offsets
    else:
        offsets = pa.array(np.arange(0, n * m + 1, m, dtype=np.int64 if large else np.int32))
    column = (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, flat)
    _SHARED_OFFSETS[key] = column
    return column


# The last list column made of each shape, for as long as it lives: the table's list columns of one width (votes,
# window values, window scores) share its offsets buffer (Arrow buffers are immutable) instead of 4 bytes per sample
# each.
_SHARED_OFFSETS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def matrix(column: pa.ChunkedArray | pa.Array, m: int, dtype: np.dtype | type) -> np.ndarray:
    """A list column with ``m`` entries per row back as an ``n x m`` numpy matrix of ``dtype``."""
    flat = pc.list_flatten(column)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, m)
