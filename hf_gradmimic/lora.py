"""LoRA matrices of a PEFT model as mimic layers: ``"lora"`` and LoRA wrapper paths become the A and B modules of the active adapter.

Grad-Mimic (Huang et al., arXiv 2501.06708) scores a sample by ``⟨−g_i, θ_ref − θ_t⟩ / ‖θ_ref − θ_t‖`` over the
mimic tensors. When a model is fine-tuned with LoRA (PEFT), the trainable tensors are the adapter's matrices:
a LoRA layer computes ``base(x) + s · B(A(dropout(x)))``, with ``A`` and ``B`` plain ``nn.Linear`` modules held
in ``lora_A[adapter]`` / ``lora_B[adapter]``. Each is a linear mimic layer for the ghost rules
(`hf_gradmimic.ghost.linear`): its recorded input is what it really saw (after the LoRA dropout) and its output
gradient carries the scaling ``s``, so ``⟨g_i, v⟩`` is exact for every sample.

`expand_lora_layers` turns the names a user writes into those modules:

- ``"lora"``: every A and B matrix of the active adapter, in every LoRA layer;
- a LoRA wrapper (``"model.layers.0.self_attn.q_proj"``): its A and B;
- a ``lora_A`` / ``lora_B`` ModuleDict: its active adapter's module;

and refuses what the ghost maths cannot score exactly: LoRA variants (DoRA...) that also read the matrices outside
the module calls, LoRA on embeddings or on bare parameters (no module call to record), merged or disabled adapters.
PEFT is imported only when the model already uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

from torch import nn

LORA_KEYWORD = "lora"
"""``mimic_layers=["lora"]``: every LoRA A and B matrix of the active adapter."""

LORA_MATRICES = ("lora_A", "lora_B")


class LoraLayerError(ValueError):
    """A LoRA layer named as a mimic layer whose adapter the ghost maths cannot score exactly."""


def _lora_layer_type() -> type | None:
    """PEFT's ``LoraLayer``, or None when PEFT was never imported (then no model can hold a LoRA layer)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every PEFT LoRA layer of ``model`` (a `PeftModel`, or a transformers model given adapters with
    ``add_adapter``), by module path."""
    layer_type = _lora_layer_type()
    if layer_type is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, layer_type):
            yield name, module


def _active_adapter(name: str, layer: nn.Module) -> str:
    """The one adapter of ``layer`` that runs, after the checks that make its A and B exact ghost layers."""
    active = [
        adapter
        for adapter in layer.active_adapters
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {})
    ]
    if len(active) != 1:
        raise LoraLayerError(
            f"LoRA layer {name!r} has {len(active)} active adapters ({active}); Grad-Mimic compares one adapter with "
            "its reference. Activate one with `model.set_adapter(name)`."
        )
    (adapter,) = active
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        raise LoraLayerError(
            f"LoRA layer {name!r}: adapter {adapter!r} is disabled or merged into the base weights, so its matrices "
            "do not run in the forward pass. Unmerge it (`model.unmerge_adapter()`) and enable it."
        )
    if adapter not in layer.lora_A:
        raise LoraLayerError(
            f"LoRA layer {name!r} is a LoRA embedding: PEFT looks its A and B matrices up as bare parameters, without "
            "a module call that the ghost maths could record. Leave the embedding out of `target_modules`, or name "
            "the other LoRA layers in `mimic_layers`."
        )
    if hasattr(layer, "parameter_name"):  # PEFT's ParamWrapper (`target_parameters`): the matrices are used directly
        raise LoraLayerError(
            f"LoRA layer {name!r} adapts the bare parameter {layer.parameter_name!r} (`target_parameters`): PEFT uses "
            "its A and B matrices without module calls that the ghost maths could record. Use `target_modules`."
        )
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        raise LoraLayerError(
            f"LoRA layer {name!r} uses the LoRA variant {variant} (e.g. DoRA): it also reads the A and B weights "
            "outside their module calls (a weight norm), so per-sample gradients of the matrices are not the ghost "
            "rule's. Use plain LoRA (`use_dora=False`) for the mimic layers."
        )
    return adapter


def _matrices(name: str, layer: nn.Module, reference: str) -> dict[str, str]:
    """``{student path: reference path}`` of the active adapter's A and B modules of one LoRA layer."""
    adapter = _active_adapter(name, layer)
    return {f"{name}.{matrix}.{adapter}": f"{reference}.{matrix}.{adapter}" for matrix in LORA_MATRICES}


def expand_lora_layers(model: nn.Module, layer_map: Mapping[str, str]) -> dict[str, str]:
    """``mimic_layers`` with its LoRA names replaced by the modules of the active adapter's matrices.

    Args:
        model: the unwrapped student.
        layer_map: ``{student_module: reference_module}`` (`MimicConfig.mimic_layer_map`).

    Returns:
        The same map, in order, where ``"lora"`` became every A and B module of the active adapter, a LoRA wrapper its
        own two, and a ``lora_A`` / ``lora_B`` ModuleDict its active adapter's module. Other names are kept as they
        are. Scores then span all those matrices (Grad-Mimic, arXiv 2501.06708, over the concatenated tensors).
    """
    wrappers = dict(lora_layers(model))
    expanded: dict[str, str] = {}
    for student, reference in layer_map.items():
        if student == LORA_KEYWORD:
            if reference != student:
                raise ValueError(f"`mimic_layers` entry 'lora={reference}': 'lora' takes no reference name.")
            if not wrappers:
                raise LoraLayerError(
                    f"`mimic_layers=['lora']`, but {type(model).__name__} has no LoRA layer. Wrap the model with "
                    "`peft.get_peft_model(model, LoraConfig(...))` first, or name its layers (e.g. ['lm_head'])."
                )
            for name, layer in wrappers.items():
                expanded.update(_matrices(name, layer, name))
        elif student in wrappers:
            expanded.update(_matrices(student, wrappers[student], reference))
        elif student.rpartition(".")[2] in LORA_MATRICES and student.rpartition(".")[0] in wrappers:
            owner, _, matrix = student.rpartition(".")
            adapter = _active_adapter(owner, wrappers[owner])
            expanded[f"{student}.{adapter}"] = f"{reference}.{adapter}"
        else:
            expanded[student] = reference
    return expanded
