r"""Scores under a batch-coupled loss: the directional derivative of every sample's loss along a direction, without per-sample gradients.

In a contrastive loss (`hf_gradmimic.contrastive`) sample ``i``'s term ``ℓ_i`` depends on every sample of
the batch, so row ``i`` of ``δ = ∂Σℓ/∂z`` is not ``∂ℓ_i/∂z_i`` and the ghost maths (`hf_gradmimic.ghost`)
do not apply. Grad-Mimic's score (Huang et al., arXiv 2501.06708) only needs ``⟨∇_θ ℓ_i, v⟩``, the
directional derivative of ``ℓ_i`` along ``v``, with the whole batch in the forward. By the chain rule over
every use ``u`` of the mimic tensors,

.. math:: \langle \nabla_\theta \ell_i, v\rangle = \sum_u \Big\langle \frac{\partial \ell_i}{\partial z^u},\ dz^u \Big\rangle,

where ``dz^u`` is the change of the use's output along ``v`` (`hf_gradmimic.ghost.GhostRule.output_along`:
the layer applied with its parameters replaced by ``v``). All ``i`` at once, by a double backward: with a
dummy weighting ``r = 1``, ``G^u(r) = ∂(Σ_i r_i ℓ_i)/∂z^u`` is linear in ``r``, so
``∂/∂r_i Σ_u ⟨G^u(r), dz^u⟩`` is the ``i``-th directional derivative. The cost is one backward with
``create_graph`` of the part between the mimic layers and the loss, and one backward of that per direction;
under several processes the gradient of the gathered negatives crosses ranks in both (see
`hf_gradmimic.contrastive.gather_rows`). Nothing here is per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..ghost import UnsupportedLayerError, ghost_rule_for
from .capture import Capture

SECOND_ORDER_HINT = (
    "Scores under a batch-coupled loss differentiate the backward from the mimic layers to the loss once more, and "
    "an operation between them has no second derivative in PyTorch ({error}). Fused attention kernels are the usual "
    'cause: load the model with `attn_implementation="eager"`, or pick mimic layers after the towers\' last '
    "attention (the last MLP layer, `...layers[-1].mlp.fc1`, as Grad-Mimic's DataComp runs do)."
)


class CoupledGhost:
    """Directional derivatives ``⟨∇_θ ℓ_i, v⟩`` of every sample's loss under a batch-coupled loss.

    Stands where a `hf_gradmimic.ghost.GhostBatch` stands for scorers that read only ``inner_product`` (Grad-Mimic):
    ``scorer.score(ctx)`` is unchanged. Per-sample norms and summed per-sample gradients have no such shortcut.

    Args:
        capture: the forward's recorded uses of the mimic tensors.
        losses: the per-sample losses ``[B]`` of that forward, with their graph.
    """

    def __init__(self, capture: Capture, losses: torch.Tensor) -> None:
        capture.check_ran()
        self.calls = list(capture.calls)
        capture.check_requires_grad(self.calls)
        self.weighting = torch.ones_like(losses, requires_grad=True)
        try:
            grads = torch.autograd.grad(
                (losses * self.weighting).sum(),
                [call.output for call in self.calls],
                create_graph=True,
                allow_unused=True,
            )
        except (RuntimeError, NotImplementedError) as error:
            raise _explained(error) from error
        capture.check_used(self.calls, grads)
        self.output_grads = grads
        self.rules = [ghost_rule_for(call.module, call.name) for call in self.calls]
        for call, rule in zip(self.calls, self.rules):
            if rule.output_along is None:
                raise UnsupportedLayerError(
                    f"Mimic layer {call.name!r} ({type(call.module).__name__}) has no `output_along` in its ghost rule, "
                    "which scores under a batch-coupled loss need."
                )

    @property
    def batch_size(self) -> int:
        return int(self.weighting.shape[0])

    def inner_product(self, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample ``⟨∇_θ ℓ_i, v⟩`` float32 ``[B]`` for ``direction`` keyed by mimic tensor (a missing key counts as 0)."""
        total = None
        for call, rule, grad in zip(self.calls, self.rules, self.output_grads):
            local = {own: direction[key] for own, key in call.tensor_keys.items() if key in direction}
            if not local:
                continue
            change = rule.output_along(call.module, call.activations, local)
            term = (grad.float() * change.to(grad.device)).sum()
            total = term if total is None else total + term
        if total is None:
            return self.weighting.new_zeros(self.batch_size).detach()
        try:
            (derivatives,) = torch.autograd.grad(total, self.weighting, retain_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError) as error:
            raise _explained(error) from error
        return torch.zeros_like(self.weighting) if derivatives is None else derivatives.detach()

    def sq_norm(self) -> torch.Tensor:
        raise NotImplementedError(
            "Per-sample gradient norms have no ghost shortcut under a batch-coupled loss (each ℓ_i depends on the whole "
            "batch); use a scorer that reads directional derivatives, such as 'mimic'."
        )

    def summed_gradient(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "Summed per-sample gradients are not available under a batch-coupled loss; use 'mimic'."
        )


