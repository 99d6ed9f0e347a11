"""The agreement gate of Stage 2 (`hf_gradmimic.filter.agreement`) through `build_filter`: a sample whose student
predicts its given label (and no reference disputes it) is kept, checked against a pandas re-derivation of the
student's and the reference's mean margins from the log and the posterior built without the gate."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
from test_labeling import make_log

from hf_gradmimic.filter import FilterWarning, build_filter
from hf_gradmimic.filter.agreement import agreement_gate


def with_margin(table, clean, seed=2):
    """The log plus a per-record student margin: mostly positive for clean samples, negative for noisy ones, with
    a band of clean samples the student gets wrong and noisy ones it fits (so the gate and the posterior disagree)."""
    rng = np.random.default_rng(seed)
    ids = table.column("sample_id").to_numpy()
    clean_row = np.isin(ids, np.flatnonzero(clean))
    margin = np.where(clean_row, rng.normal(1.0, 1.2, len(ids)), rng.normal(-1.0, 1.2, len(ids)))
    return table.append_column("margin", pa.array(margin.astype(np.float32)))


def pandas_mean_margin(table):
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    per_window = frame.groupby(["sample_id", "window"])["margin"].mean().unstack().sort_index()
    return per_window.mean(axis=1).to_numpy()


@pytest.fixture(scope="module")
def log():
    table, clean = make_log(n=500, loss_sep=0.6)
    return with_margin(table, clean), clean


def test_the_gate_keeps_exactly_the_samples_the_student_predicts(log):
    table, _ = log
    ungated = build_filter(table, discard_requires_disagreement=False)
    gated = build_filter(table)
    margin = pandas_mean_margin(table)
    posterior = ungated.keep_prob
    # Both sides of the rule are exercised: samples the posterior discards but the student predicts, and the rest.
    rescued = (posterior < 0.5) & (margin >= 0)
    assert rescued.sum() > 5 and ((posterior < 0.5) & (margin < 0)).sum() > 5
    np.testing.assert_array_equal(gated.keep, (posterior >= 0.5) | (margin >= 0))
    np.testing.assert_allclose(gated.keep_prob, np.where(margin >= 0, 0.5 + 0.5 * posterior, posterior), rtol=1e-6)
    # the ranking column is the log-odds of keep_prob wherever keep_prob has not rounded to 0 or 1
    inside = (gated.keep_prob > 1e-12) & (gated.keep_prob < 1 - 1e-9)
    assert inside.sum() > 100
    np.testing.assert_allclose(
        gated.keep_log_odds[inside], np.log(gated.keep_prob / (1 - gated.keep_prob))[inside], rtol=1e-6, atol=1e-6
    )
    assert gated.summary["agreement_gate"] == {
        "n_gated": int(rescued.sum()),
        "n_with_margin": len(margin),
        "reference_margins": [],
        "n_reference_disagrees": 0,
    }
    np.testing.assert_allclose(gated.table.column("student_margin").to_numpy(), margin, rtol=1e-5, atol=1e-6)


def test_rebuild_gives_the_gated_filter_and_can_turn_the_gate_off(log):
    table, _ = log
    gated = build_filter(table)
    np.testing.assert_array_equal(gated.rebuild().keep, gated.keep)
    np.testing.assert_allclose(gated.rebuild().keep_prob, gated.keep_prob)
    off = gated.rebuild(discard_requires_disagreement=False)
    np.testing.assert_allclose(off.keep_prob, build_filter(table, discard_requires_disagreement=False).keep_prob)


def test_a_log_without_margins_and_vote_aggregates_are_not_gated():
    table, _ = make_log(n=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilterWarning)  # the default for a log without margins: nothing abstains
        mimic_filter = build_filter(table)
    assert mimic_filter.summary["agreement_gate"] is None
    assert "student_margin" not in mimic_filter.table.column_names
    margin_table = with_margin(*make_log(n=300))
    paper = build_filter(margin_table, labeling_functions=["mimic"], method="gmm", aggregate="majority")
    assert paper.summary["agreement_gate"] is None


def test_a_sample_the_reference_disputes_is_not_protected(log):
    """With the reference's margin among the labeling functions, the gate keeps a sample only when the student
    predicts its label and the reference does not predict another: re-derived with pandas from the log."""
    table, clean = log
    rng = np.random.default_rng(5)
    ids = table.column("sample_id").to_numpy()
    reference = np.where(
        np.isin(ids, np.flatnonzero(clean)), rng.normal(1.5, 1.0, len(ids)), rng.normal(-1.5, 1.0, len(ids))
    )
    reference[ids == 3] = np.nan  # sample 3: no reference verdict, so no objection
    table = table.append_column("reference_margin", pa.array(reference.astype(np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)  # sample 3's missing value is warned about
        ungated = build_filter(table, discard_requires_disagreement=False)
        gated = build_filter(table)
    margin = pandas_mean_margin(table)
    frame = table.to_pandas()
    frame["window"] = np.ceil(frame["epoch"] - 1e-9).astype(int) - 1
    reference_mean = frame.groupby(["sample_id", "window"])["reference_margin"].mean().unstack().sort_index()
    reference_mean = reference_mean.mean(axis=1).to_numpy()
    protected = (margin >= 0) & ~(reference_mean < 0)
    disputed = (margin >= 0) & (reference_mean < 0)
    assert disputed.sum() > 5 and np.isnan(reference_mean[3])
    posterior = ungated.keep_prob
    np.testing.assert_array_equal(gated.keep, (posterior >= 0.5) | protected)
    np.testing.assert_allclose(gated.keep_prob, np.where(protected, 0.5 + 0.5 * posterior, posterior), rtol=1e-6)
    summary = gated.summary["agreement_gate"]
    assert summary["reference_margins"] == ["reference_margin"]
    assert summary["n_reference_disagrees"] == int(disputed.sum())
    assert summary["n_gated"] == int(((posterior < 0.5) & protected).sum())
    np.testing.assert_array_equal(gated.rebuild().keep, gated.keep)


def test_the_gate_function_on_its_own():
    posterior = np.array([0.1, 0.9, 0.2, 0.6, 0.3])
    margin = np.array([0.5, -1.0, -0.1, np.nan, 0.0])
    log_odds = np.log(posterior / (1 - posterior))
    gate = agreement_gate(posterior.copy(), log_odds.copy(), margin)
    expected = [0.55, 0.9, 0.2, 0.6, 0.65]
    np.testing.assert_allclose(gate.keep_prob, expected)
    np.testing.assert_allclose(gate.keep_log_odds, np.log(np.divide(expected, np.subtract(1, expected))), rtol=1e-12)
    assert (gate.n_gated, gate.n_with_margin) == (2, 4)
    with pytest.raises(ValueError, match="student margins"):
        agreement_gate(posterior, log_odds, margin[:3])
    # a reference's margin: sample 0 disputed (no longer kept), sample 4 left alone by a NaN
    reference = np.array([-0.2, 1.0, 1.0, 1.0, np.nan])
    gate = agreement_gate(posterior.copy(), log_odds.copy(), margin, [reference])
    np.testing.assert_allclose(gate.keep_prob, [0.1, 0.9, 0.2, 0.6, 0.65])
    assert (gate.n_gated, gate.n_reference_disagrees) == (1, 1)
    with pytest.raises(ValueError, match="reference margins of shapes"):
        agreement_gate(posterior, log_odds, margin, [reference[:2]])


def test_the_gate_keeps_ranking_where_keep_prob_rounds_to_one():
    # log-odds 40 and 60: P(keep) is 1.0 in float64 for both, yet the gated log-odds stay apart and exact.
    log_odds = np.array([40.0, 60.0, -50.0])
    keep_prob = 1 / (1 + np.exp(-log_odds))
    assert keep_prob[0] == keep_prob[1] == 1.0
    gate = agreement_gate(keep_prob, log_odds, np.array([1.0, 1.0, 2.0]))
    # (1 + p) / (1 - p) with 1 - p = e^-z / (1 + e^-z), 1 + p = 2 - e^-z / (1 + e^-z), by hand
    tail = np.exp(-np.array([40.0, 60.0]))
    by_hand = np.log(2 - tail / (1 + tail)) + np.array([40.0, 60.0]) + np.log1p(tail)
    np.testing.assert_allclose(gate.keep_log_odds[:2], by_hand, rtol=1e-15)
    # p = e^-50 / (1 + e^-50): gated to (1 + p) / 2, log-odds log((1 + p) / (1 - p)) ≈ 2p
    p = np.exp(-50.0) / (1 + np.exp(-50.0))
    np.testing.assert_allclose(gate.keep_log_odds[2], np.log1p(p) - np.log1p(-p), rtol=1e-9)
