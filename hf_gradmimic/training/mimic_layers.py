"""The student's mimic layers: the named modules, every module that shares their tensors, and those tensors.

Grad-Mimic (Huang et al., arXiv 2501.06708) compares per-sample gradients with ``θ_ref − θ_t`` over the
*mimic tensors*: the parameters of the named layers, keyed ``"<layer>.<param>"``. A tensor that another
module also uses (GPT-2's ``lm_head.weight`` tied to ``transformer.wte.weight``) has as its per-sample
gradient the sum over every use, so that module is hooked too (`hooked`). Every hooked module must have a
ghost rule (`hf_gradmimic.ghost`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..ghost import ghost_rule_for
from ..layer_lookup import MimicLayerError, resolve_mimic_layers
from ..lora import expand_lora_layers
from ..reference.loading import ReferenceSource, load_reference_tensors
from .capture import Capture, output_head

logger = logging.get_logger(__name__)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter that FSDP2 keeps as a sharded DTensor outside forward (an all-gather)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class MimicLayers:
    """The mimic layers of a student, their tensors (``"layer.param"`` → parameter) and every module using them.

    Args:
        model: the unwrapped student.
        layer_map: ``{student_module: reference_module}`` (`MimicConfig.mimic_layer_map`); ``"lora"`` and LoRA
            wrappers stand for their A and B matrices (`hf_gradmimic.lora.expand_lora_layers`).
    """

    def __init__(self, model: nn.Module, layer_map: Mapping[str, str]) -> None:
        self._model = model
        self.layer_map = expand_lora_layers(model, layer_map)
        self.layers = resolve_mimic_layers(model, list(self.layer_map))
        # Where each tensor lives, not the Parameter itself: FSDP2 replaces a module's parameters when it shards them.
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self.reference_names: dict[str, str] = {}
        key_of: dict[int, str] = {}
        for name, module in self.layers.items():
            for local, param in module.named_parameters(recurse=False):
                if id(param) in key_of:  # two named layers that share a tensor: it is one mimic tensor
                    continue
                key = f"{name}.{local}"
                key_of[id(param)] = key
                self._owners[key] = (module, local)
                self.reference_names[key] = f"{self.layer_map[name]}.{local}"
        if not self._owners:
            raise MimicLayerError(f"The mimic layers {list(self.layers)} hold no parameters.")
        frozen = [key for key, param in self.tensors.items() if not param.requires_grad]
        if frozen:
            raise ValueError(
                f"Mimic layer parameter(s) {frozen} do not require grad; the mimic layers must be trainable."
            )
        self.hooked = self._modules_using(model, key_of)
        self.head = output_head(model)  # recorded apart, for `Capture.head_cut`
        for name, module, keys in self.hooked:
            if name not in self.layers:
                ghost_rule_for(module, name)
                logger.info(
                    f"Mimic tensor(s) {sorted(keys.values())} are also used by {name!r}: their per-sample "
                    "gradients sum both uses."
                )

    def _modules_using(self, model: nn.Module, key_of: dict[int, str]) -> list[tuple[str, nn.Module, dict[str, str]]]:
        """Every module (the mimic layers first) holding a mimic tensor, with its own names for them."""
        hooked = [
            (
                name,
                module,
                {local: key_of[id(p)] for local, p in module.named_parameters(recurse=False) if id(p) in key_of},
            )
            for name, module in self.layers.items()
        ]
        seen = {id(module) for module in self.layers.values()}
        for name, module in model.named_modules():
            if id(module) in seen:
                continue
            # A tensor that a submodule holds too is that submodule's (BERT's `cls.predictions.bias` is its
            # `decoder.bias`, tied for resizing): the parent's forward reaches it through the child.
            below = {
                id(p) for child in module.modules() if child is not module for p in child.parameters(recurse=False)
            }
            keys = {
                local: key_of[id(p)]
                for local, p in module.named_parameters(recurse=False)
                if id(p) in key_of and id(p) not in below
            }
            if keys:
                hooked.append((name, module, keys))
                seen.add(id(module))
        return hooked

    @property
    def tensors(self) -> dict[str, nn.Parameter]:
        """``{"layer.param": parameter}``, read from the modules now (a DTensor under FSDP2)."""
        return {key: getattr(module, local) for key, (module, local) in self._owners.items()}

    @property
    def shared(self) -> dict[str, list[str]]:
        """Mimic tensors used by more than one module: ``{key: [module names]}``."""
        users: dict[str, list[str]] = {}
        for name, _, keys in self.hooked:
            for key in keys.values():
                users.setdefault(key, []).append(name)
        return {key: names for key, names in users.items() if len(names) > 1}

    @property
    def tied_names(self) -> dict[str, list[str]]:
        """For a mimic tensor read under its own name, the other names the student gives the same tensor (a tied
        ``lm_head.weight`` is also ``transformer.wte.weight``): where a checkpoint saved it, when it saved one."""
        names_of: dict[int, list[str]] = {}
        for name, param in self._model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
        tied = {}
        for key, param in self.tensors.items():
            if self.reference_names[key] == key:
                tied[key] = [name for name in names_of.get(id(param), []) if name != key]
        return {key: names for key, names in tied.items() if names}

    def capture(self, update_modules: list[nn.Module] | None = None, grad_from_first_call: bool = False) -> Capture:
        """Hooks recording every use of the mimic tensors in one forward (a context manager), and every call of
        ``update_modules`` (`hf_gradmimic.training.full_update`); with ``grad_from_first_call``, a forward under
        ``torch.no_grad`` builds a graph from the first mimic layer up (`Capture`)."""
        return Capture(self.hooked, list(self.layers), self.head, update_modules, grad_from_first_call)

    def current_tensors(self) -> dict[str, torch.Tensor]:
        """``θ_t`` per mimic tensor, whole and detached. Under FSDP2 this all-gathers: call it on every rank."""
        return {key: full_tensor(param.detach()) for key, param in self.tensors.items()}

    def load_reference(
        self, source: ReferenceSource, *, revision: str | None = None, token: str | bool | None = None
    ) -> dict[str, torch.Tensor]:
        """``θ_ref`` per mimic tensor (float32, CPU), read from ``source``; only those tensors are read."""
        if source is None:
            raise ValueError(
                "MimicTrainer needs a reference: set `mimic_reference` (Hub repo id, directory or .safetensors "
                "file) in MimicConfig, or pass `reference=` (a model or a {name: tensor} dict)."
            )
        by_name = load_reference_tensors(
            source, list(self.reference_names.values()), revision=revision, token=token, aliases=self.tied_names
        )
        reference = {key: by_name[name] for key, name in self.reference_names.items()}
        for key, param in self.tensors.items():
            if tuple(reference[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"Reference tensor {self.reference_names[key]!r} has shape {tuple(reference[key].shape)} but the "
                    f"student's {key!r} has shape {tuple(param.shape)}: the reference must have the same mimic-layer "
                    "architecture (same number of labels, same hidden size)."
                )
        return reference

    @staticmethod
    def describe_source(source: Any) -> str:
        """A reference source's name for messages and cards."""
        return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
