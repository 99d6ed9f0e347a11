r"""Grad-Mimic's score: how well a sample's negative gradient points from the current weights toward a reference.

Huang, Bilkhu, Sala, Movellan, "Evaluating Sample Utility for Data Selection by Mimicking Model Weights"
(arXiv 2501.06708, Algorithm 1), over the mimic tensors with ``v = θ_ref − θ_t``:

.. math:: m_i = \frac{\langle -g_i,\ v\rangle}{\lVert v\rVert_2},\qquad w_i = \operatorname{softmax}_i(m_i/\tau)

(the paper prints ``exp(−m_i/τ)``, a typo). ``⟨g_i, v⟩`` is a ghost inner product (`hf_gradmimic.ghost`).
For a head, ``m_i`` splits into the reference's margin on the student's features, ``−⟨g_i, θ_ref⟩/‖v‖``,
plus the student's own, ``⟨g_i, θ_t⟩/‖v‖`` (`MimicScorer.score_terms`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..ghost import GhostBatch
from .base import SampleScorer, ScoreContext

SCORE_TERMS: tuple[str, ...] = ("full", "reference")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """A content hash of ``{name: tensor}`` (names and float32 values, in name order): which reference was used."""
    if not tensors:
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


_RESCALE_ABOVE = 2.0**60
"""‖θ_ref − θ‖ from which `MimicScorer` scores with a rescaled direction (float32 inner products would overflow)."""


def mimic_scores(
    ghost: GhostBatch, direction: Mapping[str, torch.Tensor], direction_norm: torch.Tensor | float
) -> torch.Tensor:
    r"""``m_i = ⟨−g_i, v⟩ / ‖v‖₂`` (Huang et al., arXiv 2501.06708, Alg. 1), NaN for every sample when ``‖v‖ = 0``.

    .. math:: m_i = -\frac{1}{\lVert v\rVert}\sum_{\text{uses}}\Big(\sum_t \delta_{i,t}^\top V a_{i,t}
              + \big\langle \textstyle\sum_t \delta_{i,t},\ v_b\big\rangle\Big)\quad\text{(for a linear layer)}
    """
    return -ghost.inner_product(direction) / direction_norm


class MimicScorer(SampleScorer):
    """Grad-Mimic (arXiv 2501.06708): ``m_i = ⟨−g_i, θ_ref − θ_t⟩ / ‖θ_ref − θ_t‖`` (`mimic_scores`).

    Args:
        reference: ``θ_ref`` per mimic tensor (``{"classifier.weight": ...}``), as `MimicLayers.load_reference`
            reads it; not needed when every context carries its own ``direction``.
        current_tensors: returns ``θ_t`` per mimic tensor (whole under FSDP2: called on every rank).
        score_terms: ``"full"`` (the paper) or ``"reference"``: only the reference-margin term ``−⟨g_i, θ_ref⟩/‖v‖``.
        reference_name: the reference's name, for messages and cards.

    ``v`` is formed once per optimizer step and dropped at its end (`end_step`): for an ``lm_head`` it is as
    large as the layer. The paper reweights (``softmax(m/τ)``); ``"select"`` keeps the top ``ratio`` by ``m``.
    """

    name = "mimic"
    needs_output_grads = True
    requires = ("ghost",)
    default_mode = "reweight"
    monitors_reference = True
    supports_batch_coupled = True  # it reads only ⟨g_i, v⟩, a directional derivative

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor] | None = None,
        current_tensors: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        score_terms: str = "full",
        reference_name: str | None = None,
        reference_revision: str | None = None,
    ) -> None:
        if score_terms not in SCORE_TERMS:
            raise ValueError(f"`score_terms` must be one of {SCORE_TERMS}; got {score_terms!r}.")
        self.reference = dict(reference or {})
        self.current_tensors = current_tensors
        self.score_terms_mode = score_terms
        self.reference_name = reference_name
        self.reference_revision = reference_revision
        self.reference_sha256 = tensors_sha256(self.reference)
        # (step, v / scale, ‖v‖ / scale, scale): scale 1 unless ‖v‖ is too large for float32 arithmetic
        self._direction: tuple[int, dict[str, torch.Tensor], torch.Tensor, float] | None = None
        self._last_norm = float("nan")
        self._moved = False

    @classmethod
    def from_config(cls, args: Any, *, reference: Any = None, layers: Any = None, **runtime: Any) -> MimicScorer:
        source = reference if reference is not None else args.mimic_reference
        tensors = layers.load_reference(source, revision=args.mimic_reference_revision, token=args.hub_token)
        return cls(
            tensors,
            layers.current_tensors,
            args.mimic_score_terms,
            layers.describe_source(source),
            args.mimic_reference_revision,
        )

    def reference_on_device(self) -> dict[str, torch.Tensor]:
        """``θ_ref``, moved next to the student's parameters at the first call (every rank makes it at the same
        point: reading the parameters all-gathers them under FSDP2)."""
        if not self._moved and self.current_tensors is not None and self.reference:
            current = self.current_tensors()
            self.reference = {key: tensor.to(current[key].device) for key, tensor in self.reference.items()}
            self._moved = True
        return self.reference

    def direction(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``v = θ_ref − θ_t`` over the mimic tensors, and ``‖v‖``, both divided by the same power of two when ``‖v‖``
        is too large for float32 arithmetic (their ratio, the score's, is unchanged); formed once per optimizer step."""
        if self._direction is None or self._direction[0] != step:
            if self.current_tensors is None:
                raise ValueError("The 'mimic' scorer needs `ScoreContext.direction` or `current_tensors=`.")
            current = self.current_tensors()
            reference = self.reference_on_device()
            direction = {key: reference[key] - current[key].float() for key in reference}
            # ‖v‖² in float64: in float32 it overflows from |v| ≈ 1e19 (a reference of another scale), which made
            # every score 0 (or NaN) without a word.
            norm = torch.sqrt(
                sum(torch.linalg.vector_norm(v, dtype=torch.float64).square() for v in direction.values())
            )
            self._last_norm = float(norm)
            scale = 1.0
            if self._last_norm >= _RESCALE_ABOVE and math.isfinite(self._last_norm):
                # ⟨g, v⟩ would overflow float32 too: score with v / 2^k and ‖v‖ / 2^k (exact, the same ratio).
                scale = 2.0 ** math.floor(math.log2(self._last_norm))
                for tensor in direction.values():
                    tensor.div_(scale)
            self._direction = (step, direction, (norm / scale).float(), scale)
        return self._direction[1], self._direction[2]

    def scored_direction(self, step: int) -> dict[str, torch.Tensor] | None:
        """``v = θ_ref − θ_t`` exactly as `score` takes ``⟨g_i, v⟩`` at ``step`` (the very tensors), for a caller that
        forms part of that inner product itself and hands it to the ghost (`GhostBatch.remember_inner_product`: the
        reference's verdict on a head). None where the score reads another direction: ``score_terms="reference"``,
        or ``v`` rescaled for float32 (then ``θ_ref ≠ θ_t + v``)."""
        if self.score_terms_mode != "full":
            return None
        direction, _ = self.direction(step)
        return direction if self._direction[3] == 1.0 else None

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        ghost = self.require_ghost(ctx)
        if ctx.direction is not None:
            return mimic_scores(ghost, ctx.direction, ctx.require("direction_norm", self.name))
        direction, norm = self.direction(ctx.step)
        if self.score_terms_mode == "reference":
            return mimic_scores(ghost, self.reference_on_device(), norm * self._direction[3])
        return mimic_scores(ghost, direction, norm)

    def score_terms(self, ghost: GhostBatch, scores: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of ``m_i``: ``−⟨g_i, θ_ref⟩/‖v‖`` (the reference's margin on the student's features, for a
        head) and ``⟨g_i, θ_t⟩/‖v‖`` (the student's own); they sum to the full score. ``scores`` is already one of
        them (the full score, or with ``score_terms="reference"`` the reference term), so one more ghost inner
        product gives both."""
        _, scaled_norm = self.direction(step)
        norm = scaled_norm * self._direction[3]
        if self.score_terms_mode == "reference":
            current = {key: tensor.float() for key, tensor in self.current_tensors().items()}
            return scores, ghost.inner_product(current) / norm
        reference_term = mimic_scores(ghost, self.reference_on_device(), norm)
        return reference_term, scores - reference_term

    def describe(self) -> dict[str, Any]:
        """The reference: its source, the revision asked for, and a hash of the tensors actually used."""
        return {
            "reference": {
                "source": self.reference_name,
                "revision": self.reference_revision,
                "tensors_sha256": self.reference_sha256,
            },
            "score_terms": self.score_terms_mode,
        }

    def step_metrics(self) -> dict[str, float]:
        return {"mimic/direction_norm": self._last_norm}

    def end_step(self) -> None:
        self._direction = None  # v is as large as the mimic layers (vocabulary × hidden for an lm_head)
        self._last_norm = float("nan")

    def __repr__(self) -> str:
        return f"MimicScorer(reference={self.reference_name!r}, score_terms={self.score_terms_mode!r})"
