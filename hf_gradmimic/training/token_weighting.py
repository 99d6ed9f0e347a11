"""Sample-loss normalisation: how a sample's weight spreads over its supervised tokens (``mimic_token_weighting``).

`Trainer` averages a token task's loss over every supervised token of the optimizer step (``num_items_in_batch``,
across gradient-accumulation micro-batches), so a sample with more labelled tokens weighs more. The built-in
per-sample loss ``ℓ_i`` is the mean over sample ``i``'s own tokens (`hf_gradmimic.losses.token_loss`); with
``"token"`` weighting the step softmax runs over ``m_i/τ + log n_i`` (`training.step_softmax`), which gives the
coefficients ``w_i n_i / Σ_j w_j n_j``: every token of sample ``i`` weighs ``w_i``, normalised over the step's tokens,
and uniform weights reproduce `Trainer`. ``"sample"``: every sample weighs ``w_i`` whatever its length. For
sequence classification (one target per sample) both are the same.
"""

from __future__ import annotations

from typing import Any

import torch

TOKEN_WEIGHTING_CHOICES = ("token", "sample")


def log_token_counts(counts: torch.Tensor | None, weighting: str) -> torch.Tensor | None:
    """The update softmax's offsets, ``log n_i`` (−inf for a sample without a supervised token), or None when
    samples count once (``"sample"`` weighting, or counts unknown: a user loss function)."""
    if weighting != "token" or counts is None:
        return None
    return counts.float().log()


def plain_mean_weights(
    included: torch.Tensor,
    counts: torch.Tensor | None,
    weighting: str,
    accumulation_steps: int,
    num_items_in_batch: Any = None,
    loss_scale: int = 1,
) -> torch.Tensor:
    """Each sample's weight in `Trainer`'s plain loss, over the ``included`` samples of a micro-batch: ``n_i /
    num_items_in_batch`` (times the processes Trainer multiplies by when it averages tokens across devices) with
    token weighting when Trainer counted the step's tokens; otherwise the micro-batch's mean (over tokens, or over
    samples) divided by the accumulation steps, as Trainer does for a model that takes no loss keyword arguments."""
    scored = included.float()
    if weighting == "token" and counts is not None:
        tokens = scored * counts.to(scored.device).float()
        if num_items_in_batch is not None:
            return tokens * loss_scale / torch.as_tensor(num_items_in_batch, device=scored.device).float()
        return tokens / (tokens.sum().clamp_min(1) * accumulation_steps)
    return scored / (scored.sum().clamp_min(1) * accumulation_steps)


def supervised_items(labels: list[torch.Tensor], shifted: bool) -> torch.Tensor:
    """The supervised tokens of a step's micro-batches (their ``labels``) as the per-sample losses count them: a
    causal LM's (``shifted``) from the second position. Divided by `Trainer`'s ``num_items_in_batch``, it is the
    total weight U = Σ_i u_i of `Trainer`'s plain loss over the step: 1, unless `Trainer` counts other tokens (for a
    causal LM without ``loss_type``, GPT-2 in transformers 5.25, it counts the unshifted labels)."""
    return sum((batch[..., 1:] if shifted and batch.dim() == 2 else batch).ne(-100).sum() for batch in labels)
