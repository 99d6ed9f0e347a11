r"""Ghost maths of ``nn.Linear``: per-sample inner products and norms from the layer's input and output gradient.

With input activations ``a_{i,t}`` and output gradients ``δ_{i,t} = ∂ℓ_i/∂z_{i,t}`` (``t`` runs over
sequence positions; a 2-D input has one position), the per-sample weight gradient is

    g_i = Σ_t δ_{i,t} a_{i,t}ᵀ,        g^b_i = Σ_t δ_{i,t},

so any inner product with a direction ``V`` (same shape as the weight) is

    ⟨g_i, V⟩ = Σ_t δ_{i,t}ᵀ V a_{i,t} + ⟨Σ_t δ_{i,t}, v_b⟩,

one extra matmul for the whole batch, and never the ``B × out × in`` tensor of per-sample gradients.
Grad-Mimic (Huang et al., arXiv 2501.06708) needs exactly this with ``V = θ_ref − θ_t``. The layer is
linear in its parameters, so its output moves along a direction by ``dz_{i,t} = V a_{i,t} + v_b``
(`linear_output_along`), what a batch-coupled loss's directional derivative starts from.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from .registry import GhostRule, per_sample_positions, register_ghost_rule, scaled_per_sample


def linear_inner_product(
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    direction_weight: torch.Tensor | None,
    direction_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-sample ``⟨g_i, v⟩`` for ``z = W a + b``.

    .. math::
        \langle g_i, v\rangle = \sum_t \delta_{i,t}^\top V a_{i,t} + \Big\langle \sum_t \delta_{i,t},\ v_b \Big\rangle

    Args:
        activations: the layer's input ``a``, ``[B, ..., in]``.
        output_grads: ``∂(Σ_i ℓ_i)/∂z``, ``[B, ..., out]``.
        direction_weight: ``V``, ``[out, in]``, or None to leave the weight out.
        direction_bias: ``v_b``, ``[out]``, or None to leave the bias out.

    Returns:
        Float32 ``[B]``.
    """
    batch_size = activations.shape[0]
    delta = per_sample_positions(output_grads, batch_size)
    inner = delta.new_zeros(batch_size)
    if direction_weight is not None:
        a = per_sample_positions(activations, batch_size)
        weight = direction_weight.float()
        # Project onto the narrower side so the intermediate is [B, T, min(in, out)]: for an
        # lm_head (out = vocabulary) that avoids a second [B, T, vocab] tensor.
        if weight.shape[0] >= weight.shape[1]:
            inner = (torch.matmul(delta, weight) * a).sum(dim=(1, 2))
        else:
            inner = (torch.matmul(a, weight.t()) * delta).sum(dim=(1, 2))
    if direction_bias is not None:
        inner = inner + delta.sum(dim=1) @ direction_bias.float()
    return inner


