"""The scorer interface: what a sample-utility method reads (`ScoreContext`) and how its scores become weights.

A scorer returns one float32 score per sample, **higher = more useful**, from a `ScoreContext` (what the
trainer has after its hooked forward). Scores become the logits of the step-wide softmax through
`SampleScorer.softmax_logits`, in one of two modes:

- ``"reweight"``: ``s = score / τ``, so ``w = softmax(s)`` over the batch (Grad-Mimic's own update,
  Huang et al., arXiv 2501.06708);
- ``"select"``: ``s = 0`` for the top ``ratio`` of the candidate batch and ``−inf`` elsewhere, so the
  kept ``k`` samples get ``1/k`` (the online batch selection of RHO-LOSS and Bayesian data selection).

A logit of ``−inf`` means weight 0. A scorer that is a filter rather than a ranking (AGRA) sets
``filter_threshold``: in reweight mode it keeps the samples above it, with uniform weight.
`check_mode` refuses the combinations that have no meaning (``refused_modes``).
Stateful scorers keep their state in `state_dict`, which the trainer saves in every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..ghost import GhostBatch

MODES: tuple[str, ...] = ("reweight", "select")

ComparisonGrad = Mapping[str, torch.Tensor]
"""``{"layer.weight": G_w, "layer.bias": G_b}``: a dense gradient over the mimic tensors."""


@dataclass
class ScoreContext:
    """What the trainer has for one (micro-)batch of ``B`` samples; each scorer reads a few fields.

    Args:
        losses: per-sample losses ``ℓ_i``, float32 ``[B]``.
        logits: the student's logits (``[B, C]`` for classification).
        labels: the labels of the batch.
        ghost: every use of the mimic tensors with its input and output gradient (`hf_gradmimic.ghost`);
            set when the scorer ``needs_output_grads``.
        activations: ``{layer: a}``, each mimic layer's input (detached), also without output gradients.
        features: ``φ``, the input of the classification head ``[B, d]`` (Bayesian selection).
        direction: Grad-Mimic's ``v = θ_ref − θ_t`` keyed by mimic tensor (``"head.weight"``), when given
            from outside; otherwise the Grad-Mimic scorer forms it from its reference.
        direction_norm: ``‖v‖₂`` over all of ``direction``.
        reference_logits: a reference (irreducible-loss) model's logits on the batch (RHO-LOSS).
        irreducible_losses: precomputed irreducible losses ``[B]`` (RHO-LOSS).
        zero_shot_log_probs: ``log p_zs(c | x)`` ``[B, C]`` (Bayesian selection).
        comparison_grad: AGRA's mean gradient of a comparison batch, or a zero-argument callable returning
            it (so that it is only computed when a scorer asks).
        inputs: the model inputs of the batch, for scorers that run another model on it.
        extras: the batch columns the scorer asked for (``extra_columns``), popped before the forward.
        step: the optimizer step, for scorers that cache something per step.
        sample_keys: each sample's row in the training set, for scorers whose randomness must not depend on
            where the sample is scored (process, micro-batch).
    """

    losses: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ghost: GhostBatch | None = None
    activations: Mapping[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    direction: Mapping[str, torch.Tensor] | None = None
    direction_norm: torch.Tensor | float | None = None
    reference_logits: torch.Tensor | None = None
    irreducible_losses: torch.Tensor | None = None
    zero_shot_log_probs: torch.Tensor | None = None
    comparison_grad: ComparisonGrad | Callable[[], ComparisonGrad] | None = None
    inputs: Mapping[str, Any] | None = None
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    sample_keys: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.losses.shape[0])

    def require(self, name: str, scorer: str) -> Any:
        """The field ``name``, or a ValueError saying which scorer needs it."""
        value = getattr(self, name)
        if value is None or (isinstance(value, Mapping) and not value):
            raise ValueError(f"The {scorer!r} scorer needs `ScoreContext.{name}`, which is not set.")
        return value


def num_selected(batch_size: int, ratio: float) -> int:
    """``k = max(1, ⌊ratio · B⌋)`` (the authors' ``int(B * select_rate)``, at least one)."""
    return max(1, int(math.floor(ratio * batch_size + 1e-9)))


def top_k_logits(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Softmax logits that keep the ``k = max(1, ⌊ratio·B⌋)`` highest scores: 0 there, ``−inf`` elsewhere.
    NaN ranks last; ties go to the earlier sample."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1]; got {ratio}.")
    ranked = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    order = torch.sort(ranked, descending=True, stable=True).indices
    logits = torch.full_like(scores, -math.inf)
    logits[order[: num_selected(scores.numel(), ratio)]] = 0.0
    return logits


def threshold_logits(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """A filter's softmax logits: 0 for ``score > threshold``, ``−inf`` otherwise (NaN excluded)."""
    return torch.where(scores > threshold, 0.0, -math.inf).to(scores.dtype)


def softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """softmax, or all zeros when every logit is −inf (a filter excluded the whole batch: nothing to learn from)."""
    if not torch.isfinite(logits).any():
        return torch.zeros_like(logits)
    return torch.softmax(logits, dim=0)


def weights_from_scores(
    scores: torch.Tensor,
    mode: str,
    temperature: float = 1.0,
    ratio: float = 0.1,
    threshold: float | None = None,
) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (summing to 1, or all 0 for an empty filter) from scores.

    - ``"reweight"``: ``softmax(scores / temperature)``; a batch with a non-finite score gets
      uniform weights (as `MimicTrainer` does). With ``threshold`` set (a filter, AGRA): weight 0
      for ``score ≤ threshold`` (and NaN), uniform over the rest, and all zeros if none is kept:
      the caller should then skip the batch, as AGRA does.
    - ``"select"``: the ``k = max(1, ⌊ratio·B⌋)`` highest scores get ``1/k``, the rest 0. NaN
      ranks last; ties go to the earlier sample.

    This is the softmax of one micro-batch; a trainer normalising over a whole optimizer step
    uses the same logits in its online softmax instead.
    """
    check_mode_name(mode)
    scores = scores.detach().float()
    if mode == "select":
        return softmax_or_zero(top_k_logits(scores, ratio))
    if threshold is not None:
        return softmax_or_zero(threshold_logits(scores, threshold))
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature}.")
    if not torch.isfinite(scores).all():
        return torch.full_like(scores, 1.0 / scores.numel())
    return torch.softmax(scores / temperature, dim=0)


def check_mode_name(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid modes: {', '.join(MODES)}.")


def check_mode(scorer: SampleScorer, mode: str) -> None:
    """Raise a ValueError if ``scorer`` cannot run in ``mode``, saying why."""
    check_mode_name(mode)
    if mode not in scorer.supports_modes:
        reason = scorer.refused_modes.get(mode, "")
        raise ValueError(
            f"The {scorer.name!r} scorer does not support mode {mode!r}{': ' + reason if reason else ''}. "
            f"Supported: {', '.join(sorted(scorer.supports_modes))}."
        )


class SampleScorer:
    """One sample-utility method: ``score(ctx) -> Tensor[B]`` (higher = more useful).

    Class attributes tell the trainer what to prepare:

    - ``needs_output_grads``: run ``autograd.grad(Σℓ, layer outputs)`` and fill ``ctx.ghost``;
    - ``requires``: the `ScoreContext` fields `score` reads;
    - ``supports_modes`` / ``default_mode``; ``refused_modes`` says why a mode is refused;
    - ``monitors_reference``: it scores against reference weights of the mimic layers, so the trainer
      runs the reference diagnostics (alignment check, running monitor) for it;
    - ``observes``: `observe` updates a state from the trained samples, so the trainer hands it every
      process's trained samples of the step (the state stays identical on every process);
    - ``supports_batch_coupled``: it can score under a batch-coupled loss (a contrastive one), where
      ``ctx.ghost`` offers only ``inner_product`` (`hf_gradmimic.training.coupled`).

    Instances list the batch columns they read in ``extra_columns`` (the trainer pops them before the
    forward and hands them over as ``ctx.extras``). `observe` is called with the final weights after each
    scored batch (stateful scorers update there); `end_step` after each optimizer step; `state_dict` /
    `load_state_dict` go into and come back from the trainer's checkpoints.
    """

    name: ClassVar[str] = ""
    needs_output_grads: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    supports_modes: ClassVar[frozenset[str]] = frozenset(MODES)
    default_mode: ClassVar[str] = "reweight"
    refused_modes: ClassVar[dict[str, str]] = {}
    monitors_reference: ClassVar[bool] = False
    observes: ClassVar[bool] = False
    supports_batch_coupled: ClassVar[bool] = False
    extra_columns: tuple[str, ...] = ()
    filter_threshold: float | None = None

    @classmethod
    def from_config(cls, args: Any, **runtime: Any) -> SampleScorer:
        """The scorer with its options from a `MimicConfig` (``mimic_<name>_*`` fields) and what only the trainer
        has (``runtime``: ``reference``, ``zero_shot``, ``num_train_samples``, ``layers``, ``token``)."""
        return cls()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def softmax_logits(
        self, scores: torch.Tensor, mode: str, temperature: float = 1.0, ratio: float = 0.1
    ) -> torch.Tensor:
        """The step softmax's logits for these scores: ``scores / τ`` (reweight), 0/−inf at ``filter_threshold``
        (reweight, for a filter such as AGRA) or 0/−inf for the top ``ratio`` (select)."""
        if mode == "select":
            return top_k_logits(scores, ratio)
        if self.filter_threshold is not None:
            return threshold_logits(scores, self.filter_threshold)
        return scores / temperature

    def weights(
        self, scores: torch.Tensor, mode: str | None = None, temperature: float = 1.0, ratio: float = 0.1
    ) -> torch.Tensor:
        """`weights_from_scores` over this batch alone, after `check_mode` (``mode`` defaults to ``default_mode``)."""
        mode = mode or self.default_mode
        check_mode(self, mode)
        return weights_from_scores(scores, mode, temperature=temperature, ratio=ratio, threshold=self.filter_threshold)

    def observe(self, ctx: ScoreContext, weights: torch.Tensor) -> None:
        """Called after the batch is weighted; stateless scorers ignore it."""

    def describe(self) -> dict[str, Any]:
        """What identifies this scorer's scores beyond its name and options (e.g. Grad-Mimic's reference), for the
        score log's provenance and the cards."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Values to log for the optimizer step that just ended (``mimic/...``), read before `end_step`."""
        return {}

    def end_step(self) -> None:
        """Called after each optimizer step; scorers that cache per-step values drop them here."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def require_ghost(self, ctx: ScoreContext) -> GhostBatch:
        """``ctx.ghost``, or a ValueError naming this scorer."""
        return ctx.require("ghost", self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
