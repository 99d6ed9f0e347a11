"""The reference's verdict on each training sample: its per-sample loss on the student's current features.

Grad-Mimic's reference (Huang et al., arXiv 2501.06708) is a model whose mimic layers read the student's own
features (a head probed on them, `hf_gradmimic.build_reference`). Its loss on a sample is the "reference
argmax ≠ label" signal made continuous, a label-noise detector on its own and one of Stage 2's signals
(``reference_loss`` in the score log). Two ways to get it:

- a single mimic layer whose output *is* the logits (a head): the reference's layer applied to the features the
  training forward captured, one matmul (`reference_head_losses`); train mode, as the student's own loss;
- any other mimic layers: a no-grad forward of the student with its mimic tensors swapped for the reference's
  (`swapped_losses`), eval mode; it costs a forward.

`ReferenceVerdict` picks one per micro-batch by ``MimicConfig.mimic_log_reference_loss``: ``"auto"`` records it
only where it is one matmul over ``[B, classes]`` logits (a classification head: measured in ``make bench``),
``"always"`` everywhere (a language model's head costs an ``lm_head``-sized matmul; other layers a forward),
``"never"`` not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..losses import SampleLoss
from .capture import Capture

__all__ = ["LOG_REFERENCE_LOSS_CHOICES", "ReferenceVerdict", "reference_head_losses", "swapped_losses"]

LOG_REFERENCE_LOSS_CHOICES = ("auto", "always", "never")

MONITOR_CHUNK_LOGITS = 1 << 22
"""At most this many reference logits are alive at once when a head is applied to captured features."""


def reference_head_losses(
    layers: Any, reference: dict[str, torch.Tensor], capture: Capture, labels: Any, sample_loss: SampleLoss
) -> torch.Tensor:
    """Per-sample losses of the reference's head on the features the training forward just captured, without
    gradients. A few samples at a time, so that at most `MONITOR_CHUNK_LOGITS` logits are alive (a language
    model's are vocabulary-sized)."""
    ((name, layer),) = layers.layers.items()
    features = capture.activations()[name]
    params = {
        local: reference[f"{name}.{local}"].to(features.dtype) for local, _ in layer.named_parameters(recurse=False)
    }
    with torch.no_grad():
        one = torch.func.functional_call(layer, params, (features[:1],))
        chunk = max(1, MONITOR_CHUNK_LOGITS // max(1, one.numel()))
        return torch.cat(
            [
                sample_loss.per_sample_losses(
                    {"logits": torch.func.functional_call(layer, params, (features[start : start + chunk],))},
                    {"labels": labels[start : start + chunk]},
                )
                for start in range(0, len(features), chunk)
            ]
        )


def swapped_losses(
    model: torch.nn.Module,
    layers: Any,
    reference: dict[str, torch.Tensor],
    model_inputs: dict[str, Any],
    inputs: dict[str, Any],
    sample_loss: SampleLoss,
    *,
    with_own: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-sample losses of the student (unless ``with_own`` is False: None), and of the student with its mimic
    tensors swapped for the reference's (so the reference reads the student's current features), both in eval
    mode and without gradients."""
    # Mimic tensors are keyed by their parameter name on the unwrapped model; tied uses follow (tie_weights).
    swapped = {key: reference[key].to(param.dtype) for key, param in layers.tensors.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = sample_loss.per_sample_losses(model(**model_inputs), inputs) if with_own else None
            outputs = torch.func.functional_call(model, swapped, args=(), kwargs=model_inputs, strict=False)
            with_reference = sample_loss.per_sample_losses(outputs, inputs)
    finally:
        model.train(was_training)
    return own, with_reference


class ReferenceVerdict:
    """The reference's per-sample loss of each training micro-batch, for the score log's ``reference_loss``.

    Args:
        setting: ``"auto"``, ``"always"`` or ``"never"`` (`MimicConfig.mimic_log_reference_loss`).
        reference: returns the reference's mimic tensors on the training device (the scorer's).
        layers: the student's `MimicLayers`.
        model: the unwrapped student.
        sample_loss: the trainer's per-sample losses (`hf_gradmimic.losses.SampleLoss`).
    """

    def __init__(
        self,
        setting: str,
        reference: Callable[[], dict[str, torch.Tensor]],
        layers: Any,
        model: torch.nn.Module,
        sample_loss: SampleLoss,
    ) -> None:
        if setting not in LOG_REFERENCE_LOSS_CHOICES:
            raise ValueError(
                f"`mimic_log_reference_loss` must be one of {LOG_REFERENCE_LOSS_CHOICES}; got {setting!r}."
            )
        self.setting = setting
        self.reference = reference
        self.layers = layers
        self.model = model
        self.sample_loss = sample_loss

    def losses(
        self,
        capture: Capture,
        logits: torch.Tensor | None,
        labels: Any,
        model_inputs: dict[str, Any],
        inputs: dict[str, Any],
    ) -> torch.Tensor | None:
        """The reference's per-sample losses (float32, detached), or None where the setting leaves them out.

        Call right after the training forward, while the captured features are alive."""
        if self.setting == "never" or labels is None:
            return None
        head = logits is not None and capture.only_output() is logits
        if head and (self.setting == "always" or logits.dim() == 2):
            return reference_head_losses(self.layers, self.reference(), capture, labels, self.sample_loss).float()
        if self.setting == "always":
            _, with_reference = swapped_losses(
                self.model, self.layers, self.reference(), model_inputs, inputs, self.sample_loss, with_own=False
            )
            return with_reference.float()
        return None
