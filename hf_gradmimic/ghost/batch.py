"""Every use of the mimic tensors in one batch, and the per-sample quantities summed over those uses.

A *use* is one call of a module that holds mimic tensors: the mimic layers themselves, and any other
module that shares one of their tensors (GPT-2's ``wte`` when its ``lm_head`` is tied to it), once per
call in the forward. The per-sample gradient of a tensor is the sum of its gradients over every use, so
inner products with a direction add up over uses; a squared norm does too, except for the cross terms
of a tensor used more than once, which are taken from that tensor's per-sample gradients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .registry import GhostRule, ghost_rule_for


@dataclass
class LayerUse:
    """One call of a module holding mimic tensors: its input, the gradient at its output, and its tensors.

    Attributes:
        name: the module's path in the model, for messages.
        module: the module.
        activations: its input ``a`` (detached).
        output_grads: ``∂(Σ_i ℓ_i)/∂z`` at its output ``z``.
        tensor_keys: the module's own parameter names mapped to the keys of the mimic tensors they are
            (``{"weight": "lm_head.weight"}`` for a ``wte`` tied to ``lm_head``).
    """

    name: str
    module: nn.Module
    activations: torch.Tensor
    output_grads: torch.Tensor
    tensor_keys: Mapping[str, str]


def own_tensor_keys(name: str, module: nn.Module) -> dict[str, str]:
    """``{"weight": "name.weight", "bias": "name.bias"}`` for the parameters ``module`` holds itself."""
    return {local: f"{name}.{local}" for local, _ in module.named_parameters(recurse=False)}


class GhostBatch:
    """The uses of one batch, with Σ-over-uses inner products, squared norms and summed gradients.

    Every quantity is per sample (``[B]``, float32) and keyed by mimic-tensor key, e.g. a direction
    ``{"head.weight": V, "head.bias": v_b}``. A key missing from a direction counts as zero.
    """

    def __init__(self, uses: Sequence[LayerUse]) -> None:
        if not uses:
            raise ValueError("A GhostBatch needs at least one layer use; no mimic layer ran in the forward pass.")
        self.uses = list(uses)
        self.rules: list[GhostRule] = [ghost_rule_for(use.module, use.name) for use in self.uses]
        uses_per_key = Counter(key for use in self.uses for key in use.tensor_keys.values())
        self.tensor_keys = list(uses_per_key)
        self.shared_keys = {key for key, count in uses_per_key.items() if count > 1}
        # use index -> (the direction's tensors, by the use's own names; ⟨g_i^use, v⟩), formed outside (`remember`)
        self._known: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}

    @classmethod
    def from_layers(
        cls,
        layers: Mapping[str, nn.Module],
        activations: Mapping[str, torch.Tensor],
        output_grads: Mapping[str, torch.Tensor],
    ) -> GhostBatch:
        """One use per named layer, each with the tensors it holds itself (``"name.weight"``, ``"name.bias"``)."""
        return cls(
            [
                LayerUse(name, module, activations[name], output_grads[name], own_tensor_keys(name, module))
                for name, module in layers.items()
            ]
        )

    @property
    def batch_size(self) -> int:
        return int(self.uses[0].activations.shape[0])

    def remember_inner_product(self, use: int, direction: Mapping[str, torch.Tensor], value: torch.Tensor) -> None:
        r"""Take ``value`` (float32 ``[B]``) as ``⟨g^{use}_i, v⟩`` for use number ``use`` and exactly these tensors of
        ``direction`` (keyed by mimic tensor), formed by the caller: `inner_product` with the same tensor objects
        then reads it instead of forming it again. The reference's verdict on a head (Grad-Mimic, arXiv 2501.06708)
        forms the head's output change along ``v`` anyway (`hf_gradmimic.training.reference_verdict`)."""
        keys = self.uses[use].tensor_keys
        self._known[use] = ({own: direction[key] for own, key in keys.items() if key in direction}, value)

    def _remembered(self, use: int, local: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The remembered ``⟨g^{use}_i, v⟩`` when it was formed with the very tensors of ``local``, else None."""
        known = self._known.get(use)
        if known is None or known[0].keys() != local.keys():
            return None
        return known[1] if all(known[0][own] is tensor for own, tensor in local.items()) else None

    def inner_product(self, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""Per-sample ``⟨g_i, v⟩ = Σ_uses Σ_tensors ⟨g^{use}_i, v⟩`` (ghost inner products; no per-sample gradient)."""
        total = None
        for index, (use, rule) in enumerate(zip(self.uses, self.rules)):
            local = {own: direction[key] for own, key in use.tensor_keys.items() if key in direction}
            if not local:
                continue
            term = self._remembered(index, local)
            if term is None:
                term = rule.inner_product(use.module, use.activations, use.output_grads, local)
            total = term if total is None else total + term
        if total is None:
            return self.uses[0].output_grads.new_zeros(self.batch_size, dtype=torch.float32)
        return total

    def sq_norm(self) -> torch.Tensor:
        r"""Per-sample ``‖g_i‖²`` over every mimic tensor.

        Tensors with one use take the layer's ghost norm; a tensor with several uses needs the cross terms
        ``⟨g^u_i, g^{u'}_i⟩``, taken from its per-sample gradients (``[B, *shape]`` for that tensor only).
        """
        total = self.uses[0].output_grads.new_zeros(self.batch_size, dtype=torch.float32)
        shared: dict[str, torch.Tensor] = {}
        for use, rule in zip(self.uses, self.rules):
            alone = [own for own, key in use.tensor_keys.items() if key not in self.shared_keys]
            if alone:
                total = total + rule.sq_norm(use.module, use.activations, use.output_grads, alone)
            together = {own: key for own, key in use.tensor_keys.items() if key in self.shared_keys}
            if together:
                grads = rule.per_sample_gradient(use.module, use.activations, use.output_grads, list(together))
                for own, key in together.items():
                    shared[key] = grads[own] if key not in shared else shared[key] + grads[own]
        for grad in shared.values():
            total = total + grad.flatten(1).square().sum(dim=1)
        return total

    def summed_gradient(self) -> dict[str, torch.Tensor]:
        """``Σ_i g_i`` per mimic tensor (the batch's summed-loss gradient), summed over uses."""
        summed: dict[str, torch.Tensor] = {}
        for use, rule in zip(self.uses, self.rules):
            for own, grad in rule.summed_gradient(
                use.module, use.activations, use.output_grads, list(use.tensor_keys)
            ).items():
                key = use.tensor_keys[own]
                summed[key] = grad if key not in summed else summed[key] + grad
        return summed
