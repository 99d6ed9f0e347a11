r"""A full fine-tune's weighted update from one backward: every trainable tensor's Σ_i c_i g_i from its module's recorded input and output gradient.

Grad-Mimic (Huang et al., arXiv 2501.06708) trains on ``Σ_i c_i ∇ℓ_i`` with ``c`` known only once the scores are,
and the scores of a mimic layer below the output head need a backward down to it. A backward computes, at every
layer, the input gradient (to go on) and the weight gradient (``δᵀ a`` for a linear layer). Samples do not interact,
so the gradient of ``Σ_i c_i ℓ_i`` at any layer's output is ``c_i δ_i``, and every weight gradient of the weighted
loss is the layer's own contraction of its recorded input ``a`` with ``c ⊙ δ``. So one backward that takes δ at every
trainable module's output (input gradients only, its graph freed as it goes) serves both: the scores read the mimic
layers' δ, then each tensor's update is formed from ``(a, c ⊙ δ)`` by its layer's rule (one matmul for a linear
layer, what the backward would have spent on it). The part between the loss and the lowest mimic layer is
differentiated once, not twice.

This holds when every trainable tensor belongs to a module whose gradient is a function of its input and output
gradient alone (`summed_gradient_of`) and is used only by that module's forward: `FullUpdate.check` compares, at
the first batch, the formed gradient with autograd's and the step falls back to the two-pass plan otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..ghost import UnsupportedLayerError, ghost_rule_for, scaled_per_sample

logger = logging.get_logger(__name__)

GradientRule = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, list[str], torch.Tensor | None], dict[str, torch.Tensor]
]


def layer_norm_summed_gradient(
    layer: nn.LayerNorm,
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    params: list[str],
    sample_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``Σ c ⊙ δ ⊙ x̂`` (weight) and ``Σ c ⊙ δ`` (bias) over every sample and position, ``x̂`` the normalised input
    and ``c`` each sample's coefficient (``sample_scale``, or 1)."""
    shape = layer.normalized_shape
    dims = tuple(range(output_grads.dim() - len(shape)))
    output_grads = scaled_per_sample(output_grads, sample_scale)
    grads: dict[str, torch.Tensor] = {}
    if "weight" in params:
        normalised = F.layer_norm(activations.float(), shape, None, None, layer.eps)
        grads["weight"] = (output_grads * normalised).sum(dims)
    if "bias" in params:
        grads["bias"] = output_grads.sum(dims)
    return grads


def summed_gradient_of(module: nn.Module) -> GradientRule | None:
    """The rule forming ``module``'s tensors' summed gradient from its input and output gradient, or None."""
    if type(module) is nn.LayerNorm:
        return layer_norm_summed_gradient
    try:
        return ghost_rule_for(module).summed_gradient
    except UnsupportedLayerError:
        return None


@dataclass
class _Owner:
    name: str
    module: nn.Module
    rule: GradientRule
    params: dict[str, nn.Parameter]


class FullUpdate:
    """Every trainable tensor of ``model`` with the module that owns it, when each has a rule (else ``owners`` is
    None: the update cannot be formed this way)."""

    def __init__(self, model: nn.Module) -> None:
        owners: list[_Owner] | None = []
        for name, module in model.named_modules():
            params = {local: p for local, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not params:
                continue
            rule = summed_gradient_of(module)
            if rule is None:
                owners = None
                break
            owners.append(_Owner(name, module, rule, params))
        self.owners = owners
        self.verified = False  # `check` passed at a first batch
        self.usable = True  # `check` has not failed

    @property
    def modules(self) -> list[nn.Module]:
        return [owner.module for owner in self.owners or []]

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable tensors, each once, in a fixed order."""
        seen: dict[int, nn.Parameter] = {}
        for owner in self.owners or []:
            for param in owner.params.values():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def gradients(self, calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]], scale: torch.Tensor | None):
        """Each tensor's ``Σ_i scale_i g_i`` (``params`` order, each in its dtype) from ``calls``: ``(module, input,
        δ at its output)`` for every recorded call (δ None: the call did not reach the loss). ``scale`` None: 1."""
        by_module = {id(owner.module): owner for owner in self.owners}
        total: dict[int, torch.Tensor] = {}
        for module, activations, grads in calls:
            if grads is None:
                continue
            owner = by_module[id(module)]
            # the rule applies ``scale`` where it costs least (an lm_head's δ is vocabulary-wide, its input is not)
            for local, grad in owner.rule(module, activations, grads, list(owner.params), scale).items():
                key = id(owner.params[local])
                total[key] = grad if key not in total else total[key] + grad
        # A tensor no call reached gets None, as from autograd: the optimizer then leaves it alone, as in `Trainer`.
        return tuple(total[id(p)].to(p.dtype) if id(p) in total else None for p in self.params)

    @staticmethod
    def check_coefficients(batch_size: int, device: torch.device) -> torch.Tensor:
        """Per-sample coefficients for `check`, unequal (``2 ** (i mod 4)``): with equal ones, a call whose rows are
        not the samples (MPNet's relative position bias, called on ``[T, T]`` bucket ids, when ``T`` equals the batch
        size) sums to autograd's gradient all the same, and only the weighted update would be wrong. Powers of two,
        so that a gradient scaled by them in place and back is exactly itself again (no vocabulary-sized copy)."""
        return torch.exp2(torch.arange(batch_size, device=device, dtype=torch.float32) % 4)

    def check(
        self,
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]],
        expected: tuple,
        coefficients: torch.Tensor,
    ) -> bool:
        """Whether the gradients formed from ``calls`` with ``coefficients`` (`check_coefficients`) are autograd's
        (``expected``: of ``Σ_i c_i ℓ_i``, None for an unused tensor): a tensor used outside its module's forward, a
        module whose gradient is not its rule's, or a call whose rows are not the samples fails it, and the update
        is not formed this way again."""
        formed = self.gradients(calls, coefficients)
        for param, mine, theirs in zip(self.params, formed, expected):
            theirs = torch.zeros_like(param) if theirs is None else theirs
            mine = torch.zeros_like(param) if mine is None else mine
            scale = float(theirs.abs().max()) if theirs.numel() else 0.0
            if not torch.allclose(mine.float(), theirs.float(), rtol=1e-3, atol=1e-4 * scale + 1e-7):
                self.usable = False
                logger.info(
                    "MimicTrainer backpropagates twice: a trainable tensor's gradient is not its module's rule "
                    "applied to the module's recorded input and output gradient (used outside that module?)."
                )
                return False
        self.verified = True
        return True


class GradientsOf(torch.autograd.Function):
    """A zero scalar whose backward gives ``params`` the gradients ``pending()`` returns (formed then), times the
    upstream gradient, accumulated as autograd does."""

    @staticmethod
    def forward(ctx, pending: list, *params: torch.Tensor) -> torch.Tensor:
        ctx.pending = pending
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        if not ctx.pending:
            raise RuntimeError("MimicTrainer's loss was backpropagated twice, or before its coefficients were set.")
        grads = ctx.pending.pop()()
        if upstream.device.type == "cpu" and float(upstream) == 1.0:
            return None, *grads  # a pass over every tensor's gradient saved (a GPU keeps the product: no sync)
        return None, *(None if grad is None else grad.mul_(upstream) for grad in grads)
