r"""AGRA: a sample's gradient cosine with a comparison batch's mean gradient (Sedova, Zellinger, Roth, ECML PKDD 2023).

"Learning with noisy labels by adaptive gradient-based outlier removal":

.. math:: \cos_i = \frac{\langle g_i, G\rangle}{\lVert g_i\rVert\,\lVert G\rVert + 10^{-6}}

over every mimic tensor flattened together, with ``G`` the mean gradient of a batch drawn independently
from the training set (`comparison_gradient`). ``⟨g_i, G⟩`` is a ghost inner product and ``‖g_i‖`` the ghost
norm; the ``10⁻⁶`` is the authors' and makes a zero gradient score 0. A sample with ``cos ≤ threshold`` is
excluded from the update.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ghost import GhostBatch
from .base import ComparisonGrad, SampleScorer, ScoreContext
from .grand import grand_scores

AGRA_EPS = 1e-6
"""Added to ``‖g_i‖·‖G‖`` in the AGRA cosine, as the authors' code does: a zero gradient scores 0."""


def comparison_gradient(ghost: GhostBatch) -> dict[str, torch.Tensor]:
    r"""Mean gradient of a comparison batch over the mimic tensors (AGRA's aggregated gradient):
    ``G = (1/B_c) Σ_i g_i``, from the batch's summed-loss gradient (one matmul per use, not per-sample gradients)."""
    return {key: grad / ghost.batch_size for key, grad in ghost.summed_gradient().items()}


def agra_cosine(ghost: GhostBatch, comparison: ComparisonGrad) -> torch.Tensor:
    """``cos(g_i, G)`` per sample (Sedova et al. 2023)."""
    inner = ghost.inner_product(comparison)
    comparison_norm = torch.sqrt(sum(comparison[key].float().square().sum() for key in ghost.tensor_keys))
    return inner / (grand_scores(ghost) * comparison_norm + AGRA_EPS)


class AgraScorer(SampleScorer):
    """AGRA (Sedova et al., ECML PKDD 2023): samples with ``cos ≤ threshold`` are excluded from the update.

    AGRA's decision is absolute (the number kept varies per batch), so its only mode is ``"reweight"`` as a
    filter: weight 0 at or below the threshold, uniform over the kept samples (its update is their plain mean
    loss). ``ctx.comparison_grad`` is `comparison_gradient` of a batch drawn independently from the training
    set (or a callable producing it).
    """

    name = "agra"
    needs_output_grads = True
    requires = ("ghost", "comparison_grad")
    supports_modes = frozenset({"reweight"})
    default_mode = "reweight"
    refused_modes = {
        "select": "AGRA is a filter with an absolute threshold (a sample is kept when its cosine with the "
        "comparison gradient exceeds it), not a ranking; use mode='reweight', which excludes the samples at "
        "or below the threshold and weights the rest uniformly",
    }

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)
        self.filter_threshold = self.threshold

    @classmethod
    def from_config(cls, args: Any, **runtime: Any) -> AgraScorer:
        return cls(threshold=args.mimic_agra_threshold)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        comparison = ctx.require("comparison_grad", self.name)
        if callable(comparison):
            comparison = comparison()
        return agra_cosine(self.require_ghost(ctx), comparison)

    def __repr__(self) -> str:
        return f"AgraScorer(threshold={self.threshold})"
