"""The registry of layer types that the ghost maths knows, keyed by module class (as Opacus' grad samplers).

A layer type is supported when one file registers a `GhostRule` for it: four pure functions of the
layer, its input ``a`` (detached) and ``δ = ∂(Σ_i ℓ_i)/∂z`` at its output ``z``, for the layer's
parameters named in ``params`` (or in ``direction``):

- ``inner_product(layer, a, δ, direction) -> [B]``: per-sample ``⟨g_i, v⟩`` with a direction over those
  parameters (Grad-Mimic's score, AGRA's cosine numerator);
- ``sq_norm(layer, a, δ, params) -> [B]``: per-sample ``‖g_i‖²`` (GraNd, AGRA);
- ``summed_gradient(layer, a, δ, params, sample_scale=None) -> {name: tensor}``: ``Σ_i c_i g_i`` with ``c`` the
  ``[B]`` ``sample_scale`` (or 1: AGRA's comparison gradient; Grad-Mimic's weighted update of a layer, formed from
  one backward's ``a`` and ``δ``, `hf_gradmimic.training.full_update`);
- ``per_sample_gradient(layer, a, δ, params) -> {name: [B, ...]}``: the per-sample gradients themselves,
  used only for the squared norm of a tensor that several uses share (their cross terms);
- ``output_along(layer, a, direction) -> dz``: the change of the layer's output when its parameters move
  along ``direction`` (a directional derivative, shaped as the output). For a layer linear in its
  parameters this is the layer applied with its parameters replaced by the direction. Batch-coupled
  losses (`hf_gradmimic.training.coupled`) need it: there row ``i`` of ``δ`` is not ``∂ℓ_i/∂z_i``.

Adding a layer type is one new file that calls `register_ghost_rule`. Every function works in float32
whatever the training precision. The first four rely on samples not interacting (no batch norm in training
mode, no contrastive loss), so that row ``i`` of ``δ`` is ``∂ℓ_i/∂z_i``; ``output_along`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

InnerProduct = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
SqNorm = Callable[[nn.Module, torch.Tensor, torch.Tensor, Collection[str]], torch.Tensor]
GradientMap = Callable[[nn.Module, torch.Tensor, torch.Tensor, Collection[str]], dict[str, torch.Tensor]]
OutputAlong = Callable[[nn.Module, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


class UnsupportedLayerError(TypeError):
    """A mimic layer whose type has no ghost rule, or whose configuration the rule refuses."""


def _accept(layer: nn.Module) -> None:
    """The default configuration check: every instance of the type is supported."""


@dataclass(frozen=True)
class GhostRule:
    """The ghost maths of one layer type (see the module docstring for each function's contract)."""

    inner_product: InnerProduct
    sq_norm: SqNorm
    summed_gradient: GradientMap
    per_sample_gradient: GradientMap
    check: Callable[[nn.Module], None] = _accept
    output_along: OutputAlong | None = None


GHOST_RULES: dict[type[nn.Module], GhostRule] = {}


def register_ghost_rule(layer_type: type[nn.Module], rule: GhostRule) -> GhostRule:
    """Make ``layer_type`` usable as a mimic layer; returns ``rule``."""
    GHOST_RULES[layer_type] = rule
    return rule


def supported_layer_types() -> list[str]:
    """The registered layer types, by qualified name."""
    return sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in GHOST_RULES)


def ghost_rule_for(layer: nn.Module, name: str = "") -> GhostRule:
    """The rule of ``layer``'s type, after its configuration check.

    A subclass of a registered type counts only when it keeps the registered ``forward``: a subclass
    that computes something else (a quantised linear layer, say) would make the formula silently wrong.
    """
    cls = type(layer)
    rule = GHOST_RULES.get(cls)
    if rule is None:
        for base in cls.__mro__[1:]:
            if base in GHOST_RULES and cls.forward is base.forward:
                rule = GHOST_RULES[base]
                break
    where = f"Mimic layer {name!r}" if name else "The layer"
    if rule is None:
        raise UnsupportedLayerError(
            f"{where} is a {cls.__module__}.{cls.__qualname__}, which the ghost maths does not support. "
            f"Supported layer types: {', '.join(supported_layer_types())}. To add one, register a GhostRule "
            "for it in a new file of hf_gradmimic/ghost/."
        )
    try:
        rule.check(layer)
    except UnsupportedLayerError as error:
        raise UnsupportedLayerError(f"{where}: {error}") from None
    return rule


def scaled_per_sample(tensor: torch.Tensor, sample_scale: torch.Tensor | None) -> torch.Tensor:
    """``tensor[i] * c_i`` in float32 for the ``[B]`` coefficients ``c`` = ``sample_scale`` (``tensor`` in float32
    when None): a new tensor, since the recorded activations and output gradients it scales are read again."""
    tensor = tensor.float()
    if sample_scale is None:
        return tensor
    return tensor * sample_scale.detach().float().view(-1, *([1] * (tensor.dim() - 1)))


def per_sample_positions(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """View ``[B, ..., features]`` as ``[B, T, features]`` in float32 (``T = 1`` for 2-D inputs)."""
    return tensor.reshape(batch_size, -1, tensor.shape[-1]).float()
