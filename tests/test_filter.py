"""Tests of Grad-Mimic's Stage-2 filter (`hf_gradmimic.filter`) and its report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_gradmimic.filter import (
    METHODS,
    BadShardError,
    FilterWarning,
    MimicFilter,
    aggregate_votes,
    build_filter,
    estimate_quality,
    fit_gmm_1d,
    identify,
    identify_kmeans,
    identify_topk,
    kmeans_1d,
)
from hf_gradmimic.score_log_io import SCORE_COLUMNS, SCORE_TYPES, ScoreWriter, load_scores

TYPES = {name: SCORE_TYPES.get(name, pa.int64()) for name in SCORE_COLUMNS}  # int64 sample ids


def make_log(n=2000, epochs=3, batch=32, clean_fraction=0.7, sep=0.65, sd=0.2, seed=0):
    """A score log like the trainer's: every epoch a permutation cut into batches.

    Clean samples get b*w ~ N(1 + sep/2, sd), noisy ones N(1 - sep/2, sd), so the paper's
    ``w > 1/b`` rule (and any sensible 2-cluster split) separates them. Returns (table, clean flags).
    """
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < clean_fraction
    steps_per_epoch = -(-n // batch)
    columns = {name: [] for name in TYPES}
    position = np.arange(n)
    batch_size = np.where(position // batch == steps_per_epoch - 1, n - (steps_per_epoch - 1) * batch, batch)
    for epoch in range(epochs):
        order = rng.permutation(n)
        step = epoch * steps_per_epoch + position // batch + 1
        bw = np.clip(np.where(clean[order], 1 + sep / 2, 1 - sep / 2) + rng.normal(0, sd, n), 0.01, None)
        columns["global_step"].append(step)
        columns["epoch"].append(step / steps_per_epoch)
        columns["sample_id"].append(order)
        columns["mimic_score"].append(np.where(clean[order], 0.5, -0.5) + rng.normal(0, 0.3, n))
        columns["weight"].append(bw / batch_size)
        columns["loss"].append(rng.random(n))
        columns["batch_size"].append(batch_size)
        columns["rank"].append(np.zeros(n))
        columns["repeated"].append(np.zeros(n, dtype=bool))
        columns["status"].append(np.zeros(n, dtype=np.int8))  # STATUS_SCORED: every sample had a finite score
    table = pa.table({name: pa.array(np.concatenate(v), type=TYPES[name]) for name, v in columns.items()})
    return table, clean


def records(rows):
    """A score table from (global_step, epoch, sample_id, mimic_score, b*w, batch_size) tuples."""
    step, epoch, sid, score, bw, b = map(np.asarray, zip(*rows))
    return pa.table(
        {
            "global_step": pa.array(step, pa.int64()),
            "epoch": pa.array(epoch, pa.float64()),
            "sample_id": pa.array(sid, pa.int64()),
            "mimic_score": pa.array(score, pa.float32()),
            "weight": pa.array(bw / b, pa.float32()),
            "loss": pa.array(np.zeros(len(step)), pa.float32()),
            "batch_size": pa.array(b, pa.int32()),
            "rank": pa.array(np.zeros(len(step)), pa.int32()),
            "repeated": pa.array(np.zeros(len(step), dtype=bool)),
        }
    )


def discard_f1(keep, clean):
    discarded, noisy = ~np.asarray(keep), ~np.asarray(clean)
    tp = np.sum(discarded & noisy)
    return 2 * tp / (2 * tp + np.sum(discarded & ~noisy) + np.sum(~discarded & noisy))


@pytest.fixture(scope="module")
def log():
    return make_log()


# -- identification -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_detects_the_noisy_samples(log, method):
    table, clean = log
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 well-behaved windows: no fallback, no warning
        # The synthetic log's loss is uniform noise: only the mimic windows carry the signal here.
        mimic_filter = build_filter(table, method=method, aggregate="snorkel", topk=70, labeling_functions=["mimic"])
    assert mimic_filter.summary["n_windows"] == 3
    assert mimic_filter.summary["aggregate_used"] == "snorkel"
    assert np.array_equal(mimic_filter.sample_ids, np.arange(len(clean)))
    assert discard_f1(mimic_filter.keep, clean) > 0.9
    # Snorkel finds every window accurate, and the threshold method reports the paper's 1/b rule.
    assert all(a > 0.85 for a in mimic_filter.summary["estimated_accuracies"])
    if method == "threshold":
        assert mimic_filter.summary["thresholds"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("aggregate", ["majority", "all", "any"])
def test_simple_aggregates(log, aggregate):
    table, clean = log
    mimic_filter = build_filter(table, method="threshold", aggregate=aggregate, labeling_functions=["mimic"])
    votes = mimic_filter.votes()
    expected = {
        "majority": (votes == 1).mean(axis=1) >= 0.5,
        "all": (votes == 1).all(axis=1),
        "any": (votes == 1).any(axis=1),
    }
    assert np.array_equal(mimic_filter.keep, expected[aggregate])
    assert mimic_filter.summary["estimated_accuracies"] is None


def brute_force_2means(x):
    x = np.sort(x)
    best = (np.inf, None)
    for k in range(1, x.size):
        if x[k] == x[k - 1]:
            continue
        sse = ((x[:k] - x[:k].mean()) ** 2).sum() + ((x[k:] - x[k:].mean()) ** 2).sum()
        best = min(best, (sse, x[k]))
    return best


def inertia(x, high):
    return ((x[high] - x[high].mean()) ** 2).sum() + ((x[~high] - x[~high].mean()) ** 2).sum()


@pytest.mark.parametrize("seed", range(6))
def test_exact_kmeans_agrees_with_sklearn(seed):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    n_low, n_high = rng.integers(3, 40, size=2)
    x = np.r_[rng.normal(0.6, 0.2, n_low), rng.normal(1.4, 0.2, n_high)]
    rng.shuffle(x)
    keep, boundary = identify_kmeans(x)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x.reshape(-1, 1))
    sklearn_high = km.labels_ == np.argmax(km.cluster_centers_.ravel())
    assert np.array_equal(keep, sklearn_high)
    assert inertia(x, keep) == pytest.approx(km.inertia_, rel=1e-9)
    assert boundary == pytest.approx(km.cluster_centers_.mean())


@pytest.mark.parametrize("seed", range(12))
def test_exact_kmeans_is_the_global_optimum(seed):
    # On unstructured inputs Lloyd's algorithm (sklearn) can stop in a local optimum; the exact
    # split must match brute force and never be worse than sklearn.
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(100 + seed)
    x = np.round(rng.normal(size=int(rng.integers(2, 40))), 1 if seed % 2 else 6)
    if x.min() == x.max():
        x[0] += 1
    cut, low, high = kmeans_1d(x)
    best_sse, best_cut = brute_force_2means(x)
    assert cut == best_cut
    assert inertia(x, x >= cut) == pytest.approx(best_sse, rel=1e-9, abs=1e-12)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x.reshape(-1, 1))
    assert inertia(x, x >= cut) <= km.inertia_ * (1 + 1e-9) + 1e-12


def test_gmm_recovers_two_gaussians():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0.5, 0.1, 3000), rng.normal(1.5, 0.2, 7000)]
    mixture = fit_gmm_1d(x)
    assert mixture.converged
    np.testing.assert_allclose(mixture.means, [0.5, 1.5], atol=0.01)
    np.testing.assert_allclose(np.sqrt(mixture.variances), [0.1, 0.2], atol=0.01)
    np.testing.assert_allclose(mixture.weights, [0.3, 0.7], atol=0.01)
    decision = identify(x, "gmm")
    assert 0.6 < decision.boundary < 1.1
    assert np.array_equal(decision.keep[:3000], x[:3000] > decision.boundary)
    assert decision.keep[3000:].mean() > 0.99 and decision.keep[:3000].mean() < 0.01


def test_gmm_grouped_em_matches_exact_em():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0.7, 0.25, 3_000), rng.normal(1.3, 0.25, 7_000)]
    exact = fit_gmm_1d(x, max_groups=x.size)
    grouped = fit_gmm_1d(x, max_groups=512)
    np.testing.assert_allclose(grouped.means, exact.means, atol=2e-3)
    np.testing.assert_allclose(grouped.weights, exact.weights, atol=2e-3)
    assert grouped.boundary() == pytest.approx(exact.boundary(), abs=2e-3)


def test_topk_and_degenerate_windows():
    x = np.arange(10.0)
    keep, cutoff = identify_topk(x, 30)
    assert keep.sum() == 3 and cutoff == 7.0
    decision = identify(np.full(5, 1.0), "gmm")
    assert decision.degenerate and decision.keep.all() and np.isnan(decision.boundary)


# -- windows ---------------------------------------------------------------------------------------


def test_epoch_windows_put_the_last_step_of_an_epoch_in_that_epoch():
    # 2 steps per epoch; a record's epoch is the fractional epoch after its step, so step 2 has
    # epoch 1.0 (and step 4 a float-rounded 2.0000000000000004): both end their epoch.
    rows = []
    for step, epoch in [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0000000000000004), (5, 2.5), (6, 3.0)]:
        for sid in range(4):
            rows.append((step, epoch, sid, 0.1, 1.0 + 0.1 * sid * (step % 2), 4))
    mimic_filter = build_filter(records(rows), method="threshold", aggregate="majority")
    windows = mimic_filter.summary["windows"]
    assert [w["name"] for w in windows] == ["epoch_0", "epoch_1", "epoch_2"]
    assert [(w["first_step"], w["last_step"]) for w in windows] == [(1, 2), (3, 4), (5, 6)]


def test_int_windows_split_steps_evenly(log):
    table, _ = log
    mimic_filter = build_filter(table, method="threshold", aggregate="majority", windows=6)
    windows = mimic_filter.summary["windows"]
    assert len(windows) == 6
    lengths = [w["last_step"] - w["first_step"] + 1 for w in windows]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == int(pa.compute.max(table["global_step"]).as_py())


def test_step_windows_give_one_labeling_function_per_step():
    table, _ = make_log(n=96, epochs=2, batch=16)
    mimic_filter = build_filter(table, method="kmeans", aggregate="majority", windows="step")
    n_steps = len(np.unique(table["global_step"].to_numpy()))
    assert mimic_filter.summary["n_windows"] == n_steps == 12
    votes = mimic_filter.votes()
    # Each sample is seen once per epoch, i.e. votes in exactly 2 of the 12 step windows.
    assert ((votes != -1).sum(axis=1) == 2).all()
    assert mimic_filter.summary["window_names"][0] == "step_1"


def test_absent_sample_abstains_and_values_are_averaged():
    rows = [
        # window epoch_0 (steps 1-2): sample 0 seen twice (b*w 1.2 and 1.6 -> mean 1.4), 2 absent
        (1, 0.5, 0, 0.2, 1.2, 2),
        (1, 0.5, 1, -0.2, 0.8, 2),
        (2, 1.0, 0, 0.4, 1.6, 2),
        (2, 1.0, 3, 0.0, 0.4, 2),
        # window epoch_1 (steps 3-4): samples 0..3
        (3, 1.5, 0, 0.1, 1.5, 2),
        (3, 1.5, 1, 0.1, 0.5, 2),
        (4, 2.0, 2, 0.1, 1.2, 2),
        (4, 2.0, 3, 0.1, 0.8, 2),
        # window epoch_2 (steps 5-6): sample 3 absent
        (5, 2.5, 0, 0.1, 1.3, 2),
        (5, 2.5, 1, 0.1, 0.7, 2),
        (6, 3.0, 2, 0.1, 1.1, 1),
    ]
    mimic_filter = build_filter(records(rows), method="threshold", aggregate="snorkel")
    votes = mimic_filter.votes()
    assert votes[2, 0] == -1 and votes[3, 2] == -1
    values = mimic_filter.window_values()
    assert values[0, 0] == pytest.approx(1.4, rel=1e-6)
    assert np.isnan(values[2, 0])
    assert mimic_filter.window_scores()[0, 0] == pytest.approx(0.3, rel=1e-6)
    assert mimic_filter.table["mean_mimic_score"][0].as_py() == pytest.approx(np.mean([0.2, 0.4, 0.1, 0.1]), rel=1e-6)
    assert mimic_filter.table["n_records"].to_pylist() == [4, 3, 2, 2]
    np.testing.assert_array_equal(votes, [[1, 1, 1], [0, 0, 0], [-1, 1, 1], [0, 0, -1]])


# -- aggregation -----------------------------------------------------------------------------------


def test_two_windows_fall_back_to_majority_with_a_warning(log):
    table, clean = log
    with pytest.warns(FilterWarning, match="at least 3 labeling functions"):
        mimic_filter = build_filter(
            table, method="threshold", aggregate="snorkel", windows=2, labeling_functions=["mimic"]
        )
    assert mimic_filter.summary["aggregate_used"] == "majority"
    assert any("falling back to majority" in w for w in mimic_filter.summary["warnings"])
    votes = mimic_filter.votes()
    assert np.array_equal(mimic_filter.keep, (votes == 1).mean(axis=1) >= 0.5)


def test_label_model_on_patterns_equals_the_full_fit():
    from snorkel.labeling.model import LabelModel

    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.7
    votes = np.where(rng.random((3000, 4)) < [0.8, 0.9, 0.85, 0.95], y[:, None], ~y[:, None]).astype(np.int8)
    votes[rng.random((3000, 4)) < 0.1] = -1
    prob, info = aggregate_votes(votes, "snorkel", seed=0)
    majority_kept = np.clip(((votes == 1).sum(1) / (votes != -1).sum(1) >= 0.5).mean(), 0.01, 0.99)
    model = LabelModel(cardinality=2, verbose=False)
    model.fit(
        votes.astype(np.int64),
        class_balance=[1 - majority_kept, majority_kept],
        n_epochs=500,
        lr=0.01,
        seed=0,
        progress_bar=False,
    )
    np.testing.assert_allclose(prob, model.predict_proba(votes.astype(np.int64))[:, 1], atol=1e-6)
    np.testing.assert_allclose(info["estimated_accuracies"], model.get_weights(), atol=1e-6)
    assert info["label_model"]["exact"] and info["label_model"]["n_patterns"] <= 3**4
    # Above fit_rows, proportional pattern counts: same decisions, tiny probability differences.
    approx, approx_info = aggregate_votes(votes, "snorkel", seed=0, fit_rows=1000)
    assert not approx_info["label_model"]["exact"]
    assert approx_info["label_model"]["max_abs_overlap_error"] < 1e-2
    assert np.mean((approx >= 0.5) == (prob >= 0.5)) > 0.99


def test_all_abstain_row_is_an_error():
    with pytest.raises(ValueError, match="abstain in every window"):
        aggregate_votes(np.array([[1, 0, 1], [-1, -1, -1], [1, 1, 0]]), "majority")


# -- inputs ----------------------------------------------------------------------------------------


def test_path_dataset_dataframe_and_table_inputs_agree(tmp_path, log):
    table, _ = log
    writer = ScoreWriter(tmp_path, max_buffered_rows=1500)
    steps = table["global_step"].to_numpy()
    boundaries = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1], True])
    columns = {name: table[name].to_numpy() for name in TYPES}
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        writer.add_step(
            global_step=int(steps[start]),
            epoch=float(columns["epoch"][start]),
            sample_ids=columns["sample_id"][start:stop],
            mimic_scores=columns["mimic_score"][start:stop],
            weights=columns["weight"][start:stop],
            losses=columns["loss"][start:stop],
            batch_size=int(columns["batch_size"][start]),
        )
    writer.close()
    reference = build_filter(table, method="kmeans")
    for source in (tmp_path, tmp_path / "mimic_scores", load_scores(tmp_path), table.to_pandas()):
        other = build_filter(source, method="kmeans")
        assert other.table.equals(reference.table)
    # The writer's shards carry page checksums: values changed on disk are an error naming the shard, not other values.
    shard = sorted((tmp_path / "mimic_scores").iterdir())[0]
    corrupt_column_values(shard, "loss")
    with pytest.raises(BadShardError, match=rf"{shard.name} cannot be read.*CRC checksum"):
        build_filter(tmp_path, method="kmeans")


def corrupt_column_values(path: Path, column: str) -> None:
    """Flip the last 8 bytes of ``column``'s data in a Parquet file: values, past every page header."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(pq.read_schema(path).names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    data[end - 8 : end] = bytes(byte ^ 0xFF for byte in data[end - 8 : end])
    path.write_bytes(bytes(data))


