"""Reading the score log on bad input (issue 15): unreadable shards are named or skipped, gaps and duplicated
records are found, pandas nulls read as NaN, the `status` column decides, a corrupt saved filter is named.

Each case asserts the behaviour and a message naming the thing at fault; the oracle is the filter built
from the intact log (or a hand-made log whose answer is known)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_filter import make_log

from hf_gradmimic.cli import main as cli_main
from hf_gradmimic.filter import BadShardError, FilterWarning, MimicFilter, build_filter
from hf_gradmimic.score_log_io import SCORES_DIRNAME, STATUS_NONFINITE, STATUS_UNLABELED

# The labeling functions whose columns this file's logs hold (the default's margin is not among them).
LOG_SOURCES = ["mimic", "loss", "mean_loss"]


def write_log(table: pa.Table, output_dir: Path, rows_per_shard: int = 300) -> list[Path]:
    """``table`` as rank-0 shards named like ScoreWriter's, cut every ``rows_per_shard`` rows."""
    folder = output_dir / SCORES_DIRNAME
    folder.mkdir(parents=True)
    paths = []
    for start in range(0, table.num_rows, rows_per_shard):
        part = table.slice(start, rows_per_shard)
        steps = part.column("global_step").to_numpy()
        path = folder / f"rank00000-steps{steps.min():09d}-{steps.max():09d}.parquet"
        pq.write_table(part, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def log():
    table, _ = make_log(n=1000, epochs=3, batch=50)
    return table


def same_filter(a: MimicFilter, b: MimicFilter) -> None:
    assert a.table.column("sample_id").equals(b.table.column("sample_id"))
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.votes(), b.votes())
    np.testing.assert_array_equal(a.window_values(), b.window_values())


