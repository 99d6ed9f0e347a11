"""Local `evaluate` metrics for hf-gradmimic, loadable offline.

Two metric scripts live next to this file and are loaded *by path* with `evaluate.load`, so no Hub
access is ever needed for them:

- `gradmimic_filter.py`: audit of a filter's keep/discard decisions against clean flags, with discard
  as the positive class (precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN)),
  the retained fraction and, for keep probabilities, ROC AUC / average precision of the keep
  probability for the clean flag. See that module's docstring for the exact definitions.
- `accuracy.py`: classification accuracy, #(prediction == reference) / N.

`evaluate` (and through it `datasets`/`pyarrow`) is imported inside the functions, not at module
import, so that `import hf_gradmimic.metrics` stays cheap.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import evaluate


__all__ = [
    "LOCAL_METRICS",
    "accuracy_compute_metrics",
    "clean_flags_array",
    "compute_filter_metrics",
    "load_accuracy_metric",
    "load_filter_metric",
    "load_metric",
    "local_metric_path",
]

_METRICS_DIR = Path(__file__).resolve().parent

# Name -> script. Only these names are served locally by `load_metric`; everything else goes to the Hub.
LOCAL_METRICS: dict[str, Path] = {
    "accuracy": _METRICS_DIR / "accuracy.py",
    "gradmimic_filter": _METRICS_DIR / "gradmimic_filter.py",
}

_TRUE_ENV_VALUES = {"1", "ON", "YES", "TRUE"}


def local_metric_path(name: str) -> str:
    """Absolute path of the local metric script `name` (one of `LOCAL_METRICS`)."""
    if name not in LOCAL_METRICS:
        raise KeyError(f"No local metric named {name!r}; local metrics are {sorted(LOCAL_METRICS)}.")
    return str(LOCAL_METRICS[name])


def load_filter_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """Load the `gradmimic_filter` metric from its script path (works offline).

    `kwargs` are forwarded to `evaluate.load` (e.g. `keep_in_memory=True`, `experiment_id=...`).
    """
    import evaluate

    return evaluate.load(local_metric_path("gradmimic_filter"), **kwargs)


def load_accuracy_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """Load the local `accuracy` metric from its script path (works offline)."""
    import evaluate

    return evaluate.load(local_metric_path("accuracy"), **kwargs)


def _offline_mode() -> bool:
    # Read the environment at call time as well as evaluate's own flag: `evaluate.config` freezes
    # HF_EVALUATE_OFFLINE when evaluate is first imported and ignores HF_HUB_OFFLINE altogether.
    if any(os.environ.get(var, "").upper() in _TRUE_ENV_VALUES for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")):
        return True
    import evaluate.config
    import huggingface_hub.constants

    return bool(evaluate.config.HF_EVALUATE_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


def _local_names() -> str:
    return ", ".join(repr(name) for name in sorted(LOCAL_METRICS))


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a metric by name, preferring the local scripts.

    A name in `LOCAL_METRICS` ("accuracy", "gradmimic_filter") loads the local script, so it never
    touches the network (note that "accuracy" therefore means *our* accuracy, not the Hub's).
    Any other name (or a path) goes to `evaluate.load`. In offline mode (HF_HUB_OFFLINE or
    HF_EVALUATE_OFFLINE set) the Hub module is only looked up in evaluate's local cache
    (`local_files_only=True`), so a module fetched earlier still loads.

    Raises:
        RuntimeError: if a hosted module could not be fetched (offline, or Hub unreachable) and is
            not cached; the message names the local metrics that work offline.
    """
    import evaluate
    from evaluate.utils.file_utils import DownloadConfig

    if name in LOCAL_METRICS:
        return evaluate.load(local_metric_path(name), **kwargs)

    offline = _offline_mode()
    if offline:
        # Without this evaluate would still try an HTTP HEAD for the script's ETag when its own
        # frozen flag disagrees with the environment.
        download_config = kwargs.pop("download_config", None) or DownloadConfig()
        download_config = download_config.copy()
        download_config.local_files_only = True
        kwargs["download_config"] = download_config
    try:
        return evaluate.load(name, **kwargs)
    except OSError as err:
        # OSError covers FileNotFoundError, requests' ConnectionError and evaluate's
        # OfflineModeIsEnabled. Online, evaluate turns "Hub unreachable" into FileNotFoundError,
        # so a network failure and a misspelt name cannot be told apart there.
        if offline:
            problem = (
                "offline: offline mode is on (HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE) "
                "and it is not in the local evaluate cache"
            )
        else:
            problem = (
                "(offline?): the Hugging Face Hub could not be reached or has no such module, "
                "and it is not in the local evaluate cache"
            )
        raise RuntimeError(
            f"Could not fetch the hosted metric {name!r} {problem}. "
            f"Local metrics that work without network: {_local_names()} "
            f"(hf_gradmimic.metrics.load_metric(<name>))."
        ) from err


# One in-memory instance per local metric: `evaluate.load` hashes and imports the script on every call,
# and `keep_in_memory=True` avoids the Arrow cache files and file locks of the on-disk mode.
@functools.cache
def _in_memory_metric(name: str) -> evaluate.EvaluationModule:
    import evaluate

    return evaluate.load(local_metric_path(name), keep_in_memory=True)


# An evaluate metric instance is stateful (add_batch ... compute), so concurrent callers must not interleave.
_COMPUTE_LOCK = threading.Lock()


