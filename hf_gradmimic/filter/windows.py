"""Records -> per-(sample, window) means: the score log reduced to the matrices that identification reads.

In window ``j`` sample ``i`` gets ``v_ij``, the mean of ``b * w`` over its records there (``b`` the
size of the batch the softmax ran over, ``w`` the sample's weight, so 1 means uniform), and the
mean mimic score; a sample with no record in ``j`` abstains (Huang et al., arXiv 2501.06708,
Section 4.2). The reduction reads one shard (or 4M-row slice) at a time into compact numpy arrays
(24 bytes per record) and groups with ``bincount``; there is no Python loop over samples or records.
Each step below frees the buffers it is done with, which is what keeps 10M samples x 5 epochs in
a few GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..scores import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED
from .inputs import ScoreSource, ScoresLike, score_source
from .shards import BadShardPolicy
from .warning import warn

__all__ = ["MAX_MATRIX_CELLS", "WindowedScores", "WindowsLike", "check_windows", "collect_windows"]

WindowsLike = Union[Literal["epoch", "step"], int]

# The (samples x windows) matrices are dense; beyond this many cells (e.g. windows="step" on a
# large run) ask for fewer windows instead of allocating gigabytes.
MAX_MATRIX_CELLS = 400_000_000

_SCORE_COLUMNS_NEEDED = ("global_step", "sample_id", "mimic_score", "weight", "batch_size")


def check_windows(windows: Any) -> None:
    """Refuse anything but ``"epoch"``, ``"step"`` or a positive int."""
    if isinstance(windows, str):
        if windows not in ("epoch", "step"):
            raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")
    elif isinstance(windows, bool) or not isinstance(windows, (int, np.integer)) or windows < 1:
        raise ValueError(f"windows must be 'epoch', 'step' or a positive int, got {windows!r}.")


@dataclass
class WindowedScores:
    """Per-sample, per-window aggregates of the score log (the input of identification).

    ``values[i, j]`` is the mean ``b * w`` of sample ``i`` in window ``j`` and ``scores[i, j]`` its
    mean mimic score there (both ``nan`` where the sample is absent, i.e. abstains).
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


def collect_windows(
    scores: ScoresLike, windows: WindowsLike = "epoch", *, on_bad_shard: BadShardPolicy = "error"
) -> WindowedScores:
    """Read the score log into memory and reduce it to per-(sample, window) means of ``b * w`` and mimic score.

    The records are read one shard (or 4M-row slice) at a time into compact numpy arrays, then
    grouped with one ``bincount`` per statistic over the flat key ``sample * m + window`` (or a
    sort + ``reduceat`` when the sample ids are too sparse for a dense key space). Records that a
    distributed sampler repeated (``repeated == True``) are dropped, as `load_scores` does.
    NaN mimic scores are left out of the score means (their weights still count) with a warning.

    The ``status`` column (`hf_gradmimic.scores`), when present: records of status 1 (non-finite)
    and 2 (no supervised label) are left out of the means, so a sample abstains in a window where
    it has no scored record; ``n_nonfinite`` counts each sample's status-1 records (the filter
    discards those samples). Logs written before the column existed read as all scored.

    This holds every record in memory (24 bytes each); `build_filter` streams by default
    (`hf_gradmimic.filter.outofcore`), which gives the same result in bounded memory.
    """
    check_windows(windows)
    source = open_source(scores, windows, on_bad_shard)
    return collect_source(source, windows)


def collect_source(source: ScoreSource, windows: WindowsLike) -> WindowedScores:
    """`collect_windows` on an opened `ScoreSource` (the in-memory engine)."""
    warn_list: list[str] = source.warnings
    for message in warn_list:
        warn(message)
    records = _read_records(source, windows)
    record_window, names, ranges = _window_per_record(records, windows, warn_list)
    codes, n_codes, code_ids = _sample_codes(records)
    m = len(names)
    if n_codes * m > MAX_MATRIX_CELLS:
        raise ValueError(
            f"{n_codes} samples x {m} windows is too large for the dense vote matrix "
            f"(limit {MAX_MATRIX_CELLS} cells); use fewer windows, e.g. windows=<int>."
        )
    key = _cell_keys(codes, record_window, m)
    del codes, record_window
    sums = _cell_sums(key, records, n_codes * m)
    del key
    means = _window_means(sums, code_ids, n_codes, m)
    return windowed_scores(means, names, ranges, records.count, warn_list)


