"""Tests of Stage 2's other labeling functions (`hf_gradmimic.filter.labeling`): the loss windows and a
classifier's agreement with the label, against pandas / numpy re-derivations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hf_gradmimic.filter import (
    FilterWarning,
    LossWindows,
    MimicFilter,
    PredictorAgreement,
    PredictorMargin,
    build_filter,
)
from hf_gradmimic.filter.labeling import resolve_labeling_functions
from hf_gradmimic.score_log_io import SCORE_COLUMNS, SCORE_TYPES, SCORES_DIRNAME, write_provenance, write_shard

TYPES = {name: SCORE_TYPES.get(name, pa.int64()) for name in SCORE_COLUMNS}
# The default before issue 22 (mimic and loss windows' votes, k-means, Snorkel): the vote machinery these tests check.
PREVIOUS_DEFAULT = {"labeling_functions": ["mimic", "loss"], "method": "kmeans", "aggregate": "snorkel"}


def make_log(n=600, epochs=3, batch=30, clean_fraction=0.7, bw_sep=0.1, loss_sep=1.5, seed=0):
    """A trainer-like score log in which b*w separates clean from noisy samples weakly (``bw_sep``) and the
    loss strongly (clean ~ |N(0.3, 0.2)|, noisy ~ |N(0.3 + loss_sep, 0.3)|)."""
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < clean_fraction
    steps_per_epoch = n // batch
    columns = {name: [] for name in TYPES}
    for epoch in range(epochs):
        order = rng.permutation(n)
        step = epoch * steps_per_epoch + np.arange(n) // batch + 1
        c = clean[order]
        bw = np.clip(np.where(c, 1 + bw_sep / 2, 1 - bw_sep / 2) + rng.normal(0, 0.2, n), 0.01, None)
        columns["global_step"].append(step)
        columns["epoch"].append(step / steps_per_epoch)
        columns["sample_id"].append(order)
        columns["mimic_score"].append(rng.normal(0, 1, n))
        columns["weight"].append(bw / batch)
        columns["loss"].append(np.abs(np.where(c, rng.normal(0.3, 0.2, n), rng.normal(0.3 + loss_sep, 0.3, n))))
        columns["batch_size"].append(np.full(n, batch))
        columns["rank"].append(np.zeros(n))
        columns["repeated"].append(np.zeros(n, dtype=bool))
        columns["status"].append(np.zeros(n, dtype=np.int8))
    table = pa.table({name: pa.array(np.concatenate(v), type=TYPES[name]) for name, v in columns.items()})
    return table, clean


def discard_f1(keep, clean):
    from sklearn.metrics import f1_score

    return f1_score(~np.asarray(clean), ~np.asarray(keep))


@pytest.mark.parametrize("given", ["explicit", "the filter's method"])
def test_loss_votes_equal_a_pandas_rederivation(given):
    table, _ = make_log()
    if given == "explicit":
        mimic_filter = build_filter(
            table, labeling_functions=["mimic", LossWindows(method="topk")], topk=40, aggregate="snorkel"
        )
    else:  # "loss" splits its windows as the filter splits the mimic ones
        mimic_filter = build_filter(table, **{**PREVIOUS_DEFAULT, "method": "topk"}, topk=40)
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    mean_loss = frame.groupby(["sample_id", "window"])["loss"].mean().unstack().sort_index()
    lf_votes = np.asarray(mimic_filter.table.column("lf_votes").to_pylist())
    for j in range(3):
        values = mean_loss[j].to_numpy()
        n_keep = int(np.ceil(0.4 * values.size - 1e-9))
        expected = values <= np.sort(values)[n_keep - 1]  # the 40% smallest mean losses vote keep
        assert np.array_equal(lf_votes[:, j] == 1, expected)
    entries = mimic_filter.summary["labeling_functions"]
    assert [e["name"] for e in entries] == ["loss/epoch_0", "loss/epoch_1", "loss/epoch_2"]
    assert all(e["estimated_accuracy"] is not None for e in entries)
    assert mimic_filter.summary["settings"]["labeling_functions"] == ["mimic", "loss"]


def test_under_a_threshold_filter_the_loss_windows_use_the_gmm():
    table, _ = make_log(n=300)
    votes = [
        np.asarray(
            build_filter(table, method=method, labeling_functions=functions).table.column("lf_votes").to_pylist()
        )
        for method, functions in (
            ("threshold", ["mimic", "loss"]),
            ("kmeans", ["mimic", LossWindows("gmm")]),
            ("kmeans", ["mimic", "loss"]),
        )
    ]
    assert np.array_equal(votes[0], votes[1]) and not np.array_equal(votes[0], votes[2])


def test_the_loss_windows_lift_a_weak_mimic_signal():
    table, clean = make_log()
    paper = build_filter(table, labeling_functions=["mimic"], aggregate="snorkel")
    default = build_filter(table, **PREVIOUS_DEFAULT)
    assert "lf_votes" not in paper.table.column_names and "lf_votes" in default.table.column_names
    assert discard_f1(default.keep, clean) > discard_f1(paper.keep, clean) + 0.1
    assert discard_f1(default.keep, clean) > 0.9


def test_non_finite_or_flagged_losses_abstain():
    table, _ = make_log(n=300)
    loss = table.column("loss").to_numpy().copy()
    status = table.column("status").to_numpy().copy()
    sample, first_epoch = table.column("sample_id").to_numpy(), table.column("global_step").to_numpy() <= 10
    loss[(sample == 5) & first_epoch] = np.nan  # sample 5: NaN loss in epoch 0
    status[(sample == 7) & first_epoch] = 1  # sample 7: flagged non-finite in epoch 0
    table = table.set_column(table.column_names.index("loss"), "loss", pa.array(loss, pa.float32()))
    table = table.set_column(table.column_names.index("status"), "status", pa.array(status, pa.int8()))
    lf_votes = np.asarray(build_filter(table, **PREVIOUS_DEFAULT).table.column("lf_votes").to_pylist())
    assert lf_votes[5, 0] == -1 and lf_votes[7, 0] == -1
    assert (lf_votes[5, 1:] != -1).all() and (lf_votes[[0, 1, 2], 0] != -1).all()


def test_predictor_agreement_is_matched_by_sample_id():
    table, clean = make_log()
    n = clean.size
    labels = np.arange(n) % 3
    predicted = np.where(clean, labels, (labels + 1) % 3)  # an oracle: agrees exactly on the clean samples
    logits = np.eye(3)[predicted]
    ids = np.arange(n)[::-1]  # rows given in reverse order, matched by id; the last id missing
    lf = PredictorAgreement(logits[ids][:-1], labels[ids][:-1], sample_ids=ids[:-1], name="reference")
    mimic_filter = build_filter(table, labeling_functions=["mimic", lf])
    column = np.asarray(mimic_filter.table.column("lf_votes").to_pylist())[:, -1]
    assert column[0] == -1  # id 0 was the missing row
    assert np.array_equal(column[1:] == 1, clean[1:])
    assert mimic_filter.summary["labeling_functions"][-1]["labeling_function"] == "reference"


@pytest.mark.parametrize("predictor", [PredictorAgreement, PredictorMargin])
def test_a_predictor_without_sample_ids_is_refused_on_a_log_keyed_by_an_id_column(tmp_path, predictor):
    """A log whose ids are the values of ``mimic_id_column``: read as row indices, a predictor's rows would be other
    samples', or (ids beyond its rows, as here) none, and the function was dropped without a word. Refused, naming
    the column; ids matching none of its ``sample_ids`` are refused too."""
    table, clean = make_log()
    table = table.set_column(
        table.column_names.index("sample_id"), "sample_id", pa.compute.add(table.column("sample_id"), 1000)
    )
    (tmp_path / SCORES_DIRNAME).mkdir()
    write_shard(table, tmp_path / SCORES_DIRNAME / "rank00000-steps000000001-999999999.parquet")
    write_provenance(tmp_path, {"sample_ids": {"column": "uid"}})
    labels = np.arange(clean.size) % 3
    with pytest.raises(ValueError, match=r"values of the column 'uid' \(mimic_id_column\).*pass sample_ids="):
        build_filter(tmp_path, labeling_functions=["mean_loss", predictor(np.eye(3)[labels], labels)])
    elsewhere = predictor(np.eye(3)[labels], labels, sample_ids=np.arange(clean.size))  # 0..n-1, not the log's ids
    with pytest.raises(ValueError, match=r"none of the score log's sample ids \(e.g. \[10"):
        build_filter(tmp_path, labeling_functions=["mean_loss", elsewhere])


def test_rebuild_reuses_the_labeling_votes_and_equals_build(tmp_path):
    table, clean = make_log()
    lf = PredictorAgreement(np.where(clean, 0, 1), np.zeros(clean.size), name="zero_shot")
    built = build_filter(table, labeling_functions=["mimic", "loss", lf])
    direct = build_filter(table, method="kmeans", labeling_functions=["mimic", "loss", lf])
    assert built.rebuild(method="kmeans").table.equals(direct.table)
    built.save(tmp_path)
    loaded = MimicFilter.load(tmp_path)
    assert loaded.rebuild(method="kmeans").table.equals(direct.table)


@pytest.mark.parametrize(
    "functions, error",
    [
        ([], ValueError),
        (["mimic", "nope"], ValueError),
        ("mimic", TypeError),
        (["mimic", 3], TypeError),
        (["mimic", "loss", LossWindows()], ValueError),
    ],
)
def test_bad_labeling_functions_are_refused(functions, error):
    with pytest.raises(error):
        resolve_labeling_functions(functions)


def test_without_mimic_only_the_other_functions_vote(tmp_path):
    table, clean = make_log()
    agreement = PredictorAgreement(np.where(clean, 0, 1), np.zeros(clean.size), name="reference")
    mimic_filter = build_filter(table, aggregate="majority", labeling_functions=["loss", agreement])
    lf_votes = np.asarray(mimic_filter.table.column("lf_votes").to_pylist())
    assert lf_votes.shape == (clean.size, 4)  # 3 loss windows and the reference
    # Majority over the non-abstaining votes of those four columns, re-derived with numpy.
    voted = lf_votes != -1
    share = (lf_votes == 1).sum(1) / voted.sum(1)
    np.testing.assert_allclose(mimic_filter.keep_prob, share)
    assert np.array_equal(mimic_filter.keep, share >= 0.5)
    assert mimic_filter.summary["settings"]["labeling_functions"] == ["loss", "reference"]
    assert mimic_filter.summary["estimated_accuracies"] is None
    # The mimic windows' votes are still in the table, and rebuild keeps them out of the vote.
    with_mimic = build_filter(table, aggregate="majority", labeling_functions=["mimic", "loss", agreement])
    assert mimic_filter.table.column("votes").equals(with_mimic.table.column("votes"))
    assert not np.array_equal(mimic_filter.keep_prob, with_mimic.keep_prob)
    mimic_filter.save(tmp_path)
    assert MimicFilter.load(tmp_path).rebuild(aggregate="majority").table.equals(mimic_filter.table)


def test_a_log_without_loss_names_the_way_out():
    table, _ = make_log(n=150)
    with pytest.raises(ValueError, match="labeling_functions=\\['mimic'\\]"):
        build_filter(table.drop(["loss"]), **PREVIOUS_DEFAULT)
    with (
        pytest.raises(ValueError, match="labeling_functions=\\['mimic'\\]"),
        pytest.warns(FilterWarning, match="`loss`"),
    ):
        build_filter(table.drop(["loss"]))  # the default's signals all abstain
    assert build_filter(table.drop(["loss"]), labeling_functions=["mimic"]).table.num_rows == 150


def test_frame_input_gives_the_same_filter_as_arrow():
    table, _ = make_log(n=150)
    assert build_filter(pd.DataFrame(table.to_pandas())).table.equals(build_filter(table).table)


def test_a_filter_that_keeps_nothing_says_so():
    table, _ = make_log(n=300, bw_sep=0.0, seed=3)  # b*w carries no signal: the top 1% differ in every window
    with pytest.warns(FilterWarning, match="keeps no sample"):
        mimic_filter = build_filter(table, method="topk", topk=1, aggregate="all", labeling_functions=["mimic"])
    assert not mimic_filter.keep.any()


@pytest.mark.parametrize("engine", ["memory", "streaming"])
def test_the_loss_windows_come_from_the_one_read_of_the_log(tmp_path, monkeypatch, engine):
    """Every shard is read once for the mimic and the loss windows together (the loss rode a second read before)."""
    from test_filter_streaming import write_shards

    from hf_gradmimic.filter import inputs

    table, _ = make_log(n=300)
    folder = write_shards(table, tmp_path, rows=250) / SCORES_DIRNAME
    reads = []
    read_shard = inputs.read_shard
    monkeypatch.setattr(inputs, "read_shard", lambda path, *args: reads.append(path) or read_shard(path, *args))
    mimic_filter = build_filter(tmp_path, engine=engine, labeling_functions=["mimic", "loss", "mean_loss"])
    assert sorted(reads) == sorted(folder.iterdir())
    assert mimic_filter.summary["settings"]["labeling_functions"] == ["mimic", "loss", "mean_loss"]


def test_predictor_margin_is_the_given_labels_logit_minus_the_largest_other_matched_by_id():
    table, clean = make_log()
    n = clean.size
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (n, 4))
    labels = rng.integers(0, 4, n)
    ids = np.arange(n)[::-1]  # rows given in reverse order, matched by id; the last id missing
    lf = PredictorMargin(logits[ids][:-1], labels[ids][:-1], sample_ids=ids[:-1], name="reference")
    mimic_filter = build_filter(table, labeling_functions=["mean_loss", lf])
    column = np.asarray(mimic_filter.table.column("lf_scores").to_pylist(), dtype=float)[:, -1]
    expected = np.array([logits[i, labels[i]] - np.delete(logits[i], labels[i]).max() for i in range(n)])
    assert np.isnan(column[0])  # id 0 was the missing row: it abstains
    np.testing.assert_allclose(column[1:], expected[1:], rtol=1e-6, atol=1e-7)  # stored as float32
    entry = mimic_filter.summary["labeling_functions"][-1]
    assert entry["labeling_function"] == "reference" and entry["reference_margin"] is True


def test_a_predictor_margin_survives_save_and_rebuild(tmp_path):
    table, clean = make_log()
    margin_logits = np.stack([np.where(clean, 2.0, -1.0), np.zeros(clean.size)], axis=1)
    built = build_filter(table, labeling_functions=["mean_loss", PredictorMargin(margin_logits, np.zeros(clean.size))])
    built.save(tmp_path)
    assert MimicFilter.load(tmp_path).rebuild().table.equals(built.table)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((3, 1)), [0, 0, 0], "at least 2 classes"),
        (np.zeros((3, 2)), [0, 1], "shape"),
        (np.zeros((3, 2)), [0, 2, 1], "index the 2 classes"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0]]), [0, 1, 0], r"row\(s\) \[1\]"),
    ],
)
def test_bad_predictor_margin_input_is_named(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        PredictorMargin(logits, labels, name="reference")
