"""Per-sample gradient maths without per-sample gradients ("ghost" maths), one file per layer type.

As Opacus' ``grad_sample/``: each supported layer type registers a `GhostRule` of pure functions in its
own file (`linear`, `conv1d`, `embedding`); `GhostBatch` sums them over every use of the mimic tensors
in a batch, tied tensors included. Grad-Mimic (Huang et al., arXiv 2501.06708) needs the per-sample
inner product ``⟨g_i, θ_ref − θ_t⟩``; GraNd and AGRA need per-sample norms and a summed gradient.
"""

from . import conv1d, embedding, linear  # noqa: F401  (each registers its layer type)
from .batch import GhostBatch, LayerUse, own_tensor_keys
from .linear import linear_inner_product, linear_per_sample_gradient, linear_sq_norm, linear_summed_gradient
from .registry import (
    GHOST_RULES,
    GhostRule,
    UnsupportedLayerError,
    ghost_rule_for,
    register_ghost_rule,
    scaled_per_sample,
    supported_layer_types,
)

__all__ = [
    "GHOST_RULES",
    "GhostBatch",
    "GhostRule",
    "LayerUse",
    "UnsupportedLayerError",
    "ghost_rule_for",
    "linear_inner_product",
    "linear_per_sample_gradient",
    "linear_sq_norm",
    "linear_summed_gradient",
    "own_tensor_keys",
    "register_ghost_rule",
    "scaled_per_sample",
    "supported_layer_types",
]
