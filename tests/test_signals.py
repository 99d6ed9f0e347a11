"""Stage 2's continuous labeling functions (`hf_gradmimic.filter.signals`) through `build_filter`: the signals
against a pandas re-derivation from the log, the keep posterior on them, and what a log without them gets."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow as pa
import pytest
from test_labeling import discard_f1, make_log

from hf_gradmimic.filter import DEFAULT_LABELING_FUNCTIONS, FilterWarning, build_filter, keep_posterior
from hf_gradmimic.filter.signals import LOSS_FLOOR

SIGNALS = ["mean_loss", "last_loss", "reference_loss"]


def with_reference_loss(table, clean_ids, seed=1):
    """The log plus a reference_loss column: small for clean samples, large for noisy ones, noisy itself."""
    rng = np.random.default_rng(seed)
    ids = table.column("sample_id").to_numpy()
    clean = np.isin(ids, clean_ids)
    reference_loss = np.abs(np.where(clean, rng.normal(0.2, 0.3, len(ids)), rng.normal(1.5, 0.6, len(ids))))
    return table.append_column("reference_loss", pa.array(reference_loss.astype(np.float32)))


def pandas_signals(table, columns=("loss", "loss", "reference_loss"), windows=("mean", "last", "mean")):
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    out = []
    for column, window in zip(columns, windows):
        per_window = frame.groupby(["sample_id", "window"])[column].mean().unstack().sort_index()
        log_loss = -np.log(per_window + LOSS_FLOOR)
        out.append((log_loss.mean(axis=1) if window == "mean" else log_loss.ffill(axis=1).iloc[:, -1]).to_numpy())
    return np.stack(out, axis=1)


def logs():
    table, clean = make_log(n=600, loss_sep=1.0)
    return with_reference_loss(table, np.flatnonzero(clean)), clean


def test_the_mixture_reads_the_signals_as_pandas_computes_them():
    table, clean = logs()
    mimic_filter = build_filter(table, labeling_functions=SIGNALS, aggregate="mixture")
    expected = keep_posterior(pandas_signals(table), None, seed=0).keep_prob
    np.testing.assert_allclose(mimic_filter.keep_prob, expected, rtol=1e-4, atol=1e-6)
    stored = np.asarray(mimic_filter.table.column("lf_scores").to_pylist())
    np.testing.assert_allclose(stored, pandas_signals(table), rtol=1e-5, atol=1e-6)
    assert (mimic_filter.keep == (expected >= 0.5)).all()
    assert mimic_filter.summary["mixture"]["converged"]
    assert np.mean(mimic_filter.keep == clean) > 0.95


def test_gaussian_classes_on_request_and_rebuild_keeps_the_filters_own():
    """``mixture_degrees_of_freedom=math.inf`` gives the Gaussian mixture on the pandas signals; `rebuild` keeps
    what the filter was built with, also for a summary saved before the setting was recorded (Gaussian then, the
    fit's own value in between), and takes another on request."""
    table, _ = logs()
    signals = pandas_signals(table)
    gaussian = build_filter(table, labeling_functions=SIGNALS, mixture_degrees_of_freedom=math.inf)
    expected = keep_posterior(signals, None, seed=0, degrees_of_freedom=math.inf).keep_prob
    np.testing.assert_allclose(gaussian.keep_prob, expected, rtol=1e-4, atol=1e-6)
    default_t = keep_posterior(signals, None, seed=0).keep_prob
    assert np.abs(default_t - expected).max() > 1e-2  # the two models differ on these signals
    np.testing.assert_allclose(gaussian.rebuild().keep_prob, gaussian.keep_prob)
    np.testing.assert_allclose(
        gaussian.rebuild(mixture_degrees_of_freedom=4.0).keep_prob, default_t, rtol=1e-4, atol=1e-6
    )
    del gaussian.summary["settings"]["mixture_degrees_of_freedom"]
    np.testing.assert_allclose(gaussian.rebuild().keep_prob, gaussian.keep_prob)  # its mixture summary says None
    del gaussian.summary["mixture"]["degrees_of_freedom"]
    np.testing.assert_allclose(gaussian.rebuild().keep_prob, gaussian.keep_prob)  # older still: Gaussian
    t_filter = build_filter(table, labeling_functions=SIGNALS)
    del t_filter.summary["settings"]["mixture_degrees_of_freedom"]
    np.testing.assert_allclose(t_filter.rebuild().keep_prob, default_t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", [0, -2.0, math.nan, "4", True])
def test_degrees_of_freedom_that_are_not_a_positive_number_are_refused_before_the_log_is_read(value):
    with pytest.raises(ValueError, match="mixture_degrees_of_freedom must be"):
        build_filter("/nonexistent/score/log", mixture_degrees_of_freedom=value)


def test_votes_and_signals_combine_and_rebuild_reuses_both():
    table, _ = logs()
    mimic_filter = build_filter(table, labeling_functions=["mimic", "mean_loss"], aggregate="mixture")
    votes = np.asarray(mimic_filter.table.column("votes").to_pylist(), dtype=np.int8)
    expected = keep_posterior(pandas_signals(table, ("loss",), ("mean",)), votes, seed=0).keep_prob
    np.testing.assert_allclose(mimic_filter.keep_prob, expected, rtol=1e-4, atol=1e-6)
    rebuilt = mimic_filter.rebuild()
    np.testing.assert_allclose(rebuilt.keep_prob, mimic_filter.keep_prob)
    # A vote aggregate cuts the continuous column into votes; the table keeps its values.
    snorkel = mimic_filter.rebuild(aggregate="majority")
    assert snorkel.summary["aggregate_used"] == "majority"
    assert "lf_scores" in snorkel.table.column_names


def test_a_log_without_the_reference_loss_column_abstains_with_one_warning():
    table, _ = make_log(n=300)
    with pytest.warns(FilterWarning, match="no `reference_loss` column") as caught:
        mimic_filter = build_filter(table, labeling_functions=SIGNALS, aggregate="mixture")
    assert sum("reference_loss" in str(w.message) for w in caught) == 1
    expected = keep_posterior(pandas_signals(table, ("loss", "loss"), ("mean", "last")), None, seed=0).keep_prob
    np.testing.assert_allclose(mimic_filter.keep_prob, expected, rtol=1e-4, atol=1e-6)


def test_every_signal_abstaining_is_refused_naming_why():
    table, _ = make_log(n=300)
    with pytest.raises(ValueError, match="reference_loss"), pytest.warns(FilterWarning):
        build_filter(table, labeling_functions=["reference_loss"], aggregate="mixture")


def test_a_sample_without_the_signal_abstains_for_it():
    table, clean = logs()
    reference_loss = table.column("reference_loss").to_numpy().copy()
    ids = table.column("sample_id").to_numpy()
    reference_loss[ids < 50] = np.nan  # these samples never had a reference verdict
    table = table.set_column(
        table.column_names.index("reference_loss"), "reference_loss", pa.array(reference_loss, pa.float32())
    )
    with pytest.warns(FilterWarning, match="reference_loss"):
        mimic_filter = build_filter(table, labeling_functions=SIGNALS, aggregate="mixture")
    signals = pandas_signals(table)
    assert np.isnan(signals[:50, 2]).all()
    expected = keep_posterior(signals, None, seed=0).keep_prob
    np.testing.assert_allclose(mimic_filter.keep_prob, expected, rtol=1e-4, atol=1e-6)


def test_a_non_finite_signal_value_is_named_with_its_sample_id():
    table, _ = logs()
    reference_loss = table.column("reference_loss").to_numpy().copy()
    ids = table.column("sample_id").to_numpy()
    reference_loss[np.flatnonzero(ids == 123)[0]] = np.inf
    table = table.set_column(
        table.column_names.index("reference_loss"), "reference_loss", pa.array(reference_loss, pa.float32())
    )
    with pytest.warns(FilterWarning, match=r"123"):
        build_filter(table, labeling_functions=SIGNALS, aggregate="mixture")


def test_the_mixture_is_the_same_on_every_engine(tmp_path):
    """The streaming engine cut into several partitions gives the in-memory engine's filter, bit for bit."""
    from hf_gradmimic.filter.engines.memory import collect_windows
    from hf_gradmimic.filter.engines.outofcore import collect_windows_streaming

    table, _ = logs()
    spilled = collect_windows_streaming(table, memory_budget=20_000, spill_dir=tmp_path)
    held = collect_windows(table)
    assert spilled.signals.keys() == held.signals.keys() == {"loss", "reference_loss"}
    for name in held.signals:
        np.testing.assert_array_equal(spilled.signals[name], held.signals[name])
    streamed = build_filter(table, labeling_functions=SIGNALS, aggregate="mixture", spill_dir=tmp_path)
    in_memory = build_filter(table, labeling_functions=SIGNALS, aggregate="mixture", engine="memory")
    assert streamed.table.equals(in_memory.table)


def untrained_first_epochs(table, epochs=2, seed=3):
    """The log with the loss of its first ``epochs`` epochs drawn whatever the sample: a student that has not yet
    learnt anything (a contrastive model from its initialisation)."""
    rng = np.random.default_rng(seed)
    loss = table.column("loss").to_numpy().copy()
    early = table.column("epoch").to_numpy() <= epochs
    loss[early] = np.abs(rng.normal(1.0, 0.6, early.sum()))
    return table.set_column(table.column_names.index("loss"), "loss", pa.array(loss, pa.float32()))


def test_a_log_without_the_margin_defaults_to_the_last_window_loss():
    table, clean = make_log(n=600, epochs=4, loss_sep=1.0)  # no margin column: a contrastive or LM-like log
    table = untrained_first_epochs(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilterWarning)  # no warning about a margin this log was never meant to have
        default = build_filter(table)
    assert default.summary["settings"]["labeling_functions"] == ["last_loss_linear"]
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    last = -frame.groupby(["sample_id", "window"])["loss"].mean().unstack().sort_index().iloc[:, [-1]].to_numpy()
    np.testing.assert_allclose(np.asarray(default.table.column("lf_scores").to_pylist()), last, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(default.keep_prob, keep_posterior(last, None, seed=0).keep_prob, rtol=1e-4, atol=1e-6)
    # Against the truth the log was drawn from: the last window finds the noisy samples that the mean over windows,
    # diluted by the untrained ones, finds less well.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)  # its EM may stop at its iteration cap: only its cut matters
        mean = build_filter(table, labeling_functions=["mean_loss"])
    assert discard_f1(default.keep, clean) > 0.95
    assert discard_f1(default.keep, clean) > discard_f1(mean.keep, clean) + 0.02


def test_the_default_follows_the_margins_the_log_records():
    """The student's margin and the reference's: the classification default; the student's alone: the default
    without the reference's margin, and no warning about it (the log was never going to have it)."""
    table, _ = make_log(n=300)
    rng = np.random.default_rng(0)
    table = table.append_column("margin", pa.array(rng.normal(1.0, 1.0, table.num_rows).astype(np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilterWarning)
        student_only = build_filter(table)
    assert student_only.summary["settings"]["labeling_functions"] == ["mean_loss", "mean_margin"]
    assert student_only.summary["agreement_gate"]["reference_margins"] == []
    reference = rng.normal(1.0, 1.0, table.num_rows).astype(np.float32)
    default = build_filter(table.append_column("reference_margin", pa.array(reference)))
    assert default.summary["settings"]["labeling_functions"] == list(DEFAULT_LABELING_FUNCTIONS)
    assert default.summary["agreement_gate"]["reference_margins"] == ["reference_margin"]


def test_the_reference_margin_signal_is_the_mean_over_windows_of_its_window_means():
    table, clean = make_log(n=300)
    rng = np.random.default_rng(4)
    ids = table.column("sample_id").to_numpy()
    margin = np.where(
        np.isin(ids, np.flatnonzero(clean)), rng.normal(2.0, 1.0, len(ids)), rng.normal(-1.5, 1.0, len(ids))
    )
    table = table.append_column("reference_margin", pa.array(margin.astype(np.float32)))
    mimic_filter = build_filter(table, labeling_functions=["reference_margin"], aggregate="mixture")
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    expected = frame.groupby(["sample_id", "window"])["reference_margin"].mean().unstack().sort_index().mean(axis=1)
    stored = np.asarray(mimic_filter.table.column("lf_scores").to_pylist())[:, 0]
    np.testing.assert_allclose(stored, expected.to_numpy(), rtol=1e-5, atol=1e-6)
    assert discard_f1(mimic_filter.keep, clean) > 0.9
