r"""GraNd: the per-sample gradient norm over the mimic layers (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021).

.. math:: \mathrm{GraNd}_i = \Big(\sum_l \lVert g^l_i\rVert^2\Big)^{1/2}

from the ghost squared norms of `hf_gradmimic.ghost` (``‖δ_i‖²‖a_i‖²`` for a 2-D linear layer): no
per-sample gradient is built, except for a tensor that several modules share. The paper averages the
norm over several initialisations early in training and prunes the low scores once; here it is the
current model's norm, used online (keep the high scores).
"""

from __future__ import annotations

import torch

from ..ghost import GhostBatch
from .base import SampleScorer, ScoreContext


def grand_scores(ghost: GhostBatch) -> torch.Tensor:
    """``‖g_i‖₂`` over every mimic tensor (Paul et al. 2021)."""
    # The Gram form is a sum of products that can round to a tiny negative number.
    return ghost.sq_norm().clamp_min(0.0).sqrt()


class GrandScorer(SampleScorer):
    """GraNd (Paul et al. 2021): ``"select"`` keeps the highest norms (the paper prunes the lowest); ``"reweight"``
    is a soft variant ``softmax(‖g_i‖/τ)`` that is not in the paper."""

    name = "grand"
    needs_output_grads = True
    requires = ("ghost",)
    default_mode = "select"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return grand_scores(self.require_ghost(ctx))
