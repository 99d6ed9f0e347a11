r"""One Grad-Mimic micro-batch: forwarded, scored and turned into the loss whose backward gives Σ_i c_i ∇ℓ_i.

Grad-Mimic (Huang, Bilkhu, Sala, Movellan, arXiv 2501.06708, Algorithm 1) weights each sample of an optimizer
step by ``w_i = softmax_i(m_i / τ)`` of its score and trains on ``Σ_i w_i ∇ℓ_i``. `MimicStep.score` is the one
place a batch is forwarded with the mimic layers captured and scored: per-sample losses (`SampleLoss`), the
gradients at the mimic layers' outputs (the ghost, `hf_gradmimic.ghost`), the scorer's `ScoreContext`, its
scores and each sample's status (`guards.row_status`), returned as a `ScoredBatch`. Three paths use it:

- reweight (`MimicStep.reweight`): the scored batch's coefficients from the step-wide softmax
  (`step_softmax.StepSoftmax`), then its loss by the step's `Backward` plan;
- select (`MimicStep.candidates`, `MimicStep.train_selected`): every micro-batch of the step scored first
  (`selection`), then a forward of the selected samples only;
- non-finite rows (`MimicStep.loss_without`): a second forward without them, since 0·NaN is NaN in the
  backward (`guards`); with nothing left, a zero loss that still takes part in the gradient reduction.

How the weighted gradient is backpropagated is decided once per step, in `MimicStep.backward_plan`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..ghost import UnsupportedLayerError
from ..losses import SampleLoss, classification_margins, logits_of
from ..score_log_io import STATUS_NONFINITE, STATUS_SCORED
from ..scorers import SampleScorer, ScoreContext, comparison_gradient
from .batch import rows_of, shown_ids
from .capture import BackwardFromLogits, Capture, HeadCut, PendingGrad, scale_per_sample
from .coupled import GhostReader
from .diagnostics import ReferenceDiagnostics
from .full_update import FullUpdate, GradientsOf
from .guards import row_status
from .mimic_layers import MimicLayers
from .reference_verdict import VERDICT_COLUMNS, ReferenceVerdict, SharedHead
from .selection import Candidates, Selection
from .step_softmax import StepSoftmax
from .token_weighting import log_token_counts, plain_mean_weights
from .use_backward import only_mimic_tensors_train, uses_weighted_loss


class Backward(enum.Enum):
    """How a step's weighted gradient Σ_i c_i ∇ℓ_i is backpropagated (`MimicStep.backward_plan`)."""

    USES = "uses"
    """The mimic tensors are all that trains (LoRA, a head): Σ_i c_i g_i through their recorded uses
    (`use_backward.uses_weighted_loss`); the backward through the model that gave δ is the only one."""
    LOGITS = "logits"
    """A built-in loss, scope ``all``: a backward started at the logits with c_i δ_i (`capture.BackwardFromLogits`),
    so the loss's own graph is differentiated once; with a mimic layer below the output head, started at the head's
    input (`capture.HeadCut`), so the head is differentiated once too."""
    SPLIT = "split"
    """A built-in loss, scope ``all``, every trainable tensor in a module whose gradient its input and output gradient
    give (`full_update`): one backward from the logits to every module's output (input gradients only), then each
    tensor's Σ_i c_i g_i formed from its module's input and c_i δ_i, so nothing is differentiated twice. Checked
    against autograd at the first batch; `LOGITS` otherwise."""
    LOSS = "loss"
    """A backward of Σ_i c_i ℓ_i (scope ``all``), or of the plain loss plus a correction on the mimic tensors
    (scope ``layer``)."""


