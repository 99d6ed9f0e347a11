"""Per-sample losses ``ℓ_i`` computed from the model's logits, in float32.

Grad-Mimic needs one loss per sample; a model's own ``outputs.loss`` is already reduced over the
batch, so it is not used ("don't trust the model's own loss"). Conventions follow `Trainer`:
labels equal to ``-100`` are ignored, token losses are averaged over each sample's own label
tokens, causal LMs shift labels by one, and ``label_smoothing_factor`` is honoured (the same
formula as transformers' ``LabelSmoother``: ``(1-ε)·nll + ε·mean_c(-log p_c)``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

PerSampleLossFn = Callable[[Any, dict[str, Any]], torch.Tensor]


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``ℓ_i`` for single-label classification (cross entropy), regression (squared error) or
    multi-label classification (binary cross entropy averaged over labels)."""
    logits = logits.float()
    if logits.shape[-1] == 1 and labels.is_floating_point() and labels.dim() == 1:
        return (logits.squeeze(-1) - labels.float()).square()
    if labels.is_floating_point() and labels.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=-1)
    return F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, shift: bool = False
) -> torch.Tensor:
    """``ℓ_i`` = mean token cross entropy over sample ``i``'s label tokens (``-100`` ignored).

    With ``shift`` (causal LM), position ``t`` predicts label ``t + 1``. A sample without any label
    token gets loss 0 and therefore a zero gradient.
    """
    if shift:
        # Shift the labels, not the logits: slicing [B, T, vocab] logits copies them, and its backward
        # fills a zero tensor of that size (transformers' causal-LM loss does the same).
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    batch_size, length, vocab = logits.shape
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, vocab),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(batch_size, length)
    label_counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / label_counts


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its labels are shifted), looking through a PEFT wrapper: a
    ``PeftModel`` made without ``task_type="CAUSAL_LM"`` is named neither like a causal LM nor like anything else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    name = type(model).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel"))


def logits_of(outputs: Any) -> torch.Tensor:
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, dict):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise TypeError(
        f"Cannot find logits in the model's outputs of type {type(outputs).__name__}; pass "
        "`per_sample_loss_fn=(outputs, inputs) -> Tensor[B]` to MimicTrainer."
    )


def per_sample_loss(model: nn.Module, outputs: Any, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Dispatch on the task: causal LM, token classification (3-D logits) or sequence classification."""
    logits = logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        return token_loss(logits, labels, label_smoothing, shift=is_causal_lm(model))
    if logits.dim() == 2:
        return sequence_classification_loss(logits, labels, label_smoothing)
    raise ValueError(
        f"No built-in per-sample loss for logits of shape {tuple(logits.shape)} with labels of shape "
        f"{tuple(labels.shape)}; pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[B]` to MimicTrainer."
    )


def supervised_counts(model: nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """How many supervised targets each sample has under `per_sample_loss`'s conventions (``-100`` ignored, causal
    LMs shifted). A sample with none has loss 0 and no gradient: nothing to score it by."""
    logits = logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        targets = labels[:, 1:] if is_causal_lm(model) else labels
        return (targets != IGNORE_INDEX).sum(dim=1)
    if labels.is_floating_point():
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
    return (labels.reshape(labels.shape[0], -1) != IGNORE_INDEX).sum(dim=1)
