"""`MimicTrainer`: Grad-Mimic Stage 1 as a drop-in `transformers.Trainer`, and the mixin that gives any Trainer that behaviour.

Grad-Mimic (Huang, Bilkhu, Sala, Movellan, "Evaluating Sample Utility for Data Selection by Mimicking
Model Weights", arXiv 2501.06708, Algorithm 1). At step t, with v_t = θ_ref − θ_t over the mimic tensors
and g_i = ∇ℓ_i restricted to them:

    m_i = ⟨−g_i, v_t⟩ / ‖v_t‖₂          (mimic score; any `hf_gradmimic.scorers` scorer in its place)
    w_i = softmax_i(m_i / τ)            (plus sign: the paper's exp(−m_i/τ) is a typo)
    update direction = Σ_i w_i ∇ℓ_i     (backward of Σ_i w_i ℓ_i with w detached)

This module holds only the Trainer overrides and the set-up of the owners of each job
(`hf_gradmimic.training`). The step itself (a forward with the mimic layers captured, one ``autograd.grad``
to their outputs, the scorer's scores, the step-wide softmax's coefficients, and the loss for one backward)
is `hf_gradmimic.training.step.MimicStep`.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .cards import render_model_card
from .config import MimicConfig
from .contrastive import contrastive_loss_for, is_batch_coupled
from .fileio import atomic_write
from .losses import PerSampleLossFn, SampleLoss, is_causal_lm, loss_fn_from_compute_loss_func
from .reference.loading import ReferenceSource
from .scorers import MimicScorer, SampleScorer, check_mode, scorer_from_config
from .training.audit import FilterAudit
from .training.batch import Bookkeeping, KeepColumns
from .training.checks import (
    ActivationCheckpointingCheck,
    adapt_to_fsdp,
    check_batch_rows,
    check_launch,
    check_one_reference,
    check_scorer_columns,
    check_supported_setup,
    resolve_resume_checkpoint,
)
from .training.coupled import GhostReader, check_coupled_setup
from .training.dataset import TrainingData, prepare_training_data
from .training.diagnostics import ReferenceDiagnostics, check_reference_setup
from .training.guards import NonFiniteStepGuard
from .training.internal_callbacks import hide_internal_callbacks
from .training.metrics_buffer import MetricsBuffer
from .training.mimic_layers import MimicLayers
from .training.model_loss_check import check_model_loss_is_builtin
from .training.reference_verdict import ReferenceVerdict
from .training.resume_guard import check_log_reaches, check_resume, write_run_record
from .training.score_log import ScoreLog, run_provenance
from .training.scorer_state import load_scorer_state, save_scorer_state
from .training.selection import observe_step, select_over_step
from .training.starting_weights import StartingWeights
from .training.step import MicroBatch, MimicStep, StepCounts
from .training.step_softmax import StepSoftmax, gather_across_ranks
from .training.stream_ids import StreamIds, is_stream, stream_position
from .training.token_weighting import supervised_items


class _StepEnd(TrainerCallback):
    """Hands each finished optimizer step to the trainer's end-of-step flow."""

    def __init__(self, end_step: Callable[[Any], None]) -> None:
        self.end_step = end_step

    def on_step_end(self, args, state, control, **kwargs):
        self.end_step(state)


def check_no_compute_loss_override(trainer_class: type) -> None:
    """Refuse a subclass of a Grad-Mimic trainer that overrides ``compute_loss``.

    The mixin's ``compute_loss`` returns the loss whose gradient is ``Σ_i w_i ∇ℓ_i``, already normalised over the
    optimizer step (``loss_is_scaled_for_ga``). An override replaces or adds to it: without ``super()`` nothing is
    scored, and a term added to it is neither reweighted nor divided by the accumulation steps, so training would
    silently differ from `Trainer`'s."""
    classes = trainer_class.__mro__[: trainer_class.__mro__.index(MimicTrainerMixin)]
    ours = __name__.split(".")[0]  # this package's trainers (MimicSFTTrainer's override logs and calls super())
    overriding = [cls for cls in classes if "compute_loss" in vars(cls) and cls.__module__.split(".")[0] != ours]
    if overriding:
        raise TypeError(
            f"{overriding[0].__qualname__} overrides `compute_loss`, where a Grad-Mimic trainer builds its reweighted "
            "loss (Σ_i w_i ∇ℓ_i, normalised over the optimizer step): a loss computed there would not be scored, "
            "reweighted or scaled for gradient accumulation as the rest is, and training would silently differ. Give "
            "the per-sample loss as `per_sample_loss_fn=` (or `compute_loss_func=`) instead, and log extra metrics "
            "from a callback."
        )


