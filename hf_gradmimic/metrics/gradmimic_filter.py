# Copyright 2025 The hf-gradmimic Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Audit metric for a Grad-Mimic data filter: how well do its discard decisions find mislabelled samples?

A filter decides, per training sample, to keep it (1) or discard it (0), possibly through a keep
probability. The ground truth is a per-sample "clean" flag (1 = correctly labelled). The **discard**
decision is the positive class, because the point of the filter is to find the noisy samples:

    discarded_i = prediction_i < threshold          noisy_i = (reference_i == 0)
    TP = #(discarded & noisy)   FP = #(discarded & clean)   FN = #(kept & noisy)

    discard_precision = TP / (TP + FP)              (0.0 when nothing is discarded)
    discard_recall    = TP / (TP + FN)              (0.0 when no sample is noisy)
    discard_f1        = 2 TP / (2 TP + FP + FN)     (0.0 when TP + FP + FN == 0)
    retained_fraction = #(kept) / N

The 0.0 fallbacks are scikit-learn's `zero_division=0` semantics, so the numbers match
`precision_recall_fscore_support(noisy, discarded, average="binary", zero_division=0)`.

When the predictions are keep *probabilities* (not all in {0, 1}), two threshold-free ranking metrics
of the keep probability as a score for the **clean** flag (clean is the positive class here, the
opposite of the discard metrics above; ROC AUC is symmetric under flipping both, AP is not) are added:

    keep_roc_auc           = P(score of a random clean sample > score of a random noisy one),
                             ties counting 1/2 (Mann-Whitney U / (N_clean N_noisy));
                             equals `sklearn.metrics.roc_auc_score(clean, keep_prob)`.
    keep_average_precision = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds, clean as positive;
                             equals `sklearn.metrics.average_precision_score(clean, keep_prob)`.

Both are `nan` when the references hold a single class (all clean or all noisy), where they are
undefined (scikit-learn raises or warns there instead).

