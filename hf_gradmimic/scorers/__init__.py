"""Sample-utility scorers: Grad-Mimic and its rivals behind one interface, one file each, registered by name.

===========  ==================  =================  ===========================================
name         needs output grads  modes              reads from the context
===========  ==================  =================  ===========================================
mimic        yes                 reweight, select   ghost (and its own reference)
grand        yes                 select, reweight   ghost
agra         yes                 reweight (filter)  ghost, comparison_grad
rho_loss     no                  select, reweight   irreducible loss column | reference logits | model
bayesian     no                  select             logits, labels, features, zero-shot log-probs
clip_score   no                  select, reweight   inputs (a reference image–text model runs on them)
===========  ==================  =================  ===========================================

`SCORERS` maps names to classes and `get_scorer(name, **kwargs)` builds one; `scorer_from_config` builds the
one a `MimicConfig` names, with every option from its ``mimic_*`` fields. Every ghost quantity needs
``δ = ∂(Σ_i ℓ_i)/∂z`` at each use's output: the gradient of the **sum** of per-sample losses, so that row
``i`` is ``∂ℓ_i/∂z_i``. All maths runs in float32 (float64 for the Bayesian Cholesky factors).
"""

from __future__ import annotations

from typing import Any

from .agra import AGRA_EPS, AgraScorer, agra_cosine, comparison_gradient
from .base import (
    MODES,
    ComparisonGrad,
    SampleScorer,
    ScoreContext,
    check_mode,
    num_selected,
    softmax_or_zero,
    top_k_logits,
    weights_from_scores,
)
from .bayesian import (
    BayesianScorer,
    bayesian_selection_score,
    ce_logit_grad,
    laplace_logit_samples,
    moving_average_factor,
)
from .clip_score import ClipScoreScorer, clip_score_of
from .grand import GrandScorer, grand_scores
from .mimic import SCORE_TERMS, MimicScorer, mimic_scores
from .rho_loss import RhoLossScorer, reducible_loss, reference_losses

SCORERS: dict[str, type[SampleScorer]] = {
    cls.name: cls for cls in (MimicScorer, GrandScorer, AgraScorer, RhoLossScorer, BayesianScorer, ClipScoreScorer)
}


def get_scorer(name: str, **kwargs: Any) -> SampleScorer:
    """An instance of the scorer registered as ``name``, built with ``kwargs``."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; valid names: {', '.join(SCORERS)}.") from None
    return cls(**kwargs)


def scorer_from_config(args: Any, **runtime: Any) -> SampleScorer:
    """The scorer ``args.mimic_scorer`` names, with its options from ``args`` and ``runtime`` (see
    `SampleScorer.from_config`)."""
    try:
        cls = SCORERS[args.mimic_scorer]
    except KeyError:
        raise ValueError(f"Unknown scorer {args.mimic_scorer!r}; valid names: {', '.join(SCORERS)}.") from None
    return cls.from_config(args, **runtime)


__all__ = [
    "AGRA_EPS",
    "MODES",
    "SCORERS",
    "SCORE_TERMS",
    "AgraScorer",
    "BayesianScorer",
    "ClipScoreScorer",
    "ComparisonGrad",
    "GrandScorer",
    "MimicScorer",
    "RhoLossScorer",
    "SampleScorer",
    "ScoreContext",
    "agra_cosine",
    "bayesian_selection_score",
    "ce_logit_grad",
    "check_mode",
    "clip_score_of",
    "comparison_gradient",
    "get_scorer",
    "grand_scores",
    "laplace_logit_samples",
    "mimic_scores",
    "moving_average_factor",
    "num_selected",
    "reducible_loss",
    "reference_losses",
    "scorer_from_config",
    "softmax_or_zero",
    "top_k_logits",
    "weights_from_scores",
]
