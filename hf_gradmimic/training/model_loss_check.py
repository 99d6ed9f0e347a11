"""The first-batch check that the built-in per-sample losses average to the model's own loss.

`MimicTrainer` does not use a model's ``outputs.loss`` (it is reduced over the batch): it recomputes one loss per sample
from the logits (`hf_gradmimic.losses`). `Trainer` trains on the model's own loss. When a model computes its loss in
its own way (a second label column, an auxiliary term, a custom criterion), the two would train different objectives
without a word; this check refuses that at the first training batch, before any update, naming the two ways out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..losses import per_sample_loss, supervised_counts


def own_loss_and_predictions(outputs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's own loss and its predictions from a forward *with* labels, read as `Trainer` reads them: the
    ``loss`` and ``logits`` attributes or keys (for a dict without ``logits``, its first other tensor), or a tuple's
    first two elements. ``(None, None)`` when the outputs hold no loss."""
    if isinstance(outputs, dict) or hasattr(outputs, "loss"):
        get = outputs.get if isinstance(outputs, dict) else lambda key: getattr(outputs, key, None)
        loss, logits = get("loss"), get("logits")
        if logits is None and isinstance(outputs, dict):
            logits = next((v for k, v in outputs.items() if k != "loss" and isinstance(v, torch.Tensor)), None)
        return loss, logits
    if isinstance(outputs, (tuple, list)) and len(outputs) >= 2:
        return outputs[0], outputs[1]
    return None, None


def trainer_mean(losses: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """How the model's own loss averages the per-sample losses: over the supervised tokens (token tasks: ``ℓ_i`` is
    sample ``i``'s mean over its ``counts[i]`` tokens), else over the samples."""
    if counts is None:
        return losses.mean()
    counts = counts.to(losses.dtype)
    return (losses * counts).sum() / counts.sum().clamp(min=1)


@torch.no_grad()
def check_model_loss_is_builtin(
    model: nn.Module, unwrapped: nn.Module, inputs: dict[str, Any], trainer_name: str
) -> None:
    """Run ``model`` once on ``inputs`` (labels included, no gradient, eval mode) and compare its own loss with the built-in
    per-sample losses averaged as `Trainer` would; raise ValueError when they differ (relative 1e-4 in float32, 2e-2
    in half precision). Outputs without a loss (the model computes none) are not checked."""
    labels = inputs.get("labels")
    if labels is None:
        return
    # In eval mode, as the alignment check's forwards: no dropout or NEFTune noise is drawn, so the training forward
    # that follows takes the same random numbers as Trainer's.
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            own, logits = own_loss_and_predictions(model(**inputs))
    except (RuntimeError, ValueError, TypeError):
        return  # the model cannot compute its own loss on these labels: the built-in losses say why, in their terms
    finally:
        model.train(was_training)
    if own is None or logits is None or not isinstance(own, torch.Tensor) or own.numel() != 1:
        return
    try:
        losses = per_sample_loss(unwrapped, logits, labels)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{trainer_name} computes one loss per sample from the logits, and has no built-in loss for this model's "
            f"outputs ({error}). Pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[batch]`, or a "
            "`compute_loss_func` marked with `hf_gradmimic.returns_per_sample_losses`."
        ) from error
    counts = supervised_counts(unwrapped, logits, labels) if logits.dim() == 3 else None
    expected = trainer_mean(losses.float(), counts)
    own = own.detach().float()
    tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2
    if not torch.isfinite(own) or not torch.isfinite(expected):
        return  # a non-finite batch is the non-finite guard's to handle
    if torch.isclose(own, expected, rtol=tolerance, atol=tolerance * 1e-2):
        return
    raise ValueError(
        f"The model's own loss on the first training batch is {own.item():.6g}, and the built-in per-sample losses that "
        f"{trainer_name} weights average to {expected.item():.6g}: {type(unwrapped).__name__} computes its loss in its "
        "own way (a second label column, an auxiliary term, another criterion), which Trainer trains on and the "
        "built-in losses would silently replace. Pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[batch]` "
        "returning that loss per sample, or a `compute_loss_func` marked with `hf_gradmimic.returns_per_sample_losses`."
    )
