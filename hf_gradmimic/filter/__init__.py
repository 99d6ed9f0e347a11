"""Stage 2 of Grad-Mimic: an automated ensemble filter built from the score log.

Grad-Mimic (Huang et al., "Evaluating Sample Utility for Data Selection by Mimicking Model
Weights", arXiv 2501.06708) re-weights every batch during training (Stage 1) and then, after
training, turns the recorded weights into a data filter (Stage 2, Section 4.2):

1. **Windows as labeling functions.** The training run is cut into windows of optimizer steps
   (by default one per epoch). In window ``j`` a sample ``i`` gets the value

       v_ij = mean over its records in window j of  b * w_i

   where ``w_i`` is the softmax weight the sample received and ``b`` the size of the batch the
   softmax ran over, so ``v_ij = 1`` means "uniform weight, no opinion", ``v_ij > 1`` "up-weighted"
   (its negative gradient points toward the reference model) and ``v_ij < 1`` "down-weighted".
   A sample that has no record in window ``j`` abstains there.

2. **Identification per window.** Each window votes keep (1) / discard (0) for the samples it saw:

   - ``threshold``: keep when ``v_ij > t``; the paper's rule is ``t = 1``, i.e. ``w_i > 1/b``;
   - ``kmeans``: the exact optimal 1-D 2-means split of the window's values (sort + prefix sums,
     O(n log n)); keep the cluster with the higher centre;
   - ``gmm``: a two-component 1-D Gaussian mixture fitted by EM (initialised from the k-means split,
     so it is deterministic); keep the values above the point, between the two means, where the
     weighted component densities cross;
   - ``topk``: keep the top ``k`` percent of the window's values.

3. **Other labeling functions** (`labeling`): per-window small-loss votes from the log's ``loss``
   column, and one vote per sample from a classifier's predictions (the reference's, a zero-shot
   model's), appended to the windows' votes; ``build_filter(..., labeling_functions=[...])``.

4. **Aggregation.** The ``n x m`` vote matrix (``-1`` abstain, ``0`` discard, ``1`` keep) is combined
   into a keep probability per sample, by default with Snorkel's `LabelModel` (weak supervision:
   it estimates each window's accuracy from the agreements between windows, without labels), or
   by majority vote, ``all`` or ``any``. A sample is kept when ``P(keep) >= 0.5``.

Section 5.1 of the paper also uses two dataset-level quality estimators, which
`estimate_quality` returns: the retained fraction ``|kept| / n`` and the mean mimic score
``(1/n) sum_i m_i`` (``m_i`` being sample ``i``'s mean mimic score over its records).

Everything is vectorised (numpy ``bincount`` / sort + prefix sums over the records of the
score log, read shard by shard); there are no Python loops over samples or records.

Modules, in the order the data flows: `inputs` (the one place that converts paths, pandas, Arrow
and `datasets` inputs, with `shards` checking a log's files), `records` (score-log chunks -> per-record
arrays), `windows` (optimizer steps -> windows), `reduction` (records -> per-sample window means and
signals, `WindowedScores`), `engines` (one module per engine behind one registry: `memory`, `outofcore`
(the default, bounded memory) and `ray`), `identification` (with `clustering`), `labeling` (votes) and `signals` (continuous values),
`aggregation` (votes -> P(keep)) and `posterior` (signals and votes -> P(keep)), `decide` (-> table and summary), `result` (`MimicFilter`, with `matching`, `matrices` and `stream`),
`build` (`build_filter`, `estimate_quality`) and `warning` (`FilterWarning`).
"""

from __future__ import annotations

from .aggregation import (
    ABSTAIN,
    AGGREGATES,
    DEFAULT_AGGREGATE,
    DISCARD,
    KEEP,
    LABEL_MODEL_EPOCHS,
    LABEL_MODEL_FIT_ROWS,
    LABEL_MODEL_LR,
    VOTE_AGGREGATES,
    aggregate_votes,
)
from .build import build_filter, estimate_quality
from .clustering import GaussianMixture1D, fit_gmm_1d, kmeans_1d
from .engines import ENGINES, Engine, get_engine
from .engines.memory import MAX_MATRIX_CELLS, collect_windows
from .engines.outofcore import collect_windows_streaming
from .engines.ray import collect_windows_ray
from .identification import (
    DEFAULT_METHOD,
    METHODS,
    Identification,
    identify,
    identify_gmm,
    identify_kmeans,
    identify_threshold,
    identify_topk,
)
from .inputs import ScoresLike
from .labeling import (
    DEFAULT_LABELING_FUNCTIONS,
    DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN,
    LabelingContext,
    LabelingFunction,
    LabelingVotes,
    LossWindows,
    PredictorAgreement,
    PredictorMargin,
    ScoringFunction,
)
from .posterior import DEFAULT_DEGREES_OF_FREEDOM, MixtureFit, keep_posterior
from .records import SIGNAL_COLUMNS
from .reduction import WindowedScores
from .result import SUMMARY_FILENAME, TABLE_FILENAME, MimicFilter
from .shards import BAD_SHARD_POLICIES, BadShardError
from .signals import SIGNAL_NAMES, LabelingScores, WindowSignal
from .warning import FilterWarning
from .windows import WindowsLike

# The public names of every submodule: users import them from `hf_gradmimic.filter`, not from where they live.
__all__ = [
    "ABSTAIN",
    "AGGREGATES",
    "BAD_SHARD_POLICIES",
    "DEFAULT_AGGREGATE",
    "DEFAULT_DEGREES_OF_FREEDOM",
    "DEFAULT_LABELING_FUNCTIONS",
    "DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN",
    "DEFAULT_METHOD",
    "DISCARD",
    "ENGINES",
    "KEEP",
    "LABEL_MODEL_EPOCHS",
    "LABEL_MODEL_FIT_ROWS",
    "LABEL_MODEL_LR",
    "MAX_MATRIX_CELLS",
    "METHODS",
    "SIGNAL_COLUMNS",
    "SIGNAL_NAMES",
    "SUMMARY_FILENAME",
    "TABLE_FILENAME",
    "VOTE_AGGREGATES",
    "BadShardError",
    "Engine",
    "FilterWarning",
    "GaussianMixture1D",
    "Identification",
    "LabelingContext",
    "LabelingFunction",
    "LabelingScores",
    "LabelingVotes",
    "LossWindows",
    "MimicFilter",
    "MixtureFit",
    "PredictorAgreement",
    "PredictorMargin",
    "ScoringFunction",
    "ScoresLike",
    "WindowSignal",
    "WindowedScores",
    "WindowsLike",
    "aggregate_votes",
    "build_filter",
    "collect_windows",
    "collect_windows_ray",
    "collect_windows_streaming",
    "estimate_quality",
    "fit_gmm_1d",
    "get_engine",
    "identify",
    "identify_gmm",
    "identify_kmeans",
    "identify_threshold",
    "identify_topk",
    "keep_posterior",
    "kmeans_1d",
]
