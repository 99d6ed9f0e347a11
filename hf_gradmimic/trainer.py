"""`MimicTrainer`: Grad-Mimic Stage 1 as a drop-in subclass of `transformers.Trainer`.

Grad-Mimic (Huang, Bilkhu, Sala, Movellan, "Evaluating Sample Utility for Data Selection by
Mimicking Model Weights", arXiv 2501.06708, Algorithm 1). At step t, with v_t = θ_ref − θ_t over
the mimic layers' weights and biases and g_i = ∇ℓ_i restricted to them:

    m_i = ⟨−g_i, v_t⟩ / ‖v_t‖₂          (mimic score)
    w_i = softmax_i(m_i / τ)            (plus sign: the paper's exp(−m_i/τ) is a typo)
    update direction = Σ_i w_i ∇ℓ_i     (backward of Σ_i w_i ℓ_i with w detached)

``⟨g_i, v⟩`` comes from the layer's input and output gradient (`hf_gradmimic.ghost`), never from
per-sample gradients: one forward with hooks, one ``autograd.grad`` of Σℓ_i to the mimic layers'
outputs (retaining the graph), one extra matmul per layer, then the single backward. With the
built-in losses, which read the model only through its logits z, the first ``autograd.grad`` stops
at z (δ = ∂Σℓ/∂z, the loss's own graph freed), reaches the mimic layers from there, and the
backward starts at z with c_i δ_i: the loss's graph (a ``[B, T, vocab]`` log-softmax for a
language model) is differentiated once, as in plain `Trainer`.

Normalisation over the optimizer step (``mimic_normalize="step"``) is exact under gradient
accumulation and data parallelism: scores are gathered across ranks (a few floats per sample) and
micro-batches are combined as an online softmax. Micro-batch k has softmax logits s = m/τ; with a
running max M and running sum S = Σ exp(s_j − M) over everything seen in the step, it contributes
Σ_i exp(s_i − M_k)/S_k · ∇ℓ_i and the gradients already accumulated are rescaled by
S_{k−1}·exp(M_{k−1} − M_k)/S_k. After the last micro-batch the accumulated gradient is exactly
Σ_i softmax(s)_i ∇ℓ_i over the whole step, whatever the split.

Each micro-batch's logits travel with its sample rows, so every rank also knows which samples the
others drew: a sample already seen in the epoch is one that accelerate's ``even_batches`` repeated
to fill the last batches, and its records are flagged ``repeated``. Supported and tested parallel
set-ups (DDP, FSDP2, bf16, activation checkpointing, resume) and refused ones: docs/distributed.md.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .config import MimicConfig
from .ghost import linear_inner_product
from .losses import PerSampleLossFn, logits_of, per_sample_loss
from .scorers import SampleScorer, ScoreContext, check_mode, comparison_gradient, get_scorer, num_selected
from .reference import (
    ReferenceSource,
    load_reference_tensors,
    read_reference_metadata,
    reference_tensor_names,
    resolve_mimic_layers,
)
from .scores import ScoreWriter, read_score_table

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")

SELF_TERM_PATIENCE = 3
"""Monitored steps in a row with the self term dominating before the monitor warns."""

MONITOR_CHUNK_LOGITS = 1 << 22
"""At most this many reference logits are alive at once when the monitor scores a head on captured features."""

ROW_INDEX_KEY = "mimic_row_index"
"""Batch key carrying each sample's row index in ``train_dataset``; popped before the model sees the batch."""


class _RowIndexedDataset(torch.utils.data.Dataset):
    """Adds the row index to each example of a map-style dataset of dicts."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        if not isinstance(example, dict):
            raise TypeError(
                f"MimicTrainer needs dataset examples that are dicts, got {type(example).__name__} at row {index}."
            )
        return {**example, ROW_INDEX_KEY: index}


def with_row_index(dataset: Any) -> Any:
    """The training set with a ``mimic_row_index`` column, so sample ids survive batching."""
    import datasets

    if dataset is None:
        return None
    if isinstance(dataset, datasets.Dataset):
        if ROW_INDEX_KEY in dataset.column_names:
            return dataset
        return dataset.add_column(ROW_INDEX_KEY, np.arange(len(dataset), dtype=np.int64))
    if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
        raise TypeError(
            "MimicTrainer records scores by row index and needs a map-style train_dataset; an iterable dataset "
            f"({type(dataset).__name__}) has none. Add a `{ROW_INDEX_KEY}` integer column to it."
        )
    return _RowIndexedDataset(dataset)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter that FSDP2 keeps as a sharded DTensor outside forward (an all-gather)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor gradient (FSDP2), which in-place ops can scale; a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_supported_setup(accelerator: Any, args: MimicConfig, model: nn.Module) -> None:
    """Refuse the set-ups under which the scores or the update would be silently wrong (see docs/distributed.md)."""
    if args.torch_compile or hasattr(model, "_orig_mod"):
        raise ValueError(
            "MimicTrainer does not support torch.compile (`torch_compile=True` or a compiled model): a compiled graph "
            "hands the mimic layers' forward hooks tensors that the loss does not depend on through autograd "
            "(AOTAutograd backends such as inductor and aot_eager), so the output gradients, and the scores, would "
            "be silently wrong. Train the uncompiled model."
        )
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ValueError(
                "MimicTrainer does not support DeepSpeed ZeRO stage 3: it partitions every parameter across ranks and "
                "gathers a layer's weights only inside that layer's forward, so outside it the mimic layers' weights "
                "are empty and θ_ref − θ cannot be formed. Use ZeRO stage 1 or 2, FSDP2 or DDP."
            )
        if args.mimic_normalize == "step" and args.gradient_accumulation_steps > 1:
            raise ValueError(
                "With DeepSpeed, MimicTrainer cannot combine `mimic_normalize='step'` with gradient accumulation: "
                "DeepSpeed keeps the accumulated gradients in its own buffers, which the step-wide softmax must "
                "rescale after every micro-batch. Use `mimic_normalize='micro'` or `gradient_accumulation_steps=1`."
            )
    if kind == DistributedType.FSDP:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "MimicTrainer needs FSDP2 (`fsdp_config={'fsdp_version': 2}`): FSDP1 flattens parameters, and "
                "outside forward the mimic layers' weights are views into a sharded flat parameter."
            )
        if args.mimic_reweight_scope == "layer":
            raise ValueError(
                "`mimic_reweight_scope='layer'` is not supported under FSDP: its correction term re-applies the mimic "
                "layers outside forward, where FSDP2 keeps their weights sharded. Use `mimic_reweight_scope='all'`."
            )


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The newest ``checkpoint-N`` under ``output_dir`` that was completely written, or None.

    transformers (5.23) writes a checkpoint in place, not into a temporary folder, and the main
    process writes ``trainer_state.json`` last: a run killed while saving leaves a folder without it,
    which `Trainer`'s own ``resume_from_checkpoint=True`` would pick and then fail to load.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(match[1])
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_NAME.fullmatch(name))
        and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE_NAME))
    ]
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on with the reentrant variant.

    transformers stores ``functools.partial(checkpoint, **kwargs)`` on each module it checkpoints.
    Without an explicit ``use_reentrant`` torch (≤ 2.13) defaults to the reentrant variant.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if function is not None and getattr(function, "keywords", {}).get("use_reentrant") is not False:
                return True
    return False


def _finite_or_zero(running_max: torch.Tensor) -> torch.Tensor:
    """The softmax shift: the running max, or 0 while no finite logit has been seen (−inf − (−inf) is NaN)."""
    return torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))


class _PendingGrad:
    """The gradient at the logits that `_BackwardFrom` hands on, known only after the scores."""

    grad: torch.Tensor | None = None


class _BackwardFrom(torch.autograd.Function):
    """A zero scalar whose backward hands ``pending.grad`` to ``output``: ``backward()`` of it starts at ``output``.

    When every parameter reaches the loss only through the logits z, ∂(Σ_i c_i ℓ_i)/∂z_i = c_i δ_i with
    δ = ∂Σℓ/∂z, which the scores needed anyway. Starting the backward there skips a second pass through the
    loss's own graph (a log-softmax backward over ``[B, T, vocab]`` for a language model). The node is made
    right after the forward and the gradient set later, so that nothing has to keep the logits alive in
    between. The gradient is scaled in place by the upstream one and handed on once, as `Trainer` backpropagates.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, pending: _PendingGrad) -> torch.Tensor:
        ctx.pending = pending
        return output.new_zeros(())

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad, ctx.pending.grad = ctx.pending.grad, None
        if grad is None:
            raise RuntimeError("MimicTrainer's loss was backpropagated twice, or before its logits' gradient was set.")
        return grad.mul_(upstream), None