def _compute_local(name: str, **kwargs: Any) -> dict[str, float]:
    with _COMPUTE_LOCK:
        return _in_memory_metric(name).compute(**kwargs)


def clean_flags_array(values: Any, name: str) -> np.ndarray:
    """Clean flags as booleans, refused unless every value is a boolean or 0/1 (e.g. strings like "clean"/"noisy",
    which would count as neither and give precision 0 and an undefined AUROC); ``name`` is where they come from."""
    flags = np.asarray(values)
    if flags.dtype == bool:
        return flags
    if flags.dtype.kind in "iuf":
        wrong = ~np.isin(flags, (0, 1))
    else:
        wrong = np.array(
            [not isinstance(value, (bool, np.bool_)) and value not in (0, 1) for value in flags.tolist()], dtype=bool
        )
    if wrong.any():
        examples = list(dict.fromkeys(flags[wrong].tolist()))[:5]
        raise ValueError(
            f"{name} must hold clean flags: True/1 for a correctly labelled sample, False/0 for a noisy one; it holds "
            f"{int(wrong.sum())} other value(s), e.g. {examples}. Map them first, e.g. "
            "dataset.map(lambda row: {'is_clean': row['status'] == 'clean'})."
        )
    return flags.astype(bool)


def compute_filter_metrics(
    keep: Sequence[bool] | np.ndarray,
    clean: Sequence[bool] | np.ndarray,
    keep_prob: Sequence[float] | np.ndarray | None = None,
    threshold: float = 0.5,
    keep_score: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """Filter audit without the `evaluate` boilerplate.

    Args:
        keep: per-sample keep decisions (True = keep).
        clean: per-sample ground truth (True = correctly labelled).
        keep_prob: optional per-sample keep probabilities in [0, 1]. When given, `keep_roc_auc` and
            `keep_average_precision` are added (computed from `keep_prob` in float64, always, even if it
            happens to be 0/1), while the discard precision/recall/F1 and `retained_fraction` come from the
            `keep` decisions, which may differ from `keep_prob >= threshold` (e.g. sampled keeps).
        threshold: discard threshold applied to `keep` (irrelevant for boolean flags).
        keep_score: optional per-sample ranking on any real scale, higher = keep (a filter's `keep_log_odds`, which
            does not round to 1.0 where `keep_prob` does). When given, `keep_roc_auc` and `keep_average_precision`
            are computed from it, and `keep_prob` is not read.

    Returns:
        The `gradmimic_filter` result dict: `discard_precision`, `discard_recall`, `discard_f1`,
        `retained_fraction` and, with `keep_prob`, `keep_roc_auc`, `keep_average_precision`.
    """
    keep_arr = np.asarray(keep, dtype=np.float32).reshape(-1)
    clean_arr = np.asarray(clean).astype(np.int32).reshape(-1)
    if keep_arr.shape != clean_arr.shape:
        raise ValueError(f"keep has {keep_arr.size} entries but clean has {clean_arr.size}.")
    # rank_metrics=False: the flags' own ranking would only restate precision/recall.
    results = _compute_local(
        "gradmimic_filter", predictions=keep_arr, references=clean_arr, threshold=threshold, rank_metrics=False
    )
    # The rank metrics in float64 (the `evaluate` metric's features are float32, where probabilities within 6e-8 of
    # 1 tie): keep_score, else keep_prob, by the metric script's own rank formulas.
    if keep_score is not None:
        results.update(_rank_metrics(clean_arr, keep_score, "keep_score"))
    elif keep_prob is not None:
        results.update(_rank_metrics(clean_arr, keep_prob, "keep_prob", probabilities=True))
    return results


def _rank_metrics(clean: np.ndarray, values: Any, name: str, probabilities: bool = False) -> dict[str, float]:
    """``keep_roc_auc`` and ``keep_average_precision`` of ``values`` (higher = keep) for the clean flags, in float64."""
    from .gradmimic_filter import average_precision, roc_auc

    score = np.asarray(values, dtype=np.float64).reshape(-1)
    if score.shape != clean.shape:
        raise ValueError(f"{name} has {score.size} entries but clean has {clean.size}.")
    if np.isnan(score).any():
        raise ValueError(f"{name} holds NaN at positions {np.flatnonzero(np.isnan(score))[:5].tolist()}.")
    if probabilities and (not np.isfinite(score).all() or score.min() < 0.0 or score.max() > 1.0):
        raise ValueError(f"{name} must hold keep probabilities in [0, 1].")
    return {
        "keep_roc_auc": roc_auc(clean == 1, score),
        "keep_average_precision": average_precision(clean == 1, score),
    }


def accuracy_compute_metrics(eval_pred: Any) -> dict[str, float]:
    """`Trainer(compute_metrics=accuracy_compute_metrics)`: argmax the logits, then local accuracy.

    Accepts a `transformers.EvalPrediction` or a `(predictions, label_ids)` tuple. If the model returns
    a tuple of outputs, the first one is taken as the logits. Logits with one more dimension than the
    labels are argmaxed over the last axis; otherwise they are taken as predicted ids already (e.g. after
    `preprocess_logits_for_metrics`). Positions labelled -100 (transformers' ignore index) are dropped.
    """
    if hasattr(eval_pred, "predictions"):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    preds = logits.argmax(axis=-1) if logits.ndim == labels.ndim + 1 else logits
    preds = preds.reshape(-1)
    labels = labels.reshape(-1)
    mask = labels != -100
    return _compute_local("accuracy", predictions=preds[mask], references=labels[mask])
