"""Sample guards: a sample whose loss or score is not finite, or that has no supervised label, gets weight 0 and never reaches the parameters.

Plain `Trainer` lets one non-finite sample make every parameter NaN. Here such a sample:

- gets a softmax logit of −inf (weight 0) and the ``status`` `STATUS_NONFINITE` in the score log, so the
  Stage-2 filter discards it;
- contributes no gradient. Masking its loss is not enough (0·NaN is NaN in the backward, and every
  layer's weight gradient sums over the rows' activations), so the micro-batch is run again without it
  and that forward is the one backpropagated;
- is counted (``mimic/nonfinite_samples``) and named in a warning.

A step in which no sample of any process is finite is skipped (`NonFiniteStepGuard`): the parameters and
the optimizer's state do not change, and training goes on as `Trainer`'s does (whose
``logging_nan_inf_filter`` keeps the NaN loss out of the logged mean); with ``mimic_max_nonfinite_steps`` set,
that many such steps in a row stop training with an error. A sample without a supervised label (a prompt-only
language-model sample) has loss 0 and no gradient, so its score says nothing: weight 0, `STATUS_UNLABELED`, and
it abstains in the filter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..score_log_io import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED
from .batch import shown_ids


def row_status(losses: torch.Tensor, scores: torch.Tensor, supervised: torch.Tensor | None) -> torch.Tensor:
    """Each sample's score-log ``status``: non-finite (loss, or score while others are finite), unlabeled, or scored.

    When every sample with a finite loss has a non-finite score, the scores say nothing about the samples
    (‖θ_ref − θ‖ = 0): those samples stay scored and the batch falls back to uniform weights."""
    finite_loss = torch.isfinite(losses)
    per_row_score_problem = ~torch.isfinite(scores) & torch.isfinite(scores[finite_loss]).any()
    status = torch.full_like(losses, STATUS_SCORED, dtype=torch.int8)
    if supervised is not None:
        status[supervised.to(losses.device) == 0] = STATUS_UNLABELED
    status[~finite_loss | per_row_score_problem] = STATUS_NONFINITE
    return status


class NonFiniteStepGuard(TrainerCallback):
    """Skips the optimizer update of a step in which no sample of any process was finite, stops training after
    ``max_steps`` such steps in a row, and counts and names the samples left out (`count`).

    Args:
        finite_samples: the number of finite samples of the current step, over every process.
        parameters: the trainable parameters (their gradients are dropped for a skipped step).
        max_steps: how many skipped steps in a row are tolerated (None: any number).
    """

    STATE_KEY = "MimicNonFiniteStepGuard"
    """Its counts' key in ``TrainerState.stateful_callbacks``: saved with each checkpoint, continued on resume."""
    COUNTS = ("in_a_row", "skipped", "fallback_count", "nonfinite_samples", "unlabeled_samples")

    def __init__(
        self,
        finite_samples: Callable[[], int | None],
        parameters: Callable[[], Any],
        max_steps: int | None,
        supervised_samples: Callable[[], int | None] | None = None,
        weighted_samples: Callable[[], int | None] | None = None,
    ) -> None:
        self.finite_samples = finite_samples
        self.supervised_samples = supervised_samples
        self.weighted_samples = weighted_samples
        self.first_step_checked = False
        self.parameters = parameters
        self.max_steps = max_steps
        self.in_a_row = 0
        self.skipped = 0
        self.fallback_count = self.nonfinite_samples = self.unlabeled_samples = 0

    def _check_first_step_is_supervised(self) -> None:
        """The first optimizer step of a run with no supervised sample on any process (every label -100): refused
        before its update, rather than training to the end on weight decay alone and leaving an empty filter."""
        if self.first_step_checked or self.supervised_samples is None:
            return
        self.first_step_checked = True
        supervised, finite = self.supervised_samples(), self.finite_samples()
        if supervised == 0 and finite:
            raise ValueError(
                f"The first optimizer step has {finite} sample(s) and none with a supervised label, on any process: every "
                "label is -100 (ignored). Training would change the weights by weight decay alone and score nothing. "
                "Check the labels: a collator or `completion_only_loss` masking every token, a prompt-only dataset, "
                "or labels cut off by truncation. If only the first batches are unlabeled, shuffle the dataset."
            )

    def _skip_update(self) -> None:
        # A gradient of None makes torch's optimizers skip the parameter: no update, no weight decay, no moment change.
        for param in self.parameters():
            param.grad = None

    def state(self) -> dict[str, int]:
        """The running counts, for the checkpoint's ``trainer_state.json``."""
        return {name: int(getattr(self, name)) for name in self.COUNTS}

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run continues the checkpoint's counts (the logged running totals go on); a fresh one starts at 0.
        saved = (state.stateful_callbacks or {}).get(self.STATE_KEY) or {}
        for name in self.COUNTS:
            setattr(self, name, int(saved.get(name, 0)))

    def count(self, records: Any, sample_ids: np.ndarray | None, global_step: int) -> dict[str, float]:
        """Counts a finished step's left-out samples, warns naming them, and returns the running counts to log."""
        self.fallback_count += records.fallback_batches
        if records.fallback_batches:
            warnings.warn(
                f"Step {global_step}: {records.fallback_batches} micro-batch(es) had a non-finite mimic score for every "
                "sample (‖θ_ref − θ‖ = 0: no direction); they used uniform weights.",
                RuntimeWarning,
                stacklevel=3,
            )
        nonfinite = records.rows[records.status == STATUS_NONFINITE]
        if nonfinite.size:
            warnings.warn(
                f"Step {global_step}: {nonfinite.size} sample(s) had a non-finite loss or score and were left out of the "
                f"update (weight 0, no gradient; flagged in the score log, the filter discards them): ids "
                f"{shown_ids(nonfinite, sample_ids)}{' ...' if nonfinite.size > 10 else ''}.",
                RuntimeWarning,
                stacklevel=3,
            )
        # Every process's samples of the step (the statuses travel in the step softmax's collective).
        self.nonfinite_samples += records.nonfinite_in_step
        self.unlabeled_samples += records.unlabeled_in_step
        return {
            "mimic/fallback_count": self.fallback_count,
            "mimic/nonfinite_samples": self.nonfinite_samples,
            "mimic/unlabeled_samples": self.unlabeled_samples,
        }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._check_first_step_is_supervised()
        finite = self.finite_samples()
        if finite is None or finite > 0:
            self.in_a_row = 0
            if self.weighted_samples is not None and self.supervised_samples is not None:
                if self.weighted_samples() == 0 and self.supervised_samples():
                    # A filter (AGRA) that excluded every scored sample: the batch is skipped, as AGRA skips it.
                    self._skip_update()
                    warnings.warn(
                        f"Step {state.global_step + 1}: the scorer excluded every sample of the step (weight 0 each); "
                        "the update was skipped (parameters and optimizer state unchanged).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return
        self._skip_update()
        self.in_a_row += 1
        self.skipped += 1
        if self.max_steps is not None and self.in_a_row >= self.max_steps:
            raise RuntimeError(
                f"Step {state.global_step + 1}: no sample had a finite loss for {self.in_a_row} optimizer steps in a row "
                f"(mimic_max_nonfinite_steps={self.max_steps}); the model itself produces non-finite values (diverged "
                "weights, or an input scale it cannot handle). Lower the learning rate, check the data, or resume "
                "from an earlier checkpoint."
            )
        warnings.warn(
            f"Step {state.global_step + 1}: no sample of the step had a finite loss or score; the update was skipped "
            f"(parameters and optimizer state unchanged; {self.in_a_row} such step(s) in a row).",
            RuntimeWarning,
            stacklevel=2,
        )