def test_repeated_records_are_dropped():
    rows = [(1, 0.5, 0, 0.2, 1.5, 2), (1, 0.5, 1, -0.2, 0.5, 2), (2, 1.0, 0, 0.2, 1.5, 2), (2, 1.0, 1, 0.1, 0.5, 2)]
    table = records(rows)
    repeated = table.set_column(8, "repeated", pa.array([False, False, False, True]))
    mimic_filter = build_filter(repeated, method="threshold", aggregate="majority")
    assert mimic_filter.table["n_records"].to_pylist() == [2, 1]


def test_string_sample_ids():
    table, clean = make_log(n=300, epochs=3)
    ids = pa.array([f"doc-{i:04d}" for i in table["sample_id"].to_numpy()])
    mimic_filter = build_filter(table.set_column(2, "sample_id", ids), method="threshold")
    assert mimic_filter.table["sample_id"].to_pylist() == [f"doc-{i:04d}" for i in range(300)]
    assert np.array_equal(mimic_filter.keep, build_filter(table, method="threshold").keep)


# -- errors ----------------------------------------------------------------------------------------


def test_empty_logs_are_errors(tmp_path, log):
    table, _ = log
    with pytest.raises(ValueError, match="empty"):
        build_filter(table.slice(0, 0))
    (tmp_path / "mimic_scores").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_filter(tmp_path)
    with pytest.raises(FileNotFoundError, match="No score log"):
        build_filter(tmp_path / "nowhere")