# ---------------------------------------------------------------- unreadable shards


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage: not Parquet at all
        path.write_bytes(b"this is not a parquet file" * 20)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_an_unreadable_shard_is_named_in_build_filter_and_the_cli(tmp_path, log, how, capsys):
    paths = write_log(log, tmp_path)
    bad = paths[2]
    corrupt(bad, how)
    with pytest.raises(BadShardError) as raised:
        build_filter(tmp_path, method="threshold")
    assert str(bad) in str(raised.value) and "on_bad_shard='skip'" in str(raised.value)
    assert raised.value.path == bad
    # The CLI prints the library's message, naming the file, and exits 2.
    code = cli_main(["filter", str(tmp_path), "--method", "threshold", "--output", str(tmp_path / "f")])
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("engine", ["streaming", "memory"])
def test_on_bad_shard_skip_leaves_the_shards_out_and_lists_them(tmp_path, log, engine):
    paths = write_log(log, tmp_path)
    corrupt(paths[1], "truncated")
    corrupt(paths[4], "empty")
    with pytest.warns(FilterWarning) as caught:
        skipped = build_filter(tmp_path, method="threshold", aggregate="majority", on_bad_shard="skip", engine=engine)
    messages = [str(w.message) for w in caught]
    listing = next(m for m in messages if "Skipped 2 unreadable" in m)
    assert str(paths[1]) in listing and str(paths[4]) in listing
    assert any(m in skipped.summary["warnings"] for m in [listing])
    # Oracle: the filter of the log without those shards' rows.
    keep_rows = np.ones(log.num_rows, dtype=bool)
    keep_rows[300:600] = keep_rows[1200:1500] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        expected = build_filter(log.filter(pa.array(keep_rows)), method="threshold", aggregate="majority")
    same_filter(skipped, expected)
    # And the CLI takes the option.
    assert (
        cli_main(
            [
                "filter",
                str(tmp_path),
                "--method",
                "threshold",
                "--aggregate",
                "majority",
                "--on-bad-shard",
                "skip",
                "--output",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize("engine", ["streaming", "memory"])
def test_a_skipped_shard_does_not_take_the_copies_another_shard_holds_of_its_steps(tmp_path, log, engine):
    """Two overlapping shards of rank 0, A (steps 1-2) and B (steps 2-3): step 2 is in both, and B's copies are dropped
    as duplicates of A's. With a corrupt page in A's ``weight`` column (its steps and ids read), A is skipped: step 2 is
    then read from B, so only A's step 1 is missing (the oracle: the log without step 1's rows)."""
    steps = log.column("global_step").to_numpy()
    folder = tmp_path / SCORES_DIRNAME
    folder.mkdir()
    first = folder / "rank00000-steps000000001-000000002.parquet"
    second = folder / "rank00000-steps000000002-000000003.parquet"
    pq.write_table(log.filter(pa.array(steps <= 2)), first, compression="none")
    pq.write_table(log.filter(pa.array((steps >= 2) & (steps <= 3))), second)
    column = pq.ParquetFile(first).metadata.schema.to_arrow_schema().get_field_index("weight")
    offset = pq.ParquetFile(first).metadata.row_group(0).column(column).data_page_offset
    data = bytearray(first.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64
    first.write_bytes(bytes(data))
    with pytest.warns(FilterWarning, match=r"Skipped 1 unreadable score-log shard"):
        skipped = build_filter(tmp_path, method="threshold", aggregate="majority", engine=engine, on_bad_shard="skip")
    assert skipped.summary["n_records"] == int(((steps >= 2) & (steps <= 3)).sum())


@pytest.mark.parametrize("engine", ["streaming", "memory"])
def test_a_corrupt_page_under_an_intact_footer_is_named_or_skipped(tmp_path, log, engine):
    paths = write_log(log, tmp_path)
    data = bytearray(paths[2].read_bytes())
    data[4:40] = b"\xff" * 36  # the first page header: the footer still reads, the data does not
    paths[2].write_bytes(bytes(data))
    with pytest.raises(BadShardError, match=r"cannot be read \(OSError: Couldn.t deserialize thrift") as raised:
        build_filter(tmp_path, method="threshold", engine=engine)
    assert str(paths[2]) in str(raised.value)
    with pytest.warns(FilterWarning, match=r"Skipped 1 unreadable score-log shard.*its data cannot be read"):
        skipped = build_filter(tmp_path, method="threshold", aggregate="majority", engine=engine, on_bad_shard="skip")
    assert any(str(paths[2]) in m for m in skipped.summary["warnings"])
    assert skipped.summary["n_records"] == log.num_rows - 300


def test_a_shard_without_the_needed_columns_is_named(tmp_path, log):
    paths = write_log(log, tmp_path)
    pq.write_table(pq.read_table(paths[3]).drop(["weight"]), paths[3])
    with pytest.raises(BadShardError, match=r"lacks the column\(s\) \['weight'\]") as raised:
        build_filter(tmp_path)
    assert str(paths[3]) in str(raised.value)


# ---------------------------------------------------------------- gaps and duplicates


def test_a_gap_in_the_step_ranges_is_warned_about(tmp_path, log):
    paths = write_log(log, tmp_path)
    lost = paths[3]
    first, last = (int(x) for x in lost.stem.split("steps")[1].split("-"))
    lost.unlink()
    with pytest.warns(FilterWarning, match=rf"Gap in the score log of rank 0: no shard holds steps {first}\.\.{last}"):
        result = build_filter(tmp_path, method="threshold", aggregate="majority")
    assert any("Gap in the score log" in m for m in result.summary["warnings"])


def test_duplicated_shards_are_warned_about_and_counted_once(tmp_path, log):
    paths = write_log(log, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        intact = build_filter(tmp_path, method="threshold", aggregate="majority", windows=2)
    # The same steps of rank 0 twice: a copy of shard 2 under a name covering a wider range
    # (e.g. copied in from another run), and a copy overlapping shards 3 and 4.
    table2 = pq.read_table(paths[2])
    steps2 = table2.column("global_step").to_numpy()
    copy_name = paths[2].with_name(f"rank00000-steps{steps2.min():09d}-{steps2.max() + 1:09d}.parquet")
    pq.write_table(table2, copy_name)
    both = pa.concat_tables([pq.read_table(paths[3]).slice(150), pq.read_table(paths[4]).slice(0, 150)])
    steps = both.column("global_step").to_numpy()
    pq.write_table(both, paths[3].with_name(f"rank00000-steps{steps.min():09d}-{steps.max():09d}.parquet"))
    with pytest.warns(FilterWarning, match=r"Duplicated records in the score log of rank 0: 300 record\(s\)") as caught:
        deduplicated = build_filter(tmp_path, method="threshold", aggregate="majority", windows=2)
    duplicates = [str(w.message) for w in caught if "Duplicated records" in str(w.message)]
    # The copy of shard 2 (300 records); the copy straddling shards 3 and 4 (150 each: shard 3's half
    # is dropped from the copy, and the copy's other half from shard 4, which comes after it).
    assert len(duplicates) == 3
    assert str(copy_name) in duplicates[0] and paths[2].name in duplicates[0]
    assert [int(m.split(": ")[1].split(" ")[0]) for m in duplicates] == [300, 150, 150]
    same_filter(deduplicated, intact)
    assert deduplicated.summary["n_records"] == intact.summary["n_records"] == log.num_rows


def test_a_boundary_step_split_over_two_shards_is_not_a_duplicate(tmp_path, log):
    # The writer flushed mid-step (a full buffer), then again at a checkpoint: two shards share a
    # step with different samples. Nothing is dropped and nothing is warned about.
    steps = log.column("global_step").to_numpy()
    cut = int(np.flatnonzero(steps == steps[1600])[10])
    folder = tmp_path / SCORES_DIRNAME
    folder.mkdir()
    for part in (log.slice(0, cut), log.slice(cut)):
        s = part.column("global_step").to_numpy()
        pq.write_table(part, folder / f"rank00000-steps{s.min():09d}-{s.max():09d}.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilterWarning)
        # The sources this log has (it has no margin column, which the default would warn about once).
        split = build_filter(tmp_path, method="threshold", aggregate="majority", labeling_functions=LOG_SOURCES)
        whole = build_filter(log, method="threshold", aggregate="majority", labeling_functions=LOG_SOURCES)
    same_filter(split, whole)


# ---------------------------------------------------------------- pandas nulls


def test_a_pandas_frame_with_nan_scores_reads_like_the_dataset(log):
    import datasets

    scores = log.column("mimic_score").to_numpy().copy()
    scores[::7] = np.nan
    table = log.set_column(log.column_names.index("mimic_score"), "mimic_score", pa.array(scores, pa.float32()))
    frame = table.to_pandas()
    assert pa.Table.from_pandas(frame).column("mimic_score").null_count > 0  # what used to be refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        from_frame = build_filter(frame, method="threshold")
        from_dataset = build_filter(datasets.Dataset(table), method="threshold")
    same_filter(from_frame, from_dataset)
    np.testing.assert_array_equal(from_frame.window_scores(), from_dataset.window_scores())
    assert from_frame.summary["n_nan_scores"] == from_dataset.summary["n_nan_scores"] == int(np.isnan(scores).sum())


# ---------------------------------------------------------------- the status column


def with_status(table: pa.Table, status: np.ndarray, weight_zero: bool = True) -> pa.Table:
    columns = dict(zip(table.column_names, table.columns))
    columns["status"] = pa.array(status, pa.int8())
    weight = table.column("weight").to_numpy().copy()
    score = table.column("mimic_score").to_numpy().copy()
    if weight_zero:
        weight[status != 0] = 0.0  # what the trainer writes for a non-scored record
        score[status == STATUS_NONFINITE] = np.nan
        score[status == STATUS_UNLABELED] = 0.0
    columns["weight"] = pa.array(weight, pa.float32())
    columns["mimic_score"] = pa.array(score, pa.float32())
    return pa.table(columns)


@pytest.mark.parametrize("engine", ["streaming", "memory"])
def test_status_decides_nonfinite_and_unlabeled_samples(log, engine):
    ids = log.column("sample_id").to_numpy()
    steps = log.column("global_step").to_numpy()
    status = np.zeros(log.num_rows, dtype=np.int8)
    nonfinite_ids = np.array([3, 10, 500])  # one non-finite record each, in their second epoch
    for sid in nonfinite_ids:
        status[np.flatnonzero(ids == sid)[1]] = STATUS_NONFINITE
    unlabeled_ids = np.array([7, 8, 9])  # never labeled: every record is status 2
    status[np.isin(ids, unlabeled_ids)] = STATUS_UNLABELED
    partly = 20  # unlabeled in its first epoch only: abstains there
    status[np.flatnonzero(ids == partly)[0]] = STATUS_UNLABELED
    table = with_status(log, status)
    with pytest.warns(FilterWarning) as caught:
        result = build_filter(table, method="threshold", aggregate="majority", engine=engine)
    messages = " ".join(str(w.message) for w in caught)
    assert "3 sample(s) had a non-finite loss or score" in messages
    assert "3 sample(s) have no vote and no finite signal value" in messages
    summary = result.summary
    assert summary["n_nonfinite_samples"] == 3 and summary["n_unscored_samples"] == 3
    assert summary["n_unlabeled_records"] == 3 * 3 + 1
    by_id = {
        name: result.table.column(name).to_numpy(zero_copy_only=False) for name in ("sample_id", "keep", "keep_prob")
    }
    row = {int(s): i for i, s in enumerate(by_id["sample_id"])}
    votes = result.votes()
    # Non-finite: discarded whatever the votes say.
    assert not by_id["keep"][[row[s] for s in nonfinite_ids]].any()
    assert (by_id["keep_prob"][[row[s] for s in nonfinite_ids]] == 0).all()
    # Unlabeled throughout: abstains everywhere, gets the prior (the share of voted samples kept).
    voted = (votes != -1).any(axis=1)
    prior = (by_id["keep_prob"][voted] >= 0.5).mean()
    for s in unlabeled_ids:
        assert (votes[row[s]] == -1).all()
        assert by_id["keep_prob"][row[s]] == pytest.approx(prior)
        assert by_id["keep"][row[s]] == (prior >= 0.5)
    # Partly unlabeled: abstains in that window only; its other windows are the unflagged log's.
    first_window = 0
    assert votes[row[partly], first_window] == -1 and (votes[row[partly], 1:] != -1).all()
    # Oracle for the windows of everyone else: the log without the non-scored records.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        oracle = build_filter(log.filter(pa.array(status == 0)), method="threshold", aggregate="majority")
    oracle_rows = {int(s): i for i, s in enumerate(oracle.sample_ids)}
    others = [s for s in row if s in oracle_rows]
    np.testing.assert_array_equal(
        result.window_values()[[row[s] for s in others]], oracle.window_values()[[oracle_rows[s] for s in others]]
    )
    assert steps.size == log.num_rows


def test_logs_without_a_status_column_still_work(log):
    legacy = log.drop(["status"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilterWarning)
        result = build_filter(legacy, method="threshold", labeling_functions=LOG_SOURCES)
    same_filter(result, build_filter(log, method="threshold", labeling_functions=LOG_SOURCES))
    assert result.summary["n_nonfinite_samples"] == 0


def test_a_status_outside_0_1_2_is_named(log):
    status = np.zeros(log.num_rows, dtype=np.int8)
    status[5] = 7
    with pytest.raises(ValueError, match=r"Column 'status' of the score log holds 1 value\(s\) other than 0"):
        build_filter(with_status(log, status, weight_zero=False))


def test_rebuild_and_save_keep_the_status_decisions(tmp_path, log):
    status = np.zeros(log.num_rows, dtype=np.int8)
    status[np.flatnonzero(log.column("sample_id").to_numpy() == 42)[0]] = STATUS_NONFINITE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        result = build_filter(with_status(log, status), method="threshold")
        loaded = MimicFilter.load(result.save(tmp_path / "f"))
        rebuilt = loaded.rebuild(method="kmeans")
    assert not rebuilt.keep[list(rebuilt.sample_ids).index(42)]
    assert rebuilt.summary["n_nonfinite_samples"] == 1


# ---------------------------------------------------------------- a corrupt saved filter


@pytest.mark.parametrize("content", ['{"n_samples": 3, "setti', "", "\x00\x01 not json"])
def test_load_names_a_corrupt_summary(tmp_path, log, content):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        folder = build_filter(log, method="threshold").save(tmp_path / "f")
    (folder / "summary.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON") as raised:
        MimicFilter.load(folder)
    assert str(folder / "summary.json") in str(raised.value)


def test_load_names_a_summary_that_is_not_a_filter_summary(tmp_path, log):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        folder = build_filter(log, method="threshold").save(tmp_path / "f")
    (folder / "summary.json").write_text(json.dumps([1, 2, 3]), encoding="utf-8")
    with pytest.raises(ValueError, match="is not a MimicFilter summary") as raised:
        MimicFilter.load(folder)
    assert str(folder / "summary.json") in str(raised.value)


@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_records_repeated_within_one_shard_are_counted_once(tmp_path, log, id_kind):
    # Two runs appending into one shard: some (step, sample_id) pairs appear twice in it. Integer ids are coded by
    # subtraction, string ids by a dictionary; both must find the same rows as pandas' duplicated().
    if id_kind == "str":
        ids = pa.array([f"s{i:05d}" for i in log.column("sample_id").to_numpy()])
        log = log.set_column(log.column_names.index("sample_id"), "sample_id", ids)
    paths = write_log(log, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        intact = build_filter(tmp_path, method="threshold", aggregate="majority", labeling_functions=LOG_SOURCES)
    shard = pq.read_table(paths[1])
    doubled = pa.concat_tables([shard, shard.take(pa.array(np.arange(0, shard.num_rows, 7)))])
    pq.write_table(doubled, paths[1])
    expected = int(doubled.select(["global_step", "sample_id"]).to_pandas().duplicated().sum())
    with pytest.warns(FilterWarning, match=rf"{expected} record\(s\) in .* repeat a \(step, sample_id\)"):
        deduplicated = build_filter(tmp_path, method="threshold", aggregate="majority", labeling_functions=LOG_SOURCES)
    assert expected == len(range(0, shard.num_rows, 7))
    same_filter(deduplicated, intact)
    assert deduplicated.summary["n_records"] == log.num_rows