This file is an `evaluate` module script: `evaluate.load("/abs/path/to/gradmimic_filter.py")` copies it
into the dynamic-modules cache and imports it from there, so it must stay self-contained (only library
imports, no relative or `hf_gradmimic` imports). It is implemented with numpy only.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Audits a Grad-Mimic data filter against per-sample clean/noisy ground truth. The discard decision
(prediction < threshold) is the positive class for precision, recall and F1 against the noisy flag
(reference == 0); `retained_fraction` is the fraction of samples kept. When predictions are keep
probabilities, the ROC AUC and average precision of the keep probability as a score for the clean
flag are reported too.
"""

_CITATION = """\
@article{huang2025gradmimic,
  title   = {Evaluating Sample Utility for Data Selection by Mimicking Model Weights},
  author  = {Huang, Tzu-Heng and Bilkhu, Manjot and Sala, Frederic and Movellan, Javier},
  journal = {arXiv preprint arXiv:2501.06708},
  year    = {2025},
  url     = {https://arxiv.org/abs/2501.06708}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): per-sample keep flags (0 = discard, 1 = keep) or keep
        probabilities in [0, 1].
    references (`list` of `int`): per-sample clean flags (1 = correctly labelled, 0 = noisy).
    threshold (`float`, defaults to 0.5): a sample is discarded when `prediction < threshold`
        (so a keep probability equal to the threshold is kept).
    rank_metrics (`bool`, *optional*): whether to add `keep_roc_auc` and `keep_average_precision`.
        Defaults to `None`: added only when the predictions are probabilities (not all in {0, 1}).

Returns:
    discard_precision (`float`): TP / (TP + FP) with discard as the positive class, 0.0 if nothing is discarded.
    discard_recall (`float`): TP / (TP + FN), 0.0 if no sample is noisy.
    discard_f1 (`float`): harmonic mean of the two, 0.0 if undefined.
    retained_fraction (`float`): fraction of samples kept (prediction >= threshold).
    keep_roc_auc (`float`, probabilities only): ROC AUC of the keep probability for the clean flag,
        `nan` if the references hold a single class.
    keep_average_precision (`float`, probabilities only): average precision of the keep probability
        for the clean flag (clean is the positive class), `nan` if the references hold a single class.

Examples:
    >>> metric = evaluate.load("path/to/hf_gradmimic/metrics/gradmimic_filter.py")
    >>> metric.compute(predictions=[1, 0, 0, 1], references=[1, 0, 1, 1])
    {'discard_precision': 0.5, 'discard_recall': 1.0, 'discard_f1': 0.6666666666666666, 'retained_fraction': 0.5}
"""


def _safe_div(num: float, den: float) -> float:
    # sklearn's zero_division=0: an undefined ratio is reported as 0.0 rather than nan so that
    # averages over runs stay finite.
    return float(num) / float(den) if den > 0 else 0.0


def roc_auc(clean: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney U) statistic, with tied scores sharing their average rank.

    With average ranks for ties this is exactly the trapezoidal area under the ROC curve, i.e. what
    `sklearn.metrics.roc_auc_score` computes, in O(N log N) without building the curve.
    """
    n_pos = int(clean.sum())
    n_neg = clean.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_score = score[order]
    # Boundaries of runs of equal scores; every member of a run gets the run's mean 1-based rank.
    run_start = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    run_end = np.r_[run_start[1:], sorted_score.size]
    run_rank = (run_start + run_end + 1) / 2.0
    ranks = np.empty(score.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, run_end - run_start)
    u = ranks[clean].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(clean: np.ndarray, score: np.ndarray) -> float:
    """Step-wise average precision sum_n (R_n - R_{n-1}) P_n with `clean` as the positive class.

    Thresholds are the distinct scores from high to low; tied samples enter together (as in
    `sklearn.metrics.average_precision_score`, which does not interpolate).
    """
    n_pos = int(clean.sum())
    if n_pos == 0 or n_pos == clean.size:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    sorted_score = score[order]
    sorted_clean = clean[order]
    # Last index of each run of equal scores: the operating points of the PR curve.
    last_of_run = np.flatnonzero(np.r_[sorted_score[1:] != sorted_score[:-1], True])
    tps = np.cumsum(sorted_clean, dtype=np.float64)[last_of_run]
    predicted_pos = last_of_run + 1.0
    precision = tps / predicted_pos
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GradmimicFilter(evaluate.Metric):
    """Discard precision / recall / F1, retained fraction and keep-probability ranking metrics."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float32"),
                    "references": datasets.Value("int32"),
                }
            ),
            # numpy format hands `_compute` arrays instead of Python lists (no per-element boxing).
            format="numpy",
            homepage="https://arxiv.org/abs/2501.06708",
            reference_urls=["https://arxiv.org/abs/2501.06708"],
        )

    def _compute(
        self,
        predictions,
        references,
        threshold: float = 0.5,
        rank_metrics: bool | None = None,
    ) -> dict[str, float]:
        score = np.asarray(predictions, dtype=np.float64).reshape(-1)
        ref = np.asarray(references).reshape(-1)
        if score.size == 0:
            raise ValueError("gradmimic_filter needs at least one sample.")
        if not np.all(np.isfinite(score)) or score.min() < 0.0 or score.max() > 1.0:
            raise ValueError("predictions must be keep flags (0/1) or keep probabilities in [0, 1].")
        if not np.isin(ref, (0, 1)).all():
            raise ValueError("references must be clean flags: 1 = correctly labelled, 0 = noisy.")

        clean = ref == 1
        discarded = score < threshold
        noisy = ~clean
        tp = int(np.count_nonzero(discarded & noisy))
        fp = int(np.count_nonzero(discarded & clean))
        fn = int(np.count_nonzero(~discarded & noisy))

        precision = _safe_div(tp, tp + fp)
        recall = _safe_div(tp, tp + fn)
        # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall, written so that
        # it needs no special case when one of them is 0.
        f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
        results: dict[str, float] = {
            "discard_precision": precision,
            "discard_recall": recall,
            "discard_f1": f1,
            "retained_fraction": float(np.count_nonzero(~discarded)) / score.size,
        }

        if rank_metrics is None:
            # Hard 0/1 flags carry no ranking beyond the decision itself, so AUC/AP would only
            # restate precision/recall; report them for probabilities only.
            rank_metrics = not np.isin(score, (0.0, 1.0)).all()
        if rank_metrics:
            results["keep_roc_auc"] = roc_auc(clean, score)
            results["keep_average_precision"] = average_precision(clean, score)
        return results