def reduce_partition(
    records: _Records, step_map: "StepWindows", *, dense: bool, bincount: bool
) -> PartMeans:
    """One sample-id range's records (in log order) -> its per-sample window means (frees ``records``).

    The streaming and Ray engines reduce each range with this, passing the choices the in-memory
    engine makes for the whole log (``dense`` id coding, ``bincount`` or sort + reduceat), so that
    every sum is the in-memory engine's.
    """
    m = len(step_map.names)
    record_window = step_map.of_records(records.steps)
    records.steps = None
    codes, n_codes, code_ids = _sample_codes(records, dense=dense)
    key = _cell_keys(codes, record_window, m)
    del codes, record_window
    sums = _cell_sums(key, records, n_codes * m, bincount=bincount)
    del key
    return _window_means(sums, code_ids, n_codes, m)


def open_source(scores: ScoresLike, windows: WindowsLike, on_bad_shard: BadShardPolicy) -> ScoreSource:
    """The score log as a `ScoreSource`, its shards checked for the columns the reduction reads."""
    needed = list(_SCORE_COLUMNS_NEEDED) + (["epoch"] if windows == "epoch" else [])
    return score_source(scores, on_bad_shard=on_bad_shard, needed=needed)


# ----------------------------------------------------------------------------------------------
# Reading: score log -> compact numpy arrays
# ----------------------------------------------------------------------------------------------


@dataclass
class _Records:
    """The score log's records as compact numpy arrays, repeated records dropped.

    The reduction steps set a buffer to None once they are done with it, so that its memory is
    returned before the next step allocates (the arrays are one entry per record).
    """

    count: int
    steps: np.ndarray | None  # int64 global_step
    bw: np.ndarray | None  # float32 b * w
    scores: np.ndarray | None  # float32 mimic_score, NaN allowed
    int_ids: np.ndarray | None  # int64 sample_id, when the ids are integers
    other_ids: list[pa.Array]  # the sample_id chunks otherwise (strings...)
    step_epochs: list[tuple[np.ndarray, np.ndarray]]  # (distinct steps, their epoch) per chunk; epoch windows only
    status: np.ndarray | None = None  # int8 status, allocated once a chunk holds a non-scored record


def _columns_to_read(source: ScoreSource, windows: WindowsLike) -> list[str]:
    """The score-log columns the reduction reads; a ValueError names the missing ones."""
    available = source.column_names()
    needed = list(_SCORE_COLUMNS_NEEDED) + (["epoch"] if windows == "epoch" else [])
    missing = [c for c in needed if c not in available]
    if missing:
        raise ValueError(f"The score log ({source.description}) lacks the column(s) {missing}; found {available}.")
    return needed + [c for c in ("repeated", "status") if c in available]


def _read_records(source: ScoreSource, windows: WindowsLike) -> _Records:
    """Fill preallocated numpy buffers chunk by chunk (one shard or slice in memory at a time)."""
    columns = _columns_to_read(source, windows)
    capacity = source.num_rows()
    if capacity == 0:
        raise ValueError(f"The score log ({source.description}) is empty: it holds no record.")
    records = _Records(
        count=0,
        steps=np.empty(capacity, dtype=np.int64),
        bw=np.empty(capacity, dtype=np.float32),
        scores=np.empty(capacity, dtype=np.float32),
        int_ids=None,
        other_ids=[],
        step_epochs=[],
    )
    for chunk in source.chunks(columns):
        chunk = _without_repeated(chunk)
        rows = chunk.num_rows
        if rows == 0:
            continue
        sl = slice(records.count, records.count + rows)
        steps = _column_numpy(chunk, "global_step")
        records.steps[sl] = steps
        status = chunk_status(chunk)
        records.bw[sl] = _b_times_w(chunk, status)
        records.scores[sl] = _column_numpy(chunk, "mimic_score")
        if status is not None:
            if records.status is None:
                records.status = np.zeros(capacity, dtype=np.int8)
            records.status[sl] = status
        _store_ids(records, chunk.column("sample_id"), sl, capacity)
        records.step_epochs.append(chunk_steps(chunk, steps, windows))
        records.count += rows
    if records.count == 0:
        raise ValueError(f"The score log ({source.description}) is empty once repeated records are dropped.")
    if records.int_ids is not None and records.other_ids:
        raise ValueError("The score log mixes integer and non-integer sample_id types across shards.")
    filled = records.count
    records.steps, records.bw, records.scores = records.steps[:filled], records.bw[:filled], records.scores[:filled]
    if records.int_ids is not None:
        records.int_ids = records.int_ids[:filled]
    if records.status is not None:
        records.status = records.status[:filled]
    return records


