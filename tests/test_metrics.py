"""Tests for the local evaluate metrics (`hf_gradmimic.metrics`).

The filter metric is checked against scikit-learn on random inputs with ties; loading is checked with
offline environment variables and with sockets disabled, so no test can wait on the network.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

import hf_gradmimic.metrics as hm

evaluate = pytest.importorskip("evaluate")

FILTER_PATH = Path(hm.__file__).resolve().parent / "gradmimic_filter.py"
ACCURACY_PATH = Path(hm.__file__).resolve().parent / "accuracy.py"
RANK_KEYS = {"keep_roc_auc", "keep_average_precision"}
FLAG_KEYS = {"discard_precision", "discard_recall", "discard_f1", "retained_fraction"}


@pytest.fixture
def no_network(monkeypatch):
    """Offline env vars plus sockets that refuse to resolve or connect; returns the list of attempts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture(scope="module")
def filter_metric():
    return hm.load_filter_metric(keep_in_memory=True)


def _sklearn_reference(prob: np.ndarray, clean: np.ndarray, threshold: float) -> dict[str, float]:
    noisy = (clean == 0).astype(int)
    discarded = (prob < threshold).astype(int)
    p, r, f, _ = precision_recall_fscore_support(noisy, discarded, average="binary", pos_label=1, zero_division=0)
    return {
        "discard_precision": p,
        "discard_recall": r,
        "discard_f1": f,
        "retained_fraction": float(np.mean(prob >= threshold)),
    }