def test_nan_scores(log):
    table, _ = log
    scores = table["mimic_score"].to_numpy().copy()
    scores[:10] = np.nan
    partial = table.set_column(3, "mimic_score", pa.array(scores, pa.float32()))
    with pytest.warns(FilterWarning, match="10 of 6000 records have a NaN mimic_score"):
        mimic_filter = build_filter(partial, method="threshold")
    assert np.isfinite(mimic_filter.summary["mean_mimic_score"])
    # Weights of NaN-score records still count: the decisions are those of the clean log.
    assert np.array_equal(mimic_filter.keep, build_filter(table, method="threshold").keep)
    all_nan = table.set_column(3, "mimic_score", pa.array(np.full(len(scores), np.nan), pa.float32()))
    with pytest.raises(ValueError, match="Every mimic_score"):
        build_filter(all_nan, method="threshold")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="median"), "identification method"),
        (dict(aggregate="vote"), "aggregate"),
        (dict(windows="batch"), "windows"),
        (dict(windows=0), "windows"),
        (dict(windows=True), "windows"),
        (dict(windows=10**9), "more than"),
        (dict(topk=0), "topk"),
    ],
)
def test_invalid_settings(log, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_filter(log[0], **kwargs)


def test_missing_column_and_bad_type(log):
    with pytest.raises(ValueError, match="lacks the column"):
        build_filter(log[0].drop(["weight"]))
    with pytest.raises(TypeError, match="scores must be"):
        build_filter([1, 2, 3])


# -- the MimicFilter API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_filter():
    table, clean = make_log(n=400, epochs=3, seed=3)
    return build_filter(table, method="gmm", labeling_functions=["mimic"], aggregate="snorkel"), clean  # loss: noise


def test_save_load_round_trip(tmp_path, small_filter):
    mimic_filter, _ = small_filter
    mimic_filter.save(tmp_path / "filter")
    assert sorted(p.name for p in (tmp_path / "filter").iterdir()) == ["filter.parquet", "summary.json"]
    loaded = MimicFilter.load(tmp_path / "filter")
    assert loaded.table.equals(mimic_filter.table)
    assert loaded.summary == mimic_filter.summary
    json.loads((tmp_path / "filter" / "summary.json").read_text())  # strict JSON, no NaN
    assert loaded.to_dataset().num_rows == mimic_filter.table.num_rows
    with pytest.raises(FileNotFoundError):
        MimicFilter.load(tmp_path / "nothing")


def test_a_filter_saved_before_keep_log_odds_loads_with_them(tmp_path, small_filter):
    import pyarrow.parquet as pq

    mimic_filter, _ = small_filter
    mimic_filter.save(tmp_path / "old")
    old_table = mimic_filter.table.drop_columns(["keep_log_odds"])
    pq.write_table(old_table, tmp_path / "old" / "filter.parquet")
    loaded = MimicFilter.load(tmp_path / "old")
    assert loaded.table.column_names == mimic_filter.table.column_names
    keep_prob = mimic_filter.keep_prob
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(loaded.keep_log_odds, np.log(keep_prob) - np.log1p(-keep_prob), rtol=1e-9)


def test_rebuild_equals_build(log):
    from hf_gradmimic.filter import LossWindows

    table, _ = log
    votes = {"aggregate": "snorkel"}
    rebuilt = build_filter(table, method="gmm", labeling_functions=["mimic", "loss"], **votes).rebuild(
        method="topk", topk=70
    )
    # rebuild re-splits the mimic windows only: the loss windows keep the split they were built with.
    direct = build_filter(table, method="topk", topk=70, labeling_functions=["mimic", LossWindows("gmm")], **votes)
    assert rebuilt.table.equals(direct.table)
    assert build_filter(table, method="topk", topk=70, labeling_functions=["mimic"]).table.equals(
        build_filter(table, method="gmm", labeling_functions=["mimic"]).rebuild(method="topk", topk=70).table
    )


def test_apply_returns_exactly_the_kept_rows(small_filter):
    import datasets

    mimic_filter, _ = small_filter
    n = mimic_filter.table.num_rows
    dataset = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(n)], "idx": list(range(n))})
    kept = mimic_filter.apply(dataset)
    assert kept["idx"] == np.flatnonzero(mimic_filter.keep).tolist()
    assert dataset.num_rows == n  # no side effect
    # Match on an id column of a shuffled dataset: same rows, in the dataset's order.
    shuffled = dataset.shuffle(seed=0)
    kept_shuffled = mimic_filter.apply(shuffled, id_column="idx")
    assert sorted(kept_shuffled["idx"]) == kept["idx"]
    assert kept_shuffled["idx"] == [i for i in shuffled["idx"] if mimic_filter.keep[i]]
    frame = pd.DataFrame({"idx": range(n)})
    assert mimic_filter.apply(frame)["idx"].tolist() == kept["idx"]