@dataclass
class MicroBatch:
    """A training micro-batch with the columns taken off it: each sample's key (its row in the training set, or its
    stream key) and the scorer's extra columns."""

    inputs: dict[str, Any]
    rows: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> Any:
        return self.inputs.get("labels")

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class StepCounts:
    """Where a micro-batch stands in training: its optimizer step, the step's micro-batches, and the supervised
    tokens `Trainer` counted over the step (None when it does not)."""

    global_step: int
    accumulation_steps: int
    num_items_in_batch: Any = None
    plain_share: Any = 1.0  # Σ_i u_i over the step, a float or a 0-d tensor (`token_weighting.supervised_items`)


@dataclass
class LogitsBackward:
    """The `Backward.LOGITS` plan's pieces: ``root``, a zero scalar whose backward starts at the logits with
    ``pending``'s gradient, and δ = ∂Σℓ/∂logits, to be scaled by the coefficients into that gradient. With a
    ``head`` cut, the backward starts at the head's input with ``head_input_grad`` = ∂Σℓ/∂h scaled, and the head's
    own gradient is formed from δ scaled."""

    root: torch.Tensor
    pending: PendingGrad
    prediction_grad: torch.Tensor
    head: HeadCut | None = None
    head_input_grad: torch.Tensor | None = None
    update: Any = None  # `Backward.SPLIT`: (FullUpdate, recorded calls, the list GradientsOf pops from)

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """Hand the root c_i δ_i (or c_i ∂ℓ_i/∂h_i and the head's Σ_i c_i g_i; or every tensor's Σ_i c_i g_i)."""
        if self.update is not None:
            full_update, calls, pending = self.update
            pending.append(lambda: full_update.gradients(calls, coefficients))
            return
        if self.head is None:
            self.pending.grad = scale_per_sample(self.prediction_grad, coefficients)
            return
        head, prediction_grad = self.head, self.prediction_grad
        self.pending.grad = scale_per_sample(self.head_input_grad, coefficients)
        # the head's rule scales its narrower side: no pass over a vocabulary-wide δ
        self.pending.param_grads = lambda: head.weighted_grads(prediction_grad, coefficients)


@dataclass
class ScoredBatch:
    """A micro-batch forwarded with the mimic layers captured and scored (`MimicStep.score`).

    ``losses`` keep their graph where a backward follows; ``outputs`` is None once nothing reads it (a
    ``[B, T, vocab]`` tensor for a language model). ``recorded`` holds the per-sample columns that only travel to
    the score log (the margin, the reference's loss)."""

    batch: MicroBatch
    outputs: Any
    losses: torch.Tensor
    counts: torch.Tensor | None
    scores: torch.Tensor
    status: torch.Tensor
    ctx: ScoreContext | None
    ghost: Any = None
    recorded: dict[str, torch.Tensor | None] = field(default_factory=dict)
    from_logits: LogitsBackward | None = None

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.status == STATUS_NONFINITE


