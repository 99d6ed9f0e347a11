"""Reading per-sample matrices in row blocks (`hf_gradmimic.filter.rowblocks`) and the block-wise k-means split,
against plain NumPy: the same values, and a mapped matrix's pages leave the process's resident memory."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradmimic.filter import kmeans_1d
from hf_gradmimic.filter.rowblocks import matrix_column, release_pages, row_blocks


def _resident_file_pages() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) * 1024


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_row_blocks_and_columns_equal_numpy(tmp_path, block):
    matrix = np.random.default_rng(0).standard_normal((503, 5)).astype(np.float32)
    matrix.tofile(tmp_path / "m")
    mapped = np.memmap(tmp_path / "m", dtype=np.float32, mode="r", shape=matrix.shape)
    seen = np.concatenate([copy for _, copy in row_blocks(mapped, block)])
    assert np.array_equal(seen, matrix)
    for j in range(5):
        assert np.array_equal(matrix_column(mapped, j), matrix[:, j])
        assert matrix_column(matrix, j).flags.c_contiguous


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="madvise(MADV_DONTNEED) is POSIX")
def test_release_pages_drops_a_read_mapping_from_resident_memory(tmp_path):
    size = 64 << 20
    np.ones(size // 8).tofile(tmp_path / "big")
    mapped = np.memmap(tmp_path / "big", dtype=np.float64, mode="r")
    before = _resident_file_pages()
    assert float(mapped.sum()) == size // 8  # every page read through the mapping
    touched = _resident_file_pages()
    release_pages(mapped[10:20])  # a view: the mapping behind it is found
    released = _resident_file_pages()
    assert touched - before > size // 2  # reading made the pages resident (in RSS) ...
    assert touched - released > size // 2  # ... and releasing took them out again
    assert float(mapped[-1]) == 1.0  # still readable


def _one_pass_split(x: np.ndarray) -> tuple[float, float, float]:
    """The optimal 2-means split by one unblocked scan (the derivation in `kmeans_1d`'s docstring)."""
    x = np.sort(x.astype(np.float64))
    n = x.size
    prefix = np.cumsum(x - x.mean())
    k = np.arange(1, n, dtype=np.float64)
    between = prefix[:-1] ** 2 / k + (prefix[-1] - prefix[:-1]) ** 2 / (n - k)
    between[x[1:] == x[:-1]] = -np.inf
    split = int(np.argmax(between)) + 1
    return float(x[split]), float(x[:split].mean()), float(x[split:].mean())


@pytest.mark.parametrize("n, decimals", [(2, 6), (3, 0), (50, 1), (5000, 2), (5000, 6)])
@pytest.mark.parametrize("block", [1, 2, 7, 4096])
def test_blockwise_kmeans_split_equals_one_pass(monkeypatch, n, decimals, block):
    rng = np.random.default_rng(n + decimals)
    values = np.round(np.r_[rng.normal(0.7, 0.25, n // 3), rng.normal(1.3, 0.25, n - n // 3)], decimals)
    if np.unique(values).size < 2:
        values[0] += 1.0
    monkeypatch.setattr("hf_gradmimic.filter.clustering._SPLIT_BLOCK", block)
    assert kmeans_1d(values) == _one_pass_split(values)