def test_id_mismatches_are_errors(small_filter):
    import datasets

    mimic_filter, clean = small_filter
    n = mimic_filter.table.num_rows
    with pytest.raises(ValueError, match="not row indices of the dataset"):
        mimic_filter.apply(datasets.Dataset.from_dict({"x": list(range(n - 5))}))
    with pytest.raises(ValueError, match="have no score"):
        mimic_filter.apply(datasets.Dataset.from_dict({"x": list(range(n + 5))}))
    with pytest.raises(ValueError, match="not in the dataset's 'idx' column"):
        mimic_filter.apply(datasets.Dataset.from_dict({"idx": list(range(1, n + 1))}), id_column="idx")
    with pytest.raises(ValueError, match="have no score"):
        mimic_filter.apply(datasets.Dataset.from_dict({"idx": list(range(n + 3))}), id_column="idx")
    with pytest.raises(ValueError, match="one flag per"):
        mimic_filter.evaluate(clean[:-1])


def test_evaluate_uses_compute_filter_metrics(small_filter):
    import datasets
    from sklearn.metrics import average_precision_score, roc_auc_score

    from hf_gradmimic.metrics import compute_filter_metrics

    mimic_filter, clean = small_filter
    expected = compute_filter_metrics(mimic_filter.keep, clean)
    # the rank metrics are the ranking's, keep_log_odds (in float64), as scikit-learn computes them
    expected["keep_roc_auc"] = pytest.approx(roc_auc_score(clean, mimic_filter.keep_log_odds), abs=1e-12)
    expected["keep_average_precision"] = pytest.approx(
        average_precision_score(clean, mimic_filter.keep_log_odds), abs=1e-12
    )
    assert mimic_filter.evaluate(clean) == expected
    dataset = datasets.Dataset.from_dict({"is_clean": clean.astype(int).tolist()})
    assert mimic_filter.evaluate("is_clean", dataset=dataset) == expected
    assert expected["discard_f1"] > 0.85