def _explained(error: BaseException) -> BaseException:
    """A missing second derivative, said in our words; any other error unchanged."""
    text = str(error)
    if "derivative for" in text or "not implemented" in text.lower() or "forward AD" in text:
        return RuntimeError(SECOND_ORDER_HINT.format(error=text.splitlines()[0]))
    return error


def check_samples_independent(capture: Capture, losses: torch.Tensor) -> None:
    """Raise when a per-sample loss not marked batch-coupled makes sample 0's loss depend on another sample's row of a
    mimic layer's output (a contrastive loss, in-batch negatives, batch norm in training mode): the ghost maths would
    score it silently wrong. One backward, at the first scored batch."""
    if len(losses) < 2:
        return
    calls = [call for call in capture.calls if isinstance(call.output, torch.Tensor) and call.output.requires_grad]
    if not calls:
        return
    grads = torch.autograd.grad(losses[0], [call.output for call in calls], retain_graph=True, allow_unused=True)
    for call, grad in zip(calls, grads):
        if grad is not None and grad.shape[0] == len(losses) and bool((grad[1:] != 0).any()):
            raise ValueError(
                f"`per_sample_loss_fn` couples the samples of a batch: sample 0's loss depends on other samples' outputs "
                f"of mimic layer {call.name!r} (a contrastive loss, in-batch negatives, or batch norm in training mode). "
                "The ghost maths assume independent samples and would score it silently wrong. Mark the loss with "
                "`hf_gradmimic.batch_coupled(per_sample_loss_fn)`: the scores are then directional derivatives, exact "
                "for a coupled loss."
            )


def check_coupled_setup(scorer: Any, args: Any, accelerator: Any) -> None:
    """Refuse what a batch-coupled loss cannot do: scorers that need per-sample gradient norms or summed per-sample
    gradients, ``mimic_reweight_scope='layer'`` (its correction weights each row of δ), FSDP and DeepSpeed."""
    from accelerate.utils import DistributedType

    if not getattr(scorer, "supports_batch_coupled", False):
        raise ValueError(
            f"The {scorer.name!r} scorer cannot score a batch-coupled (contrastive) loss: it needs per-sample quantities "
            "that depend on each sample alone. Use `mimic_scorer='mimic'` (directional derivatives) or 'clip_score'."
        )
    if args.mimic_reweight_scope == "layer":
        raise ValueError(
            "`mimic_reweight_scope='layer'` reweights the rows of each mimic layer's output gradient, which under a "
            "batch-coupled loss mix every sample; use `mimic_reweight_scope='all'` (backward of Σ_i w_i ℓ_i)."
        )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"Batch-coupled losses are supported on one process and under DDP; {accelerator.distributed_type} is not "
            "tested with their double backward. Use DDP (`accelerate launch` without FSDP/DeepSpeed)."
        )


class GhostReader:
    """What the ghost scorers read of a batch's gradients at the mimic layers, for the loss the trainer uses.

    Independent samples get the ghost maths (`Capture.ghost_batch`); a batch-coupled loss gets directional
    derivatives (`CoupledGhost`), since row i of ∂Σℓ/∂z is not ∂ℓ_i/∂z_i there. A user loss not marked coupled is
    checked once, at the first batch, for coupling (`check_samples_independent`).
    """

    def __init__(self, batch_coupled: bool, check_user_loss: bool) -> None:
        self.batch_coupled = batch_coupled
        self._unchecked = check_user_loss and not batch_coupled

    def __call__(self, capture: Capture, losses: torch.Tensor, retain_graph: bool = True) -> Any:
        if self.batch_coupled:
            return CoupledGhost(capture, losses)
        if self._unchecked:
            self._unchecked = False
            check_samples_independent(capture, losses)
        return capture.ghost_batch(losses.sum(), retain_graph=retain_graph)
