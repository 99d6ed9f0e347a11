r"""Ghost maths of transformers' ``Conv1D`` (GPT-2's blocks): a linear layer that stores its weight transposed.

``Conv1D`` computes ``z = a W + b`` with ``W`` of shape ``[in, out]``, so its per-sample gradient is the
transpose of `linear`'s:

    g_i = Σ_t a_{i,t} δ_{i,t}ᵀ  ([in, out]),        ⟨g_i, V⟩ = Σ_t a_{i,t}ᵀ V δ_{i,t} + ⟨Σ_t δ_{i,t}, v_b⟩,

and ``‖g_i‖²`` is the same Gram form as for ``nn.Linear``. Along a direction the output moves by
``dz = a V + v_b``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .linear import (
    LINEAR_RULE,
    linear_inner_product,
    linear_output_along,
    linear_per_sample_gradient,
    linear_summed_gradient,
)
from .registry import GhostRule, register_ghost_rule


def _inner_product(
    layer: nn.Module, activations: torch.Tensor, output_grads: torch.Tensor, direction: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    weight = direction.get("weight")
    return linear_inner_product(
        activations, output_grads, None if weight is None else weight.t(), direction.get("bias")
    )


def _transposed(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`linear`'s gradients with the weight's last two dimensions swapped (``[in, out]``, as Conv1D stores it)."""
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(-2, -1)
    return grads


def _summed_gradient(
    layer: nn.Module,
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    params: Collection[str],
    sample_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``Σ_i c_i g_i = aᵀ diag(c) δ`` over every sample and position, laid out ``[in, out]`` as the weight (a
    transposed view would make the optimizer copy it)."""
    return linear_summed_gradient(
        activations, output_grads, "weight" in params, "bias" in params, sample_scale, input_major=True
    )


def _per_sample_gradient(
    layer: nn.Module, activations: torch.Tensor, output_grads: torch.Tensor, params: Collection[str]
) -> dict[str, torch.Tensor]:
    return _transposed(linear_per_sample_gradient(activations, output_grads, "weight" in params, "bias" in params))


def _output_along(layer: nn.Module, activations: torch.Tensor, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``dz = a V + v_b`` (the weight is stored ``[in, out]``)."""
    weight = direction.get("weight")
    return linear_output_along(activations, None if weight is None else weight.t(), direction.get("bias"))


CONV1D_RULE = register_ghost_rule(
    Conv1D,
    GhostRule(
        inner_product=_inner_product,
        sq_norm=LINEAR_RULE.sq_norm,  # the Gram form does not depend on how the weight is laid out
        summed_gradient=_summed_gradient,
        per_sample_gradient=_per_sample_gradient,
        output_along=_output_along,
    ),
)