def chunk_status(chunk: pa.Table) -> np.ndarray | None:
    """The int8 ``status`` of a chunk's records, or None when every record is scored (or there is no column)."""
    if "status" not in chunk.column_names:
        return None
    status = _column_numpy(chunk, "status").astype(np.int8, copy=False)
    unknown = (status < STATUS_SCORED) | (status > STATUS_UNLABELED)
    if unknown.any():
        raise ValueError(
            f"Column 'status' of the score log holds {int(unknown.sum())} value(s) other than 0 (scored), "
            f"1 (non-finite) or 2 (unlabeled), e.g. {np.unique(status[unknown])[:5].tolist()}."
        )
    return status if (status != STATUS_SCORED).any() else None


def _without_repeated(chunk: pa.Table) -> pa.Table:
    """``chunk`` without the records a distributed sampler repeated (as `load_scores` drops them)."""
    if "repeated" in chunk.column_names:
        repeated = chunk.column("repeated")
        if pc.any(repeated).as_py():
            return chunk.filter(pc.invert(repeated))
    return chunk


def _column_numpy(chunk: pa.Table, name: str) -> np.ndarray:
    column = chunk.column(name)
    if column.null_count:
        raise ValueError(f"Column {name!r} of the score log holds {column.null_count} null value(s).")
    return column.to_numpy()


def _b_times_w(chunk: pa.Table, status: np.ndarray | None = None) -> np.ndarray:
    """``b * w`` per record in float64; a ValueError when a scored record's weight is not finite.

    Records that were not scored (``status`` 1 or 2) get 0: the trainer gave them weight 0, and the
    reduction leaves them out of the means anyway.
    """
    weight = _column_numpy(chunk, "weight").astype(np.float64)
    if status is not None:
        weight[status != STATUS_SCORED] = 0.0
    if not np.isfinite(weight).all():
        raise ValueError(
            f"The score log holds {int((~np.isfinite(weight)).sum())} non-finite weight(s); "
            "weights must be finite (NaN is only allowed in mimic_score)."
        )
    weight *= _column_numpy(chunk, "batch_size")
    return weight


def _store_ids(records: _Records, ids: pa.ChunkedArray, sl: slice, capacity: int) -> None:
    """Integer ids go into a numpy buffer (allocated on first use); other ids are kept as Arrow chunks."""
    if ids.null_count:
        raise ValueError(f"Column 'sample_id' of the score log holds {ids.null_count} null value(s).")
    if pa.types.is_integer(ids.type):
        if records.int_ids is None:
            records.int_ids = np.empty(capacity, dtype=np.int64)
        records.int_ids[sl] = ids.to_numpy()
    else:
        records.other_ids.extend(ids.chunks)


def chunk_steps(chunk: pa.Table, steps: np.ndarray, windows: WindowsLike) -> tuple[np.ndarray, np.ndarray | None]:
    """One ``(step, epoch)`` pair per distinct step of a chunk (epoch None unless ``windows="epoch"``)."""
    # Shards are step-ordered, so a diff finds the distinct steps without sorting.
    if steps.size > 1 and (np.diff(steps) >= 0).all():
        starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    else:
        _, starts = np.unique(steps, return_index=True)
    epochs = _column_numpy(chunk, "epoch")[starts] if windows == "epoch" else None
    return steps[starts], epochs


# ----------------------------------------------------------------------------------------------
# Windows: optimizer steps -> window index per record
# ----------------------------------------------------------------------------------------------


