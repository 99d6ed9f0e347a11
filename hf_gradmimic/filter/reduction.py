"""Records -> per-(sample, window) cell sums -> per-sample window means (`WindowedScores`), the same on every engine.

In window ``j`` sample ``i`` gets ``v_ij``, the mean of ``b * w`` over its scored records there (``b``
the size of the batch the softmax ran over, ``w`` the sample's weight, so 1 means uniform), and the
mean mimic score; a sample with no record in ``j`` abstains (Huang et al., arXiv 2501.06708, Section
4.2). The signal columns of the log (`hf_gradmimic.filter.records.SIGNAL_COLUMNS`: the student's loss,
the reference's) get the same per-window means, in the same pass. Records are grouped with one
``bincount`` per statistic over the flat key ``sample * m + window`` (or a sort + ``reduceat`` when
the keys are too sparse); there is no Python loop over samples or records, and each step frees the
buffers it is done with.

Every engine (`hf_gradmimic.filter.engines`) reduces each group of samples with `reduce_records`,
passing the choices made for the whole log (``dense`` id coding, ``bincount`` or sort + reduceat), so
that every sum is the same left fold over the same records in log order: the engines agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..score_log_io import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED
from .records import Records
from .warning import warn
from .windows import StepWindows

__all__ = [
    "MAX_LISTED_IDS",
    "WindowedScores",
    "WindowedScoresBuilder",
    "bincount_cells",
    "completed",
    "dense_ids",
    "reduce_records",
]

MAX_LISTED_IDS = 5
"""How many sample ids a warning about non-finite signal values names."""


@dataclass
class WindowedScores:
    """Per-sample, per-window aggregates of the score log (the input of identification).

    ``values[i, j]`` is the mean ``b * w`` of sample ``i`` in window ``j`` and ``scores[i, j]`` its
    mean mimic score there (both ``nan`` where the sample is absent, i.e. abstains). ``signals`` holds,
    for each signal column the log has (`SIGNAL_COLUMNS`: ``loss``, ``reference_loss``,
    ``reference_margin``), the ``n_samples x n_windows`` float32 means over the scored records whose
    value is finite, ``nan`` where the sample has no such record in the window; empty when the log has
    none of the columns.

    The reduction of one group of samples (a partition of the out-of-core engine, a range of the Ray
    engine) is a `WindowedScores` too, its warnings not yet given (`completed` gives them).
    """

    sample_ids: pa.Array
    values: np.ndarray
    scores: np.ndarray
    mean_weight: np.ndarray
    mean_score: np.ndarray
    n_records: np.ndarray
    window_names: list[str]
    window_steps: list[tuple[int, int]]
    total_records: int
    n_nan_scores: int
    warnings: list[str] = field(default_factory=list)
    # Per sample, its records with status 1 (non-finite loss or score); None when the log has no
    # `status` column. Such a sample is discarded by the filter (see `decide`).
    n_nonfinite: np.ndarray | None = None
    n_unlabeled_records: int = 0
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    # Samples with no finite mimic score at all (for the NaN-score warning).
    n_without_score: int = 0
    # Per signal: (scored records whose value is not finite, the smallest MAX_LISTED_IDS of their sample ids).
    nonfinite_signals: dict[str, tuple[int, list]] = field(default_factory=dict)


def reduce_records(
    records: Records,
    step_map: StepWindows,
    *,
    dense: bool | None = None,
    bincount: bool | None = None,
    max_cells: int | None = None,
) -> WindowedScores:
    """Records (in log order) -> their samples' window means, warnings not yet given (frees ``records``).

    ``dense`` (integer ids coded as ``id - min``) and ``bincount`` (else sort + reduceat) are chosen
    from these records when None; an engine that reduces the log in groups passes the choices for
    the whole log. ``max_cells`` refuses more (sample, window) cells than that, naming the way out.
    """
    m = len(step_map.names)
    count = records.count
    record_window = step_map.of_records(records.steps)
    records.steps = None
    codes, n_codes, code_ids = _sample_codes(records, dense=dense)
    if max_cells is not None and n_codes * m > max_cells:
        raise ValueError(
            f"{n_codes} samples x {m} windows is too large for the dense vote matrix "
            f"(limit {max_cells} cells); use fewer windows, e.g. windows=<int>."
        )
    key = _cell_keys(codes, record_window, m)
    del codes, record_window
    cells = n_codes * m
    by_bincount = bincount_cells(cells, count) if bincount is None else bincount
    sums = (_bincount_sums if by_bincount else _sorted_sums)(key, records, cells, m)
    nonfinite_signals = {
        name: (n, code_ids.ids_of(codes).to_pylist()) for name, (n, codes) in sums.signal_nonfinite.items()
    }
    del key
    return _window_means(sums, code_ids, n_codes, step_map, count, nonfinite_signals)


def completed(windowed: WindowedScores, warn_list: list[str]) -> WindowedScores:
    """The whole log's `WindowedScores` with its warnings given and kept (NaN scores, non-finite signal values)."""
    if windowed.n_nan_scores:
        _warn_nan_scores(windowed.n_nan_scores, windowed.total_records, windowed.n_without_score, warn_list)
    if windowed.nonfinite_signals:
        _warn_nonfinite_signals(windowed.nonfinite_signals, warn_list)
    windowed.warnings = warn_list
    return windowed