def _scale_per_sample(tensor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``tensor[i] * coefficients[i]``, in place when the layout allows (the tensor can be vocabulary-sized).
    The product is formed in the coefficients' float32 and rounded once to the tensor's dtype (bf16 logits)."""
    scale = coefficients.detach().view(-1, *([1] * (tensor.dim() - 1)))
    return tensor.mul_(scale) if tensor.is_contiguous() else (tensor * scale).to(tensor.dtype)


def _softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """softmax, or all zeros when every logit is −inf (AGRA excluded the whole batch: nothing to learn from)."""
    if not torch.isfinite(logits).any():
        return torch.zeros_like(logits)
    return torch.softmax(logits, dim=0)


@dataclass
class _StepState:
    """What the online softmax and the score log keep over the micro-batches of one optimizer step."""

    global_step: int
    running_max: torch.Tensor
    running_sum: torch.Tensor
    micro_batches: int = 0
    all_logits: list[torch.Tensor] = field(default_factory=list)  # every rank's, "step" normalisation only
    all_rows: list[torch.Tensor] = field(default_factory=list)  # every rank's rows, −inf padded, per micro-batch
    all_scores: list[torch.Tensor] = field(default_factory=list)  # every rank's, aligned with all_rows
    all_losses: list[torch.Tensor] = field(default_factory=list)  # every rank's, aligned with all_rows
    rows: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)  # "micro" normalisation only
    fallbacks: list[torch.Tensor] = field(default_factory=list)


class _LinearCapture:
    """Forward hooks that keep each mimic layer's input and output for one forward pass.

    Hooks are registered only around the training forward, so recomputation under gradient
    checkpointing (which runs during backward) is not captured twice.
    """

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_LinearCapture":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in self.outputs:
                raise RuntimeError(
                    f"Mimic layer {name!r} ran more than once in one forward pass (a shared or tied module); "
                    "its per-sample gradient is then not Σ_t δ a, so pick another layer."
                )
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _ScoreLogCallback(TrainerCallback):
    """Ties the set-up checks, the score log and the repeat tracking to the Trainer's events."""

    def __init__(self, trainer: "MimicTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # Here, not in __init__: `Trainer.train` turns activation checkpointing on just before.
        self.trainer._check_activation_checkpointing()
        self.trainer._start_score_log(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_step(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        # A sample counts as repeated when already seen in the same epoch.
        self.trainer._seen_rows = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer._score_writer is not None:
            self.trainer._score_writer.flush(wait=True)


class MimicTrainer(Trainer):
    """A `Trainer` that reweights every sample of a batch by its Grad-Mimic score.

    Use it exactly like `Trainer`, with a `MimicConfig` and a reference::

        trainer = MimicTrainer(model=model, args=MimicConfig(output_dir="out", mimic_reference="org/ref"),
                               train_dataset=train, eval_dataset=test)
        trainer.train()
        scores = hf_gradmimic.load_scores("out")

    Args:
        reference: overrides ``args.mimic_reference`` with an in-memory source: a model
            (`PreTrainedModel` or any `nn.Module`), a ``{name: tensor}`` dict, a path or a repo id.
        per_sample_loss_fn: ``(outputs, inputs) -> Tensor[B]``, for tasks the built-in losses do not
            cover. ``inputs`` still holds the labels.
        scorer: a `hf_gradmimic.scorers.SampleScorer` instance, instead of the one ``mimic_scorer`` names.
            For ``rho_loss``, ``reference=`` is the irreducible-loss model.
        zero_shot: for the ``bayesian`` scorer, ``model_inputs -> log-probabilities [B, C]`` (see
            `hf_gradmimic.zero_shot`), unless ``mimic_zero_shot_column`` holds precomputed logits.
        Every other argument is `Trainer`'s.
    """

    _tag_names = ["grad-mimic", "data-filtering", "hf-gradmimic"]
    # compute_loss returns a loss already normalised over the whole optimizer step.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MimicConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        reference: ReferenceSource | None = None,
        per_sample_loss_fn: PerSampleLossFn | None = None,
        scorer: SampleScorer | None = None,
        zero_shot: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = MimicConfig(output_dir="mimic_trainer_output")
        elif not isinstance(args, MimicConfig):
            raise TypeError(f"MimicTrainer needs `args` to be a MimicConfig, got {type(args).__name__}.")
        if model is None:
            raise ValueError("MimicTrainer needs a `model` (model_init is not supported: the mimic layers are resolved at construction).")
        self._sample_ids = None
        if train_dataset is not None and args.mimic_id_column is not None:
            self._sample_ids = self._read_id_column(train_dataset, args.mimic_id_column)
        self._clean_flags = None
        if train_dataset is not None and args.mimic_clean_column is not None:
            self._clean_flags = self._read_id_column(train_dataset, args.mimic_clean_column).astype(bool)
            if hasattr(train_dataset, "remove_columns"):  # the ground truth must never reach the model
                train_dataset = train_dataset.remove_columns([args.mimic_clean_column])
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=with_row_index(train_dataset),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            **kwargs,
        )
        check_supported_setup(self.accelerator, args, model)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes == 1:
            # Every process would train alone and write rank 0's score shards over the others'.
            raise RuntimeError(
                f"Launched as {launched} processes (WORLD_SIZE), but the Trainer did not set up distributed training "
                "and runs each as a single process. On CPU, pass `use_cpu=True` (`--use_cpu`)."
            )
        self.per_sample_loss_fn = per_sample_loss_fn
        layer_map = args.mimic_layer_map
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.mimic_layers = resolve_mimic_layers(unwrapped, list(layer_map))
        self.scorer = scorer if scorer is not None else self._default_scorer(reference, zero_shot)
        self.mode = args.mimic_mode or self.scorer.default_mode
        check_mode(self.scorer, self.mode)
        if self.mode == "select" and args.mimic_reweight_scope == "layer":
            raise ValueError("`mimic_reweight_scope='layer'` reweights a full batch; `select` mode trains on the selected samples only.")
        self.zero_shot = zero_shot
        self._extra_columns = [c for c in (args.mimic_irreducible_loss_column, args.mimic_zero_shot_column) if c]
        self._comparison_collator = None
        self._last_context: Optional[ScoreContext] = None
        self._head_outputs_logits = False  # learnt at each training forward; picks the monitor's cheap path
        self._current_extras: Optional[dict[str, Any]] = None
        self.reference_name, self.reference_tensors = None, {}
        if self.scorer.name == "mimic":
            self._load_reference(reference if reference is not None else args.mimic_reference, layer_map)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._step_state: Optional[_StepState] = None
        self._direction_cache: Optional[tuple[int, dict[str, torch.Tensor], torch.Tensor]] = None
        self._score_writer: Optional[ScoreWriter] = None
        self._alignment_checked = False
        self._self_dominated_streak = 0
        self._warned_self_term = False
        self._current_rows: Optional[torch.Tensor] = None
        self._seen_rows: Optional[np.ndarray] = None  # rows seen so far in this epoch, on any rank
        self.fallback_count = 0
        if self.accelerator.distributed_type == DistributedType.FSDP:
            self._adapt_to_fsdp()
        self.add_callback(_ScoreLogCallback(self))

    # ------------------------------------------------------------------ set-up helpers

    def _load_reference(self, source: Any, layer_map: dict[str, str]) -> None:
        """Reads only the mimic layers' tensors of the reference, and checks them against the student."""
        if source is None:
            raise ValueError(
                "MimicTrainer needs a reference: set `mimic_reference` (Hub repo id, directory or .safetensors "
                "file) in MimicConfig, or pass `reference=` (a model or a {name: tensor} dict)."
            )
        self._param_to_reference = reference_tensor_names(layer_map, self.mimic_layers)
        self.reference_name = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        reference_by_name = load_reference_tensors(
            source, list(self._param_to_reference.values()), revision=self.args.mimic_reference_revision,
            token=self.args.hub_token,
        )
        self.reference_tensors = {
            param: reference_by_name[ref_name] for param, ref_name in self._param_to_reference.items()
        }
        self._check_reference_shapes()
        self._check_reference_base(source)

    def _default_scorer(self, reference: Any, zero_shot: Any) -> SampleScorer:
        """The scorer named by ``mimic_scorer``, with what it needs from the config and the trainer's arguments."""
        args, name = self.args, self.args.mimic_scorer
        if name == "rho_loss":
            if args.mimic_irreducible_loss_column is None and not isinstance(reference, nn.Module):
                raise ValueError(
                    "mimic_scorer='rho_loss' needs the irreducible loss: pass the irreducible-loss model as "
                    "`reference=` (a model trained on holdout data), or set `mimic_irreducible_loss_column`."
                )
            return get_scorer(name, reference=reference if isinstance(reference, nn.Module) else None,
                              label_smoothing=args.label_smoothing_factor)
        if name == "bayesian":
            if args.mimic_zero_shot_column is None and zero_shot is None:
                raise ValueError(
                    "mimic_scorer='bayesian' needs zero-shot predictions: set `mimic_zero_shot_column` (logits per "
                    "sample) or pass `zero_shot=` (e.g. hf_gradmimic.zero_shot.SentenceZeroShot)."
                )
            return get_scorer(name, num_effective_data=len(self.train_dataset), seed=args.seed)
        return get_scorer(name)

    @staticmethod
    def _read_id_column(dataset: Any, column: str) -> np.ndarray:
        names = getattr(dataset, "column_names", None)
        if names is not None and column not in names:
            raise ValueError(f"Column {column!r} (MimicConfig) is not a column of train_dataset; columns: {names}.")
        try:
            return np.asarray(dataset[column])
        except (KeyError, TypeError) as error:
            raise ValueError(f"Cannot read column {column!r} (MimicConfig) from train_dataset: {error}") from error

    def _mimic_parameters(self) -> dict[str, nn.Parameter]:
        """``{"layer.weight": parameter, ...}`` of the mimic layers, in a fixed order."""
        params = {}
        for name, layer in self.mimic_layers.items():
            params[f"{name}.weight"] = layer.weight
            if layer.bias is not None:
                params[f"{name}.bias"] = layer.bias
        return params

    def _check_reference_shapes(self) -> None:
        for name, param in self._mimic_parameters().items():
            reference = self.reference_tensors[name]
            if tuple(reference.shape) != tuple(param.shape):
                raise ValueError(
                    f"Reference tensor {self._param_to_reference[name]!r} has shape {tuple(reference.shape)} but the "
                    f"student's {name!r} has shape {tuple(param.shape)}: the reference must have the same mimic-layer "
                    "architecture (same number of labels, same hidden size)."
                )
            if not param.requires_grad:
                raise ValueError(
                    f"Mimic layer parameter {name!r} does not require grad; the mimic layers must be trainable."
                )

    def _adapt_to_fsdp(self) -> None:
        if self.args.mimic_normalize == "step":
            # Under FSDP2's no_sync the accumulated gradients wait in private unsharded buffers, out of reach of
            # the online softmax's rescale; reduce-scattering after every micro-batch keeps them in `param.grad`.
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        if self.args.mimic_alignment_check:
            # The check swaps the mimic layers' weights for the reference's, which FSDP2's own swapping of
            # sharded and unsharded parameters around forward would undo.
            logger.warning("MimicTrainer skips the alignment check (`mimic_alignment_check`) under FSDP.")
            self._alignment_checked = True

    def _check_activation_checkpointing(self) -> None:
        if _uses_reentrant_checkpointing(self.accelerator.unwrap_model(self.model)):
            raise ValueError(
                "MimicTrainer needs non-reentrant activation checkpointing: the reentrant variant runs checkpointed "
                "layers without autograd in forward, so a mimic layer inside them has no output gradient. Pass "
                "`activation_checkpointing_kwargs={'use_reentrant': False}` (formerly `gradient_checkpointing_kwargs`) "
                "in the training arguments, or leave those kwargs unset: transformers then uses use_reentrant=False."
            )

    def _set_signature_columns_if_needed(self) -> None:
        # As trl does: keep our bookkeeping columns through `remove_unused_columns`.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += [ROW_INDEX_KEY, *self._extra_columns]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; ``resume_from_checkpoint=True`` picks the newest *completely written* checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint (with {TRAINER_STATE_NAME}) in {self.args.output_dir}.")
        elif resume_from_checkpoint and not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)):
            raise ValueError(
                f"{resume_from_checkpoint} has no {TRAINER_STATE_NAME}: it was not completely written (a run killed "
                "while saving it?). Resume from an earlier checkpoint, or pass `resume_from_checkpoint=True`."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ the step

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Pops the sample rows off the batch, then runs `Trainer.training_step` (one backward)."""
        rows, extras = self._pop_bookkeeping(inputs)
        if rows is None:
            raise KeyError(
                f"The training batch has no `{ROW_INDEX_KEY}`: a custom data collator dropped it. Keep that key "
                "(an integer per example) in the collated batch."
            )
        self._current_rows = torch.as_tensor(rows).cpu()
        self._current_extras = extras
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._current_rows = self._current_extras = None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """In training: the Grad-Mimic loss whose gradient is Σ_i w_i ∇ℓ_i. Elsewhere: `Trainer`'s loss."""
        self._pop_bookkeeping(inputs)
        if getattr(self, "_current_rows", None) is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        state = self._begin_micro_batch()
        labels = inputs.get("labels")
        model_inputs = inputs if self.per_sample_loss_fn is not None else {k: v for k, v in inputs.items() if k != "labels"}
        if self.mode == "select":
            return self._select_step(model, state, inputs, model_inputs, labels, return_outputs)
        uses_reference = self.scorer.name == "mimic"
        check_alignment = uses_reference and self.args.mimic_alignment_check and not self._alignment_checked
        monitored = uses_reference and state.micro_batches == 0 and self._monitor_due()
        # The diagnostics' no-grad forwards run before the training forward, while no graph is alive, so they
        # add nothing to the step's peak memory. The monitor of a head needs none (`_reference_head_losses`).
        forwards_for_monitor = monitored and not self._head_outputs_logits
        swapped = self._swapped_losses(model_inputs, inputs, labels) if check_alignment or forwards_for_monitor else None
        if check_alignment:
            self._alignment_checked = True
            self._check_alignment(*swapped)
        with _LinearCapture(self.mimic_layers) as capture:
            outputs = model(**model_inputs)
        losses = self._per_sample_losses(outputs, inputs, labels)
        self._head_outputs_logits = (
            self.per_sample_loss_fn is None and len(self.mimic_layers) == 1
            and next(iter(capture.outputs.values()), None) is logits_of(outputs)
        )
        if monitored:
            if self._head_outputs_logits:
                swapped = (losses.detach(), self._reference_head_losses(capture, labels))
            elif swapped is None:  # the layer stopped being the logits' head since the last step
                swapped = self._swapped_losses(model_inputs, inputs, labels)

        # The built-in losses read the model only through its logits: take δ = ∂Σℓ/∂logits once (freeing the
        # loss's own graph) and later start the backward at the logits with c_i δ_i (`_BackwardFrom`).
        from_logits = self.per_sample_loss_fn is None and self.args.mimic_reweight_scope == "all"
        needs_grads = self.scorer.needs_output_grads or self.args.mimic_reweight_scope == "layer"
        if from_logits:
            pending = _PendingGrad()
            logits_edge, surrogate = self._cut_at_logits(logits_of(outputs), capture, pending)
            if self.scorer.name == "mimic" and not return_outputs:
                # Nothing reads the logits' values any more. Plain `Trainer` has them freed by now too (no
                # backward node saves them); for a language model they are a [B, T, vocab] tensor.
                outputs = None
            prediction_grad = torch.autograd.grad(losses.sum(), logits_edge)[0]
            output_grads = self._output_grads(logits_edge, capture, root_grad=prediction_grad) if needs_grads else None
        else:
            output_grads = self._output_grads(losses.sum(), capture) if needs_grads else None
        scores = self._sample_scores(outputs, losses, labels, capture, output_grads, model_inputs)
        if monitored:
            self._monitor(capture, output_grads, scores.detach(), *swapped)
        logits, fallback = self._softmax_logits(scores.detach())
        coefficients = self._combine(state, logits, scores, losses)
        self._record(state, scores, logits, losses, fallback)
        if from_logits:
            del output_grads  # the head's entry is prediction_grad, scaled in place next
            pending.grad = _scale_per_sample(prediction_grad, coefficients)
            loss = surrogate
        else:
            loss = self._weighted_loss(losses, coefficients, capture, output_grads)
        # Report the plain mean loss (comparable with `Trainer`'s), backpropagate the weighted one.
        reported = losses.detach().mean() / self.current_gradient_accumulation_steps
        loss = loss - loss.detach() + reported
        return (loss, outputs) if return_outputs else loss

    def _select_step(
        self, model: nn.Module, state: _StepState, inputs: dict[str, Any], model_inputs: dict[str, Any], labels: Any,
        return_outputs: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``select`` mode (RHO-LOSS, Bayesian selection): score the candidate batch, then forward and backward only
        the top ``mimic_select_ratio`` of it. Loss-based scorers score without building a graph; ghost scorers need
        the gradient at the mimic layers' outputs, so their scoring forward builds one (freed before training)."""
        needs_grads = self.scorer.needs_output_grads
        with torch.set_grad_enabled(needs_grads):
            with _LinearCapture(self.mimic_layers) as capture:
                outputs = model(**model_inputs)
            losses = self._per_sample_losses(outputs, inputs, labels)
            output_grads = self._output_grads(losses.sum(), capture, retain_graph=False) if needs_grads else None
            scores = self._sample_scores(outputs, losses, labels, capture, output_grads, model_inputs).detach()
        del outputs, capture, output_grads
        selected = torch.topk(torch.nan_to_num(scores, nan=-math.inf), num_selected(len(scores), self.args.mimic_select_ratio)).indices
        selected = selected.sort().values
        logits = torch.full_like(scores, -math.inf)
        logits[selected] = 0.0
        coefficients = self._combine(state, logits, scores, losses)
        self._record(state, scores, logits, losses, ~torch.isfinite(scores).all())
        self.scorer.observe(self._last_context, (logits == 0).float() / len(selected))
        self._last_context = None  # it holds the batch's activations and gradients

        batch_size = len(scores)
        chosen = {k: v[selected] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size else v
                  for k, v in inputs.items()}
        chosen_model_inputs = chosen if self.per_sample_loss_fn is not None else {k: v for k, v in chosen.items() if k != "labels"}
        chosen_outputs = model(**chosen_model_inputs)
        chosen_losses = self._per_sample_losses(chosen_outputs, chosen, chosen.get("labels"))
        loss = (coefficients[selected].detach() * chosen_losses).sum()
        reported = chosen_losses.detach().mean() / self.current_gradient_accumulation_steps
        loss = loss - loss.detach() + reported
        return (loss, chosen_outputs) if return_outputs else loss

    def _sample_scores(
        self, outputs: Any, losses: torch.Tensor, labels: Any, capture: _LinearCapture,
        output_grads: dict[str, torch.Tensor] | None, model_inputs: dict[str, Any],
    ) -> torch.Tensor:
        """Per-sample utility from the configured scorer (Grad-Mimic's own path for ``mimic``)."""
        if self.scorer.name == "mimic":
            return self._mimic_scores(capture, output_grads)
        extras = self._current_extras or {}
        column = self.args.mimic_irreducible_loss_column
        context = ScoreContext(
            losses=losses.detach(),
            logits=logits_of(outputs).detach(),
            labels=labels,
            layers=self.mimic_layers,
            activations=capture.inputs,
            outputs=capture.outputs,
            output_grads=output_grads,
            irreducible_losses=extras[column].float() if column in extras else None,
            features=capture.inputs[next(iter(self.mimic_layers))] if self.scorer.name == "bayesian" else None,
            zero_shot_log_probs=self._zero_shot_log_probs(model_inputs, extras),
            comparison_grad=self._comparison_gradient if self.scorer.name == "agra" else None,
            inputs=model_inputs,
        )
        if self.mode == "select":
            self._last_context = context  # for `scorer.observe`, once the selection is made
        return self.scorer.score(context).float()

    def _zero_shot_log_probs(self, model_inputs: dict[str, Any], extras: dict[str, Any]) -> torch.Tensor | None:
        if self.scorer.name != "bayesian":
            return None
        column = self.args.mimic_zero_shot_column
        if column in extras:
            return torch.log_softmax(extras[column].float(), dim=-1)
        return self.zero_shot(model_inputs)

    def _comparison_gradient(self) -> dict[str, torch.Tensor]:
        """AGRA's comparison: the mean gradient (mimic layers) of a batch drawn at random from the training set."""
        if self._comparison_collator is None:
            self._comparison_collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        generator = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        rows = torch.randperm(len(self.train_dataset), generator=generator)[: self.args.per_device_train_batch_size]
        batch = self._prepare_inputs(self._comparison_collator([self.train_dataset[int(i)] for i in rows]))
        self._pop_bookkeeping(batch)
        labels = batch.get("labels")
        model_inputs = batch if self.per_sample_loss_fn is not None else {k: v for k, v in batch.items() if k != "labels"}
        unwrapped = self.accelerator.unwrap_model(self.model)
        with _LinearCapture(self.mimic_layers) as capture:
            outputs = unwrapped(**model_inputs)
        losses = self._per_sample_losses(outputs, batch, labels)
        output_grads = self._output_grads(losses.sum(), capture, retain_graph=False)
        return comparison_gradient(self.mimic_layers, capture.inputs, output_grads)

    def _per_sample_losses(self, outputs: Any, inputs: dict[str, Any], labels: torch.Tensor | None) -> torch.Tensor:
        if self.per_sample_loss_fn is not None:
            losses = self.per_sample_loss_fn(outputs, inputs)
        else:
            if labels is None:
                raise ValueError("The training batch has no `labels`; MimicTrainer needs them for per-sample losses.")
            smoothing = self.args.label_smoothing_factor
            losses = per_sample_loss(self.accelerator.unwrap_model(self.model), outputs, labels, smoothing)
        if losses.dim() != 1:
            raise ValueError(f"Per-sample losses must have shape [batch], got {tuple(losses.shape)}.")
        return losses.float()

    @staticmethod
    def _cut_at_logits(
        prediction: torch.Tensor, capture: _LinearCapture, pending: _PendingGrad
    ) -> tuple[torch.autograd.graph.GradientEdge, torch.Tensor]:
        """The logits' gradient edge (it names them in ``autograd.grad`` without keeping them alive) and the
        `_BackwardFrom` node; a mimic layer whose output is the logits is recorded by that edge."""
        if not prediction.requires_grad:
            raise RuntimeError(
                "The model's logits do not require grad: is every parameter frozen, or the forward run under "
                "torch.no_grad?"
            )
        edge = torch.autograd.graph.get_gradient_edge(prediction)
        for name, output in capture.outputs.items():
            if output is prediction:
                capture.outputs[name] = edge
        return edge, _BackwardFrom.apply(prediction, pending)

    def _output_grads(
        self,
        root: torch.Tensor | torch.autograd.graph.GradientEdge,
        capture: _LinearCapture,
        retain_graph: bool = True,
        root_grad: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """∂root/∂z at each mimic layer's output z: ``root`` is Σ_i ℓ_i, or the logits' edge with ``root_grad`` = δ
        at them (a vector-Jacobian product; a layer whose output *is* the logits gets δ itself, at no cost)."""
        missing = [name for name in self.mimic_layers if name not in capture.outputs]
        if missing:
            raise RuntimeError(f"Mimic layer(s) {missing} did not run in the forward pass.")
        grads = {name: root_grad for name in self.mimic_layers if capture.outputs[name] is root}
        pending = [name for name in self.mimic_layers if name not in grads]
        if not all(capture.outputs[name].requires_grad for name in pending):
            raise RuntimeError(
                "The mimic layers' outputs do not require grad: are the mimic layers frozen, or run under "
                "torch.no_grad or reentrant activation checkpointing?"
            )
        if pending:
            found = torch.autograd.grad(
                root, [capture.outputs[name] for name in pending], grad_outputs=root_grad,
                retain_graph=retain_graph, allow_unused=True,
            )
            unused = [name for name, grad in zip(pending, found) if grad is None]
            if unused:
                raise RuntimeError(f"The loss does not depend on the output of mimic layer(s) {unused}; pick layers the loss uses.")
            grads.update(zip(pending, found))
        return {name: grads[name] for name in self.mimic_layers}

    def _direction(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """v = θ_ref − θ_t over the mimic parameters, and ‖v‖; computed once per optimizer step."""
        step = self.state.global_step
        if self._direction_cache is None or self._direction_cache[0] != step:
            direction = {}
            for name, param in self._mimic_parameters().items():
                # Called on every rank at the same point of the step, as the all-gather of FSDP2 needs.
                param = _full_tensor(param.detach())
                reference = self.reference_tensors[name]
                if reference.device != param.device:
                    reference = self.reference_tensors[name] = reference.to(param.device)
                direction[name] = reference - param.float()
            norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
            self._direction_cache = (step, direction, norm)
        return self._direction_cache[1], self._direction_cache[2]

    def _ghost_inner(
        self, capture: _LinearCapture, output_grads: dict[str, torch.Tensor], direction: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Σ_layers ⟨g_i, direction⟩ per sample, by the ghost inner product (no per-sample gradients)."""
        inner = None
        for name, layer in self.mimic_layers.items():
            term = linear_inner_product(
                capture.inputs[name],
                output_grads[name],
                direction[f"{name}.weight"],
                direction[f"{name}.bias"] if layer.bias is not None else None,
            )
            inner = term if inner is None else inner + term
        return inner

    def _mimic_scores(self, capture: _LinearCapture, output_grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """m_i = −⟨g_i, v⟩ / ‖v‖ over the mimic layers (NaN when ‖v‖ = 0).

        With ``mimic_score_terms="reference"``, only the reference-margin term −⟨g_i, θ_ref⟩ / ‖v‖.
        """
        direction, norm = self._direction()
        if self.args.mimic_score_terms == "reference":
            direction = self._reference_on_device()
        return -self._ghost_inner(capture, output_grads, direction) / norm

    def _reference_on_device(self) -> dict[str, torch.Tensor]:
        self._direction()  # moves the reference tensors next to the parameters
        return self.reference_tensors

    def _score_terms(
        self, capture: _LinearCapture, output_grads: dict[str, torch.Tensor], scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of m_i: −⟨g_i, θ_ref⟩/‖v‖ (the reference's margin on the student's features, for a head)
        and ⟨g_i, θ_t⟩/‖v‖ (the student's own margin); they sum to the full score. ``scores`` is already their sum
        (with ``mimic_score_terms="reference"``: the reference term), so one more ghost inner product gives both,
        one extra matmul per mimic layer instead of two."""
        _, norm = self._direction()
        if self.args.mimic_score_terms == "reference":
            current = {name: _full_tensor(param.detach()).float() for name, param in self._mimic_parameters().items()}
            return scores, self._ghost_inner(capture, output_grads, current) / norm
        reference_term = -self._ghost_inner(capture, output_grads, self._reference_on_device()) / norm
        return reference_term, scores - reference_term

    # ------------------------------------------------------------------ weights

    def _begin_micro_batch(self) -> _StepState:
        step = self.state.global_step
        if self._step_state is None or self._step_state.global_step != step:
            device = self.args.device
            self._step_state = _StepState(
                global_step=step,
                running_max=torch.tensor(-math.inf, device=device),
                running_sum=torch.tensor(0.0, device=device),
            )
        return self._step_state

    def _softmax_logits(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax logits of the weights from the scores, and the fallback flag of the batch.

        ``reweight``: s = score/τ (uniform before ``mimic_warmup_steps``); AGRA, a filter: 0 for kept samples and
        −inf for excluded ones. A batch with a non-finite score gets s = 0 (uniform) and the flag.
        """
        fallback = ~torch.isfinite(scores).all()
        if self.state.global_step < self.args.mimic_warmup_steps:
            return torch.zeros_like(scores), fallback
        if self.scorer.name == "agra":
            logits = torch.where(scores > self.scorer.threshold, 0.0, -math.inf)
        else:
            logits = scores / self.args.mimic_temperature
        return torch.where(fallback, torch.zeros_like(scores), logits), fallback

    def _gather_across_ranks(self, *columns: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample columns of the whole micro-batch (softmax logits, sample rows, scores, losses), rank after
        rank, in float64, each rank padded to the longest with −inf (a logit of −inf adds nothing to the
        softmax; a row of −inf marks padding)."""
        device = columns[0].device
        if self.accelerator.num_processes == 1:
            return [column.to(device, torch.float64) for column in columns]
        # One collective for all; float64 holds row indices exactly up to 2**53.
        packed = torch.stack([column.to(device, torch.float64) for column in columns], dim=1)
        packed = self.accelerator.pad_across_processes(packed, dim=0, pad_index=-math.inf)
        return list(self.accelerator.gather(packed).unbind(dim=1))

    def _trainable_grads(self, scope: str) -> list[torch.Tensor]:
        params = self._mimic_parameters().values() if scope == "layer" else self.model.parameters()
        return [_local_tensor(p.grad) for p in params if p.grad is not None]

    def _combine(self, state: _StepState, logits: torch.Tensor, scores: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Adds a micro-batch's softmax logits to the step; returns each local sample's coefficient c_i, so that
        backward of Σ_i c_i ℓ_i (averaged over ranks by DDP/FSDP) accumulates Σ_i w_i ∇ℓ_i. A logit of −inf
        (excluded or unselected sample, or padding) has weight 0. Every rank's scores and losses travel in the
        same collective, for the step's metrics."""
        all_logits, all_rows, all_scores, all_losses = self._gather_across_ranks(
            logits, self._current_rows, scores.detach(), losses.detach()
        )
        all_logits = all_logits.to(logits.dtype)
        state.all_rows.append(all_rows)
        state.all_scores.append(all_scores)
        state.all_losses.append(all_losses)
        state.micro_batches += 1
        if self.args.mimic_normalize == "micro":
            weights = _softmax_or_zero(logits)
            state.weights.append(weights)
            return weights / self.current_gradient_accumulation_steps
        new_max = torch.maximum(state.running_max, all_logits.max())
        shift = _finite_or_zero(new_max)
        carried = state.running_sum * torch.exp(state.running_max - shift)
        new_sum = carried + torch.exp(all_logits - shift).sum()
        if state.micro_batches > 1:
            # Gradients accumulated so far were normalised by the old sum: bring them to the new one.
            grads = self._trainable_grads(self.args.mimic_reweight_scope)
            if grads:
                torch._foreach_mul_(grads, torch.where(new_sum > 0, carried / new_sum, torch.ones_like(new_sum)))
        state.running_max, state.running_sum = new_max, new_sum
        state.all_logits.append(all_logits)
        # DDP and FSDP average gradients over ranks; the softmax already spans all ranks.
        coefficients = torch.exp(logits - shift) / new_sum * self.accelerator.num_processes
        return torch.where(new_sum > 0, coefficients, torch.zeros_like(coefficients))

    def _record(self, state: _StepState, scores: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor,
                fallback: torch.Tensor) -> None:
        """Keeps a micro-batch's per-sample values for the score log (written at the end of the step)."""
        state.rows.append(self._current_rows)
        state.scores.append(scores.detach())
        state.logits.append(logits)
        state.losses.append(losses.detach())
        state.fallbacks.append(fallback)

    def _weighted_loss(
        self,
        losses: torch.Tensor,
        coefficients: torch.Tensor,
        capture: _LinearCapture,
        output_grads: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The loss to backpropagate for this micro-batch (see the module docstring)."""
        if self.args.mimic_reweight_scope == "all":
            return (coefficients.detach() * losses).sum()
        # "layer": plain mean gradient everywhere, and on the mimic layers a correction term whose
        # gradient is Σ_i (c_i − 1/b) g_i, so those layers get exactly Σ_i c_i g_i.
        plain = losses.mean() / self.current_gradient_accumulation_steps
        uniform = 1.0 / (losses.shape[0] * self.current_gradient_accumulation_steps)
        correction = 0.0
        for name, layer in self.mimic_layers.items():
            relinear = F.linear(capture.inputs[name].to(layer.weight.dtype), layer.weight, layer.bias)
            delta = output_grads[name].float() * (coefficients - uniform).detach().view(-1, *([1] * (relinear.dim() - 1)))
            correction = correction + (delta.to(relinear.dtype) * relinear).sum()
        return plain + correction

    # ------------------------------------------------------------------ end of step: records and metrics

    def _finish_step(self, state_after: Any) -> None:
        """Called at ``on_step_end``: final weights of the step, its records and its metrics."""
        state = self._step_state
        if state is None or state.global_step != state_after.global_step - 1 or not state.rows:
            return
        self._step_state = None
        mimic_scores = torch.cat(state.scores).float().cpu().numpy()
        losses = torch.cat(state.losses).float().cpu().numpy()
        rows = torch.cat(state.rows).numpy()
        real = torch.isfinite(torch.cat(state.all_rows))  # drop the padding of uneven ranks
        if self.args.mimic_normalize == "micro":
            weights = torch.cat(state.weights).float().cpu().numpy()
            batch_sizes = np.concatenate([np.full(len(r), len(r)) for r in state.rows])
            ess_fraction = float(np.mean([1.0 / w.square().sum().item() / len(w) for w in state.weights if w.sum() > 0]))
            weighted_loss = float((weights * losses).sum() / max(weights.sum(), 1e-30))  # this rank's micro-batches
        else:
            total = torch.clamp(state.running_sum, min=torch.finfo(state.running_sum.dtype).tiny)
            shift = _finite_or_zero(state.running_max)
            weights = torch.exp(torch.cat(state.logits) - shift).div(total).float().cpu().numpy()
            all_weights = torch.exp(torch.cat(state.all_logits)[real] - shift) / total
            batch_sizes = np.full(len(rows), int(real.sum()))
            ess_fraction = float(1.0 / all_weights.square().sum() / real.sum())
            step_losses = torch.cat(state.all_losses)[real]
            weighted_loss = float((all_weights * step_losses).sum() / torch.clamp(all_weights.sum(), min=1e-30))
        fallback_batches = int(torch.stack(state.fallbacks).sum().item())
        self.fallback_count += fallback_batches
        if fallback_batches:
            warnings.warn(
                f"Step {state_after.global_step}: {fallback_batches} micro-batch(es) had a non-finite mimic score "
                "(‖θ_ref − θ‖ = 0, or a non-finite loss); they used uniform weights.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._score_writer is not None:
            sample_ids = rows if self._sample_ids is None else self._sample_ids[rows]
            self._score_writer.add_step(
                global_step=state_after.global_step,
                epoch=float(state_after.epoch or 0.0),
                sample_ids=sample_ids,
                mimic_scores=mimic_scores,
                weights=weights,
                losses=losses,
                batch_size=batch_sizes,
                repeated=self._repeated_flags(state),
            )
        step_scores = torch.cat(state.all_scores)[real].cpu().numpy()  # every rank's samples of the step
        finite = step_scores[np.isfinite(step_scores)]
        norm = self._direction_cache[2] if self._direction_cache else float("nan")
        self._direction_cache = None  # v is as large as the mimic layers (vocabulary × hidden for an lm_head)
        self._metrics["mimic/score_mean"].append(float(finite.mean()) if finite.size else float("nan"))
        self._metrics["mimic/score_std"].append(float(finite.std()) if finite.size else float("nan"))
        self._metrics["mimic/frac_positive"].append(float((finite > 0).mean()) if finite.size else float("nan"))
        self._metrics["mimic/ess_fraction"].append(ess_fraction)
        self._metrics["mimic/direction_norm"].append(float(norm))
        self._metrics["mimic/weighted_loss"].append(weighted_loss)
        self._metrics["mimic/fallback_count"].append(float(self.fallback_count))

    def _repeated_flags(self, state: _StepState) -> np.ndarray:
        """Flags this rank's samples of the step that count as repeats: already seen in this epoch on any rank,
        or earlier in this step (an earlier micro-batch, or a lower rank). With accelerate's `even_batches`,
        the last batches of an epoch are topped up with the epoch's first samples; these are the repeats."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        gathered = [rows.cpu().numpy() for rows in state.all_rows]
        every_row = np.concatenate(gathered)  # micro-batch after micro-batch, rank after rank: first seen first
        real = np.isfinite(every_row)
        rows = every_row[real].astype(np.int64)
        repeated = np.ones(len(rows), dtype=bool)
        repeated[np.unique(rows, return_index=True)[1]] = False
        repeated |= self._mark_seen(rows)
        flags = np.zeros(len(every_row), dtype=bool)
        flags[real] = repeated
        # This rank's samples are its slice of each micro-batch's gather (one iteration per micro-batch).
        mine, offset = [], 0
        for micro_rows, own in zip(gathered, state.rows):
            start = offset + rank * (len(micro_rows) // world)
            mine.append(flags[start : start + len(own)])
            offset += len(micro_rows)
        return np.concatenate(mine)

    def _mark_seen(self, rows: np.ndarray) -> np.ndarray:
        """Marks ``rows`` as seen in this epoch; returns which of them already were."""
        size = max(len(self.train_dataset), int(rows.max(initial=-1)) + 1)
        if self._seen_rows is None or len(self._seen_rows) < size:
            seen = np.zeros(size, dtype=bool)
            if self._seen_rows is not None:
                seen[: len(self._seen_rows)] = self._seen_rows
            self._seen_rows = seen
        already = self._seen_rows[rows]
        self._seen_rows[rows] = True
        return already

    def _restore_seen_rows(self, state: Any) -> None:
        """On resume mid-epoch, mark the samples that the score log holds for the epoch being resumed.

        A record's ``epoch`` is e + k/steps_in_epoch at the k-th step of epoch e, in (e, e + 1]; the epoch
        being resumed is ⌊state.epoch⌋, unless the checkpoint ends an epoch (state.epoch integral)."""
        if float(state.epoch or 0.0).is_integer():
            return
        columns = ["global_step", "epoch", "sample_id"]
        try:
            table = read_score_table(self._score_writer.folder, drop_repeated=False, columns=columns)
        except (FileNotFoundError, ValueError):  # no score log: nothing recorded, nothing to flag
            return
        keep = pc.and_(
            pc.greater(table["epoch"], math.floor(state.epoch)), pc.less_equal(table["global_step"], state.global_step)
        )
        ids = table.filter(keep)["sample_id"].to_numpy(zero_copy_only=False)
        rows = ids.astype(np.int64) if self._sample_ids is None else np.flatnonzero(np.isin(self._sample_ids, ids))
        self._mark_seen(rows)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # As trl's trainers: metrics gathered per step, averaged over the logging interval.
        if self.model is not None and self.model.training and self._metrics:
            for key, values in self._metrics.items():
                finite = [value for value in values if np.isfinite(value)]
                logs[key] = values[-1] if key == "mimic/fallback_count" else (float(np.mean(finite)) if finite else float("nan"))
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ alignment diagnostic

    def _swapped_losses(self, model_inputs: dict[str, Any], inputs: dict[str, Any], labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses of the student, and of the student with its mimic layers swapped for the reference
        (so the reference reads the student's current features), both in eval mode and without gradients."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        # Mimic layers were resolved on the unwrapped model, so "layer.weight" is its parameter name.
        swapped = {
            name: self.reference_tensors[name].to(param.device, param.dtype)
            for name, param in self._mimic_parameters().items()
        }
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad():
                own = self._per_sample_losses(unwrapped(**model_inputs), inputs, labels)
                outputs = torch.func.functional_call(unwrapped, swapped, args=(), kwargs=model_inputs, strict=False)
                with_reference = self._per_sample_losses(outputs, inputs, labels)
        finally:
            unwrapped.train(was_training)
        return own, with_reference

    def _reference_head_losses(self, capture: _LinearCapture, labels: Any) -> torch.Tensor:
        """Per-sample losses of the reference's head on the features the training forward just captured: the
        monitor's reference loss when the mimic layer is the head that makes the logits, for one matmul instead of
        `_swapped_losses`' two forwards. A few samples at a time, so that at most `MONITOR_CHUNK_LOGITS` logits
        are alive (a language model's are vocabulary-sized, and the training graph is alive meanwhile)."""
        ((name, layer),) = self.mimic_layers.items()
        reference = self._reference_on_device()
        features = capture.inputs[name]
        weight = reference[f"{name}.weight"].to(features.dtype)
        bias = reference[f"{name}.bias"].to(features.dtype) if layer.bias is not None else None
        logits_per_sample = features[0].numel() // features.shape[-1] * weight.shape[0]
        chunk = max(1, MONITOR_CHUNK_LOGITS // logits_per_sample)
        with torch.no_grad():
            return torch.cat([
                self._per_sample_losses({"logits": F.linear(features[start : start + chunk], weight, bias)}, {},
                                        labels[start : start + chunk])
                for start in range(0, len(features), chunk)
            ])

    def _check_alignment(self, own: torch.Tensor, with_reference: torch.Tensor) -> None:
        """Loss of the student with its mimic layers swapped for the reference, next to its own (first step)."""
        own_loss, reference_loss = float(own.mean()), float(with_reference.mean())
        self._metrics["mimic/alignment_student_loss"].append(own_loss)
        self._metrics["mimic/alignment_reference_loss"].append(reference_loss)
        # Compare medians: with noisy labels a good reference is confidently "wrong" on the flipped
        # samples, which dominates the mean but not the median.
        own_median, reference_median = float(own.median()), float(with_reference.median())
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

    def _check_reference_base(self, source: Any) -> None:
        """Warn when the reference was built from another checkpoint than the student's (recipes' metadata)."""
        if not isinstance(source, (str, os.PathLike)):
            return
        metadata = read_reference_metadata(source, revision=self.args.mimic_reference_revision, token=self.args.hub_token)
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        student = str(getattr(config, "_name_or_path", "") or "")
        student_revision = str(getattr(config, "_commit_hash", "") or "")
        base, base_revision = metadata.get("base_model", ""), metadata.get("base_revision", "")
        mismatch = bool(base and student and base != student) or bool(
            base_revision and student_revision and base_revision != student_revision
        )
        if mismatch:
            warnings.warn(
                f"The reference {self.reference_name} was built from checkpoint {base!r}"
                f"{f' @ {base_revision}' if base_revision else ''}, but the student starts from {student!r}"
                f"{f' @ {student_revision}' if student_revision else ''}. Mimic scores only mean something when both "
                "share coordinates: build the reference from the student's own checkpoint (hf_gradmimic.build_reference).",
                UserWarning,
                stacklevel=3,
            )

    def _monitor_due(self) -> bool:
        interval = self.args.mimic_monitor_steps
        if not interval:
            steps = self.args.logging_steps
            interval = int(steps) if self.args.logging_strategy == "steps" and steps >= 1 else 50
        return self.state.global_step % interval == 0

    def _monitor(self, capture: _LinearCapture, output_grads: dict[str, torch.Tensor], scores: torch.Tensor,
                 own: torch.Tensor, with_reference: torch.Tensor) -> None:
        """The running alignment monitor (first micro-batch of a monitored step).

        Logs the two terms of the score and the loss of the reference's mimic layers applied to the student's
        current features, next to the student's own (``with_reference`` / ``own``). For a head that makes the
        logits both come from the training forward (train mode: dropout on); for other layers, from two no-grad
        eval-mode forwards (`_swapped_losses`). When the self term drives the ranking
        (its spread over the batch exceeds the reference term's) for several monitored steps in a row, warns once.
        """
        reference_term, self_term = self._score_terms(capture, output_grads, scores)
        finite = torch.isfinite(reference_term) & torch.isfinite(self_term)
        if not finite.any():  # ‖v‖ = 0: no direction, no terms (the step falls back to uniform weights)
            return
        reference_term, self_term = reference_term[finite], self_term[finite]
        for key, value in (
            ("reference_term", reference_term.mean()),
            ("self_term", self_term.mean()),
            ("reference_term_std", reference_term.std(correction=0)),
            ("self_term_std", self_term.std(correction=0)),
            ("reference_loss", with_reference.mean()),
            ("student_loss", own.mean()),
        ):
            self._metrics[f"mimic/monitor_{key}"].append(float(value))
        dominated = bool(self_term.numel() > 1 and self_term.std(correction=0) > reference_term.std(correction=0))
        self._self_dominated_streak = self._self_dominated_streak + 1 if dominated else 0
        if self._self_dominated_streak >= SELF_TERM_PATIENCE and not self._warned_self_term:
            self._warned_self_term = True
            warnings.warn(
                f"For {self._self_dominated_streak} monitored steps in a row the student's own margin (self term) has "
                "driven the mimic scores more than the reference's margin. The scores then favour hard samples, which "
                "are often the mislabeled ones: the reference no longer reads the student's features (its loss on "
                "them is logged as mimic/monitor_reference_loss). Use a reference probed on the student's checkpoint "
                "(hf_gradmimic.build_reference), freeze the backbone, or set mimic_score_terms='reference'.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ score log and checkpoints

    def _start_score_log(self, state: Any) -> None:
        self._seen_rows = None
        if not self.args.mimic_record_scores:
            return
        global_step = state.global_step
        if self._score_writer is None:
            self._score_writer = ScoreWriter(self.args.output_dir, rank=self.accelerator.process_index)
        removed = self._score_writer.truncate_after(global_step)
        if removed:
            logger.warning(
                f"Removed {removed} score records after step {global_step} from {self._score_writer.folder} "
                "(a previous run in this output_dir, or steps after the checkpoint being resumed)."
            )
        if global_step:
            self.accelerator.wait_for_everyone()  # every rank's shards are truncated before any rank reads them
            self._restore_seen_rows(state)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The shards on disk must hold exactly the steps this checkpoint has taken.
        if self._score_writer is not None:
            self._score_writer.flush(wait=True)
        super()._save_checkpoint(model, trial)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, plus, with ``mimic_clean_column``, the running filter scored against the clean flags."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        filter_metrics = self._running_filter_metrics(metric_key_prefix)
        if filter_metrics:
            self.log(filter_metrics)
            metrics.update(filter_metrics)
        return metrics

    def _running_filter_metrics(self, prefix: str) -> dict[str, float]:
        """Detection quality of the filter built from the scores recorded so far (`build_filter` + the metric module)."""
        if self._clean_flags is None or self._score_writer is None:
            return {}
        self._score_writer.flush(wait=True)
        self.accelerator.wait_for_everyone()
        if not self.is_world_process_zero():
            return {}
        from .filter import build_filter

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few windows early on: the LabelModel falls back to majority
                mimic_filter = build_filter(self._score_writer.folder.parent, method=self.args.mimic_filter_method, seed=self.args.seed)
        except (FileNotFoundError, ValueError):  # nothing recorded yet
            return {}
        ids = mimic_filter.sample_ids
        if self._sample_ids is None:
            clean = self._clean_flags[ids.astype(np.int64)]
        else:
            position = {sample_id: row for row, sample_id in enumerate(self._sample_ids.tolist())}
            clean = self._clean_flags[[position[sample_id] for sample_id in ids.tolist()]]
        audit = mimic_filter.evaluate(clean)
        return {f"{prefix}_mimic_filter_{key}": float(value) for key, value in audit.items()}

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the Grad-Mimic model card (template ``model_cards/model_card.md``) to ``<output_dir>/README.md``."""
        if not self.is_world_process_zero():
            return
        from .hub import render_model_card

        card = render_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        card.save(path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash never leaves a half-written card

    def _pop_bookkeeping(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Removes our columns (row index, clean flags, the scorer's columns) from a batch before the model sees
        it; returns the rows and the scorer's columns."""
        if self.args.mimic_clean_column:
            inputs.pop(self.args.mimic_clean_column, None)
        extras = {column: inputs.pop(column) for column in self._extra_columns if column in inputs}
        return inputs.pop(ROW_INDEX_KEY, None), extras

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._pop_bookkeeping(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