def test_estimate_quality(log):
    table, clean = log
    paper = {"labeling_functions": ["mimic"], "aggregate": "snorkel"}  # the log's loss is noise: the mimic windows
    quality = estimate_quality(table, method="threshold", **paper)
    mimic_filter = build_filter(table, method="threshold", **paper)
    assert quality["retained_fraction"] == pytest.approx(mimic_filter.keep.mean())
    assert quality == estimate_quality(mimic_filter)
    means = table.group_by("sample_id").aggregate([("mimic_score", "mean")]).sort_by("sample_id")
    assert quality["mean_mimic_score"] == pytest.approx(np.mean(means["mimic_score_mean"].to_numpy()), rel=1e-5)
    assert abs(quality["retained_fraction"] - clean.mean()) < 0.05


def test_degenerate_window_keeps_everyone_with_a_warning():
    rows = [(s, s / 2, sid, 0.1, 1.0 if s <= 2 else 0.5 + 0.3 * sid, 3) for s in range(1, 7) for sid in range(3)]
    with pytest.warns(FilterWarning, match="fewer than two distinct"):
        mimic_filter = build_filter(records(rows), method="kmeans", aggregate="majority")
    assert mimic_filter.summary["degenerate_windows"] == ["epoch_0"]
    assert (mimic_filter.votes()[:, 0] == 1).all()
    assert mimic_filter.summary["thresholds"][0] is None