# ----------------------------------------------------------------------------------------------
# Coding: sample ids -> dense codes, cell keys
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CodeIds:
    """The sample id behind each code: ``offset + code`` (dense integer ids) or ``dictionary[code]``."""

    offset: int = 0
    dictionary: pa.Array | None = None

    def of(self, present: np.ndarray) -> pa.Array:
        """The ids of the codes where the bool mask ``present`` (one entry per code) is True."""
        if self.dictionary is None:
            return pa.array(np.flatnonzero(present) + self.offset, type=pa.int64())
        # Every dictionary entry comes from a record, so every code is present.
        return self.dictionary

    def ids_of(self, codes: np.ndarray) -> pa.Array:
        """The ids of ``codes``."""
        if self.dictionary is None:
            return pa.array(codes + self.offset, type=pa.int64())
        return self.dictionary.take(pa.array(codes))


def dense_ids(lo: int, hi: int, count: int) -> bool:
    """Whether integer ids in ``[lo, hi]`` over ``count`` records are coded as ``id - lo`` (else dictionary-encoded)."""
    return hi - lo + 1 <= 2 * count


def bincount_cells(cells: int, count: int) -> bool:
    """Whether ``cells`` (sample, window) cells over ``count`` records are summed by ``bincount`` (else sort + reduceat)."""
    return cells <= 4 * count


def _sample_codes(records: Records, *, dense: bool | None = None) -> tuple[np.ndarray, int, _CodeIds]:
    """A dense int64 code per record, ordered like the sorted sample ids (frees the id buffers).

    Returns ``(codes, n_codes, code_ids)``. Integer ids that are dense enough are coded as
    ``id - min(id)``, in place (some codes may then belong to no record); other ids are
    dictionary-encoded. An engine reducing the log in groups passes the choice made for the whole log (``dense``).
    """
    int_ids, other_ids = records.int_ids, records.other_ids
    records.int_ids, records.other_ids = None, []
    if int_ids is None:
        return _sorted_codes(pa.chunked_array(other_ids).combine_chunks().dictionary_encode())
    lo, hi = int(int_ids.min()), int(int_ids.max())
    if dense if dense is not None else dense_ids(lo, hi, records.count):
        int_ids -= lo
        return int_ids, hi - lo + 1, _CodeIds(offset=lo)
    return _sorted_codes(pa.array(int_ids).dictionary_encode())


def _sorted_codes(encoded: pa.DictionaryArray) -> tuple[np.ndarray, int, _CodeIds]:
    """Dense codes ordered like the sorted distinct ids (so the output is sorted by sample_id)."""
    dictionary = encoded.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, order.size, _CodeIds(dictionary=dictionary.take(pa.array(order)))


