"""Reference diagnostics of Grad-Mimic: the base-checkpoint check, the first-step alignment check, the running monitor.

Grad-Mimic's score (Huang et al., arXiv 2501.06708) only means something when the reference shares the
student's coordinates. For a head, ``m_i ∝ (e_y − p_i)ᵀ (W_ref − W_t) h_i``: the reference's margin on the
student's features minus the student's own margin. These checks say when that fails:

- at construction, a reference built from another checkpoint than the student's (its recorded metadata);
- at the first step, the student with its mimic layers swapped for the reference, no better than itself
  (median per-sample loss);
- at every monitored step, the two terms of the score and the reference's loss on the student's current
  features; when the self term drives the ranking for several monitored steps in a row, a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..ghost import GhostBatch
from ..lora import lora_layers
from ..losses import SampleLoss
from ..reference.loading import checkpoint_name, read_reference_metadata
from ..reference.lora import check_adapter_init, check_adapter_scaling, module_adapter_metadata
from .capture import Capture
from .metrics_buffer import MetricsBuffer
from .reference_verdict import reference_head_losses, swapped_losses

SELF_TERM_PATIENCE = 3
"""Monitored steps in a row with the self term dominating before the monitor warns."""


FORWARD_MONITOR_MIN_STEPS = 50
"""The least interval of the default monitor (``mimic_monitor_steps=0``) where it needs two no-grad forwards (a mimic
layer that is not the head making the logits: LoRA matrices, an inner layer). They cost about 0.8 of a step on a
small Llama with LoRA, so at trl's ``logging_steps=10`` about 8% of training; a head's monitor reads the training
forward and follows the logging interval."""


def monitor_interval(args: Any, needs_forwards: bool = False) -> int:
    """The running monitor's interval in optimizer steps: ``mimic_monitor_steps``, else the logging interval (50
    when logging is not by steps), at least `FORWARD_MONITOR_MIN_STEPS` when the monitor needs its own forwards."""
    if args.mimic_monitor_steps:
        return args.mimic_monitor_steps
    steps = args.logging_steps
    interval = int(steps) if args.logging_strategy == "steps" and steps >= 1 else 50
    return max(interval, FORWARD_MONITOR_MIN_STEPS) if needs_forwards else interval


def check_reference_setup(
    source: Any,
    model: Any,
    current_tensors: Callable[[], dict[str, torch.Tensor]],
    *,
    revision: str | None,
    token: Any,
    reference_name: str,
) -> None:
    """At construction: the base-checkpoint check, and for a LoRA student, that its adapter starts from the A
    matrices the reference's adapter was trained from (`hf_gradmimic.reference.lora.check_adapter_init`)."""
    check_reference_base(
        source, getattr(model, "config", None), revision=revision, token=token, reference_name=reference_name
    )
    if not any(True for _ in lora_layers(model)):
        return
    if isinstance(source, (str, os.PathLike)):
        metadata = read_reference_metadata(source, revision=revision, token=token)
        check_adapter_scaling(metadata, model, reference_name)
        check_adapter_init(metadata, current_tensors(), reference_name)
    elif isinstance(getattr(source, "peft_config", None), dict):  # a PeftModel given in memory
        check_adapter_scaling(module_adapter_metadata(source), model, reference_name)


def check_reference_base(
    source: Any, student_config: Any, *, revision: str | None, token: Any, reference_name: str
) -> None:
    """Warn when the reference was built from another checkpoint than the student's (`build_reference` metadata)."""
    if not isinstance(source, (str, os.PathLike)):
        return
    metadata = read_reference_metadata(source, revision=revision, token=token)
    student = str(getattr(student_config, "_name_or_path", "") or "")
    student_revision = str(getattr(student_config, "_commit_hash", "") or "")
    base, base_revision = metadata.get("base_model", ""), metadata.get("base_revision", "")
    mismatch = bool(base and student and checkpoint_name(base) != checkpoint_name(student)) or bool(
        base_revision and student_revision and base_revision != student_revision
    )
    if mismatch:
        warnings.warn(
            f"The reference {reference_name} was built from checkpoint {base!r}"
            f"{f' @ {base_revision}' if base_revision else ''}, but the student starts from {student!r}"
            f"{f' @ {student_revision}' if student_revision else ''}. Mimic scores only mean something when both "
            "share coordinates: build the reference from the student's own checkpoint (hf_gradmimic.build_reference).",
            UserWarning,
            stacklevel=5,
        )