def _random_case(seed: int, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = (rng.random(n) < rng.uniform(0.5, 0.9)).astype(np.int32)
    # Noisy samples get lower keep probabilities on average; rounding creates many ties.
    prob = np.clip(rng.normal(0.35 + 0.3 * clean, 0.2), 0.0, 1.0).round(decimals)
    # Compare against sklearn on exactly what the metric sees after the float32 feature cast.
    return prob.astype(np.float32).astype(np.float64), clean


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_filter_metric_matches_sklearn_on_probabilities(filter_metric, seed, threshold):
    prob, clean = _random_case(seed, n=200 + 37 * seed, decimals=1 + seed % 3)
    assert len(np.unique(prob)) < prob.size  # the case must contain ties
    out = filter_metric.compute(predictions=prob, references=clean, threshold=threshold)

    assert set(out) == FLAG_KEYS | RANK_KEYS
    for key, value in _sklearn_reference(prob, clean, threshold).items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out["keep_roc_auc"] == pytest.approx(roc_auc_score(clean, prob), abs=1e-12)
    assert out["keep_average_precision"] == pytest.approx(average_precision_score(clean, prob), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_filter_metric_matches_sklearn_on_flags(filter_metric, seed):
    rng = np.random.default_rng(100 + seed)
    clean = (rng.random(150) < 0.7).astype(np.int32)
    # Keep flags that are right ~80% of the time.
    keep = np.where(rng.random(150) < 0.8, clean, 1 - clean).astype(np.float32)
    out = filter_metric.compute(predictions=keep, references=clean)

    assert set(out) == FLAG_KEYS  # hard flags: no ranking metrics
    for key, value in _sklearn_reference(keep, clean, 0.5).items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_filter_metric_hand_computed(filter_metric):
    # discard = [0, 1, 1, 0, 1]; noisy = [0, 1, 0, 0, 1] -> TP=2, FP=1, FN=0.
    out = filter_metric.compute(predictions=[0.9, 0.1, 0.4, 0.5, 0.2], references=[1, 0, 1, 1, 0])
    assert out["discard_precision"] == pytest.approx(2 / 3)
    assert out["discard_recall"] == pytest.approx(1.0)
    assert out["discard_f1"] == pytest.approx(0.8)
    assert out["retained_fraction"] == pytest.approx(0.4)  # 0.5 == threshold is kept
    assert out["keep_roc_auc"] == pytest.approx(1.0)


def test_filter_metric_edge_cases(filter_metric):
    # No noisy sample: recall is undefined -> 0.0 (sklearn zero_division=0), and so is everything else.
    out = filter_metric.compute(predictions=[1.0, 0.0, 0.2, 0.9], references=[1, 1, 1, 1])
    assert out["discard_precision"] == 0.0
    assert out["discard_recall"] == 0.0
    assert out["discard_f1"] == 0.0
    # Single class: AUC and AP are undefined -> nan.
    assert np.isnan(out["keep_roc_auc"]) and np.isnan(out["keep_average_precision"])
    out = filter_metric.compute(predictions=[0.7, 0.3], references=[0, 0])
    assert np.isnan(out["keep_roc_auc"]) and np.isnan(out["keep_average_precision"])
    assert out["discard_precision"] == 1.0 and out["discard_recall"] == 0.5

    # Nothing discarded: precision undefined -> 0.0.
    out = filter_metric.compute(predictions=[1, 1, 1], references=[1, 0, 1])
    assert out["discard_precision"] == 0.0 and out["discard_recall"] == 0.0 and out["retained_fraction"] == 1.0

    # rank_metrics forces the ranking metrics on for hard flags.
    out = filter_metric.compute(predictions=[1, 0, 1, 0], references=[1, 0, 0, 1], rank_metrics=True)
    assert out["keep_roc_auc"] == pytest.approx(roc_auc_score([1, 0, 0, 1], [1, 0, 1, 0]))

    with pytest.raises(ValueError, match="keep probabilities"):
        filter_metric.compute(predictions=[1.5, 0.0], references=[1, 0])
    with pytest.raises(ValueError, match="clean flags"):
        filter_metric.compute(predictions=[1.0, 0.0], references=[2, 0])


@pytest.mark.parametrize("keep_in_memory", [True, False])
def test_add_batch_equals_one_shot(tmp_path, keep_in_memory):
    prob, clean = _random_case(seed=7, n=301, decimals=2)
    metric = hm.load_filter_metric(keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    one_shot = metric.compute(predictions=prob, references=clean)

    bounds = [0, 1, 50, 51, 200, 301]  # uneven batches, including a batch of one
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        metric.add_batch(predictions=prob[lo:hi], references=clean[lo:hi])
    batched = metric.compute()
    assert batched == one_shot


def test_evaluate_load_by_path_offline(no_network):
    # Env vars only (evaluate's import-time flag stays stale): a local path needs no network at all.
    metric = evaluate.load(str(FILTER_PATH))
    assert type(metric).__name__ == "GradmimicFilter"
    assert "2501.06708" in metric.info.citation
    assert set(metric.info.features) == {"predictions", "references"}
    assert metric.info.features["predictions"].dtype == "float32"
    out = metric.compute(predictions=[1, 0, 0, 1], references=[1, 0, 1, 1])
    assert out == pytest.approx(
        {"discard_precision": 0.5, "discard_recall": 1.0, "discard_f1": 2 / 3, "retained_fraction": 0.5}
    )
    assert no_network == []


@pytest.mark.parametrize("path", [FILTER_PATH, ACCURACY_PATH])
def test_metric_scripts_are_self_contained(path):
    # evaluate copies the script into its modules cache; relative imports would need extra files
    # and `hf_gradmimic` imports would tie the copy to this checkout.
    from evaluate.loading import get_imports

    imports = get_imports(str(path))
    assert all(kind == "library" for kind, *_ in imports), imports
    assert not any(name == "hf_gradmimic" for _, name, *_ in imports)


def test_load_metric_local_names_offline(no_network):
    assert type(hm.load_metric("gradmimic_filter")).__name__ == "GradmimicFilter"
    accuracy = hm.load_metric("accuracy")
    assert type(accuracy).__name__ == "Accuracy"
    assert accuracy.compute(predictions=[0, 1, 2], references=[0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
    assert no_network == []


def _uncached_hosted_name() -> str:
    # A module fetched earlier is served from the cache even offline (by design); fall back to a name
    # that cannot be cached if this machine happens to have `bleu`.
    modules = Path(evaluate.config.HF_MODULES_CACHE) / "evaluate_modules" / "metrics"
    if any(modules.glob("evaluate-*--bleu")):
        return "hf-gradmimic-test-never-cached-metric"
    return "bleu"


@pytest.mark.parametrize("evaluate_flag_frozen", [True, False], ids=["evaluate-flag-set", "env-only"])
def test_load_metric_hosted_offline_raises_clear_error(no_network, monkeypatch, evaluate_flag_frozen):
    # evaluate-flag-set: what a process started with the env vars sees (evaluate and huggingface_hub
    # freeze them at import). env-only: both were imported before the env vars were set, so only
    # load_metric's own check sees them; it must still fail fast with the same error.
    import huggingface_hub.constants

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", evaluate_flag_frozen)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", evaluate_flag_frozen)
    with pytest.raises(RuntimeError) as excinfo:
        hm.load_metric(_uncached_hosted_name())
    message = str(excinfo.value)
    assert "offline" in message
    assert "'accuracy'" in message and "'gradmimic_filter'" in message
    if evaluate_flag_frozen:
        assert no_network == []


def test_accuracy_metric_matches_numpy():
    rng = np.random.default_rng(0)
    metric = hm.load_accuracy_metric(keep_in_memory=True)
    for n_classes in (2, 5):
        preds = rng.integers(0, n_classes, size=257)
        refs = rng.integers(0, n_classes, size=257)
        assert metric.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(np.mean(preds == refs))


def test_accuracy_compute_metrics():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 3))
    labels = rng.integers(0, 3, size=64)
    expected = float(np.mean(logits.argmax(-1) == labels))
    assert hm.accuracy_compute_metrics((logits, labels))["accuracy"] == pytest.approx(expected)
    # EvalPrediction-like object, tuple model outputs, and -100 positions ignored.
    labels_masked = labels.copy()
    labels_masked[:10] = -100
    eval_pred = SimpleNamespace(predictions=(logits, np.zeros(1)), label_ids=labels_masked)
    expected_masked = float(np.mean(logits[10:].argmax(-1) == labels[10:]))
    assert hm.accuracy_compute_metrics(eval_pred)["accuracy"] == pytest.approx(expected_masked)


def test_compute_filter_metrics():
    prob, clean = _random_case(seed=3, n=120, decimals=1)
    rng = np.random.default_rng(3)
    keep = rng.random(prob.size) < prob  # sampled keeps differ from thresholded probabilities
    out = hm.compute_filter_metrics(keep, clean.astype(bool))
    assert set(out) == FLAG_KEYS
    for key, value in _sklearn_reference(keep.astype(float), clean, 0.5).items():
        assert out[key] == pytest.approx(value, abs=1e-12), key

    with_prob = hm.compute_filter_metrics(keep, clean.astype(bool), keep_prob=prob)
    assert {k: with_prob[k] for k in FLAG_KEYS} == out
    assert with_prob["keep_roc_auc"] == pytest.approx(roc_auc_score(clean, prob), abs=1e-12)
    assert with_prob["keep_average_precision"] == pytest.approx(average_precision_score(clean, prob), abs=1e-12)

    # probabilities within 6e-8 of 1, which float32 (the `evaluate` metric's features) would tie, rank in float64
    near_one = 1 - np.where(clean == 1, 1e-9, 1e-8) * rng.random(clean.size)
    assert len(np.unique(near_one.astype(np.float32))) < 3
    with_near_one = hm.compute_filter_metrics(keep, clean.astype(bool), keep_prob=near_one)
    assert with_near_one["keep_roc_auc"] == pytest.approx(roc_auc_score(clean, near_one), abs=1e-12)
    assert with_near_one["keep_average_precision"] == pytest.approx(average_precision_score(clean, near_one), abs=1e-12)
    with pytest.raises(ValueError, match="keep probabilities in"):
        hm.compute_filter_metrics(keep, clean.astype(bool), keep_prob=near_one + 1)

    # a ranking on any scale (log-odds), whose top values float32 probabilities would all round to 1.0
    log_odds = np.where(clean == 1, 40.0, 20.0) + rng.normal(0, 8.0, clean.size)
    assert (np.float32(1 / (1 + np.exp(-log_odds))) == 1.0).mean() > 0.5
    with_score = hm.compute_filter_metrics(keep, clean.astype(bool), keep_prob=prob, keep_score=log_odds)
    assert {k: with_score[k] for k in FLAG_KEYS} == out
    assert with_score["keep_roc_auc"] == pytest.approx(roc_auc_score(clean, log_odds), abs=1e-12)
    assert with_score["keep_average_precision"] == pytest.approx(average_precision_score(clean, log_odds), abs=1e-12)
    with pytest.raises(ValueError, match="keep_score holds NaN"):
        hm.compute_filter_metrics(keep, clean.astype(bool), keep_score=np.where(clean == 1, np.nan, 0.0))

    with pytest.raises(ValueError, match="entries"):
        hm.compute_filter_metrics([True, False], [True])