def _cell_keys(codes: np.ndarray, record_window: np.ndarray, m: int) -> np.ndarray:
    """The flat cell key ``sample_code * m + window`` per record, computed in the codes buffer (in place)."""
    key = codes
    key *= m
    key += record_window
    return key


# ----------------------------------------------------------------------------------------------
# Grouping: (sample, window) cells -> counts and sums
# ----------------------------------------------------------------------------------------------


class _CellSums(NamedTuple):
    """Per (sample, window) cell: records, scored records, records with a finite score, sums of ``b * w``
    and of scores over the scored records, status-1 records (the last three ``count`` when the log
    has no ``status``); per signal its (sum, count) over the scored records with a finite value."""

    count: np.ndarray
    count_score: np.ndarray
    sum_bw: np.ndarray
    sum_score: np.ndarray
    n_nan: int
    count_valid: np.ndarray
    count_nonfinite: np.ndarray | None
    n_unlabeled: int
    signal_sums: dict[str, tuple[np.ndarray, np.ndarray]]
    # Per signal with non-finite values among the scored records: (how many, the codes of the first samples).
    signal_nonfinite: dict[str, tuple[int, np.ndarray]]


def _status_counts(key: np.ndarray, status: np.ndarray | None, cells: int, count: np.ndarray):
    """``(count_valid, count_nonfinite, n_unlabeled, valid mask or None)`` from the records' status."""
    if status is None:
        return count, None, 0, None
    valid = status == STATUS_SCORED
    nonfinite = status == STATUS_NONFINITE
    count_valid = np.bincount(key[valid], minlength=cells)
    count_nonfinite = np.bincount(key[nonfinite], minlength=cells)
    return count_valid, count_nonfinite, int((status == STATUS_UNLABELED).sum()), valid


def _bincount_sums(key: np.ndarray, records: Records, cells: int, m: int) -> _CellSums:
    bw, score, status = records.bw, records.scores, records.status
    records.bw = records.scores = records.status = None
    count = np.bincount(key, minlength=cells)
    count_valid, count_nonfinite, n_unlabeled, valid = _status_counts(key, status, cells, count)
    signal_sums, signal_nonfinite = _signal_sums(key, records, valid, cells, m, None)
    nan_scores = np.isnan(score)
    if valid is not None:
        nan_scores &= valid  # only a scored record's NaN score is a "NaN score"
        score[~valid] = 0.0  # b * w is already 0 there
    n_nan = int(nan_scores.sum())
    sum_bw = np.bincount(key, weights=bw, minlength=cells)
    del bw
    if n_nan or valid is not None:
        score[nan_scores] = 0.0
        with_score = ~nan_scores if valid is None else valid & ~nan_scores
        count_score = np.bincount(key[with_score], minlength=cells)
    else:
        count_score = count
    sum_score = np.bincount(key, weights=score, minlength=cells)
    return _CellSums(
        count,
        count_score,
        sum_bw,
        sum_score,
        n_nan,
        count_valid,
        count_nonfinite,
        n_unlabeled,
        signal_sums,
        signal_nonfinite,
    )


