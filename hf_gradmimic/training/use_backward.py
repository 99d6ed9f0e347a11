r"""A backward through the recorded uses of the mimic tensors only: their weighted gradient without a second pass through the model.

Every use of a mimic tensor was recorded with its input ``a`` and the gradient ``δ = ∂(Σ_i ℓ_i)/∂z`` at its
output (`hf_gradmimic.ghost.GhostBatch`). Samples do not interact inside the model, so the gradient of
``Σ_i c_i ℓ_i`` at that output is ``c_i δ_i``, and by the chain rule the tensor's gradient is the sum over its
uses of the layer's own vector-Jacobian product with ``c ⊙ δ``:

    ∇_θ Σ_i c_i ℓ_i = Σ_uses (∂z/∂θ)ᵀ (c ⊙ δ) = Σ_i c_i g_i.

`uses_weighted_loss` builds a scalar with exactly that gradient by re-applying each layer to its detached input,
one layer-sized matmul per use. Grad-Mimic (Huang et al., arXiv 2501.06708) needs ``Σ_i w_i g_i``: when the mimic
tensors are every trainable parameter (LoRA adapters, a head on a frozen backbone), this is the whole update, and
the step needs no backward through the model besides the one that gave ``δ``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..ghost import GhostBatch


def uses_weighted_loss(ghost: GhostBatch, scale: torch.Tensor) -> torch.Tensor:
    r"""A scalar whose gradient is ``Σ_i scale_i g_i`` on the mimic tensors and zero on every other tensor.

    .. math:: L = \sum_{\text{uses}} \big\langle \operatorname{scale} \odot \delta,\ f(a; \theta) \big\rangle,
              \qquad \nabla_\theta L = \sum_i \operatorname{scale}_i\, g_i

    Args:
        ghost: the recorded uses, each with its input and output gradient.
        scale: ``[B]`` per-sample factors (detached).
    """
    total = None
    for use in ghost.uses:
        # The layer ran in the dtype of its output (and so of δ): under mixed precision autocast cast its float32
        # weights and input to bf16/fp16 there. Cast them the same way, differentiably, so that the weights' gradient
        # is computed in that dtype and accumulated in theirs, as autograd does through autocast's casts.
        compute = use.output_grads.dtype
        # Only the mimic tensors stay live: the input is detached, so nothing upstream is reached.
        params = {
            local: as_compute_dtype(param if local in use.tensor_keys else param.detach(), compute)
            for local, param in use.module.named_parameters(recurse=False)
        }
        output = torch.func.functional_call(use.module, params, (as_compute_dtype(use.activations, compute),))
        factor = scale.detach().view(-1, *([1] * (output.dim() - 1)))
        term = ((use.output_grads.float() * factor).to(output.dtype) * output).sum()
        total = term if total is None else total + term
    return total


def as_compute_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` when both are floating point (integer inputs, an embedding's ids, stay as they are)."""
    if tensor.is_floating_point() and dtype.is_floating_point and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def only_mimic_tensors_train(model: nn.Module, mimic_tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the mimic tensors are every parameter of ``model`` that requires grad (then `uses_weighted_loss` is
    the whole update)."""
    mimic = {id(tensor) for tensor in mimic_tensors}
    return all(id(param) in mimic for param in model.parameters() if param.requires_grad)
