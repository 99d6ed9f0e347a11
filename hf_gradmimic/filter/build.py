"""The Stage-2 entry points: `build_filter` (score log -> `MimicFilter`) and `estimate_quality`
(the two dataset-quality estimators of Huang et al., arXiv 2501.06708, Section 5.1)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from ..score_log_io import scores_provenance
from .aggregation import DEFAULT_AGGREGATE
from .decide import check_settings, decide
from .engines import ENGINES, get_engine
from .identification import DEFAULT_METHOD
from .inputs import ScoresLike
from .labeling import (
    LabelingContext,
    LabelingFunctionLike,
    default_labeling_functions,
    labeling_scores,
    labeling_votes,
    resolve_labeling_functions,
)
from .posterior import DEFAULT_DEGREES_OF_FREEDOM
from .result import MimicFilter
from .shards import BAD_SHARD_POLICIES, BadShardPolicy
from .warning import FilterWarning
from .windows import WindowsLike, check_windows

__all__ = ["ENGINES", "build_filter", "estimate_quality"]


def build_filter(
    scores: ScoresLike,
    method: str = DEFAULT_METHOD,
    aggregate: str = DEFAULT_AGGREGATE,
    windows: WindowsLike = "epoch",
    *,
    threshold: float | None = None,
    topk: float = 50,
    seed: int = 0,
    on_bad_shard: BadShardPolicy = "error",
    engine: str = "streaming",
    spill_dir: str | os.PathLike | None = None,
    labeling_functions: Sequence[LabelingFunctionLike] | None = None,
    discard_requires_disagreement: bool = True,
    mixture_degrees_of_freedom: float = DEFAULT_DEGREES_OF_FREEDOM,
) -> MimicFilter:
    """Build Grad-Mimic's Stage-2 ensemble filter from a score log.

    Args:
        scores: the score log: an ``output_dir`` (or its ``mimic_scores/`` folder), the
            `datasets.Dataset` that `load_scores` returns, a `pyarrow.Table` or a `pandas.DataFrame`
            with the score-log columns. Records flagged ``repeated`` are dropped.
        method: per-window identification, one of ``"threshold"``, ``"kmeans"`` (default, `DEFAULT_METHOD`),
            ``"gmm"``, ``"topk"``.
        windows: the labeling functions: ``"epoch"`` (one per epoch), ``"step"`` (one per optimizer
            step) or an int ``N`` (``N`` equal windows of consecutive global steps). Epoch windows
            use ``ceil(epoch) - 1`` (with a tolerance for float rounding), because a record's
            ``epoch`` is the fractional epoch *after* its step: the last step of the first epoch
            has ``epoch == 1.0`` and belongs to window ``epoch_0``, which ``floor`` would get wrong.
        threshold: for ``method="threshold"``: keep when ``b * w > threshold`` (default 1.0, i.e. ``w > 1/b``).
        topk: for ``method="topk"``: the percentage of each window's samples to keep (default 50).
        seed: the LabelModel's seed.
        on_bad_shard: what an unreadable shard of a score log on disk does: ``"error"`` (the error
            names the file) or ``"skip"`` (left out, with a warning listing every skipped file).
            Gaps in a rank's step ranges are warned about, and records held by two shards of one
            rank (same step and sample) are counted once, with a warning.
        engine: ``"streaming"`` (default) reduces the log in bounded memory, spilling sample-id
            ranges to ``spill_dir`` when it does not fit (`hf_gradmimic.filter.engines.outofcore`);
            ``"memory"`` holds every record (24 bytes each). Both give the same filter, bit for bit.
            ``"ray"`` reduces the shards on the current Ray cluster (`hf_gradmimic.filter.engines.ray`,
            ``pip install "hf-gradmimic[ray]"``), with the same result; it needs integer sample ids
            (row indices, or an integer ``mimic_id_column``) and refuses other id types, naming the streaming one.
        spill_dir: where the streaming engine spills (default: the system's temporary folder).
        labeling_functions: the sources of evidence (Snorkel's labeling functions, Ratner et al. 2017), by name or
            object. Continuous ones give each sample a value (`hf_gradmimic.filter.signals`): ``"mean_loss"`` (the
            reweighted student's mean log-loss over the windows), ``"mean_margin"`` (its mean margin: the area
            under the margin, Pleiss et al. 2020), ``"last_loss"``, ``"last_loss_linear"``, ``"window_loss"``,
            ``"reference_loss"`` and ``"reference_margin"`` (the reference's loss and margin from the log: its head on
            the student's features, or the reference model's own under ``mimic_log_reference_loss="reference_model"``),
            and objects such as ``PredictorMargin(reference_logits, labels)`` (the
            reference's margin from its own logits). Voting ones: ``"mimic"`` (the windows' ``b * w`` votes of the
            paper), ``"loss"`` (per-window small-loss votes) and objects such as
            ``PredictorAgreement(reference_logits, labels)``. Default (None): `DEFAULT_LABELING_FUNCTIONS`,
            ``["mean_loss", "mean_margin", "reference_margin"]``, chosen on the realistic suite's runs against the
            best of five baselines per setting (docs/results.md, `scripts/stage2_search.py`); without
            ``"reference_margin"`` for a log that lacks it (a reference that is not a classification head); for a log
            without the student's margin (a contrastive or language-model run)
            `DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN`, ``["last_loss_linear"]``, the student's loss in its last
            window (docs/clip_curation.md).
        aggregate: how the labeling functions combine: ``"mixture"`` (default, `DEFAULT_AGGREGATE`: the keep
            posterior of `hf_gradmimic.filter.posterior` over the continuous values and the votes), or a vote rule
            (``"snorkel"``, ``"majority"``, ``"all"``, ``"any"``; a continuous function then votes by a GMM cut).
            The paper's filter is ``labeling_functions=["mimic"], method="gmm", aggregate="snorkel"``.
        discard_requires_disagreement: with ``aggregate="mixture"``, discard a sample only when the posterior says so
            *and* a classifier predicts another class than its given label (a negative mean margin): the reweighted
            student, or a reference whose margin is among the labeling functions (``"reference_margin"``,
            `PredictorMargin`); cleanlab's ``filter_by="both"`` (`hf_gradmimic.filter.agreement`). No effect on a log
            without the margin (not a single-label classification run) or with a vote aggregate.
        mixture_degrees_of_freedom: with ``aggregate="mixture"``, the degrees of freedom of each class's Student t
            over the continuous signals (default `DEFAULT_DEGREES_OF_FREEDOM`, 4, chosen on the realistic suite: heavy
            tails keep the far flipped samples from dragging the classes); ``math.inf`` gives Gaussian classes,
            the filter of versions before the t.

    Returns:
        A `MimicFilter`: ``table`` has one row per sample (sorted by ``sample_id``) with its mean
        mimic score, mean ``b * w``, per-window votes / values / scores, ``keep_prob``, ``keep_log_odds`` (the
        ranking: its log-odds, which do not round to 1.0 where ``keep_prob`` does) and ``keep``;
        ``summary`` has the retained fraction, per-window thresholds and estimated accuracies,
        degenerate windows, the settings used, and the score log's ``provenance`` (the reference, the
        scorer and its settings, the student, what the sample ids index): from the log's folder, or from the
        `datasets.Dataset` that `load_scores` returned; None for other in-memory logs.

    Example:
        >>> mimic_filter = build_filter("outputs/run1")  # the student's mean log-loss and margin, keep posterior
        >>> clean_train = mimic_filter.apply(train_dataset)
    """
    check_settings(method, aggregate, threshold, topk, mixture_degrees_of_freedom)
    check_windows(windows)
    if threshold is not None and method != "threshold":
        warnings.warn(
            f"threshold={threshold} is only used by method='threshold' (method={method!r}).",
            FilterWarning,
            stacklevel=2,
        )
    functions, mimic_votes = resolve_labeling_functions(labeling_functions)  # a named one is checked before the read
    if on_bad_shard not in BAD_SHARD_POLICIES:
        raise ValueError(f"on_bad_shard must be one of {BAD_SHARD_POLICIES}, got {on_bad_shard!r}.")
    if spill_dir is not None and not os.path.isdir(spill_dir):
        raise ValueError(
            f"spill_dir={str(spill_dir)!r} is not an existing directory; create it, or pass None for the system's temporary folder."
        )
    windowed = get_engine(engine).collect(scores, windows, on_bad_shard=on_bad_shard, spill_dir=spill_dir)
    # The default depends on whether the log records the student's and the reference's margins.
    if labeling_functions is None:
        functions, mimic_votes = resolve_labeling_functions(
            default_labeling_functions("margin" in windowed.signals, "reference_margin" in windowed.signals)
        )
    context = LabelingContext(scores, windowed, windows, method, threshold, topk, on_bad_shard=on_bad_shard)
    table, summary = decide(
        windowed,
        method=method,
        aggregate=aggregate,
        windows=windows,
        threshold=threshold,
        topk=topk,
        seed=seed,
        extra_votes=labeling_votes(functions, context),
        mimic_votes=mimic_votes,
        extra_scores=labeling_scores(functions, context),
        discard_requires_disagreement=discard_requires_disagreement,
        mixture_degrees_of_freedom=mixture_degrees_of_freedom,
    )
    # What produced the log (and what its sample ids index) travels with the filter, to its cards and checks.
    summary["provenance"] = scores_provenance(scores)
    return MimicFilter(table, summary)


def estimate_quality(scores_or_filter: ScoresLike | MimicFilter, **build_kwargs: Any) -> dict[str, float]:
    """The two dataset-quality estimators of the paper (Section 5.1).

    - ``retained_fraction``: ``|{i : keep_i}| / n``, the share of samples the ensemble filter keeps;
    - ``mean_mimic_score``: ``(1/n) sum_i m_i``, the mean over samples of each sample's mean mimic
      score over its records (samples whose scores are all NaN are left out).

    Args:
        scores_or_filter: a `MimicFilter`, or anything `build_filter` accepts (the filter is then
            built with ``build_kwargs``).
    """
    mimic_filter = (
        scores_or_filter
        if isinstance(scores_or_filter, MimicFilter)
        else build_filter(scores_or_filter, **build_kwargs)
    )
    summary = mimic_filter.summary
    mean_score = summary["mean_mimic_score"]
    return {
        "retained_fraction": float(summary["retained_fraction"]),
        "mean_mimic_score": float("nan") if mean_score is None else float(mean_score),
        "n_samples": int(summary["n_samples"]),
    }
