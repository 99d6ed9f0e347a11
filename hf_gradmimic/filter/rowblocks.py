"""Per-sample matrices read in bounded row blocks, so that a memory-mapped one does not stay in the process's memory.

The streaming engine leaves the filter's per-sample outputs (window values, scores, signals) in memory-mapped files
(`hf_gradmimic.filter.reduction.WindowedScoresBuilder`). Pages of a mapping that the process has read count in its
resident memory until they are unmapped, so reading a whole mapped matrix would bring it all back into memory. These
helpers copy a block of rows at a time and then tell the kernel that the mapping's pages are not needed
(``madvise(MADV_DONTNEED)``: for a read-only file mapping the data stays in the page cache and is read again on the
next access). On in-memory arrays they are plain row slices.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

__all__ = ["ROW_BLOCK", "matrix_column", "release_pages", "row_blocks"]

ROW_BLOCK = 1 << 20
"""Rows per block: 20 MiB of a 5-window float32 matrix, 40 MiB once a labeling function converts it to float64."""


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of the read-only file mapping behind ``array`` (if any) from this process's resident memory."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def row_blocks(matrix: np.ndarray, block: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, a copy of matrix[rows])`` for consecutive blocks of at most ``block`` rows (default `ROW_BLOCK`); a
    mapped matrix's pages are released after each copy."""
    n = matrix.shape[0]
    block = ROW_BLOCK if block is None else block
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        copy = np.array(matrix[rows])
        release_pages(matrix)
        yield rows, copy


def matrix_column(matrix: np.ndarray, j: int) -> np.ndarray:
    """Column ``j`` of an ``n x m`` matrix as a contiguous array, read block by block (see `row_blocks`)."""
    out = np.empty(matrix.shape[0], dtype=matrix.dtype)
    for rows, copy in row_blocks(matrix):
        out[rows] = copy[:, j]
    return out