class MimicTrainerMixin:
    """Grad-Mimic reweighting for any `transformers.Trainer` subclass: put it first among the bases.

    ``class MyTrainer(MimicTrainerMixin, SomeTrainer)`` trains like ``SomeTrainer`` with every sample of every
    batch weighted by the configured scorer (`MimicConfig`), writes the score log, and checkpoints the scorer.
    `MimicTrainer` (over `Trainer`) and `hf_gradmimic.sft.MimicSFTTrainer` (over trl's `SFTTrainer`) are built so.
    A new subclass provides:

    - a configuration with every `MimicArguments` field: a dataclass ``(MimicArguments, SomeTrainingArguments)``,
      named in ``mimic_config_class``;
    - per-sample losses: the built-in ones read the logits (sequence or token classification, causal LM); when its
      forward returns something else (trl's fused LM head), ``per_sample_loss_fn`` or the hook below.

    Public hooks for subclasses (`hf_gradmimic.sft.MimicSFTTrainer` uses both):

    - ``create_sample_loss(loss_fn) -> SampleLoss``: how a batch becomes per-sample losses. Return a
      `hf_gradmimic.losses.SampleLoss` subclass overriding ``model_inputs(inputs)`` (what every forward gets),
      ``per_sample_losses(outputs, inputs)`` (``ℓ_i``, float32 ``[B]``) or ``supervised_counts(outputs, labels)``
      (supervised targets per sample; a sample with none is not scored). The step, the select-mode scoring and the
      reference checks all read the batch through it.
    - ``is_mimic_step(model) -> bool``: whether `compute_loss` is training this batch the Grad-Mimic way (an
      override of `compute_loss` that adds to it asks this first).

    In training the base ``compute_loss`` is replaced (the backward must give Σ_i w_i ∇ℓ_i); in evaluation it runs
    as is. The mixin overrides ``get_train_dataloader`` (the collator is wrapped so that the sample ids survive it),
    ``training_step``, ``compute_loss``, ``prediction_step``, ``train``, ``evaluate``, ``log``,
    ``create_model_card``, ``_save_checkpoint`` and ``_hp_search_setup`` (where the Grad-Mimic set-up is rebuilt for a
    ``model_init`` model), each calling the base class. Its own callbacks run after the user's without being listed.

    Keyword arguments, besides the base trainer's:
        reference: overrides ``args.mimic_reference`` with an in-memory source: a model
            (`PreTrainedModel` or any `nn.Module`), a ``{name: tensor}`` dict, a path or a repo id.
            For ``rho_loss`` it is the irreducible-loss model.
        per_sample_loss_fn: ``(outputs, inputs) -> Tensor[B]``, for tasks the built-in losses do not
            cover. ``inputs`` still holds the labels. `Trainer`'s ``compute_loss_func`` is used in its place when
            marked with `hf_gradmimic.returns_per_sample_losses` (one loss per sample), and refused otherwise. Mark
            a loss whose terms depend on the whole batch (in-batch negatives) with `hf_gradmimic.batch_coupled`;
            image–text dual encoders (CLIP, SigLIP) get theirs by themselves (`hf_gradmimic.contrastive`).
        scorer: a ready `hf_gradmimic.scorers.SampleScorer`, instead of the one ``mimic_scorer`` names.
        zero_shot: for the ``bayesian`` scorer, ``model_inputs -> log-probabilities [B, C]`` (see
            `hf_gradmimic.zero_shot`), unless ``mimic_zero_shot_column`` holds precomputed logits.
    """

    _tag_names = ["grad-mimic", "data-filtering", "hf-gradmimic"]
    mimic_config_class: type = MimicConfig
    """The configuration ``args`` must be (it has every `MimicArguments` field), and the default one."""
    # compute_loss returns a loss already normalised over the whole optimizer step.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        reference: ReferenceSource | None = None,
        per_sample_loss_fn: PerSampleLossFn | None = None,
        scorer: SampleScorer | None = None,
        zero_shot: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        config, train_dataset = (bound.arguments.get(name) for name in ("args", "train_dataset"))
        if config is None:
            config = bound.arguments["args"] = self.mimic_config_class(output_dir="mimic_trainer_output")
        elif not hasattr(config, "mimic_layer_map"):
            raise TypeError(
                f"{type(self).__name__} needs `args` to be a {self.mimic_config_class.__name__}, got "
                f"{type(config).__name__}."
            )
        check_no_compute_loss_override(type(self))
        per_sample_loss_fn = loss_fn_from_compute_loss_func(
            bound.arguments.get("compute_loss_func"), per_sample_loss_fn, type(self).__name__
        )
        # Without a train_dataset (evaluate or predict only) the Grad-Mimic set-up waits for one (`_hp_search_setup`).
        data = None if train_dataset is None else prepare_training_data(train_dataset, config, type(self).__name__)
        if data is not None:
            bound.arguments["train_dataset"] = data.dataset
        super().__init__(*bound.args, **bound.kwargs)
        self._mimic_inputs = (reference, per_sample_loss_fn, scorer, zero_shot)
        self._mimic_model: nn.Module | None = None  # the model the set-up was built for
        self._mimic_train_dataset: Any = None  # and the train_dataset
        self._mimic_data: TrainingData | None = None
        self._mimic_resuming = False
        self.mimic_bookkeeping = Bookkeeping(None, (), None, None)  # until then, evaluation pops only the row index
        self.mimic_metrics, self.mimic_audit = MetricsBuffer(), None
        self._mimic_batch = self._num_items_in_batch = None
        if data is not None:
            self._setup_mimic(*self._mimic_inputs, data)

    def _hp_search_setup(self, trial: Any) -> None:
        """`Trainer.train` calls this after ``model_init`` made a fresh model, and before the training loop: the
        Grad-Mimic set-up is (re)built for that model, for a hyperparameter trial's arguments, or for a train_dataset
        given after construction."""
        super()._hp_search_setup(trial)
        if self.train_dataset is None:
            return  # Trainer's own "training requires a train_dataset" error follows
        # A train_dataset replaced after the set-up (a second phase) gets its row index and sample ids as at construction.
        if self._mimic_model is self.model and trial is None and self.train_dataset is self._mimic_train_dataset:
            return
        data = self._mimic_data
        if data is None or data.dataset is not self.train_dataset:
            data = prepare_training_data(self.train_dataset, self.args, type(self).__name__)
            self.train_dataset = data.dataset
        previous = getattr(self, "scorer", None)
        self._setup_mimic(*self._mimic_inputs, data)
        if previous is not None and self._mimic_resuming and previous.state_dict():
            self.scorer.load_state_dict(previous.state_dict())  # loaded from the checkpoint by `train`

    def _setup_mimic(
        self, reference: Any, per_sample_loss_fn: Any, scorer: SampleScorer | None, zero_shot: Any, data: TrainingData
    ) -> None:
        """Builds the owners of each job (`hf_gradmimic.training`) after `Trainer.__init__` made the accelerator."""
        args, accelerator = self.args, self.accelerator
        check_one_reference(args.mimic_reference, reference)
        self._mimic_model, self._mimic_data = self.model, data
        self._mimic_train_dataset = self.train_dataset  # as the base trainer holds it (SFTTrainer's is tokenized)
        check_supported_setup(accelerator, args, self.model)
        check_launch(accelerator)
        unwrapped = accelerator.unwrap_model(self.model)
        streaming, sample_ids, clean_flags = data.streaming, data.sample_ids, data.clean_flags
        dataset_size = None if streaming else len(self.train_dataset)
        # An image–text dual encoder gets its contrastive per-sample loss (hf_gradmimic.contrastive) by itself.
        loss_fn = per_sample_loss_fn if per_sample_loss_fn is not None else contrastive_loss_for(unwrapped)
        self.sample_loss = self.create_sample_loss(loss_fn)
        check_batch_rows(self.data_collator, self.label_names, self.sample_loss.loss_fn)
        self.batch_coupled = is_batch_coupled(self.sample_loss.loss_fn)
        self.mimic_layers = MimicLayers(unwrapped, args.mimic_layer_map)
        self.scorer = (
            scorer
            if scorer is not None
            else scorer_from_config(
                args,
                reference=reference,
                zero_shot=zero_shot,
                layers=self.mimic_layers,
                num_train_samples=dataset_size,
                model=unwrapped,
            )
        )
        check_scorer_columns(self.scorer, self.train_dataset, args)
        self.mode = args.mimic_mode or self.scorer.default_mode
        if self.batch_coupled:
            check_coupled_setup(self.scorer, args, accelerator)
        check_mode(self.scorer, self.mode)
        if self.mode == "select" and args.mimic_reweight_scope == "layer":
            raise ValueError(
                "`mimic_reweight_scope='layer'` reweights a full batch; `select` mode trains on the selected samples only."
            )
        if self.mode == "select" and args.mimic_normalize == "micro" and args.gradient_accumulation_steps > 1:
            # The selection is made over the whole step; normalising per micro-batch would weight a selected sample
            # by its micro-batch's count (a lone one 1/2, three together 1/6 each), not 1/k, and log other weights.
            raise ValueError(
                "`mimic_normalize='micro'` cannot be combined with `select` mode and gradient accumulation: the k "
                "samples are selected over the whole optimizer step, and each trains with weight 1/k, which "
                "per-micro-batch normalisation would change. Use `mimic_normalize='step'` (the default)."
            )
        stream_ids = StreamIds() if streaming else None  # a stream's samples are named by their ids' keys
        self.mimic_bookkeeping = Bookkeeping(
            args.mimic_clean_column, self.scorer.extra_columns, args.mimic_id_column, stream_ids
        )
        self.mimic_metrics = MetricsBuffer()
        self._mimic_batch: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._num_items_in_batch: Any = None
        self._plain_share: float | torch.Tensor = 1.0  # scope "layer": Σ_i u_i over the step (`_plain_share_of_step`)
        self._selections: deque = deque()  # select mode: the step's selection, one entry per micro-batch
        self._step_candidates: list[MicroBatch] | None = None  # select mode: the step's micro-batches, to score
        self._model_loss_checked = False  # `_check_model_loss`, once, at the first training batch
        self._comparison_collator = None
        alignment_possible = adapt_to_fsdp(accelerator, args)
        self.reference_name = getattr(self.scorer, "reference_name", None)
        # What the cards name: a path or repo id as is, a model or tensor dict as an in-memory reference.
        self.reference_in_memory = reference is not None and not isinstance(reference, (str, os.PathLike))
        self.mimic_diagnostics = None
        if self.scorer.monitors_reference:
            check_reference_setup(
                reference if reference is not None else args.mimic_reference,
                unwrapped,
                self.mimic_layers.current_tensors,
                revision=args.mimic_reference_revision,
                token=args.hub_token,
                reference_name=self.reference_name,
            )
            self.mimic_diagnostics = ReferenceDiagnostics(
                self.scorer,
                self.mimic_layers,
                unwrapped,
                self.sample_loss,
                self.mimic_metrics,
                args.mimic_alignment_check and alignment_possible,
                args,
            )
        # The reference's per-sample loss for the score log (a Stage-2 signal): for scorers that have a reference
        # sharing the student's coordinates, i.e. those the diagnostics monitor.
        self.reference_verdict = (
            ReferenceVerdict(
                args.mimic_log_reference_loss,
                self.scorer.reference_on_device,
                self.mimic_layers,
                unwrapped,
                self.sample_loss,
                self.scorer.scored_direction if isinstance(self.scorer, MimicScorer) else None,
                dataset_size,
            )
            if self.scorer.monitors_reference and args.mimic_record_scores
            else None
        )
        self.step_softmax = StepSoftmax(
            args.mimic_normalize, accelerator.num_processes, gather_across_ranks(accelerator), self._accumulated_grads
        )
        self.score_log = ScoreLog(
            args.output_dir,
            accelerator.process_index,
            accelerator.num_processes,
            dataset_size,
            stream_ids if streaming else sample_ids,
            args.mimic_record_scores,
            accelerator.wait_for_everyone,
            run_provenance(args, self.scorer, self.mode, unwrapped, data.given, accelerator.num_processes),
        )
        self.mimic_audit = (
            FilterAudit(clean_flags, sample_ids, args.mimic_filter_method, args.seed)
            if clean_flags is not None
            else None
        )
        # FSDP2 and DeepSpeed keep the parameters sharded outside forward, where the recorded uses are re-applied; a
        # batch-coupled loss mixes every sample into each row of δ, which the uses backward weights row by row.
        uses_backward_possible = (
            accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            and not self.batch_coupled
        )
        self.mimic_step = MimicStep(
            self.sample_loss,
            self.mimic_layers,
            self.scorer,
            self.mode,
            args,
            self.step_softmax,
            GhostReader(self.batch_coupled, check_user_loss=not self.sample_loss.reads_logits),
            unwrapped,
            accelerator.num_processes,
            uses_backward_possible,
            self.score_log.sample_ids,
            self.mimic_diagnostics,
            self.reference_verdict,
            self._comparison_batch,
            # FSDP2 gathers a unit's shards in its pre-forward hook in any grad mode, and the unit holding the first
            # mimic layer ends its forward with grad on, so its pre-backward hook gathers them for the ghost backward
            # (tests/test_distributed.py runs select mode and AGRA under FSDP2)
            graph_from_mimic_layers=accelerator.distributed_type != DistributedType.DEEPSPEED
            and not self.batch_coupled,
        )
        self.nonfinite_guard = NonFiniteStepGuard(
            self.step_softmax.finite_samples,
            lambda: self.model.parameters(),
            args.mimic_max_nonfinite_steps,
            self.step_softmax.supervised_samples,
            self.step_softmax.weighted_samples,
        )
        # Run at every event, after the user's callbacks, but not listed among them (`training.internal_callbacks`).
        self.callback_handler = hide_internal_callbacks(
            self.callback_handler,
            [
                ActivationCheckpointingCheck(lambda: self.accelerator.unwrap_model(self.model)),
                self.score_log,
                self.nonfinite_guard,
                _StepEnd(self._end_mimic_step),
            ],
        )

    # ------------------------------------------------------------------ Trainer overrides

    def _set_signature_columns_if_needed(self) -> None:
        # As trl does: keep our bookkeeping columns through `remove_unused_columns`.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += self.mimic_bookkeeping.kept_columns

    def get_train_dataloader(self) -> Any:
        """The base training dataloader, its collator wrapped so that the sample ids (and the scorer's columns) survive
        collators that keep only the model's inputs (`training.batch.KeepColumns`)."""
        collator = self.data_collator
        self.data_collator = KeepColumns(collator, self.mimic_bookkeeping.kept_columns)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; ``resume_from_checkpoint=True`` picks the newest *completely written* checkpoint, and
        the scorer's state comes back from it."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._mimic_resuming = bool(resume_from_checkpoint)
        if self._mimic_model is not None:  # an earlier train() of this trainer may have stopped inside a step
            self.step_softmax.reset()
            self._selections.clear()
            self._step_candidates = None
        if resume_from_checkpoint and self._mimic_model is not None:
            self.score_log.provenance = check_resume(resume_from_checkpoint, self.score_log.provenance)
            if self.args.mimic_record_scores:
                check_log_reaches(resume_from_checkpoint, self.args.output_dir)
            # A scorer without state reads nothing from the checkpoint; no file is ever unpickled.
            state = load_scorer_state(resume_from_checkpoint) if self.scorer.state_dict() else None
            if state is not None:
                self.scorer.load_state_dict(state)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(
        self,
        max_steps: int,
        num_update_steps_per_epoch: int,
        num_train_epochs: int,
        resume_from_checkpoint: Any,
        trial: Any,
    ) -> tuple[int, int]:
        # A stream resumed after a full pass over it: Trainer would skip batches of the first pass; continue the
        # pass the checkpoint was in instead (training.stream_ids.stream_position).
        position = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        starting = self._starting_weights()
        if starting is not None and resume_from_checkpoint is not None:
            starting.load(resume_from_checkpoint)
        elif starting is not None:  # before the first optimizer step: these are the weights training found
            starting.snapshot()
        if resume_from_checkpoint is not None and is_stream(self.train_dataset) and not self.args.ignore_data_skip:
            # The checkpoint's epoch counts batches against the max_steps of the run that wrote it (a resume may raise
            # it to train longer): `self.state.max_steps` is already this run's.
            saved = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            return stream_position(self.state.epoch or 0.0, saved.max_steps * self.args.gradient_accumulation_steps)
        return position

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The shards on disk must hold exactly the steps this checkpoint has taken, and the scorer's state is
        # written before Trainer writes trainer_state.json, the mark of a complete checkpoint.
        self.score_log.flush()
        # The guard's running counts go into trainer_state.json, to be continued on resume.
        self.state.stateful_callbacks[NonFiniteStepGuard.STATE_KEY] = self.nonfinite_guard.state()
        state = self.scorer.state_dict()
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            write_run_record(folder, self.score_log.provenance)  # what a resume from it may not change
        if state and self.args.should_save:
            save_scorer_state(folder, state)
        starting = self._starting_weights()
        if starting is not None and self.args.should_save:
            starting.save(folder)
        super()._save_checkpoint(model, trial)

    def _starting_weights(self) -> StartingWeights | None:
        """The weights the reference model's verdict is made of (``mimic_log_reference_loss='reference_model'``)."""
        verdict = getattr(self, "reference_verdict", None)
        return None if verdict is None else verdict.starting

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Takes the sample rows (and the scorer's columns) off the batch, then runs the base `training_step`."""
        rows, extras = self.mimic_bookkeeping.pop(inputs)
        if rows is None:
            key = self.mimic_bookkeeping.kept_columns[0]
            raise KeyError(
                f"The training batch has no `{key}`: a custom data collator dropped it. Keep that key (one value per "
                "example) in the collated batch."
            )
        self._mimic_batch = (torch.as_tensor(rows).cpu(), extras)
        self._num_items_in_batch = num_items_in_batch  # the step's supervised tokens, as Trainer counted them
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._mimic_batch = self._num_items_in_batch = None

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """In training: the loss whose gradient is Σ_i w_i ∇ℓ_i (`training.step.MimicStep`). Elsewhere: the base
        trainer's loss."""
        self.mimic_bookkeeping.pop(inputs)
        if not self.is_mimic_step(model):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self._check_model_loss(model, inputs)
        rows, extras = self._mimic_batch
        batch = MicroBatch(inputs, rows, extras)
        at = StepCounts(
            self.state.global_step,
            self.current_gradient_accumulation_steps,
            self._num_items_in_batch,
            self._plain_share,
        )
        if self.mode == "select":
            if self._step_candidates is not None:  # the step's first micro-batch
                self._select_over_step()
            loss, outputs = self.mimic_step.train_selected(model, batch, self._selections.popleft(), at)
        else:
            loss, outputs = self.mimic_step.reweight(model, batch, at, keep_outputs=return_outputs)
        return (loss, outputs) if return_outputs else loss

    def _check_model_loss(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Once, before the first update: the built-in per-sample losses must average to the model's own loss, which
        `Trainer` would train on (`training.model_loss_check`). Not with a user loss function (it is the loss), nor with
        label smoothing (then `Trainer` too replaces the model's loss by its own from the logits)."""
        if self._model_loss_checked:
            return
        self._model_loss_checked = True
        if self.sample_loss.loss_fn is None and not self.args.label_smoothing_factor:
            check_model_loss_is_builtin(model, self.accelerator.unwrap_model(self.model), inputs, type(self).__name__)

    @property
    def per_sample_loss_fn(self) -> PerSampleLossFn | None:
        """The per-sample loss function in use (None: the built-in losses); ``sample_loss.loss_fn``."""
        return self.sample_loss.loss_fn

    # ------------------------------------------------------------------ hooks for subclasses

    def create_sample_loss(self, loss_fn: PerSampleLossFn | None) -> SampleLoss:
        """The per-sample losses of training batches (`hf_gradmimic.losses.SampleLoss`): ``loss_fn`` (the
        ``per_sample_loss_fn`` given, a marked ``compute_loss_func``, or a dual encoder's contrastive loss), or the
        built-in losses when None. Override it to return a `SampleLoss` subclass that changes what the forward gets
        (``model_inputs``), the losses (``per_sample_losses``) or the supervised counts (``supervised_counts``)."""
        model = self.accelerator.unwrap_model(self.model)
        return SampleLoss(model, loss_fn, self.args.label_smoothing_factor)

    def is_mimic_step(self, model: nn.Module) -> bool:
        """Whether `compute_loss` trains this batch the Grad-Mimic way: ``model`` in training, inside
        `training_step`. Evaluation and prediction get the base trainer's loss."""
        return self._mimic_batch is not None and model.training

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.mimic_bookkeeping.pop(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The base `evaluate`, plus, with ``mimic_clean_column``, the running filter scored against the clean flags."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.mimic_audit is not None and self.score_log.folder is not None:
            self.score_log.flush()
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                filter_metrics = self.mimic_audit.metrics(self.score_log.folder, metric_key_prefix)
                if filter_metrics:
                    self.log(filter_metrics)
                    metrics.update(filter_metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # As trl's trainers: metrics gathered per step, averaged over the logging interval.
        if self.model is not None and self.model.training and self.mimic_metrics:
            logs.update(self.mimic_metrics.drain())
        super().log(logs, start_time)

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        dataset_name: str | list[str] | None = None,
    ) -> None:
        """Write the Grad-Mimic model card (template ``model_card.md``) to ``<output_dir>/README.md``, with
        `Trainer.create_model_card`'s arguments (``Trainer.push_to_hub(**kwargs)`` passes them) and trl's
        ``dataset_name``; ``dataset_args`` (a dataset's config) has no place in the card's metadata."""
        if not self.is_world_process_zero():
            return
        card = render_model_card(
            self,
            model_name=model_name,
            dataset_name=dataset_name or dataset or dataset_tags,
            tags=tags,
            language=language,
            license=license,
            finetuned_from=finetuned_from,
            tasks=tasks,
        )
        atomic_write(os.path.join(self.args.output_dir, "README.md"), card.save)  # never a half-written card

    # ------------------------------------------------------------------ the step (`training.step`)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The base `get_batch_samples` (every micro-batch of the next optimizer step); in ``select`` mode they are
        kept as the step's candidates, to be scored and selected together before any is trained
        (`_select_over_step`)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._plain_share = self._plain_share_of_step(batch_samples, num_items_in_batch)
        if self.mode == "select" and batch_samples:
            self._selections.clear()
            self._step_candidates = []
            for batch in batch_samples:
                inputs = self._prepare_inputs(dict(batch))
                rows, extras = self.mimic_bookkeeping.pop(inputs)
                self._step_candidates.append(MicroBatch(inputs, torch.as_tensor(rows).cpu(), extras))
        return batch_samples, num_items_in_batch

    def _select_over_step(self) -> None:
        """Select mode: scores the step's candidates and selects over all of them (`training.selection`). Run at the
        step's first micro-batch, in `Trainer`'s training context (train mode, autocast) and after it restores a
        resumed run's random state (after `get_batch_samples`): the candidates draw the dropout masks an
        uninterrupted run draws."""
        # The model itself, not its DDP wrapper: a candidate's forward is never backpropagated into the parameters,
        # and DDP (finding unused parameters) would mark them ready at each one, then again in the step's backward.
        # FSDP2 shards the model in place, so its unit hooks still gather the weights.
        # On a forked random state: the training forwards then draw the dropout masks `Trainer`'s would.
        device = self.args.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            candidates = [
                self.mimic_step.candidates(self.model, batch, self.state.global_step) for batch in self._step_candidates
            ]
        self._step_candidates = None
        accelerator = self.accelerator
        self._selections = deque(
            select_over_step(
                self.scorer,
                candidates,
                self.args.mimic_select_ratio,
                self.step_softmax.gather,
                accelerator.process_index,
                accelerator.num_processes,
                warmup=self.state.global_step < self.args.mimic_warmup_steps,
                token_weighting=self.args.mimic_token_weighting == "token",
            )
        )
        if self.scorer.observes:
            observe_step(self.scorer, list(self._selections), self.step_softmax.gather)

    def _plain_share_of_step(self, batch_samples: list, num_items_in_batch: Any) -> float | torch.Tensor:
        """Scope ``layer``: U = Σ_i u_i, the total weight of `Trainer`'s plain loss over the step
        (`token_weighting.supervised_items`); 1 wherever `Trainer` does not count the step's tokens."""
        args = self.args
        if (
            num_items_in_batch is None
            or args.mimic_reweight_scope != "layer"
            or args.mimic_token_weighting != "token"
            or self.sample_loss.loss_fn is not None
            or not all("labels" in batch for batch in batch_samples)
        ):
            return 1.0
        shifted = is_causal_lm(self.accelerator.unwrap_model(self.model))
        items = torch.as_tensor(
            supervised_items([batch["labels"] for batch in batch_samples], shifted), device=args.device
        )
        if args.average_tokens_across_devices and args.world_size > 1:  # as Trainer counts num_items_in_batch
            items = self.accelerator.gather(items).sum()
        return items.float() / num_items_in_batch  # a tensor on the device: no host sync in the step

    def _comparison_batch(self, global_step: int) -> dict[str, Any]:
        """AGRA's comparison batch: ``per_device_train_batch_size`` samples drawn at random from the training set,
        seeded by the step, collated and prepared as a training batch."""
        if is_stream(self.train_dataset):
            raise ValueError(
                "AGRA's comparison batch is drawn at random from the training set, which a stream "
                "(iterable dataset) cannot do; use another scorer, or a map-style dataset."
            )
        if self._comparison_collator is None:
            self._comparison_collator = self._get_collator_with_removed_columns(
                self.data_collator, description="training"
            )
        generator = torch.Generator().manual_seed(self.args.seed + global_step)
        rows = torch.randperm(len(self.train_dataset), generator=generator)[: self.args.per_device_train_batch_size]
        batch = self._prepare_inputs(self._comparison_collator([self.train_dataset[int(i)] for i in rows]))
        self.mimic_bookkeeping.pop(batch)
        return batch

    def _accumulated_grads(self) -> list[torch.Tensor]:
        """The gradients the step softmax rescales: every trainable parameter's (scope ``all``), or the mimic
        tensors' (scope ``layer``); this rank's shard of a DTensor gradient under FSDP2."""
        params = (
            self.mimic_layers.tensors.values() if self.args.mimic_reweight_scope == "layer" else self.model.parameters()
        )
        return [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]

    def _end_mimic_step(self, state: Any) -> None:
        """At ``on_step_end``: the step's final weights into the score log, its metrics, and the scorer's step end."""
        records = self.step_softmax.finish(state.global_step - 1)
        if records is None:
            return
        # Counted (and its left-out samples named by id) before the write: a stream's ids are forgotten once written.
        self.mimic_metrics.update(self.nonfinite_guard.count(records, self.score_log.sample_ids, state.global_step))
        self.score_log.write(records, state.global_step, float(state.epoch or 0.0))
        self.mimic_metrics.update({**records.metrics, **self.scorer.step_metrics()})
        self.scorer.end_step()


class MimicTrainer(MimicTrainerMixin, Trainer):
    """A `Trainer` that reweights every sample of a batch by its Grad-Mimic score (arXiv 2501.06708).

    Use it exactly like `Trainer`, with a `MimicConfig` and a reference::

        trainer = MimicTrainer(model=model, args=MimicConfig(output_dir="out", mimic_reference="org/ref"),
                               train_dataset=train, eval_dataset=test)
        trainer.train()
        scores = hf_gradmimic.load_scores("out")

    Every argument is `Trainer`'s, plus the keyword arguments of `MimicTrainerMixin` (``reference``,
    ``per_sample_loss_fn``, ``scorer``, ``zero_shot``).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MimicConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        reference: ReferenceSource | None = None,
        per_sample_loss_fn: PerSampleLossFn | None = None,
        scorer: SampleScorer | None = None,
        zero_shot: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            reference=reference,
            per_sample_loss_fn=per_sample_loss_fn,
            scorer=scorer,
            zero_shot=zero_shot,
            **kwargs,
        )