def _finite_pairs(own: torch.Tensor, with_reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples whose loss is finite both under the student's layers and under the reference's: a non-finite sample
    (left out of the update by the guard) would make every mean and median NaN."""
    finite = torch.isfinite(own) & torch.isfinite(with_reference)
    return own[finite], with_reference[finite]


class ReferenceDiagnostics:
    """The alignment check (first step) and the running monitor (every ``interval()`` steps) of one training run.

    Args:
        scorer: the Grad-Mimic scorer (its reference tensors, and the split of its score into two terms).
        layers: the student's `MimicLayers`.
        model: the unwrapped student.
        sample_loss: the trainer's per-sample losses (`hf_gradmimic.losses.SampleLoss`).
        metrics: where the logged values go.
        check_alignment: run the alignment check at the first step.
        args: the training configuration; the monitor's interval is read from it at each step (`monitor_interval`).
    """

    def __init__(
        self,
        scorer: Any,
        layers: Any,
        model: torch.nn.Module,
        sample_loss: SampleLoss,
        metrics: MetricsBuffer,
        check_alignment: bool,
        args: Any,
    ) -> None:
        self.scorer = scorer
        self.layers = layers
        self.model = model
        self.sample_loss = sample_loss
        self.metrics = metrics
        self.checks_alignment = check_alignment  # what the run does (the model card says it)
        self.alignment_pending = check_alignment
        self.args = args
        self.head_outputs_logits = False  # learnt at each training forward; picks the monitor's cheap path
        self.self_dominated_streak = 0
        self.warned_self_term = False
        self._monitored = False
        self._swapped: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ the three moments of a micro-batch

    def before_forward(
        self, global_step: int, micro_batch: int, model_inputs: dict[str, Any], inputs: dict[str, Any]
    ) -> None:
        """Runs the no-grad forwards the check and the monitor need, before the training forward: no graph is
        alive then, so they add nothing to the step's peak memory. The monitor of a head needs none."""
        interval = monitor_interval(self.args, needs_forwards=not self.head_outputs_logits)
        self._monitored = micro_batch == 0 and global_step % interval == 0
        # Once, at the run's first step: not again after a resume (its step is not 0), nor at a later train() call.
        check_alignment, self.alignment_pending = self.alignment_pending and global_step == 0, False
        needs_forwards = check_alignment or (self._monitored and not self.head_outputs_logits)
        self._swapped = self._swapped_losses(model_inputs, inputs) if needs_forwards else None
        if check_alignment:
            self._check_alignment(*self._swapped)

    def after_forward(
        self,
        capture: Capture,
        logits: torch.Tensor | None,
        losses: torch.Tensor,
        inputs: dict[str, Any],
        labels: Any,
        model_inputs: dict[str, Any],
    ) -> None:
        """Learns whether the single mimic layer makes the logits; for the monitor of such a head, the reference's
        losses on the features the training forward just captured."""
        self.head_outputs_logits = logits is not None and capture.only_output() is logits
        if not self._monitored:
            return
        if self.head_outputs_logits:
            self._swapped = (losses.detach(), self._reference_head_losses(capture, labels))
        elif self._swapped is None:  # the layer stopped being the logits' head since the last step
            self._swapped = self._swapped_losses(model_inputs, inputs)

    def after_scores(self, ghost: GhostBatch, scores: torch.Tensor, step: int) -> None:
        """The monitor's terms and warning, on a monitored step."""
        if self._monitored:
            self._monitor(ghost, scores.detach(), *self._swapped, step)
        self._monitored, self._swapped = False, None

    # ------------------------------------------------------------------ losses with the reference's layers

    def _swapped_losses(
        self, model_inputs: dict[str, Any], inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses of the student, and of the student with its mimic layers swapped for the reference
        (`reference_verdict.swapped_losses`: eval mode, no gradients)."""
        return swapped_losses(
            self.model, self.layers, self.scorer.reference_on_device(), model_inputs, inputs, self.sample_loss
        )

    def _reference_head_losses(self, capture: Capture, labels: Any) -> torch.Tensor:
        """The reference head's per-sample losses on the captured features: one layer call instead of two forwards."""
        return reference_head_losses(self.layers, self.scorer.reference_on_device(), capture, labels, self.sample_loss)

    # ------------------------------------------------------------------ checks

    def _check_alignment(self, own: torch.Tensor, with_reference: torch.Tensor) -> None:
        """Loss of the student with its mimic layers swapped for the reference, next to its own (first step)."""
        own, with_reference = _finite_pairs(own, with_reference)
        if not len(own):
            return  # no sample with finite losses: nothing to compare (the guard names them)
        own_loss, reference_loss = float(own.mean()), float(with_reference.mean())
        self.metrics.add("mimic/alignment_student_loss", own_loss)
        self.metrics.add("mimic/alignment_reference_loss", reference_loss)
        # Compare medians: with noisy labels a good reference is confidently "wrong" on the flipped
        # samples, which dominates the mean but not the median. Both are logged: the means under the names above,
        # the medians the check compares under `*_median`.
        own_median, reference_median = float(own.median()), float(with_reference.median())
        self.metrics.add("mimic/alignment_student_loss_median", own_median)
        self.metrics.add("mimic/alignment_reference_loss_median", reference_median)
        if not reference_median < own_median:
            warnings.warn(
                f"Alignment check: with its mimic layers swapped for the reference, the student's median per-sample "
                f"loss is {reference_median:.4f}, no better than its own {own_median:.4f} (means {reference_loss:.4f} "
                f"vs {own_loss:.4f}). The reference probably does not share the student's coordinate system (another "
                "checkpoint, or a backbone that has drifted), and its mimic scores can invert the ranking. Use a head "
                "trained on this checkpoint's frozen features (hf_gradmimic.build_reference).",
                UserWarning,
                stacklevel=2,
            )

    def _monitor(
        self, ghost: GhostBatch, scores: torch.Tensor, own: torch.Tensor, with_reference: torch.Tensor, step: int
    ) -> None:
        """Logs the two terms of the score and the loss of the reference's mimic layers applied to the student's
        current features, next to the student's own. For a head that makes the logits both come from the training
        forward (train mode: dropout on); for other layers, from two no-grad eval-mode forwards. When the self term
        drives the ranking (its spread over the batch exceeds the reference term's) for several monitored steps in
        a row, warns once."""
        reference_term, self_term = self.scorer.score_terms(ghost, scores, step)
        finite = torch.isfinite(reference_term) & torch.isfinite(self_term)
        if not finite.any():  # ‖v‖ = 0: no direction, no terms (the step falls back to uniform weights)
            return
        reference_term, self_term = reference_term[finite], self_term[finite]
        own, with_reference = _finite_pairs(own, with_reference)
        for key, value in (
            ("reference_term", reference_term.mean()),
            ("self_term", self_term.mean()),
            ("reference_term_std", reference_term.std(correction=0)),
            ("self_term_std", self_term.std(correction=0)),
            ("reference_loss", with_reference.mean()),
            ("student_loss", own.mean()),
        ):
            self.metrics.add(f"mimic/monitor_{key}", float(value))
        dominated = bool(self_term.numel() > 1 and self_term.std(correction=0) > reference_term.std(correction=0))
        self.self_dominated_streak = self.self_dominated_streak + 1 if dominated else 0
        if self.self_dominated_streak >= SELF_TERM_PATIENCE and not self.warned_self_term:
            self.warned_self_term = True
            warnings.warn(
                f"For {self.self_dominated_streak} monitored steps in a row the student's own margin (self term) has "
                "driven the mimic scores more than the reference's margin. The scores then favour hard samples, which "
                "are often the mislabeled ones: the reference no longer reads the student's features (its loss on "
                "them is logged as mimic/monitor_reference_loss). Use a reference probed on the student's checkpoint "
                "(hf_gradmimic.build_reference), freeze the backbone, or set mimic_score_terms='reference'.",
                UserWarning,
                stacklevel=2,
            )
