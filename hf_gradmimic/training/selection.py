"""Select mode: the candidate batch is the whole optimizer step, across gradient-accumulation micro-batches and processes.

RHO-LOSS (Mindermann et al., ICML 2022) and Bayesian data selection (Deng, Cui, Zhu, arXiv 2308.10544) score
a candidate batch and train on its top ``ratio``. Here the candidate batch is everything one optimizer step
sees, as the step-wide softmax of Grad-Mimic (arXiv 2501.06708) is: every micro-batch of every process is
scored before any is trained (`Trainer.get_batch_samples` fetches them together), the scores travel to every
process (a few floats per sample), and one top-k over all of them decides. A stateful scorer (``observes``)
then sees every process's selected samples of the step, in one update, so its state stays identical on every
process and equal to a single process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..score_log_io import STATUS_SCORED
from ..scorers import SampleScorer, ScoreContext


@dataclass
class Candidates:
    """One micro-batch's candidates on this process, scored (``ctx`` kept only for a scorer that observes)."""

    rows: torch.Tensor
    scores: torch.Tensor
    losses: torch.Tensor
    status: torch.Tensor
    ctx: ScoreContext | None
    counts: torch.Tensor | None = None  # supervised targets per sample, for token weighting (None: unknown)


@dataclass
class Selection:
    """A micro-batch's candidates and their softmax logits: 0 where selected, −inf elsewhere. ``shares``: each
    candidate's share of the step's loss when selected (its supervised targets with token weighting, else 1), and
    ``step_total`` theirs summed over the step's selected samples, every micro-batch and process."""

    candidates: Candidates
    logits: torch.Tensor
    shares: torch.Tensor
    step_total: float

    @property
    def selected(self) -> torch.Tensor:
        return torch.isfinite(self.logits).nonzero().flatten()


def select_over_step(
    scorer: SampleScorer,
    candidates: list[Candidates],
    ratio: float,
    gather: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    num_processes: int,
    *,
    warmup: bool = False,
    token_weighting: bool = True,
) -> list[Selection]:
    """The scorer's selection (`SampleScorer.softmax_logits` in select mode: the top ``max(1, ⌊ratio · n⌋)``) over the
    ``n`` candidates of the whole step, every micro-batch of every process, in (micro-batch, process, position)
    order: the order of one process with the whole batch. A sample that was not scored (non-finite, unlabeled)
    ranks last and is never selected. In ``warmup`` (``mimic_warmup_steps``) every scored sample is selected."""
    gathered, shares = [], []
    for batch in candidates:
        ranked = torch.where(batch.status == STATUS_SCORED, batch.scores, torch.nan).to(torch.float64)
        counted = token_weighting and batch.counts is not None
        share = batch.counts.to(ranked.device, torch.float64) if counted else torch.ones_like(ranked)
        shares.append(share)
        gathered.append(gather(torch.stack([ranked, batch.rows.to(ranked.device, torch.float64), share], dim=1)))
    every = torch.cat(gathered)  # padding rows (uneven processes) have row −inf
    real = torch.isfinite(every[:, 1])
    logits = torch.full((len(every),), -math.inf, dtype=torch.float64, device=every.device)
    if warmup:
        logits[real] = 0.0
    else:
        logits[real] = scorer.softmax_logits(every[real, 0], "select", ratio=ratio).to(torch.float64)
    logits[torch.isnan(every[:, 0])] = -math.inf  # fewer scored samples than k: select only those
    step_total = float(every[torch.isfinite(logits), 2].sum())
    selections, offset = [], 0
    for batch, block, share in zip(candidates, gathered, shares):
        start = offset + rank * (len(block) // num_processes)
        mine = logits[start : start + len(batch.rows)].to(batch.scores.device, batch.scores.dtype)
        selections.append(Selection(batch, mine, share.to(batch.scores.device), step_total))
        offset += len(block)
    return selections


def observe_step(
    scorer: SampleScorer, selections: list[Selection], gather_rows: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Hands a stateful scorer every process's selected samples of the step, as one batch with equal weights."""
    fields = {"logits": [], "labels": [], "features": []}
    for selection in selections:
        ctx, picked = selection.candidates.ctx, selection.selected
        for name in fields:
            value = getattr(ctx, name)
            fields[name].append(value[picked.to(value.device)].detach())
    local = {name: torch.cat(values) for name, values in fields.items()}
    count = gather_rows(torch.tensor([[float(len(local["labels"]))]], device=local["labels"].device)).flatten()
    every = {name: _gather_padded(value, gather_rows, count) for name, value in local.items()}
    total = len(every["labels"])
    if total == 0:
        return
    ctx = ScoreContext(
        losses=torch.zeros(total), logits=every["logits"], labels=every["labels"].long(), features=every["features"]
    )
    scorer.observe(ctx, torch.full((total,), 1.0 / total))


def _gather_padded(
    value: torch.Tensor, gather_rows: Callable[[torch.Tensor], torch.Tensor], count: torch.Tensor
) -> torch.Tensor:
    """Every process's rows of ``value`` (rank after rank), without the padding the gather added."""
    flat = value.reshape(len(value), -1).to(torch.float64)
    gathered = gather_rows(flat)
    width = len(gathered) // len(count)
    rows = torch.cat([gathered[rank * width : rank * width + int(n)] for rank, n in enumerate(count.tolist())])
    return rows.reshape(-1, *value.shape[1:]).to(value.dtype)