def _sorted_sums(key: np.ndarray, records: Records, cells: int, m: int) -> _CellSums:
    bw, score, status = records.bw, records.scores, records.status
    records.bw = records.scores = records.status = None
    valid = None if status is None else status == STATUS_SCORED
    if status is not None:
        # Unscored records leave the score sums like NaN scores do (their b * w is already 0); the
        # status counts are made in sorted order below, as a bincount would be cells-sized.
        score[~valid] = np.nan
    n_nan = int(np.isnan(score).sum()) - (0 if status is None else int((~valid).sum()))
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    cell = sorted_key[starts]
    del sorted_key
    runs = _Runs(order, starts, cell)
    signal_sums, signal_nonfinite = _signal_sums(key, records, valid, cells, m, runs)
    del valid
    count = np.zeros(cells, dtype=np.int64)
    sum_bw = np.zeros(cells)
    sum_score = np.zeros(cells)
    count[cell] = np.diff(np.r_[starts, key.size])
    sum_bw[cell] = np.add.reduceat(bw[order].astype(np.float64), starts)
    del bw
    score_sorted = score[order].astype(np.float64)
    status_sorted = None if status is None else status[order]
    del score, order
    valid_sorted = ~np.isnan(score_sorted)
    score_sorted[~valid_sorted] = 0.0
    sum_score[cell] = np.add.reduceat(score_sorted, starts)
    if n_nan or status is not None:
        count_score = np.zeros(cells, dtype=np.int64)
        count_score[cell] = np.add.reduceat(valid_sorted.astype(np.int64), starts)
    else:
        count_score = count
    if status is None:
        return _CellSums(count, count_score, sum_bw, sum_score, n_nan, count, None, 0, signal_sums, signal_nonfinite)
    count_valid = np.zeros(cells, dtype=np.int64)
    count_valid[cell] = np.add.reduceat((status_sorted == STATUS_SCORED).astype(np.int64), starts)
    count_nonfinite = np.zeros(cells, dtype=np.int64)
    count_nonfinite[cell] = np.add.reduceat((status_sorted == STATUS_NONFINITE).astype(np.int64), starts)
    n_unlabeled = int((status_sorted == STATUS_UNLABELED).sum())
    return _CellSums(
        count,
        count_score,
        sum_bw,
        sum_score,
        n_nan,
        count_valid,
        count_nonfinite,
        n_unlabeled,
        signal_sums,
        signal_nonfinite,
    )


class _Runs(NamedTuple):
    """The records sorted by cell key (stable: log order within a cell): ``order``, the ``starts`` of
    each cell's run and its ``cell`` key."""

    order: np.ndarray
    starts: np.ndarray
    cell: np.ndarray


