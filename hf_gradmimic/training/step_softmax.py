"""The step-wide online softmax: weights over every micro-batch and process of an optimizer step.

Grad-Mimic (Huang et al., arXiv 2501.06708) weights a batch by ``w = softmax(s)`` with ``s = m / τ``.
With ``normalize="step"`` the batch is the whole optimizer step, exactly, whatever its split into
gradient-accumulation micro-batches and processes: each micro-batch's logits are gathered across ranks
(a few floats per sample) and combined as an online softmax. Micro-batch ``k`` has running max ``M_k``
and running sum ``S_k = Σ exp(s_j − M_k)`` over everything seen in the step; it contributes
``Σ_i exp(s_i − M_k)/S_k · ∇ℓ_i`` and the gradients accumulated so far are rescaled by
``S_{k−1}·exp(M_{k−1} − M_k)/S_k``. After the last micro-batch the accumulated gradient is
``Σ_i softmax(s)_i ∇ℓ_i`` over the step. With ``normalize="micro"`` each micro-batch on each process is its
own softmax. A logit of ``−inf`` (an excluded or unselected sample, or padding) has weight 0.

With token weighting (``mimic_token_weighting="token"``) the update's softmax runs over ``s_i + log n_i``,
``n_i`` the sample's supervised tokens: the coefficients are ``w_i n_i / Σ_j w_j n_j`` on the per-sample mean
losses, i.e. every token of sample ``i`` weighs ``w_i``, normalised over the step's tokens, as `Trainer` averages
over them. The weights recorded (score log, metrics) stay ``w = softmax(s)``, which the filter reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..score_log_io import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED
from ..scorers.base import softmax_or_zero


def finite_or_zero(running_max: torch.Tensor) -> torch.Tensor:
    """The softmax shift: the running max, or 0 while no finite logit has been seen (−inf − (−inf) is NaN)."""
    return torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))


@dataclass
class _MicroBatch:
    """One micro-batch's values: this rank's, and every rank's (gathered, −inf padded) for the step's metrics."""

    rows: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    losses: torch.Tensor
    status: torch.Tensor
    fallback: torch.Tensor
    all_logits: torch.Tensor
    all_rows: torch.Tensor
    all_scores: torch.Tensor
    all_losses: torch.Tensor
    all_status: torch.Tensor
    weights: torch.Tensor | None = None  # "micro" normalisation only
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's per-sample columns for the log


@dataclass
class StepRecords:
    """What an optimizer step leaves for the score log and the metrics.

    ``rows``, ``scores``, ``weights``, ``losses`` and ``batch_sizes`` are this rank's samples in micro-batch
    order; ``all_rows`` holds every rank's rows per micro-batch (−inf padded), for the repeat flags.
    """

    global_step: int
    rows: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    losses: np.ndarray
    status: np.ndarray
    batch_sizes: np.ndarray
    fallback_batches: int
    all_rows: list[np.ndarray]
    micro_batch_rows: list[np.ndarray]
    nonfinite_in_step: int = 0  # every process's samples
    unlabeled_in_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Optional per-sample columns of the score log (`hf_gradmimic.score_log_io.OPTIONAL_SCORE_COLUMNS`), each present when
    # every micro-batch of the step recorded it.
    recorded: dict[str, np.ndarray] = field(default_factory=dict)


class StepSoftmax:
    """The online softmax of one optimizer step at a time.

    Args:
        normalize: ``"step"`` or ``"micro"`` (`MimicConfig.mimic_normalize`).
        num_processes: the world size; DDP and FSDP average gradients over it.
        gather: ``packed [b, k] -> [world · b_max, k]``, every rank's rows (padded with −inf); identity for one process.
        accumulated_grads: the gradients accumulated so far in the step, which a new micro-batch rescales.
    """

    def __init__(
        self,
        normalize: str,
        num_processes: int,
        gather: Callable[[torch.Tensor], torch.Tensor],
        accumulated_grads: Callable[[], list[torch.Tensor]],
    ) -> None:
        self.normalize = normalize
        self.num_processes = num_processes
        self.gather = gather
        self.accumulated_grads = accumulated_grads
        self.global_step: int | None = None
        self.running_max = self.running_sum = None
        self.micro_batches: list[_MicroBatch] = []

    def reset(self) -> None:
        """Forget a step that was never finished (training stopped inside it): a run resumed at that step index on
        the same trainer would otherwise add its micro-batches to the stale ones."""
        self.global_step = None
        self.running_max = self.running_sum = None
        self.micro_batches = []

    def _begin(self, global_step: int, device: torch.device) -> None:
        if self.global_step != global_step:
            self.global_step = global_step
            self.running_max = torch.tensor(-math.inf, device=device)
            self.running_sum = torch.tensor(0.0, device=device)
            self.micro_batches = []

    def micro_batches_in(self, global_step: int) -> int:
        """How many micro-batches of step ``global_step`` this rank has added so far."""
        return len(self.micro_batches) if self.global_step == global_step else 0

    def finite_samples(self) -> int | None:
        """Samples of the step being accumulated, over every process, with a finite loss and score (None: no step)."""
        if not self.micro_batches:
            return None
        return int(
            sum(
                int((m.all_status == STATUS_SCORED).sum() + (m.all_status == STATUS_UNLABELED).sum())
                for m in self.micro_batches
            )
        )

    def weighted_samples(self) -> int | None:
        """Samples of the step being accumulated, over every process, with a weight above 0 (None: no step)."""
        if not self.micro_batches:
            return None
        return int(sum(int(torch.isfinite(m.all_logits).sum()) for m in self.micro_batches))

    def supervised_samples(self) -> int | None:
        """Samples of the step being accumulated, over every process, that were scored: finite, with a supervised
        label (None: no step)."""
        if not self.micro_batches:
            return None
        return int(sum(int((m.all_status == STATUS_SCORED).sum()) for m in self.micro_batches))

    def add(
        self,
        global_step: int,
        rows: torch.Tensor,
        scores: torch.Tensor,
        logits: torch.Tensor,
        losses: torch.Tensor,
        status: torch.Tensor,
        fallback: torch.Tensor,
        accumulation_steps: int,
        log_counts: torch.Tensor | None = None,
        recorded: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Adds a micro-batch of the step ``global_step``; returns each local sample's coefficient c_i, so that
        backward of Σ_i c_i ℓ_i (averaged over ranks by DDP/FSDP) accumulates Σ_i w_i ∇ℓ_i. ``log_counts``: log of
        each sample's supervised tokens, for token weighting (None: every sample counts once). ``recorded``: per-sample
        columns of this rank's samples that only travel to the score log (the reference's loss, the margin)."""
        self._begin(global_step, logits.device)
        offsets = torch.zeros_like(logits) if log_counts is None else log_counts.to(logits.device, logits.dtype)
        columns = [logits, rows.to(logits.device), scores.detach(), losses.detach(), status.to(logits.device), offsets]
        packed = torch.stack([column.to(logits.device, torch.float64) for column in columns], dim=1)
        # One collective for all six columns; float64 holds row indices exactly up to 2**53.
        all_logits, all_rows, all_scores, all_losses, all_status, all_offsets = self.gather(packed).unbind(dim=1)
        micro = _MicroBatch(
            rows,
            scores.detach(),
            logits,
            losses.detach(),
            status,
            fallback,
            all_logits.to(logits.dtype),
            all_rows,
            all_scores,
            all_losses,
            all_status,
        )
        micro.recorded = {name: values.detach() for name, values in (recorded or {}).items() if values is not None}
        self.micro_batches.append(micro)
        update_logits = logits + offsets  # −inf + anything stays −inf: a left-out sample keeps weight 0
        if self.normalize == "micro":
            micro.weights = softmax_or_zero(logits)
            return softmax_or_zero(update_logits) / accumulation_steps
        all_update_logits = micro.all_logits + all_offsets.to(logits.dtype)
        new_max = torch.maximum(self.running_max, all_update_logits.max())
        shift = finite_or_zero(new_max)
        carried = self.running_sum * torch.exp(self.running_max - shift)
        new_sum = carried + torch.exp(all_update_logits - shift).sum()
        if len(self.micro_batches) > 1:
            # Gradients accumulated so far were normalised by the old sum: bring them to the new one.
            grads = self.accumulated_grads()
            if grads:
                torch._foreach_mul_(grads, torch.where(new_sum > 0, carried / new_sum, torch.ones_like(new_sum)))
        self.running_max, self.running_sum = new_max, new_sum
        coefficients = torch.exp(update_logits - shift) / new_sum * self.num_processes
        return torch.where(new_sum > 0, coefficients, torch.zeros_like(coefficients))

    def finish(self, global_step: int) -> StepRecords | None:
        """The final weights and metrics of step ``global_step`` (None when it was not scored here)."""
        if self.global_step != global_step or not self.micro_batches:
            return None
        micro_batches, self.micro_batches, self.global_step = self.micro_batches, [], None
        rows = torch.cat([m.rows for m in micro_batches]).numpy()
        losses = torch.cat([m.losses for m in micro_batches]).float().cpu().numpy()
        real = torch.isfinite(torch.cat([m.all_rows for m in micro_batches]))  # drop the padding of uneven ranks
        # A non-finite sample has weight 0; its loss must not turn the weighted mean into NaN (0·NaN).
        step_losses = torch.nan_to_num(
            torch.cat([m.all_losses for m in micro_batches])[real], nan=0.0, posinf=0.0, neginf=0.0
        )
        if self.normalize == "micro":
            weights = torch.cat([m.weights for m in micro_batches]).float().cpu().numpy()
            batch_sizes = np.concatenate([np.full(len(m.rows), len(m.rows)) for m in micro_batches])
            ess_fraction = float(
                np.mean(
                    [
                        1.0 / m.weights.square().sum().item() / len(m.weights)
                        for m in micro_batches
                        if m.weights.sum() > 0
                    ]
                )
            )
            finite_losses = np.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0)
            weighted_loss = float(
                (weights * finite_losses).sum() / max(weights.sum(), 1e-30)
            )  # this rank's micro-batches
        else:
            # The recorded weights are softmax(s) over the step, without the token counts of the update's softmax.
            step_logits = torch.cat([m.all_logits for m in micro_batches])[real]
            shift = finite_or_zero(step_logits.max())
            total = torch.clamp(torch.exp(step_logits - shift).sum(), min=torch.finfo(step_logits.dtype).tiny)
            weights = torch.exp(torch.cat([m.logits for m in micro_batches]) - shift).div(total).float().cpu().numpy()
            all_weights = torch.exp(step_logits - shift) / total
            batch_sizes = np.full(len(rows), int(real.sum()))
            ess_fraction = float(1.0 / all_weights.square().sum() / real.sum())
            weighted_loss = float((all_weights * step_losses).sum() / torch.clamp(all_weights.sum(), min=1e-30))
        step_scores = torch.cat([m.all_scores for m in micro_batches])[real].cpu().numpy()  # every rank's samples
        step_status = torch.cat([m.all_status for m in micro_batches])[real].cpu().numpy()
        finite = step_scores[np.isfinite(step_scores) & (step_status == STATUS_SCORED)]
        metrics = {
            "mimic/score_mean": float(finite.mean()) if finite.size else float("nan"),
            "mimic/score_std": float(finite.std()) if finite.size else float("nan"),
            "mimic/frac_positive": float((finite > 0).mean()) if finite.size else float("nan"),
            "mimic/ess_fraction": ess_fraction,
            "mimic/weighted_loss": weighted_loss,
        }
        return StepRecords(
            global_step=global_step,
            rows=rows,
            scores=torch.cat([m.scores for m in micro_batches]).float().cpu().numpy(),
            weights=weights,
            losses=losses,
            status=torch.cat([m.status for m in micro_batches]).cpu().numpy().astype(np.int8),
            batch_sizes=batch_sizes,
            fallback_batches=int(torch.stack([m.fallback for m in micro_batches]).sum().item()),
            all_rows=[m.all_rows.cpu().numpy() for m in micro_batches],
            micro_batch_rows=[m.rows.numpy() for m in micro_batches],
            nonfinite_in_step=int((step_status == STATUS_NONFINITE).sum()),
            unlabeled_in_step=int((step_status == STATUS_UNLABELED).sum()),
            metrics=metrics,
            recorded={
                name: torch.cat([m.recorded[name] for m in micro_batches]).float().cpu().numpy()
                for name in micro_batches[0].recorded
                if all(name in m.recorded for m in micro_batches)
            },
        )


def gather_across_ranks(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``packed [b, k] -> [world · b_max, k]``: every rank's rows, each rank padded to the longest with −inf."""
    if accelerator.num_processes == 1:
        return lambda packed: packed

    def gather(packed: torch.Tensor) -> torch.Tensor:
        packed = accelerator.pad_across_processes(packed, dim=0, pad_index=-math.inf)
        return accelerator.gather(packed)

    return gather