def test_report_writes_figures_and_json(tmp_path, log):
    import hf_gradmimic

    table, clean = log
    mimic_filter = build_filter(table, method="gmm", topk=70, labeling_functions=["mimic"])  # the log's loss is noise
    paths = hf_gradmimic.report(mimic_filter, tmp_path, clean=clean)
    assert set(paths) == {"window_histograms", "keep_probability", "method_comparison", "report_json", "report_html"}
    for key in ("window_histograms", "keep_probability", "method_comparison"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths["report_json"].read_text())
    assert set(payload["method_metrics"]) == set(METHODS)
    assert payload["method_metrics"]["gmm"] == payload["filter_metrics"]
    assert all(m["discard_f1"] > 0.9 for m in payload["method_metrics"].values())
    # Rebuilding from the scores gives the same numbers as rebuilding from the stored windows.
    again = hf_gradmimic.report(mimic_filter, tmp_path / "again", scores=table, clean=clean)
    assert json.loads(again["report_json"].read_text())["method_metrics"] == payload["method_metrics"]


def test_label_model_that_diverges_falls_back_instead_of_raising():
    """Many windows of near-unanimous keep votes make Snorkel's loss NaN (seen on select-mode logs)."""
    from hf_gradmimic.filter import aggregate_votes

    rng = np.random.default_rng(0)
    votes = np.where(rng.random((1000, 50)) < 0.98, 1, 0)
    collected: list[str] = []
    keep_prob, info = aggregate_votes(votes, "snorkel", class_balance=[0.4, 0.6], collected_warnings=collected)
    assert np.isfinite(keep_prob).all() and keep_prob.shape == (1000,)
    if info["aggregate_used"] == "majority":
        assert any("diverged" in message for message in collected)
        np.testing.assert_allclose(keep_prob, votes.mean(axis=1))
