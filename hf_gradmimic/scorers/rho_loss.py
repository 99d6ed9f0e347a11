r"""RHO-LOSS: the reducible loss, the student's loss minus a holdout model's (Mindermann et al., ICML 2022).

"Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt":

.. math:: \mathrm{RHO}_i = L[y_i \mid x_i; \mathcal D_t] - L[y_i \mid x_i; \mathcal D_{ho}]

The irreducible loss ``L[y_i | x_i; D_ho]`` comes from a precomputed column, from reference logits, or
from an irreducible-loss model run on the batch. The paper selects the top 10% of each candidate batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..losses import is_causal_lm, logits_of, sequence_classification_loss, token_loss
from .base import SampleScorer, ScoreContext


def reference_losses(
    reference_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, shift_labels: bool = False
) -> torch.Tensor:
    """Per-sample losses of a reference model's logits, with the student's loss conventions
    (`hf_gradmimic.losses`: cross entropy for ``[B, C]``, mean token loss for ``[B, T, V]``)."""
    if reference_logits.dim() == 3:
        return token_loss(reference_logits, labels, label_smoothing, shift=shift_labels)
    return sequence_classification_loss(reference_logits, labels, label_smoothing)


def reducible_loss(losses: torch.Tensor, irreducible_losses: torch.Tensor) -> torch.Tensor:
    """``ℓ_i − ℓ^IL_i`` (Mindermann et al. 2022): the student's loss minus the irreducible loss."""
    return losses.float() - irreducible_losses.to(losses.device).float()


class RhoLossScorer(SampleScorer):
    """RHO-LOSS (Mindermann et al., ICML 2022): reducible loss ``ℓ_i − ℓ^IL_i`` (`reducible_loss`).

    The irreducible loss ``ℓ^IL`` comes from, in this order: the batch column ``irreducible_loss_column``
    (``ctx.extras``), ``ctx.irreducible_losses``, ``ctx.reference_logits``, or ``reference`` given here: an
    ``nn.Module`` run without grad on ``ctx.inputs`` (labels dropped; put in eval mode here), or a callable
    ``(ctx) -> logits``. Reference logits get the student's loss conventions (``label_smoothing``,
    ``shift_labels`` for causal LMs). The paper selects the top 10% of each candidate batch (``"select"``,
    ratio 0.1); ``"reweight"`` is a soft variant not in the paper.
    """

    name = "rho_loss"
    needs_output_grads = False
    requires = ("losses",)
    default_mode = "select"

    def __init__(
        self,
        reference: nn.Module | Callable[[ScoreContext], torch.Tensor] | None = None,
        label_smoothing: float = 0.0,
        shift_labels: bool = False,
        irreducible_loss_column: str | None = None,
    ) -> None:
        if isinstance(reference, nn.Module):
            reference.eval()
        self.reference = reference
        self.label_smoothing = label_smoothing
        self.shift_labels = shift_labels
        self.irreducible_loss_column = irreducible_loss_column
        self.extra_columns = (irreducible_loss_column,) if irreducible_loss_column else ()

    @classmethod
    def from_config(
        cls, args: Any, *, reference: Any = None, model: nn.Module | None = None, **runtime: Any
    ) -> RhoLossScorer:
        column = args.mimic_irreducible_loss_column
        irreducible_model = reference if isinstance(reference, nn.Module) else None
        if column is None and irreducible_model is None:
            raise ValueError(
                "mimic_scorer='rho_loss' needs the irreducible loss: pass the irreducible-loss model as "
                "`reference=` (a model trained on holdout data), or set `mimic_irreducible_loss_column`."
            )
        return cls(
            reference=irreducible_model,
            label_smoothing=args.label_smoothing_factor,
            # the student's loss convention (`hf_gradmimic.losses`): a causal LM's position t predicts token t + 1
            shift_labels=model is not None and is_causal_lm(model),
            irreducible_loss_column=column,
        )

    def irreducible_losses(self, ctx: ScoreContext) -> torch.Tensor:
        if self.irreducible_loss_column in ctx.extras:
            return ctx.extras[self.irreducible_loss_column].float()
        if ctx.irreducible_losses is not None:
            return ctx.irreducible_losses
        logits = ctx.reference_logits
        if logits is None:
            logits = self._reference_logits(ctx)
        labels = ctx.require("labels", self.name)
        return reference_losses(logits, labels, self.label_smoothing, self.shift_labels)

    def _reference_logits(self, ctx: ScoreContext) -> torch.Tensor:
        if self.reference is None:
            raise ValueError(
                "The 'rho_loss' scorer needs irreducible losses: set `ScoreContext.irreducible_losses` (e.g. an "
                "`irreducible_loss` column), `ScoreContext.reference_logits`, or pass `reference=` (a model or a "
                "callable returning logits) to the scorer."
            )
        with torch.no_grad():
            if isinstance(self.reference, nn.Module):
                inputs = {k: v for k, v in ctx.require("inputs", self.name).items() if k != "labels"}
                return logits_of(self.reference(**inputs)).detach()
            return self.reference(ctx).detach()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return reducible_loss(ctx.require("losses", self.name), self.irreducible_losses(ctx))