def _window_per_record(
    records: _Records, windows: WindowsLike, warn_list: list[str]
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """The int32 window index of every record, the window names and their step ranges (frees ``records.steps``)."""
    steps = records.steps
    records.steps = None
    step_map = StepWindows.of(records.step_epochs, windows, warn_list)
    return step_map.of_records(steps), step_map.names, step_map.ranges


@dataclass(frozen=True)
class StepWindows:
    """The window of every distinct optimizer step of the log, with the windows' names and step ranges."""

    steps: np.ndarray  # sorted distinct steps
    window: np.ndarray  # window index per step
    names: list[str]
    ranges: list[tuple[int, int]]

    @classmethod
    def of(
        cls, step_epochs: list[tuple[np.ndarray, np.ndarray | None]], windows: WindowsLike, warn_list: list[str]
    ) -> "StepWindows":
        """From the ``(distinct steps, epochs)`` of every chunk (`chunk_steps`)."""
        all_steps = np.concatenate([s for s, _ in step_epochs])
        unique_steps, first = np.unique(all_steps, return_index=True)
        unique_epochs = np.concatenate([e for _, e in step_epochs])[first] if windows == "epoch" else None
        window, names, ranges = _window_of_steps(unique_steps, unique_epochs, windows, warn_list)
        return cls(unique_steps, window, names, ranges)

    def of_records(self, steps: np.ndarray) -> np.ndarray:
        """The int32 window of each record's step (``steps`` is modified in place)."""
        unique_steps, step_window = self.steps, self.window
        span = int(unique_steps[-1] - unique_steps[0]) + 1
        if span <= 4 * unique_steps.size + 1_000_000:
            # A dense lookup table over the step span beats a binary search per record.
            lookup = np.full(span, -1, dtype=np.int32)
            lookup[unique_steps - unique_steps[0]] = step_window
            steps -= unique_steps[0]
            return lookup[steps]
        return step_window[np.searchsorted(unique_steps, steps)].astype(np.int32)


def _window_of_steps(
    steps: np.ndarray, epochs: np.ndarray | None, windows: WindowsLike, warn_list: list[str]
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Map the distinct optimizer steps (sorted) to window indices.

    Returns ``(window_index_per_step, names, (first_step, last_step) per window)``; windows cut
    into equal step ranges are named after their ranges, ``steps_<first>-<last>``.
    """
    if windows == "step":
        index, names = np.arange(steps.size), [f"step_{int(s)}" for s in steps]
    elif windows == "epoch":
        index, names = _epoch_windows(epochs)
    else:
        index, names = _equal_step_windows(steps, int(windows), warn_list), []
    n_windows = int(index.max()) + 1
    first_step = np.full(n_windows, np.iinfo(np.int64).max)
    last_step = np.full(n_windows, np.iinfo(np.int64).min)
    np.minimum.at(first_step, index, steps)  # small: one entry per distinct step
    np.maximum.at(last_step, index, steps)
    ranges = [(int(a), int(b)) for a, b in zip(first_step, last_step)]
    if not names:
        names = [f"steps_{a}-{b}" for a, b in ranges]
    return index, names, ranges


def _epoch_windows(epochs: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """One window per epoch: ``(window index per step, names)``.

    A record's ``epoch`` is the fractional epoch *after* its step, so the last step of epoch 1 has
    ``epoch == 1.0`` exactly (``floor`` would put it in the next epoch). The window is
    ``ceil(epoch - tol) - 1`` with a tolerance ``tol`` far below one step's share of an epoch
    (half the smallest epoch increment between consecutive steps, at most 1e-6), which absorbs
    float rounding such as ``1.0000000000000002``. Windows are named ``epoch_<k>`` with ``k``
    0-based (``epoch_0`` holds the steps with ``0 < epoch <= 1``).
    """
    if epochs is None or not np.isfinite(epochs).all():
        raise ValueError("windows='epoch' needs a finite `epoch` column in the score log.")
    increments = np.diff(epochs)
    positive = increments[increments > 0]
    tol = min(1e-6, 0.5 * float(positive.min())) if positive.size else 1e-6
    epoch_index = np.maximum(np.ceil(epochs - tol).astype(np.int64) - 1, 0)
    labels, index = np.unique(epoch_index, return_inverse=True)
    return index, [f"epoch_{int(e)}" for e in labels]


def _equal_step_windows(steps: np.ndarray, windows: int, warn_list: list[str]) -> np.ndarray:
    """``windows`` windows of equal step ranges over the run; the index per step (empty windows dropped)."""
    first, last = int(steps[0]), int(steps[-1])
    span = last - first + 1
    if windows > span:
        raise ValueError(f"windows={windows} is more than the {span} optimizer steps ({first}..{last}) in the score log.")
    raw = (steps - first) * windows // span
    labels, index = np.unique(raw, return_inverse=True)
    if labels.size < windows:
        warn(
            f"{windows - labels.size} of the {windows} step windows hold no record (gaps in global_step) "
            "and were dropped.",
            warn_list,
        )
    return index


# ----------------------------------------------------------------------------------------------
# Grouping: (sample, window) cells -> counts and sums
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


def dense_ids(lo: int, hi: int, count: int) -> bool:
    """Whether integer ids in ``[lo, hi]`` over ``count`` records are coded as ``id - lo`` (else dictionary-encoded)."""
    return hi - lo + 1 <= 2 * count


def bincount_cells(cells: int, count: int) -> bool:
    """Whether ``cells`` (sample, window) cells over ``count`` records are summed by ``bincount`` (else sort + reduceat)."""
    return cells <= 4 * count


def _sample_codes(
    records: _Records, *, dense: bool | None = None, bounds: tuple[int, int] | None = None
) -> tuple[np.ndarray, int, _CodeIds]:
    """A dense int64 code per record, ordered like the sorted sample ids (frees the id buffers).

    Returns ``(codes, n_codes, code_ids)``. Integer ids that are dense enough are coded as
    ``id - min(id)``, in place (some codes may then belong to no record); other ids are
    dictionary-encoded. The streaming engine passes the choice it made for the whole log
    (``dense``) and the partition's id range (``bounds``).
    """
    int_ids, other_ids = records.int_ids, records.other_ids
    records.int_ids, records.other_ids = None, []
    if int_ids is None:
        return _sorted_codes(pa.chunked_array(other_ids).combine_chunks().dictionary_encode())
    lo, hi = bounds if bounds is not None else (int(int_ids.min()), int(int_ids.max()))
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


class _CellSums(NamedTuple):
    """Per (sample, window) cell: records, scored records, records with a finite score, sums of ``b * w``
    and of scores over the scored records, status-1 records (the last three ``count`` when the log
    has no ``status``)."""

    count: np.ndarray
    count_score: np.ndarray
    sum_bw: np.ndarray
    sum_score: np.ndarray
    n_nan: int
    count_valid: np.ndarray
    count_nonfinite: np.ndarray | None
    n_unlabeled: int


def _cell_sums(key: np.ndarray, records: _Records, cells: int, *, bincount: bool | None = None) -> _CellSums:
    """Group the records by cell key (frees ``records.bw`` and ``records.scores``).

    A dense key space gets one ``bincount`` per statistic; a sparse one (e.g. ``windows="step"``)
    a sort of the keys and a ``reduceat`` over the runs, so that no ``cells``-sized pass is made
    per record. The two sum a cell's records in a different order (``reduceat`` sums pairwise),
    so the streaming engine passes the choice made for the whole log (``bincount``): its results
    are then bit-identical to this in-memory path.
    """
    if bincount if bincount is not None else bincount_cells(cells, records.count):
        return _bincount_sums(key, records, cells)
    return _sorted_sums(key, records, cells)


def _status_counts(key: np.ndarray, status: np.ndarray | None, cells: int, count: np.ndarray):
    """``(count_valid, count_nonfinite, n_unlabeled, valid mask or None)`` from the records' status."""
    if status is None:
        return count, None, 0, None
    valid = status == STATUS_SCORED
    nonfinite = status == STATUS_NONFINITE
    count_valid = np.bincount(key[valid], minlength=cells)
    count_nonfinite = np.bincount(key[nonfinite], minlength=cells)
    return count_valid, count_nonfinite, int((status == STATUS_UNLABELED).sum()), valid


def _bincount_sums(key: np.ndarray, records: _Records, cells: int) -> _CellSums:
    bw, score, status = records.bw, records.scores, records.status
    records.bw = records.scores = records.status = None
    count = np.bincount(key, minlength=cells)
    count_valid, count_nonfinite, n_unlabeled, valid = _status_counts(key, status, cells, count)
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
    return _CellSums(count, count_score, sum_bw, sum_score, n_nan, count_valid, count_nonfinite, n_unlabeled)


def _sorted_sums(key: np.ndarray, records: _Records, cells: int) -> _CellSums:
    bw, score, status = records.bw, records.scores, records.status
    records.bw = records.scores = records.status = None
    if status is not None:
        # Unscored records leave the score sums like NaN scores do (their b * w is already 0); the
        # status counts are made in sorted order below, as a bincount would be cells-sized.
        score[status != STATUS_SCORED] = np.nan
    n_nan = int(np.isnan(score).sum()) - (0 if status is None else int((status != STATUS_SCORED).sum()))
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    cell = sorted_key[starts]
    del sorted_key
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
        return _CellSums(count, count_score, sum_bw, sum_score, n_nan, count, None, 0)
    count_valid = np.zeros(cells, dtype=np.int64)
    count_valid[cell] = np.add.reduceat((status_sorted == STATUS_SCORED).astype(np.int64), starts)
    count_nonfinite = np.zeros(cells, dtype=np.int64)
    count_nonfinite[cell] = np.add.reduceat((status_sorted == STATUS_NONFINITE).astype(np.int64), starts)
    n_unlabeled = int((status_sorted == STATUS_UNLABELED).sum())
    return _CellSums(count, count_score, sum_bw, sum_score, n_nan, count_valid, count_nonfinite, n_unlabeled)


# ----------------------------------------------------------------------------------------------
# Means: cell sums -> WindowedScores
# ----------------------------------------------------------------------------------------------


class PartMeans(NamedTuple):
    """Per-sample window means of one group of samples (all of them, or one partition of the streaming engine)."""

    sample_ids: pa.Array
    values: np.ndarray
    scores: np.ndarray
    mean_weight: np.ndarray
    mean_score: np.ndarray
    n_records: np.ndarray
    n_nonfinite: np.ndarray | None
    n_nan: int
    n_without_score: int
    n_unlabeled: int


def _window_means(sums: _CellSums, code_ids: _CodeIds, n_codes: int, m: int) -> PartMeans:
    """Per-sample, per-window means from the cell sums (samples with no record are dropped).

    Means run over the scored records (all records when the log has no ``status``); a sample whose
    records in a window are all unscored gets NaN there, i.e. abstains.
    """
    count, count_valid, count_score, sum_bw, sum_score = (
        a.reshape(n_codes, m) for a in (sums.count, sums.count_valid, sums.count_score, sums.sum_bw, sums.sum_score)
    )
    nonfinite = None if sums.count_nonfinite is None else sums.count_nonfinite.reshape(n_codes, m)
    n_records = count.sum(axis=1)
    present = n_records > 0
    if not present.all():  # dense codes leave gaps where an id in [min, max] never occurs
        count_valid, count_score, sum_bw, sum_score, n_records = (
            count_valid[present], count_score[present], sum_bw[present], sum_score[present], n_records[present]
        )
        nonfinite = None if nonfinite is None else nonfinite[present]
    del count
    sample_ids = code_ids.of(present)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (sum_bw / count_valid).astype(np.float32)  # nan where absent (0 / 0)
        window_scores = (sum_score / count_score).astype(np.float32)
        mean_weight = sum_bw.sum(axis=1) / (n_records if sums.count_nonfinite is None else count_valid.sum(axis=1))
        n_valid_scores = count_score.sum(axis=1)
        mean_score = sum_score.sum(axis=1) / n_valid_scores
    mean_score[n_valid_scores == 0] = np.nan
    return PartMeans(
        sample_ids=sample_ids,
        values=values,
        scores=window_scores,
        mean_weight=mean_weight,
        mean_score=mean_score,
        n_records=n_records.astype(np.int32),
        n_nonfinite=None if nonfinite is None else nonfinite.sum(axis=1).astype(np.int32),
        n_nan=sums.n_nan,
        n_without_score=int((n_valid_scores == 0).sum()) if sums.n_nan else 0,
        n_unlabeled=sums.n_unlabeled,
    )


def windowed_scores(
    means: PartMeans,
    names: list[str],
    ranges: list[tuple[int, int]],
    total_records: int,
    warn_list: list[str],
) -> WindowedScores:
    """`WindowedScores` from the means of every sample, with the NaN-score warning."""
    if means.n_nan:
        _warn_nan_scores(means.n_nan, total_records, means.n_without_score, warn_list)
    return WindowedScores(
        sample_ids=means.sample_ids,
        values=means.values,
        scores=means.scores,
        mean_weight=means.mean_weight,
        mean_score=means.mean_score,
        n_records=means.n_records,
        window_names=names,
        window_steps=ranges,
        total_records=total_records,
        n_nan_scores=means.n_nan,
        warnings=warn_list,
        n_nonfinite=means.n_nonfinite,
        n_unlabeled_records=means.n_unlabeled,
    )


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