def _signal_sums(
    key: np.ndarray, records: Records, valid: np.ndarray | None, cells: int, m: int, runs: _Runs | None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[int, np.ndarray]]]:
    """Per signal, its (sum, count) per cell over the scored records whose value is finite (frees
    ``records.signals``, one signal at a time), by ``bincount`` or, given ``runs``, by sort + reduceat;
    and per signal with non-finite values among the scored records, how many and the codes of the first samples."""
    sums, nonfinite = {}, {}
    for name in list(records.signals):
        values = records.signals.pop(name)
        finite = np.isfinite(values)
        bad = ~finite if valid is None else valid & ~finite
        if valid is not None:
            finite &= valid
        n_bad = int(bad.sum())
        if n_bad:
            # The samples with the smallest ids (codes are ordered like the ids), the same on every engine.
            nonfinite[name] = (n_bad, np.unique(key[bad] // m)[:MAX_LISTED_IDS])
        del bad
        values[~finite] = 0.0  # in place: no second per-record buffer
        if runs is None:
            total = np.bincount(key, weights=values, minlength=cells)
            count = np.bincount(key[finite], minlength=cells)
        else:
            total, count = np.zeros(cells), np.zeros(cells, dtype=np.int64)
            total[runs.cell] = np.add.reduceat(values[runs.order].astype(np.float64), runs.starts)
            count[runs.cell] = np.add.reduceat(finite[runs.order].astype(np.int64), runs.starts)
        del values, finite
        sums[name] = (total, count)
    return sums, nonfinite


# ----------------------------------------------------------------------------------------------
# Means: cell sums -> WindowedScores
# ----------------------------------------------------------------------------------------------


def _window_means(
    sums: _CellSums,
    code_ids: _CodeIds,
    n_codes: int,
    step_map: StepWindows,
    total_records: int,
    nonfinite_signals: dict[str, tuple[int, list]],
) -> WindowedScores:
    """Per-sample, per-window means of ``total_records`` records from the cell sums (samples with no record are dropped).

    Means run over the scored records (all records when the log has no ``status``); a sample whose
    records in a window are all unscored gets NaN there, i.e. abstains.
    """
    m = len(step_map.names)
    count, count_valid, count_score, sum_bw, sum_score = (
        a.reshape(n_codes, m) for a in (sums.count, sums.count_valid, sums.count_score, sums.sum_bw, sums.sum_score)
    )
    signal_sums = {
        name: (total.reshape(n_codes, m), n.reshape(n_codes, m)) for name, (total, n) in sums.signal_sums.items()
    }
    nonfinite = None if sums.count_nonfinite is None else sums.count_nonfinite.reshape(n_codes, m)
    n_records = count.sum(axis=1)
    present = n_records > 0
    if not present.all():  # dense codes leave gaps where an id in [min, max] never occurs
        count_valid, count_score, sum_bw, sum_score, n_records = (
            count_valid[present],
            count_score[present],
            sum_bw[present],
            sum_score[present],
            n_records[present],
        )
        nonfinite = None if nonfinite is None else nonfinite[present]
        signal_sums = {name: (total[present], n[present]) for name, (total, n) in signal_sums.items()}
    del count
    sample_ids = code_ids.of(present)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (sum_bw / count_valid).astype(np.float32)  # nan where absent (0 / 0)
        window_scores = (sum_score / count_score).astype(np.float32)
        mean_weight = sum_bw.sum(axis=1) / (n_records if sums.count_nonfinite is None else count_valid.sum(axis=1))
        n_valid_scores = count_score.sum(axis=1)
        mean_score = sum_score.sum(axis=1) / n_valid_scores
        signals = {name: (total / n).astype(np.float32) for name, (total, n) in signal_sums.items()}
    mean_score[n_valid_scores == 0] = np.nan
    return WindowedScores(
        sample_ids=sample_ids,
        values=values,
        scores=window_scores,
        mean_weight=mean_weight,
        mean_score=mean_score,
        n_records=n_records.astype(np.int32),
        window_names=step_map.names,
        window_steps=step_map.ranges,
        total_records=total_records,
        n_nan_scores=sums.n_nan,
        n_nonfinite=None if nonfinite is None else nonfinite.sum(axis=1).astype(np.int32),
        n_unlabeled_records=sums.n_unlabeled,
        signals=signals,
        n_without_score=int((n_valid_scores == 0).sum()) if sums.n_nan else 0,
        nonfinite_signals=nonfinite_signals,
    )


# ----------------------------------------------------------------------------------------------
# Gathering: groups of samples -> one WindowedScores
# ----------------------------------------------------------------------------------------------


class WindowedScoresBuilder:
    """The `WindowedScores` of the whole log, filled group by group of samples in sample-id order.

    ``n_nonfinite`` stays in memory, allocated for the most samples there can be (``capacity``; pages
    past the last sample are never touched, so they take no memory). The other per-sample outputs
    (window values and scores, signals, ids, means and counts) go to files in ``folder`` when it is
    given and are memory-mapped at the end: their pages sit in the page cache (written back and
    reclaimable) instead of the process's memory. The decision reads the ones it needs in row blocks
    (`hf_gradmimic.filter.rowblocks`), which releases the mapping's pages after each block, and the
    filter's table wraps them zero-copy, so that none is read into memory whole.
    """

    def __init__(
        self, capacity: int, step_map: StepWindows, signals: tuple[str, ...] = (), folder: Path | None = None
    ) -> None:
        self.step_map, self.m, self.folder = step_map, len(step_map.names), folder
        self.n_nonfinite: np.ndarray | None = None
        # (name, dtype, per window) of each output that may be mapped.
        self.mapped = [
            ("values", np.float32, True),
            ("ids", np.int64, False),
            ("scores", np.float32, True),
            ("mean_weight", np.float64, False),
            ("mean_score", np.float64, False),
            ("n_records", np.int32, False),
        ]
        self.mapped += [(f"signal.{name}", np.float32, True) for name in signals]
        self.kept: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in self.mapped}
        self.capacity, self.filled, self.total_records = capacity, 0, 0
        self.n_nan = self.n_without_score = self.n_unlabeled = 0
        self.nonfinite_signals: dict[str, tuple[int, list]] = {}

    def add(self, part: WindowedScores) -> None:
        """Append one group's means (its sample ids above every id added before)."""
        sl = slice(self.filled, self.filled + len(part.sample_ids))
        arrays = {
            "values": part.values,
            "ids": part.sample_ids.to_numpy(),
            "scores": part.scores,
            "mean_weight": part.mean_weight,
            "mean_score": part.mean_score,
            "n_records": part.n_records,
        }
        arrays.update({f"signal.{name}": values for name, values in part.signals.items()})
        for name, dtype, _ in self.mapped:
            values = np.ascontiguousarray(arrays[name], dtype=dtype)
            if self.folder is None:
                self.kept[name].append(values)
            else:
                with open(self.folder / f"output.{name}", "ab") as handle:
                    handle.write(values.tobytes())
        if part.n_nonfinite is not None:
            if self.n_nonfinite is None:
                self.n_nonfinite = np.zeros(self.capacity, dtype=np.int32)
            self.n_nonfinite[sl] = part.n_nonfinite
        self.filled = sl.stop
        self.total_records += part.total_records
        self.n_nan += part.n_nan_scores
        self.n_without_score += part.n_without_score
        self.n_unlabeled += part.n_unlabeled_records
        for name, (n, ids) in part.nonfinite_signals.items():
            before, listed = self.nonfinite_signals.get(name, (0, []))
            self.nonfinite_signals[name] = (before + n, sorted(listed + ids)[:MAX_LISTED_IDS])

    def _column(self, name: str, dtype: type, per_window: bool) -> np.ndarray:
        shape = (self.filled, self.m) if per_window else (self.filled,)
        if self.folder is None:
            return np.concatenate(self.kept[name]).reshape(shape)
        # Read-only map of a file in the spill folder: it outlives the folder's removal (POSIX keeps an
        # unlinked file while it is mapped) and goes with the last array that uses it.
        return np.memmap(self.folder / f"output.{name}", dtype=dtype, mode="r", shape=shape)

    def build(self) -> WindowedScores:
        """The gathered `WindowedScores` (its warnings not yet given: see `completed`)."""
        n = self.filled
        columns = {name: self._column(name, dtype, per_window) for name, dtype, per_window in self.mapped}
        return WindowedScores(
            sample_ids=pa.array(columns["ids"]),
            values=columns["values"],
            scores=columns["scores"],
            mean_weight=columns["mean_weight"],
            mean_score=columns["mean_score"],
            n_records=columns["n_records"],
            window_names=self.step_map.names,
            window_steps=self.step_map.ranges,
            total_records=self.total_records,
            n_nan_scores=self.n_nan,
            n_nonfinite=None if self.n_nonfinite is None else self.n_nonfinite[:n],
            n_unlabeled_records=self.n_unlabeled,
            signals={
                name.removeprefix("signal."): columns[name] for name, _, _ in self.mapped if name.startswith("signal.")
            },
            n_without_score=self.n_without_score,
            nonfinite_signals=dict(self.nonfinite_signals),
        )


# ----------------------------------------------------------------------------------------------
# Warnings
# ----------------------------------------------------------------------------------------------


def _warn_nan_scores(n_nan: int, total_records: int, n_without_score: int, warn_list: list[str]) -> None:
    """Warn about NaN mimic scores; refuse a log in which every score is NaN."""
    if n_nan == total_records:
        raise ValueError(
            f"Every mimic_score in the score log ({total_records} records) is NaN: there is nothing to filter on. "
            "Check the reference model and the trainer's score logging."
        )
    warn(
        f"{n_nan} of {total_records} records have a NaN mimic_score; they are left out of the mean scores "
        f"({n_without_score} sample(s) have no finite score at all), their weights still count.",
        warn_list,
    )


def _warn_nonfinite_signals(nonfinite: dict[str, tuple[int, list]], warn_list: list[str]) -> None:
    """One warning for every signal column: how many scored records have a non-finite (or missing) value, and whose."""
    parts = []
    for name, (n, ids) in nonfinite.items():
        parts.append(f"{name}: {n} record(s), the first sample_id(s) {', '.join(str(i) for i in ids)}")
    warn(
        "Scored records with a non-finite or missing value in the score log's signal column(s) abstain for that "
        f"signal in their window: {'; '.join(parts)}.",
        warn_list,
    )
