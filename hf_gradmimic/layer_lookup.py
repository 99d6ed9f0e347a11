"""Naming the mimic layers: the ``mimic_layers`` setting parsed, and each named layer found on a model by the ghost registry.

Both are needed below the trainer (the reference recipes find the head they probe; the cards print the layer map),
so they live here, under `hf_gradmimic.training` and `hf_gradmimic.reference`, and import only the ghost registry.
"""

from __future__ import annotations

import difflib

from torch import nn

from .ghost import GHOST_RULES, UnsupportedLayerError, ghost_rule_for, supported_layer_types


class MimicLayerError(UnsupportedLayerError, ValueError):
    """A named mimic layer that the model does not have, or mimic layers that hold no parameter.

    A layer error, as an unsupported layer type is (`UnsupportedLayerError`); also a ValueError, as the setting
    naming it is a wrong value (and as the error raised here before was)."""


def parse_layer_map(mimic_layers: list[str] | dict[str, str] | str | None) -> dict[str, str]:
    """Normalise ``mimic_layers`` to an ordered ``{student_module: reference_module}`` map.

    Accepts a list of module names (same name in both models), a dict for renamed heads, or
    strings of the form ``"student=reference"`` (how the dict travels through the command line).
    """
    if mimic_layers is None:
        return {}
    if isinstance(mimic_layers, str):
        mimic_layers = [part for part in mimic_layers.replace(",", " ").split() if part]
    if isinstance(mimic_layers, dict):
        return {str(student): str(reference) for student, reference in mimic_layers.items()}
    layer_map: dict[str, str] = {}
    for entry in mimic_layers:
        student, _, reference = str(entry).partition("=")
        student = student.strip()
        if not student:
            raise ValueError(
                f"`mimic_layers` has an empty module name in {entry!r}; expected 'name' or 'student=reference'."
            )
        layer_map[student] = reference.strip() or student
    return layer_map


def resolve_mimic_layers(model: nn.Module, layer_names: list[str]) -> dict[str, nn.Module]:
    """Find each named module on the (unwrapped) student; each must be of a type with a ghost rule."""
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in layer_names:
        module = modules.get(name)
        if module is None:
            candidates = [n for n, m in modules.items() if n and any(isinstance(m, cls) for cls in GHOST_RULES)]
            if not candidates:  # nothing to name instead: the model itself cannot be scored
                raise UnsupportedLayerError(
                    f"{type(model).__name__} has no layer of a supported type ({', '.join(supported_layer_types())}), "
                    f"so it has no mimic layer (`mimic_layers` names {name!r}): Grad-Mimic scores samples by the "
                    "gradients of such a layer's parameters, and bare nn.Parameter tensors have no ghost rule. Give the "
                    "model one (e.g. an nn.Linear head) and name it in `mimic_layers`, or register a rule for your "
                    "layer type (hf_gradmimic.ghost.register_ghost_rule)."
                )
            close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4) or candidates[-5:]
            raise MimicLayerError(
                f"Mimic layer {name!r} not found in {type(model).__name__}. Close names of supported layers: {close}."
            )
        ghost_rule_for(module, name)
        resolved[name] = module
    return resolved
