"""The streaming engine (`hf_gradmimic.filter.engines.outofcore`) against the in-memory engine and a pandas groupby.

Random logs, cut into many sample-id partitions by a tiny memory budget, must give the in-memory
engine's `WindowedScores` bit for bit, and so the same filter for every method and aggregate."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_filter import make_log

from hf_gradmimic.filter import (
    AGGREGATES,
    METHODS,
    FilterWarning,
    build_filter,
    collect_windows,
    collect_windows_streaming,
)
from hf_gradmimic.filter.decide import decide
from hf_gradmimic.score_log_io import SCORES_DIRNAME, write_shard

FIELDS = ("values", "scores", "mean_weight", "mean_score", "n_records", "n_nonfinite")


def random_log(seed: int, *, sparse_ids: bool = False, extras: bool = True, signals: bool = False) -> pa.Table:
    """A make_log log, reshuffled ids; with ``extras``: repeated rows, NaN scores, status 1/2 records; with
    ``signals``: the reference's loss and margin beside the student's loss, each with NaN, inf and missing values."""
    rng = np.random.default_rng(seed)
    table, _ = make_log(
        n=int(rng.integers(300, 900)), epochs=int(rng.integers(3, 6)), batch=int(rng.integers(8, 40)), seed=seed
    )
    columns = dict(zip(table.column_names, table.columns))
    ids = table.column("sample_id").to_numpy()
    if sparse_ids:  # far apart, unordered: the in-memory engine dictionary-encodes them
        mapping = rng.choice(10**12, size=ids.max() + 1, replace=False)
        columns["sample_id"] = pa.array(mapping[ids], pa.int64())
    else:
        columns["sample_id"] = pa.array(ids + 1000, pa.int64())
    if extras:
        n = table.num_rows
        repeated = rng.random(n) < 0.03
        status = np.where(rng.random(n) < 0.02, 2, 0).astype(np.int8)
        status[rng.random(n) < 0.005] = 1
        score = table.column("mimic_score").to_numpy().copy()
        score[rng.random(n) < 0.02] = np.nan
        score[status == 1] = np.nan
        weight = table.column("weight").to_numpy().copy()
        weight[status != 0] = 0
        columns.update(
            repeated=pa.array(repeated),
            status=pa.array(status, pa.int8()),
            mimic_score=pa.array(score, pa.float32()),
            weight=pa.array(weight, pa.float32()),
        )
    if signals:
        columns.update(signal_columns(np.random.default_rng(seed + 10_000), table.num_rows))
    return pa.table(columns)


def signal_columns(rng: np.random.Generator, n: int) -> dict[str, pa.Array]:
    """Random float32 signal columns: ~3% NaN, ~0.5% +-inf, ~1% missing (null) values."""
    out = {}
    for name, scale in (("loss", 2.0), ("reference_loss", 3.0), ("reference_margin", 1.0)):
        values = (rng.standard_normal(n) * scale).astype(np.float32)
        if name != "reference_margin":
            values = np.abs(values)
        values[rng.random(n) < 0.03] = np.nan
        values[rng.random(n) < 0.005] = np.inf * rng.choice([-1, 1])
        out[name] = pa.array(values, pa.float32(), mask=rng.random(n) < 0.01)
    return out


def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    """Equal column by column, NaN equal to NaN (Arrow's ``equals`` treats NaN as unequal)."""
    assert a.schema == b.schema
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_list(x.type) or pa.types.is_large_list(x.type):
            x, y = x.flatten(), y.flatten()
            assert a.column(name).combine_chunks().offsets.equals(b.column(name).combine_chunks().offsets)
        x, y = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def assert_same_windows(a, b) -> None:
    assert a.sample_ids.equals(b.sample_ids)
    assert a.window_names == b.window_names and a.window_steps == b.window_steps
    assert (a.total_records, a.n_nan_scores, a.n_unlabeled_records) == (
        b.total_records,
        b.n_nan_scores,
        b.n_unlabeled_records,
    )
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            # Bit for bit: the same float sums in the same order.
            assert np.array_equal(x, y, equal_nan=True), name


def assert_same_signals(a, b) -> None:
    """The signal matrices bit for bit (the same float sums in the same order), and the same non-finite counts."""
    assert list(a.signals) == list(b.signals)
    for name in a.signals:
        x, y = a.signals[name], b.signals[name]
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), name  # bits, NaN payloads included
    assert a.nonfinite_signals == b.nonfinite_signals


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("windows", ["epoch", 2, 7, "step"])
@pytest.mark.parametrize("sparse_ids", [False, True])
def test_streaming_equals_in_memory_bit_for_bit(seed, windows, sparse_ids):
    table = random_log(seed, sparse_ids=sparse_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        memory = collect_windows(table, windows)
        # ~100 records per partition: dozens of partitions, every one spilled to disk.
        streamed = collect_windows_streaming(table, windows, memory_budget=100 * 64)
    assert_same_windows(memory, streamed)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_every_method_and_aggregate_gives_the_same_filter(method, aggregate):
    table = random_log(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        memory = collect_windows(table, 4)
        streamed = collect_windows_streaming(table, 4, memory_budget=300 * 64)
        settings = dict(method=method, aggregate=aggregate, windows=4, threshold=None, topk=60, seed=0)
        a, summary_a = decide(memory, **settings)
        b, summary_b = decide(streamed, **settings)
    assert_same_table(a, b)
    assert summary_a == summary_b


@pytest.mark.parametrize("windows", [3, "step"])  # "step": the sparse (sort + reduceat) path
def test_streaming_matches_a_pandas_groupby(windows):
    """Independent oracle: per (sample, window) means of b*w and score over the scored, non-repeated records."""
    table = random_log(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        streamed = collect_windows_streaming(table, windows, memory_budget=200 * 64)
    frame = table.to_pandas()
    frame = frame[~frame["repeated"]]
    steps = np.sort(frame["global_step"].unique())
    if windows == "step":
        window = np.searchsorted(steps, frame["global_step"])
        m = steps.size
    else:
        window = (frame["global_step"] - steps[0]) * windows // (steps[-1] - steps[0] + 1)
        m = windows
    frame = frame.assign(window=window, bw=frame["weight"].astype("float64") * frame["batch_size"])
    scored = frame[frame["status"] == 0]
    ids = streamed.sample_ids.to_numpy()

    def matrix(series):
        return series.unstack().reindex(index=ids, columns=range(m)).to_numpy()

    np.testing.assert_allclose(
        streamed.values, matrix(scored.groupby(["sample_id", "window"])["bw"].mean()), rtol=1e-6, equal_nan=True
    )
    # pandas' mean skips NaN scores, as the filter does.
    np.testing.assert_allclose(
        streamed.scores,
        matrix(scored.groupby(["sample_id", "window"])["mimic_score"].mean()),
        rtol=1e-5,
        equal_nan=True,
    )
    np.testing.assert_array_equal(streamed.n_records, frame.groupby("sample_id").size().reindex(ids).to_numpy())
    nonfinite = frame.assign(nf=frame["status"] == 1).groupby("sample_id")["nf"].sum().reindex(ids).to_numpy()
    np.testing.assert_array_equal(streamed.n_nonfinite, nonfinite)


def write_shards(table: pa.Table, output_dir, rows: int = 700):
    """``table`` as the trainer's shards of ``rows`` records under ``output_dir/mimic_scores/`` (with their page
    checksums)."""
    folder = output_dir / SCORES_DIRNAME
    folder.mkdir(parents=True)
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        steps = part.column("global_step").to_numpy()
        write_shard(part, folder / f"rank00000-steps{steps.min():09d}-{steps.max():09d}.parquet")
    return output_dir


def test_build_filter_streams_shards_from_disk_by_default(tmp_path, monkeypatch):
    table = random_log(3, extras=False)
    write_shards(table, tmp_path, rows=500)
    # A budget far below the log: the default engine must partition and spill (into spill_dir).
    monkeypatch.setattr("hf_gradmimic.filter.engines.outofcore.DEFAULT_MEMORY_BUDGET", 50_000)
    spill = tmp_path / "spill"
    spill.mkdir()
    streamed = build_filter(tmp_path, method="gmm", spill_dir=spill)
    memory = build_filter(tmp_path, method="gmm", engine="memory")
    assert_same_table(streamed.table, memory.table)
    assert list(spill.iterdir()) == []  # the spill folder is removed


def test_string_ids_use_the_in_memory_engine():
    table = random_log(2, extras=False)
    ids = pa.array([f"id-{i}" for i in table.column("sample_id").to_numpy()])
    table = table.set_column(table.column_names.index("sample_id"), "sample_id", ids)
    streamed = collect_windows_streaming(table, "epoch", memory_budget=1000)
    assert_same_windows(collect_windows(table, "epoch"), streamed)


def test_an_unknown_engine_is_named():
    with pytest.raises(ValueError, match="Unknown engine 'duckdb'"):
        build_filter(random_log(0, extras=False), engine="duckdb")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("windows", ["epoch", 2, "step"])
@pytest.mark.parametrize("sparse_ids", [False, True])
def test_signals_are_bit_identical_on_the_spilling_engine(seed, windows, sparse_ids):
    """Repeated rows, status 1/2 records, NaN / inf / missing signal values; dozens of spilled partitions."""
    table = random_log(seed, sparse_ids=sparse_ids, signals=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        memory = collect_windows(table, windows)
        streamed = collect_windows_streaming(table, windows, memory_budget=100 * 64)
    assert set(memory.signals) == {"loss", "reference_loss", "reference_margin"}
    assert_same_windows(memory, streamed)
    assert_same_signals(memory, streamed)
    # Spilled: the signal matrices are memory-mapped like the window scores, not held in the process.
    assert all(isinstance(matrix, np.memmap) for matrix in streamed.signals.values())


def signal_oracle(table: pa.Table, windows: int):
    """Per (sample, window) mean of each signal over the non-repeated, scored records whose value is finite,
    and the non-finite scored records per signal (count, the 5 smallest sample ids), by a pandas groupby."""
    frame = table.to_pandas()  # a missing (null) value becomes NaN
    frame = frame[~frame["repeated"]]
    steps = np.sort(frame["global_step"].unique())
    frame = frame.assign(window=(frame["global_step"] - steps[0]) * windows // (steps[-1] - steps[0] + 1))
    scored = frame[frame["status"] == 0]
    ids = np.sort(frame["sample_id"].unique())
    means, nonfinite = {}, {}
    for name in ("loss", "reference_loss", "reference_margin"):
        values = scored[name].astype("float64")
        finite = np.isfinite(values)
        grouped = scored[finite].assign(value=values[finite]).groupby(["sample_id", "window"])["value"].mean()
        means[name] = grouped.unstack().reindex(index=ids, columns=range(windows)).to_numpy()
        if (~finite).any():
            nonfinite[name] = (int((~finite).sum()), np.unique(scored.loc[~finite, "sample_id"])[:5].tolist())
    return ids, means, nonfinite


@pytest.mark.parametrize("engine", ["memory", "streaming"])
def test_signal_means_match_a_pandas_groupby_and_warn_once(engine):
    table = random_log(4, signals=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FilterWarning)
        if engine == "memory":
            windowed = collect_windows(table, 3)
        else:
            windowed = collect_windows_streaming(table, 3, memory_budget=150 * 64)
    ids, means, nonfinite = signal_oracle(table, 3)
    np.testing.assert_array_equal(windowed.sample_ids.to_numpy(), ids)
    for name, expected in means.items():
        np.testing.assert_allclose(windowed.signals[name], expected, rtol=1e-6, equal_nan=True, err_msg=name)
        assert np.array_equal(np.isnan(windowed.signals[name]), np.isnan(expected)), name  # the same abstentions
    assert windowed.nonfinite_signals == nonfinite and len(nonfinite) == 3
    # One warning for every signal, naming the counts and the first sample ids; kept for the summary.
    messages = [str(w.message) for w in caught if "signal column" in str(w.message)]
    assert len(messages) == 1 and [m for m in windowed.warnings if "signal column" in m] == messages
    for name, (count, first) in nonfinite.items():
        assert f"{name}: {count} record(s), the first sample_id(s) {', '.join(map(str, first))}" in messages[0]


def test_a_log_without_signal_columns_has_none():
    table = random_log(1, extras=False).drop(["loss"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FilterWarning)
        memory = collect_windows(table, "epoch")
        streamed = collect_windows_streaming(table, "epoch", memory_budget=100 * 64)
    assert memory.signals == {} and streamed.signals == {}
    assert not any("signal column" in str(w.message) for w in caught)
    # Only the columns the log has: here the reference's margin alone, every value finite.
    margin = pa.array(np.linspace(-1, 1, table.num_rows), pa.float32())
    only_margin = collect_windows_streaming(
        table.append_column("reference_margin", margin), "epoch", memory_budget=100 * 64
    )
    assert list(only_margin.signals) == ["reference_margin"] and only_margin.nonfinite_signals == {}


def write_resumed_log(table: pa.Table, output_dir, older_first: bool, rows: int = 700) -> pa.Table:
    """``table`` as shards of a run resumed across writer versions: half of them (the first or the last) lack
    `status` and `reference_loss`. Returns the same log as one table: those records scored, their reference
    loss missing."""
    folder = output_dir / SCORES_DIRNAME
    folder.mkdir(parents=True)
    n = table.num_rows
    older = np.zeros(n, dtype=bool)
    for start in range(0, n, rows):
        part = table.slice(start, rows)
        if (start < n // 2) == older_first:
            part = part.drop(["status", "reference_loss"])
            older[start : start + rows] = True
        steps = part.column("global_step").to_numpy()
        pq.write_table(part, folder / f"rank00000-steps{steps.min():09d}-{steps.max():09d}.parquet")
    status = np.where(older, 0, table.column("status").to_numpy()).astype(np.int8)
    reference_loss = pa.array(
        table.column("reference_loss").to_numpy(zero_copy_only=False),
        pa.float32(),
        mask=older | table.column("reference_loss").is_null().to_numpy(zero_copy_only=False),
    )
    return table.set_column(table.column_names.index("status"), "status", pa.array(status)).set_column(
        table.column_names.index("reference_loss"), "reference_loss", reference_loss
    )


@pytest.mark.parametrize("older_first", [True, False])
def test_shards_without_the_newer_columns_read_as_missing_signals_and_scored(tmp_path, older_first):
    """A run resumed across writer versions: some shards lack `status` and `reference_loss`. Their records
    read as scored with a missing reference loss, on every engine, as the same log held in one table would."""
    as_one_table = write_resumed_log(random_log(6, signals=True), tmp_path, older_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        expected = collect_windows(as_one_table, 3)
        for windowed in (collect_windows(tmp_path, 3), collect_windows_streaming(tmp_path, 3, memory_budget=100 * 64)):
            assert_same_windows(expected, windowed)
            assert_same_signals(expected, windowed)
    assert np.isnan(expected.signals["reference_loss"]).sum() > np.isnan(expected.signals["loss"]).sum()


def default_filter_log(seed: int, folder) -> pa.Table:
    """A random log on disk with the columns the default filter reads (the student's loss and margin, the reference's
    margin), NaN, inf
    and missing values among them, status 1/2 records and repeated rows; returns the table written."""
    table = random_log(seed, signals=True)
    margin = signal_columns(np.random.default_rng(seed + 20_000), table.num_rows)["reference_margin"]
    table = table.append_column("margin", margin)
    write_shards(table, folder, rows=700)
    return table


def test_the_default_filter_is_identical_when_the_streaming_engine_spills(tmp_path, monkeypatch):
    default_filter_log(11, tmp_path)
    # Far below the log: many sample-id ranges, every per-sample output memory-mapped from the spill folder.
    monkeypatch.setattr("hf_gradmimic.filter.engines.outofcore.DEFAULT_MEMORY_BUDGET", 40_000)
    monkeypatch.setattr("hf_gradmimic.filter.rowblocks.ROW_BLOCK", 97)  # several row blocks per mapped matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        windowed = collect_windows_streaming(tmp_path, 5, memory_budget=40_000)
        streamed = build_filter(tmp_path, windows=5, engine="streaming")
        memory = build_filter(tmp_path, windows=5, engine="memory")
    assert isinstance(windowed.values, np.memmap) and isinstance(windowed.signals["margin"], np.memmap)
    assert streamed.summary["settings"]["labeling_functions"] == ["mean_loss", "mean_margin", "reference_margin"]
    assert streamed.summary["agreement_gate"]["reference_margins"] == ["reference_margin"]
    assert streamed.summary["aggregate_used"] == "mixture"
    np.testing.assert_array_equal(streamed.keep_prob, memory.keep_prob)
    np.testing.assert_array_equal(streamed.keep_log_odds, memory.keep_log_odds)
    np.testing.assert_array_equal(streamed.keep, memory.keep)
    assert_same_table(streamed.table, memory.table)
    assert streamed.summary["mean_mimic_score"] == memory.summary["mean_mimic_score"]


def test_a_missing_spill_dir_is_refused_before_reading_naming_it(tmp_path):
    table, _ = make_log(n=50)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match="no-such-folder.*not an existing directory"):
        build_filter(table, spill_dir=missing)
    assert not missing.exists()  # nothing was created in its place