class MimicStep:
    """The Grad-Mimic step of one training set-up, built from values once (`MimicTrainerMixin` rebuilds it for a
    new model or trial).

    Args:
        sample_loss: the forward's inputs, the per-sample losses and supervised counts.
        layers: the mimic layers, hooked around each scoring forward.
        scorer: the sample scorer.
        mode: ``"reweight"`` or ``"select"``.
        args: the `MimicArguments` configuration (``mimic_*`` fields, ``average_tokens_across_devices``).
        step_softmax: the softmax over the optimizer step, across micro-batches and processes.
        ghost_reader: the gradients at the mimic layers' outputs, for the loss in use (`coupled.GhostReader`).
        model: the unwrapped model (which of its parameters train picks the `Backward` plan).
        num_processes: the processes of the run.
        uses_backward_possible: whether the set-up allows `Backward.USES` (not under FSDP, DeepSpeed, or a
            batch-coupled loss).
        graph_from_mimic_layers: whether a forward that only scores (a select-mode candidate, AGRA's comparison
            batch) builds its graph from the first mimic layer up. δ at the mimic layers' outputs needs the graph
            above them only, so nothing below the first one keeps its activations: such a forward costs about a
            no-grad forward up to there. Not under DeepSpeed (untested: no DeepSpeed here), nor for a batch-coupled
            loss (its double backward is untested from a partial graph).
        sample_ids: the score log's sample ids, to name samples in errors.
        diagnostics: the reference diagnostics, or None.
        reference_verdict: the reference's per-sample loss for the score log, or None.
        comparison_batch: for AGRA, ``global_step -> batch`` drawn at random from the training set (prepared, its
            bookkeeping columns taken off), or None.
    """

    def __init__(
        self,
        sample_loss: SampleLoss,
        layers: MimicLayers,
        scorer: SampleScorer,
        mode: str,
        args: Any,
        step_softmax: StepSoftmax,
        ghost_reader: GhostReader,
        model: nn.Module,
        num_processes: int,
        uses_backward_possible: bool,
        sample_ids: Any = None,
        diagnostics: ReferenceDiagnostics | None = None,
        reference_verdict: ReferenceVerdict | None = None,
        comparison_batch: Callable[[int], dict[str, Any]] | None = None,
        graph_from_mimic_layers: bool = True,
    ) -> None:
        self.sample_loss = sample_loss
        self.layers = layers
        self.scorer = scorer
        self.mode = mode
        self.args = args
        self.step_softmax = step_softmax
        self.ghost_reader = ghost_reader
        self.model = model
        self.num_processes = num_processes
        self.uses_backward_possible = uses_backward_possible
        self.sample_ids = sample_ids
        self.diagnostics = diagnostics
        self.reference_verdict = reference_verdict
        self.comparison_batch = comparison_batch
        self.graph_from_mimic_layers = graph_from_mimic_layers
        # scope 'layer' corrects the plain loss through the recorded uses, so it reads the ghost too
        self.needs_ghost = scorer.needs_output_grads or args.mimic_reweight_scope == "layer"
        self.spare_sample: dict[str, Any] | None = None  # one finite sample's inputs, for `nothing_to_train`
        self.full_update = FullUpdate(model) if uses_backward_possible else None
        # `Backward.SPLIT` keeps δ at every module's output until the scores are known (memory, ~ the activations'
        # size again): worth it where the two-pass plan would differentiate the whole network twice, a mimic tensor
        # used at the input (a token embedding, a head tied to it). Elsewhere `HeadCut` leaves little to save.
        self.one_backward = any(isinstance(module, nn.Embedding) for _, module, _ in layers.hooked)

    # ------------------------------------------------------------------ the decision and the forward

    def backward_plan(self) -> Backward:
        """How this step backpropagates: the one place that decides it (`Backward`)."""
        if (
            self.needs_ghost
            and self.uses_backward_possible
            and only_mimic_tensors_train(self.model, self.layers.tensors.values())
        ):
            return Backward.USES
        if self.sample_loss.reads_logits and self.args.mimic_reweight_scope == "all":
            full = self.full_update
            if self.one_backward and self.needs_ghost and full is not None and full.owners is not None and full.usable:
                return Backward.SPLIT
            return Backward.LOGITS
        return Backward.LOSS

    def forward(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        capture: bool = True,
        plan: Backward | None = None,
        grad_from_mimic_layers: bool = False,
    ) -> tuple[Any, Any, Capture | None]:
        """``model``'s outputs on ``inputs``, their per-sample losses, and the mimic layers' recorded calls (None
        without ``capture``; with every trainable module's calls too under `Backward.SPLIT`). With
        ``grad_from_mimic_layers``, under ``torch.no_grad``: a graph from the first mimic layer up only."""
        model_inputs = self.sample_loss.model_inputs(inputs)
        if not capture:
            outputs = model(**model_inputs)
            return outputs, self.sample_loss.per_sample_losses(outputs, inputs), None
        update_modules = self.full_update.modules if plan is Backward.SPLIT else None
        with self.layers.capture(update_modules, grad_from_mimic_layers) as recorded:
            recorded.batch_size = next(
                (len(v) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), None
            )
            outputs = model(**model_inputs)
        return outputs, self.sample_loss.per_sample_losses(outputs, inputs), recorded

    def score(
        self, model: nn.Module, batch: MicroBatch, global_step: int, plan: Backward | None, keep_outputs: bool = False
    ) -> ScoredBatch:
        """``batch`` forwarded with the mimic layers captured, then scored. ``plan`` is the step's `Backward`; None
        scores a select-mode candidate (no backward follows: a graph is built only for the ghost, from the first mimic
        layer up where `graph_from_mimic_layers` allows, and freed with it; no diagnostics, nothing recorded)."""
        if plan is None:
            partial = self.scorer.needs_output_grads and self.graph_from_mimic_layers
            with torch.set_grad_enabled(self.scorer.needs_output_grads and not partial):
                return self._score(model, batch, global_step, None, keep_outputs, grad_from_mimic_layers=partial)
        return self._score(model, batch, global_step, plan, keep_outputs)

    def _score(
        self,
        model: nn.Module,
        batch: MicroBatch,
        global_step: int,
        plan: Backward | None,
        keep_outputs: bool,
        grad_from_mimic_layers: bool = False,
    ) -> ScoredBatch:
        inputs, labels = batch.inputs, batch.labels
        model_inputs = self.sample_loss.model_inputs(inputs)
        diagnostics = self.diagnostics if plan is not None else None
        if diagnostics is not None:
            micro_batch = self.step_softmax.micro_batches_in(global_step)
            diagnostics.before_forward(global_step, micro_batch, model_inputs, inputs)
        outputs, losses, capture = self.forward(model, inputs, plan=plan, grad_from_mimic_layers=grad_from_mimic_layers)
        counts = self.sample_loss.supervised_counts(outputs, labels)
        recorded: dict[str, torch.Tensor | None] = {}
        shared = None  # the reference's verdict on the head, formed with the score once δ is known
        if plan is None:  # a candidate: the logits only if the scorer reads them
            logits = logits_of(outputs) if "logits" in self.scorer.requires else None
        else:
            logits = logits_of(outputs) if self.sample_loss.reads_logits else None
            if diagnostics is not None:
                diagnostics.after_forward(capture, logits, losses, inputs, labels, model_inputs)
            recorded, shared = self._recorded(capture, logits, batch, model_inputs, global_step)
        scored_logits = logits.detach() if logits is not None and "logits" in self.scorer.requires else None
        head_features = capture.input_of(logits)  # before `cut_at` names the logits by their edge
        from_logits = None
        if plan is Backward.SPLIT and all(call.output is logits for call in capture.calls):
            plan = Backward.LOGITS  # only the head's output is scored: δ at the logits is all the scores need
            capture.update_calls = []
        if plan is Backward.SPLIT:
            edge = capture.cut_at(logits)
            fallback = PendingGrad()
            # At the first batch, a way back to `Backward.LOGITS` should the formed update differ from autograd's. Not at
            # a batch with a non-finite row: its gradients are NaN, and the batch trains from a forward without it.
            checking = not self.full_update.verified and bool(torch.isfinite(losses).all())
            root = BackwardFromLogits.apply(logits, fallback) if checking else None
            if not keep_outputs:
                outputs = logits = None
            prediction_grad = torch.autograd.grad(losses.sum(), edge)[0]
            params = self.full_update.params
            if checking:
                probe = self.full_update.check_coefficients(prediction_grad.shape[0], prediction_grad.device)
                weighted_grad = scale_per_sample(prediction_grad, probe)  # in place where it can be
                expected = torch.autograd.grad(
                    edge, params, grad_outputs=weighted_grad, retain_graph=True, allow_unused=True
                )
                if weighted_grad is prediction_grad:  # back, exactly: the coefficients are powers of two
                    scale_per_sample(prediction_grad, 1.0 / probe)
                del weighted_grad
            try:
                ghost, calls = capture.ghost_and_update(edge, prediction_grad, retain_graph=checking)
            except UnsupportedLayerError:
                if not checking:
                    raise
                self.full_update.usable = False
                ghost = capture.ghost_batch(edge, root_grad=prediction_grad)
                calls = None
            if checking and (calls is None or not self.full_update.check(calls, expected, probe)):
                from_logits = LogitsBackward(root, fallback, prediction_grad)
            else:
                pending: list = []
                from_logits = LogitsBackward(
                    GradientsOf.apply(pending, *params),
                    PendingGrad(),
                    prediction_grad,
                    update=(self.full_update, calls, pending),
                )
        elif plan is None or plan is Backward.USES:
            needed = self.scorer.needs_output_grads if plan is None else True
            ghost = self.ghost_reader(capture, losses, retain_graph=False) if needed else None
        elif plan is Backward.LOGITS:
            # δ = ∂Σℓ/∂logits once (freeing the loss's own graph); the backward starts at the logits later.
            pending = PendingGrad()
            edge = capture.cut_at(logits)
            # A mimic layer below the output head: the weighted backward starts at the head's input (`HeadCut`).
            head = capture.head_cut(logits) if self.needs_ghost and self.uses_backward_possible else None
            if head is None:
                root = BackwardFromLogits.apply(logits, pending)
            else:
                root = BackwardFromLogits.apply(head.input, pending, *head.params.values())
            if not keep_outputs:
                outputs = logits = None  # nothing reads them any more: a [B, T, vocab] tensor for a language model
            prediction_grad = torch.autograd.grad(losses.sum(), edge)[0]
            head_input_grad = None
            if head is not None:
                ghost, head_input_grad = capture.ghost_and_cut(edge, prediction_grad, head)
            else:
                ghost = capture.ghost_batch(edge, root_grad=prediction_grad) if self.needs_ghost else None
            from_logits = LogitsBackward(root, pending, prediction_grad, head, head_input_grad)
        else:
            ghost = self.ghost_reader(capture, losses) if self.needs_ghost else None
        if plan is Backward.USES and not keep_outputs:
            outputs = None
        if shared is not None:  # before the scores: the head's ⟨g_i, v⟩ is handed to the ghost here
            recorded.update(shared.finish(ghost))
            shared = None
        ctx = self._context(capture, ghost, losses, scored_logits, head_features, batch, model_inputs, global_step)
        scores = self.scorer.score(ctx).detach().float()
        status = row_status(losses.detach(), scores, counts)
        if diagnostics is not None:
            diagnostics.after_scores(ghost, scores, global_step)
        return ScoredBatch(batch, outputs, losses, counts, scores, status, ctx, ghost, recorded, from_logits)

    def _recorded(
        self,
        capture: Capture,
        logits: torch.Tensor | None,
        batch: MicroBatch,
        model_inputs: dict[str, Any],
        global_step: int,
    ) -> tuple[dict[str, torch.Tensor | None], SharedHead | None]:
        """The per-sample columns that only travel to the score log: the margin, and the reference's loss and margin
        (read while the captured features are alive), or, on a linear head scored along θ_ref − θ, the verdict put
        off until δ is known, to share its matmul with the score (`reference_verdict.SharedHead`)."""
        verdict, labels = self.reference_verdict, batch.labels
        shared = None if verdict is None else verdict.shared_head(capture, logits, labels, global_step)
        reference: dict[str, torch.Tensor | None] = dict.fromkeys(VERDICT_COLUMNS)
        if verdict is not None and shared is None:
            reference = verdict.columns(capture, logits, labels, model_inputs, batch.inputs, batch.rows)
        margin = classification_margins(logits, labels) if self.args.mimic_record_scores else None
        return {"margin": margin, **reference}, shared

    def _context(
        self,
        capture: Capture,
        ghost: Any,
        losses: torch.Tensor,
        logits: torch.Tensor | None,
        head_features: torch.Tensor | None,
        batch: MicroBatch,
        model_inputs: dict[str, Any],
        global_step: int,
    ) -> ScoreContext:
        """What the scorer reads of the batch (`hf_gradmimic.scorers.ScoreContext`)."""
        activations = capture.activations()
        return ScoreContext(
            losses=losses.detach(),
            logits=logits,
            labels=batch.labels,
            ghost=ghost,
            activations=activations,
            features=head_features,
            comparison_grad=functools.partial(self.comparison_gradient, global_step),
            inputs=model_inputs,
            extras=batch.extras,
            step=global_step,
            sample_keys=batch.rows,
        )

    # ------------------------------------------------------------------ the three paths

    def reweight(
        self, model: nn.Module, batch: MicroBatch, at: StepCounts, keep_outputs: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """Reweight mode: ``batch`` scored under this step's `Backward` plan, its coefficients c_i from the step
        softmax, and the loss whose backward gives Σ_i c_i ∇ℓ_i, with its outputs (None unless ``keep_outputs``)."""
        plan = self.backward_plan()
        scored = self.score(model, batch, at.global_step, plan, keep_outputs)
        softmax_logits, fallback = self.softmax_logits(scored.scores, scored.status, at.global_step)
        coefficients = self.step_softmax.add(
            at.global_step,
            batch.rows,
            scored.scores,
            softmax_logits,
            scored.losses,
            scored.status,
            fallback,
            at.accumulation_steps,
            log_token_counts(scored.counts, self.args.mimic_token_weighting),
            scored.recorded,
        )
        nonfinite = scored.nonfinite
        if self.num_processes > 1 and not nonfinite.all():  # for `nothing_to_train`, later
            self.spare_sample = rows_of(batch.inputs, (~nonfinite).nonzero().flatten()[:1], len(batch))
        if nonfinite.any():  # those rows must not reach the parameters: train on a forward without them
            # the first forward's graph is not backpropagated: freed before the second forward builds its own
            scored.ctx = scored.ghost = scored.from_logits = None
            scored.losses = scored.losses.detach()
            if not keep_outputs:
                scored.outputs = None
            loss = self.loss_without(model, batch, nonfinite, coefficients, scored.status, at)
        elif plan is Backward.USES:
            loss = uses_weighted_loss(scored.ghost, coefficients)
        elif scored.from_logits is not None:  # Backward.LOGITS or SPLIT
            scored.ctx = scored.ghost = None  # the head's δ is prediction_grad, scaled in place next
            scored.from_logits.set_coefficients(coefficients)
            loss = scored.from_logits.root
        else:
            loss = self.weighted_loss(scored.losses, coefficients, scored.ghost, scored.status, scored.counts, at)
        return self.reported(loss, scored.losses, scored.status, at, scored.counts), scored.outputs

    def candidates(self, model: nn.Module, batch: MicroBatch, global_step: int) -> Candidates:
        """Select mode: one micro-batch of candidates scored, before any of the step is trained. Loss-based scorers
        need no graph; ghost scorers build one for the gradient at the mimic layers' outputs, freed here."""
        scored = self.score(model, batch, global_step, None)
        ctx = scored.ctx if self.scorer.observes else None
        return Candidates(batch.rows, scored.scores, scored.losses.detach(), scored.status, ctx, scored.counts)

    def train_selected(
        self, model: nn.Module, batch: MicroBatch, selection: Selection, at: StepCounts
    ) -> tuple[torch.Tensor, Any]:
        """Select mode (RHO-LOSS, Bayesian selection): the loss of the samples selected from ``batch`` when the whole
        step was scored, from a forward of those samples only, with its outputs."""
        candidates = selection.candidates
        coefficients = self.step_softmax.add(
            at.global_step,
            candidates.rows,
            candidates.scores,
            selection.logits,
            candidates.losses,
            candidates.status,
            torch.tensor(False),
            at.accumulation_steps,
            log_token_counts(candidates.counts, self.args.mimic_token_weighting),
        )
        selected = selection.selected
        if len(selected) == 0:  # nothing to train on here; the other processes, or micro-batches, have the selection
            excluded = torch.ones_like(candidates.status, dtype=torch.bool)
            return self.loss_without(model, batch, excluded, coefficients, candidates.status, at), None  # zero
        chosen = rows_of(batch.inputs, selected, len(batch))
        outputs, losses, _ = self.forward(model, chosen, capture=False)
        loss = (coefficients[selected].detach() * losses).sum()
        # Logged: the selected samples' mean loss over the step (over their tokens with token weighting), as Trainer
        # trained on them alone logs it. Times the processes: Trainer logs the mean of the processes' losses.
        shares = selection.shares[selected.to(selection.shares.device)].to(losses.dtype)
        reported = (shares * losses.detach()).sum() * self.num_processes / selection.step_total
        return loss - loss.detach() + reported, outputs

    def loss_without(
        self,
        model: nn.Module,
        batch: MicroBatch,
        excluded: torch.Tensor,
        coefficients: torch.Tensor,
        status: torch.Tensor,
        at: StepCounts,
    ) -> torch.Tensor:
        """Σ_i c_i ℓ_i from a second forward of the micro-batch without the ``excluded`` samples: in the first forward
        their rows were not finite, and 0·NaN is NaN in every layer's weight gradient, so they must not be in the graph
        that is backpropagated. With nothing left, `nothing_to_train`."""
        kept = (~excluded).nonzero().flatten()
        if len(kept) == 0:
            return self.nothing_to_train(model, batch, (status != STATUS_NONFINITE).nonzero().flatten())
        subset = rows_of(batch.inputs, kept, len(excluded))
        outputs, losses, capture = self.forward(model, subset)
        if not torch.isfinite(losses).all():  # per-sample independence broken: these rows were finite a moment ago
            rows = batch.rows[kept[~torch.isfinite(losses)].cpu()].numpy()
            raise RuntimeError(
                f"Sample(s) {shown_ids(rows, self.sample_ids)} had a finite loss in the batch and a "
                "non-finite one without the non-finite samples: the model couples samples (batch norm in training "
                "mode?), which MimicTrainer does not support."
            )
        ghost = capture.ghost_batch(losses.sum()) if self.args.mimic_reweight_scope == "layer" else None
        counts = self.sample_loss.supervised_counts(outputs, subset.get("labels"))
        return self.weighted_loss(losses, coefficients[kept], ghost, status[kept], counts, at)

    def nothing_to_train(self, model: nn.Module, batch: MicroBatch, finite: torch.Tensor) -> torch.Tensor:
        """A zero loss for a micro-batch with no sample to train on. One process: any zero reaching the parameters.
        Several: it must come from a forward through the wrapped model, or this process's backward would leave it
        out of the step's gradient reduction (DDP reduces each parameter's gradient once per backward, on every
        process) while the others wait for it; so one finite sample (of this batch, else the last one seen here) goes
        forward with weight 0."""
        if self.num_processes == 1:
            return sum((param * 0.0).sum() for param in model.parameters() if param.requires_grad)
        if len(finite):
            self.spare_sample = rows_of(batch.inputs, finite[:1], len(batch))
        if self.spare_sample is None:
            raise RuntimeError(
                "This process has no finite sample yet (its first micro-batch is all non-finite), so it cannot take part "
                "in the step's gradient reduction with a zero contribution. Check the data at the start of the stream."
            )
        _, losses, _ = self.forward(model, self.spare_sample, capture=False)
        return losses.sum() * 0.0

    def comparison_gradient(self, global_step: int) -> dict[str, torch.Tensor]:
        """AGRA's comparison: the mean gradient (mimic tensors) of a batch drawn at random from the training set."""
        if self.comparison_batch is None:
            raise ValueError("This set-up has no training set to draw AGRA's comparison batch from.")
        # Forwarded while the scored micro-batch's graph is alive, so it keeps no graph below the mimic layers.
        partial = self.graph_from_mimic_layers
        batch = self.comparison_batch(global_step)
        for _ in range(2):
            with torch.set_grad_enabled(not partial):
                _, losses, capture = self.forward(self.model, batch, grad_from_mimic_layers=partial)
            finite = torch.isfinite(losses)
            if finite.all() or not finite.any():
                break
            # A non-finite row would make G NaN, and every cosine with it (0·NaN in the layer's matmul): G is the
            # mean gradient of the batch's finite rows, from a forward of those only.
            batch = rows_of(batch, finite.nonzero().flatten(), len(losses))
        return comparison_gradient(capture.ghost_batch(losses.sum(), retain_graph=False))

    # ------------------------------------------------------------------ weights and losses

    def softmax_logits(
        self, scores: torch.Tensor, status: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scorer's softmax logits (uniform before ``mimic_warmup_steps``), −inf (weight 0) for a sample that was
        not scored (`guards`), and the fallback flag of the batch: when the scored samples' scores are not finite
        (‖θ_ref − θ‖ = 0), they get uniform weights."""
        scored = status == STATUS_SCORED
        fallback = ~torch.isfinite(scores[scored]).all()
        args = self.args
        if global_step < args.mimic_warmup_steps:
            logits = torch.zeros_like(scores)
        else:
            logits = self.scorer.softmax_logits(scores, self.mode, args.mimic_temperature, args.mimic_select_ratio)
            logits = torch.where(fallback, torch.zeros_like(scores), logits)
        return torch.where(scored, logits, -torch.inf), fallback

    def weighted_loss(
        self,
        losses: torch.Tensor,
        coefficients: torch.Tensor,
        ghost: Any,
        status: torch.Tensor,
        counts: torch.Tensor | None,
        at: StepCounts,
    ) -> torch.Tensor:
        """The loss of the `Backward.LOSS` plan: Σ_i c_i ℓ_i (scope ``all``), or for scope ``layer`` the plain loss of
        `Trainer` over the scored samples plus a correction whose gradient is Σ_i (c_i U − u_i) g_i on the mimic tensors
        only (u_i the plain loss's weight, `token_weighting.plain_mean_weights`, and U = Σ u_i over the step)."""
        if self.args.mimic_reweight_scope == "all":
            return (coefficients.detach() * losses).sum()
        uniform = self.plain_mean_weights(status == STATUS_SCORED, counts, at)
        plain = (uniform * losses).sum()
        # The coefficients sum to 1 over the step, the plain weights to ``plain_share``: scaled alike, the correction
        # vanishes at uniform weights and the mimic tensors' step is the rest of the model's.
        return plain + uses_weighted_loss(ghost, coefficients * at.plain_share - uniform)

    def reported(
        self,
        loss: torch.Tensor,
        losses: torch.Tensor,
        status: torch.Tensor,
        at: StepCounts,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss to backpropagate, carrying as its value `Trainer`'s plain loss of the finite samples (over their
        tokens with token weighting: the same logged loss; NaN when none is finite, which `Trainer`'s
        ``logging_nan_inf_filter`` then skips)."""
        finite = status != STATUS_NONFINITE
        if finite.any():
            reported = (self.plain_mean_weights(finite, counts, at) * torch.where(finite, losses.detach(), 0.0)).sum()
        else:
            reported = losses.detach().new_tensor(float("nan"))
        return loss - loss.detach() + reported

    def plain_mean_weights(self, included: torch.Tensor, counts: torch.Tensor | None, at: StepCounts) -> torch.Tensor:
        """Each included sample's weight in `Trainer`'s plain loss (`token_weighting.plain_mean_weights`)."""
        loss_scale = self.num_processes if self.args.average_tokens_across_devices else 1
        return plain_mean_weights(
            included,
            counts,
            self.args.mimic_token_weighting,
            at.accumulation_steps,
            at.num_items_in_batch,
            loss_scale,
        )
