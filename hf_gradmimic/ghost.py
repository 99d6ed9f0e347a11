"""Per-sample gradient inner products and norms without per-sample gradients ("ghost" maths).

One small pure function per layer type, as in Opacus's ``grad_sample/``. For an ``nn.Linear``
with input activations ``a_{i,t}`` and output gradients ``δ_{i,t} = ∂ℓ_i/∂z_{i,t}`` (``t`` runs
over sequence positions; a 2-D input has one position), the per-sample weight gradient is

    g_i = Σ_t δ_{i,t} a_{i,t}ᵀ,

so any inner product with a direction ``V`` (same shape as the weight) is

    ⟨g_i, V⟩ = Σ_t δ_{i,t}ᵀ V a_{i,t},

one extra matmul for the whole batch, and never the ``B × out × in`` tensor of per-sample
gradients. Grad-Mimic (arXiv 2501.06708) needs exactly this with ``V = θ_ref − θ_t``.
All maths runs in float32 whatever the training precision.
"""

from __future__ import annotations

import torch


def _per_sample_positions(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """View ``[B, ..., features]`` as ``[B, T, features]`` in float32 (``T = 1`` for 2-D inputs)."""
    return tensor.reshape(batch_size, -1, tensor.shape[-1]).float()


def linear_inner_product(
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    direction_weight: torch.Tensor,
    direction_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-sample ``⟨g_i, v⟩`` for an ``nn.Linear``, from its input and output gradient.

    .. math::
        \langle g_i, v\rangle = \sum_t \delta_{i,t}^\top V a_{i,t} + \Big\langle \sum_t \delta_{i,t},\ v_b \Big\rangle

    Args:
        activations: the layer's input ``a``, shape ``[B, ..., in]``.
        output_grads: ``∂(Σ_i ℓ_i)/∂z`` at the layer's output ``z``, shape ``[B, ..., out]``. Because
            samples do not interact (no batch norm), its row ``i`` is ``∂ℓ_i/∂z_i``.
        direction_weight: ``V``, shape ``[out, in]``.
        direction_bias: ``v_b``, shape ``[out]``, or None for a layer without bias.

    Returns:
        Float32 tensor ``[B]``.
    """
    batch_size = activations.shape[0]
    a = _per_sample_positions(activations, batch_size)
    delta = _per_sample_positions(output_grads, batch_size)
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
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    with_bias: bool = True,
) -> torch.Tensor:
    r"""Per-sample squared gradient norm ``‖g_i‖²`` of an ``nn.Linear`` (GraNd, Paul et al. 2021).

    .. math::
        \lVert g_i \rVert_F^2 = \langle \delta_i \delta_i^\top,\ a_i a_i^\top \rangle
        = \sum_{t,s} (\delta_{i,t}\cdot\delta_{i,s})(a_{i,t}\cdot a_{i,s}),
        \qquad \lVert g^b_i \rVert^2 = \Big\lVert \sum_t \delta_{i,t} \Big\rVert^2

    For 2-D inputs this is ``‖δ_i‖²‖a_i‖²``. The Gram form costs ``O(B T² (in + out))``, not
    ``O(B · in · out)``. For long sequences (``T² > in·out/(in+out)``) building ``g_i`` would be
    cheaper; this function does not switch.
    """
    batch_size = activations.shape[0]
    a = _per_sample_positions(activations, batch_size)
    delta = _per_sample_positions(output_grads, batch_size)
    if a.shape[1] == 1:
        sq_norm = delta.square().sum(dim=(1, 2)) * a.square().sum(dim=(1, 2))
    else:
        sq_norm = (torch.bmm(delta, delta.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
    if with_bias:
        sq_norm = sq_norm + delta.sum(dim=1).square().sum(dim=1)
    return sq_norm
