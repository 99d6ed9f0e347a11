r"""Ghost maths of ``nn.Embedding``: per-sample gradients of a lookup table, from the ids and the output gradient.

The layer's input is the ids ``x_{i,t}`` and its output ``z_{i,t} = W[x_{i,t}]``, so sample ``i``'s
gradient puts ``δ_{i,t}`` on row ``x_{i,t}``:

    g_i = Σ_t e_{x_{i,t}} δ_{i,t}ᵀ,        ⟨g_i, V⟩ = Σ_t V[x_{i,t}] · δ_{i,t},
    ‖g_i‖² = Σ_{t,s} [x_{i,t} = x_{i,s}] δ_{i,t} · δ_{i,s},

where positions whose id is ``padding_idx`` are left out: ``nn.Embedding`` never updates that row. Along a
direction the output moves by ``dz_{i,t} = V[x_{i,t}]`` (0 at padding positions, for the same reason).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from .registry import GhostRule, UnsupportedLayerError, register_ghost_rule, scaled_per_sample


def _ids_and_grads(layer: nn.Embedding, ids: torch.Tensor, output_grads: torch.Tensor):
    """``[B, T]`` ids, ``[B, T, d]`` float32 output gradients with the padding positions zeroed, and the mask."""
    batch_size = ids.shape[0]
    ids = ids.reshape(batch_size, -1).long()
    delta = output_grads.reshape(batch_size, ids.shape[1], -1).float()
    valid = torch.ones_like(ids, dtype=torch.bool) if layer.padding_idx is None else ids != layer.padding_idx
    return ids, delta * valid.unsqueeze(-1), valid


def _inner_product(
    layer: nn.Module, ids: torch.Tensor, output_grads: torch.Tensor, direction: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    ids, delta, _ = _ids_and_grads(layer, ids, output_grads)
    if "weight" not in direction:
        return delta.new_zeros(ids.shape[0])
    return (direction["weight"].float()[ids] * delta).sum(dim=(1, 2))


def _sq_norm(layer: nn.Module, ids: torch.Tensor, output_grads: torch.Tensor, params: Collection[str]) -> torch.Tensor:
    ids, delta, valid = _ids_and_grads(layer, ids, output_grads)
    if "weight" not in params:
        return delta.new_zeros(ids.shape[0])
    same_row = (ids.unsqueeze(2) == ids.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    return (torch.bmm(delta, delta.transpose(1, 2)) * same_row).sum(dim=(1, 2))


def _summed_gradient(
    layer: nn.Module,
    ids: torch.Tensor,
    output_grads: torch.Tensor,
    params: Collection[str],
    sample_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``Σ_i c_i g_i``: the output gradients, times their sample's coefficient (``sample_scale``, or 1), added onto
    their rows (what a normal backward accumulates)."""
    if "weight" not in params:
        return {}
    ids, delta, _ = _ids_and_grads(layer, ids, output_grads)
    delta = scaled_per_sample(delta, sample_scale)
    summed = delta.new_zeros(layer.num_embeddings, delta.shape[-1])
    return {"weight": summed.index_add_(0, ids.reshape(-1), delta.reshape(-1, delta.shape[-1]))}


def _per_sample_gradient(
    layer: nn.Module, ids: torch.Tensor, output_grads: torch.Tensor, params: Collection[str]
) -> dict[str, torch.Tensor]:
    """``[B, num_embeddings, d]``: as large as B copies of the table, so only for tables shared by several uses."""
    if "weight" not in params:
        return {}
    ids, delta, _ = _ids_and_grads(layer, ids, output_grads)
    batch_size, rows = ids.shape[0], layer.num_embeddings
    flat_rows = (ids + rows * torch.arange(batch_size, device=ids.device).unsqueeze(1)).reshape(-1)
    grads = delta.new_zeros(batch_size * rows, delta.shape[-1])
    grads.index_add_(0, flat_rows, delta.reshape(-1, delta.shape[-1]))
    return {"weight": grads.view(batch_size, rows, -1)}


def _output_along(layer: nn.Module, ids: torch.Tensor, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``dz_{i,t} = V[x_{i,t}]``, zero where ``x_{i,t}`` is ``padding_idx`` (whose row never gets a gradient)."""
    weight = direction.get("weight")
    if weight is None:
        return torch.zeros(*ids.shape, layer.embedding_dim, device=ids.device)
    dz = weight.float()[ids.long()]
    if layer.padding_idx is not None:
        dz = dz * (ids != layer.padding_idx).unsqueeze(-1)
    return dz


def _check(layer: nn.Module) -> None:
    if layer.scale_grad_by_freq:
        raise UnsupportedLayerError(
            "nn.Embedding with scale_grad_by_freq=True scales each row's gradient by how often its id occurs in the "
            "whole batch, so a sample's gradient depends on the other samples; per-sample scores are undefined."
        )
    if layer.max_norm is not None:
        raise UnsupportedLayerError(
            "nn.Embedding with max_norm renormalises the looked-up rows of the table in place during forward, so the "
            "gradient is not the plain lookup's; use an embedding without max_norm."
        )
    if layer.sparse:
        raise UnsupportedLayerError(
            "nn.Embedding with sparse=True has sparse gradients, which the step-wide softmax cannot rescale in place "
            "between gradient-accumulation micro-batches; use sparse=False."
        )


EMBEDDING_RULE = register_ghost_rule(
    nn.Embedding,
    GhostRule(
        inner_product=_inner_product,
        sq_norm=_sq_norm,
        summed_gradient=_summed_gradient,
        per_sample_gradient=_per_sample_gradient,
        check=_check,
        output_along=_output_along,
    ),
)