def linear_sq_norm(
    activations: torch.Tensor, output_grads: torch.Tensor, with_weight: bool = True, with_bias: bool = True
) -> torch.Tensor:
    r"""Per-sample squared gradient norm ``‖g_i‖²`` (GraNd, Paul et al. 2021).

    .. math::
        \lVert g_i \rVert_F^2 = \sum_{t,s} (\delta_{i,t}\cdot\delta_{i,s})(a_{i,t}\cdot a_{i,s}),
        \qquad \lVert g^b_i \rVert^2 = \Big\lVert \sum_t \delta_{i,t} \Big\rVert^2

    For 2-D inputs this is ``‖δ_i‖²‖a_i‖²``. The Gram form costs ``O(B T² (in + out))``, not
    ``O(B · in · out)``; for long sequences (``T² > in·out/(in+out)``) building ``g_i`` would be cheaper.
    """
    batch_size = activations.shape[0]
    delta = per_sample_positions(output_grads, batch_size)
    sq_norm = delta.new_zeros(batch_size)
    if with_weight:
        a = per_sample_positions(activations, batch_size)
        if a.shape[1] == 1:
            sq_norm = delta.square().sum(dim=(1, 2)) * a.square().sum(dim=(1, 2))
        else:
            sq_norm = (torch.bmm(delta, delta.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
    if with_bias:
        sq_norm = sq_norm + delta.sum(dim=1).square().sum(dim=1)
    return sq_norm


def linear_per_sample_gradient(
    activations: torch.Tensor, output_grads: torch.Tensor, with_weight: bool = True, with_bias: bool = True
) -> dict[str, torch.Tensor]:
    r"""``g_i = Σ_t δ_{i,t} a_{i,t}ᵀ`` ``[B, out, in]`` and ``g^b_i = Σ_t δ_{i,t}`` ``[B, out]``."""
    batch_size = activations.shape[0]
    delta = per_sample_positions(output_grads, batch_size)
    grads = {}
    if with_weight:
        grads["weight"] = torch.einsum("bto,bti->boi", delta, per_sample_positions(activations, batch_size))
    if with_bias:
        grads["bias"] = delta.sum(dim=1)
    return grads


def _inner_product(
    layer: nn.Module, activations: torch.Tensor, output_grads: torch.Tensor, direction: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return linear_inner_product(activations, output_grads, direction.get("weight"), direction.get("bias"))


def _sq_norm(
    layer: nn.Module, activations: torch.Tensor, output_grads: torch.Tensor, params: Collection[str]
) -> torch.Tensor:
    return linear_sq_norm(activations, output_grads, "weight" in params, "bias" in params)


def linear_summed_gradient(
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    with_weight: bool = True,
    with_bias: bool = True,
    sample_scale: torch.Tensor | None = None,
    *,
    input_major: bool = False,
) -> dict[str, torch.Tensor]:
    r"""``Σ_i c_i g_i``: one ``δᵀ diag(c) a`` ``[out, in]`` over every sample and position (``c`` = ``sample_scale``,
    ``[B]``, or 1: what a normal backward accumulates), and ``Σ_i c_i Σ_t δ_{i,t}`` for the bias.

    .. math:: \sum_i c_i g_i = \sum_{i,t} (c_i \delta_{i,t}) a_{i,t}^\top = \sum_{i,t} \delta_{i,t} (c_i a_{i,t})^\top

    The coefficients scale whichever of ``a`` and ``δ`` is narrower: an ``lm_head``'s ``δ`` is vocabulary-wide, its
    input a few hundred features, and Grad-Mimic's weighted update (Huang et al., arXiv 2501.06708) needs only
    the product. ``input_major`` returns the weight's as ``aᵀ δ`` ``[in, out]`` (``Conv1D``'s layout), contiguous.
    """
    scale_input = sample_scale is not None and activations.shape[-1] <= output_grads.shape[-1]
    a = scaled_per_sample(activations, sample_scale if scale_input else None)
    a = a.reshape(-1, a.shape[-1])
    summed = {}
    if with_weight:
        delta = scaled_per_sample(output_grads, None if scale_input else sample_scale)
        delta = delta.reshape(-1, delta.shape[-1])
        summed["weight"] = a.t() @ delta if input_major else delta.t() @ a
    if with_bias:
        # per sample first, then the coefficients: no second vocabulary-wide tensor for an lm_head's bias
        per_sample = per_sample_positions(output_grads, activations.shape[0]).sum(dim=1)
        summed["bias"] = scaled_per_sample(per_sample, sample_scale).sum(dim=0)
    return summed


def _summed_gradient(
    layer: nn.Module,
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    params: Collection[str],
    sample_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    return linear_summed_gradient(activations, output_grads, "weight" in params, "bias" in params, sample_scale)


def _per_sample_gradient(
    layer: nn.Module, activations: torch.Tensor, output_grads: torch.Tensor, params: Collection[str]
) -> dict[str, torch.Tensor]:
    return linear_per_sample_gradient(activations, output_grads, "weight" in params, "bias" in params)


def linear_output_along(
    activations: torch.Tensor, direction_weight: torch.Tensor | None, direction_bias: torch.Tensor | None = None
) -> torch.Tensor:
    r"""``dz = a Vᵀ + v_b``: the change of ``z = a Wᵀ + b`` along ``(V, v_b)`` (float32, shaped as the output).

    .. math:: dz_{i,t} = V a_{i,t} + v_b

    A missing part of the direction counts as zero; with neither, the caller has nothing to add.
    """
    a = activations.float()
    out_features = (direction_weight if direction_weight is not None else direction_bias).shape[0]
    dz = a.new_zeros(*a.shape[:-1], out_features) if direction_weight is None else a @ direction_weight.float().t()
    return dz if direction_bias is None else dz + direction_bias.float()


def _output_along(layer: nn.Module, activations: torch.Tensor, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return linear_output_along(activations, direction.get("weight"), direction.get("bias"))


LINEAR_RULE = register_ghost_rule(
    nn.Linear,
    GhostRule(
        inner_product=_inner_product,
        sq_norm=_sq_norm,
        summed_gradient=_summed_gradient,
        per_sample_gradient=_per_sample_gradient,
        output_along=_output_along,
    ),
)
