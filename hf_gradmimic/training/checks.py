"""Set-up checks: refuse the configurations under which the scores or the update would be silently wrong.

What is supported and tested, and why the rest is refused: docs/distributed.md.
"""

from __future__ import annotations

import os
import re
from typing import Any

from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .batch import ROW_INDEX_KEY

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def check_supported_setup(accelerator: Any, args: Any, model: nn.Module) -> None:
    """Refuse torch.compile, DeepSpeed ZeRO-3, FSDP1, and the combinations that cannot rescale accumulated gradients."""
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
        if args.mimic_log_reference_loss == "reference_model":
            raise ValueError(
                "`mimic_log_reference_loss='reference_model'` is not supported under FSDP: its forward swaps in the "
                "student's starting weights whole, where FSDP2 keeps each rank's shard only. Use 'auto' or 'always' "
                "(the reference's verdict on the student's current features), or DDP."
            )


def check_one_reference(config_reference: Any, reference: Any) -> None:
    """Refuse a ``reference=`` argument that differs from the config's ``mimic_reference``: which one scores would be
    a silent choice, and the config (saved with the model, named in the cards) would name another reference."""
    if reference is None or config_reference is None:
        return
    same = isinstance(reference, (str, os.PathLike)) and os.fspath(reference) == os.fspath(config_reference)
    if not same:
        given = (
            os.fspath(reference)
            if isinstance(reference, (str, os.PathLike))
            else f"an in-memory {type(reference).__name__}"
        )
        raise ValueError(
            f"Two references were given: `reference=` ({given}) and the config's `mimic_reference={config_reference!r}`. "
            "The scores would come from the argument while the saved config and the cards name the config's. Pass only "
            "one: drop `reference=`, or set `mimic_reference=None` in the config to score with the argument."
        )


def check_launch(accelerator: Any) -> None:
    """Refuse a multi-process launch that did not set up distribution: every process would train alone and
    write rank 0's score shards over the others'."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"Launched as {launched} processes (WORLD_SIZE), but the Trainer did not set up distributed training "
            "and runs each as a single process. On CPU, pass `use_cpu=True` (`--use_cpu`)."
        )


def adapt_to_fsdp(accelerator: Any, args: Any) -> bool:
    """Under FSDP2, keep accumulated gradients where the step softmax can rescale them; returns whether the
    alignment check can run (it cannot: it swaps weights that FSDP2 itself swaps around forward)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return True
    if args.mimic_normalize == "step":
        # Under FSDP2's no_sync the accumulated gradients wait in private unsharded buffers, out of reach of
        # the online softmax's rescale; reduce-scattering after every micro-batch keeps them in `param.grad`.
        accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
    if args.mimic_alignment_check:
        logger.warning("MimicTrainer skips the alignment check (`mimic_alignment_check`) under FSDP.")
    return False


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
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


class ActivationCheckpointingCheck(TrainerCallback):
    """Refuses reentrant activation checkpointing when training starts (`Trainer.train` turns it on just before):
    the reentrant variant runs checkpointed layers without autograd in forward, so a mimic layer inside them has no
    output gradient."""

    def __init__(self, unwrapped_model: Any) -> None:
        self.unwrapped_model = unwrapped_model

    def on_train_begin(self, args, state, control, **kwargs):
        if uses_reentrant_checkpointing(self.unwrapped_model()):
            raise ValueError(
                "MimicTrainer needs non-reentrant activation checkpointing: the reentrant variant runs checkpointed "
                "layers without autograd in forward, so a mimic layer inside them has no output gradient. Pass "
                "`activation_checkpointing_kwargs={'use_reentrant': False}` (formerly `gradient_checkpointing_kwargs`) "
                "in the training arguments, or leave those kwargs unset: transformers then uses use_reentrant=False."
            )


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
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


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """``True`` becomes the newest *completely written* checkpoint; a given folder must be complete."""
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"No complete checkpoint (with {TRAINER_STATE_NAME}) in {output_dir}.")
        return found
    if resume_from_checkpoint and not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)):
        raise ValueError(
            f"{resume_from_checkpoint} has no {TRAINER_STATE_NAME}: it was not completely written (a run killed "
            "while saving it?). Resume from an earlier checkpoint, or pass `resume_from_checkpoint=True`."
        )
    return resume_from_checkpoint


def check_batch_rows(data_collator: Any, label_names: list[str] | None, loss_fn: Any) -> None:
    """Refuse, at construction, batches the per-sample scores cannot read: a collator that packs the examples into
    one row (padding-free, `DataCollatorWithFlattening`: a row is no longer a sample), and, for the built-in
    per-sample losses (no ``per_sample_loss_fn``), a model whose labels are not in ``labels`` (question answering's
    ``start_positions`` and ``end_positions``, or ``label_names`` set otherwise)."""
    from transformers import DataCollatorWithFlattening

    if isinstance(data_collator, DataCollatorWithFlattening):
        raise ValueError(
            "DataCollatorWithFlattening packs a batch's examples into one row (padding-free), so a row of the batch "
            "is no longer a sample, and per-sample scores cannot be read from it. Use a padding collator "
            "(DataCollatorWithPadding, DataCollatorForSeq2Seq, DataCollatorForLanguageModeling)."
        )
    if loss_fn is None and label_names and "labels" not in label_names:
        raise ValueError(
            f"The model's labels are {list(label_names)} (`label_names`), but the built-in per-sample losses read a "
            "`labels` column. Give the per-sample loss of this task as `per_sample_loss_fn=` (for question answering, "
            "e.g. the start and end positions' cross entropies per sample)."
        )


def check_scorer_columns(scorer: Any, dataset: Any, args: Any) -> None:
    """Refuse a column the scorer reads (``extra_columns``: RHO-LOSS's irreducible losses, Bayesian selection's
    zero-shot logits) that the training set lacks, naming the ``mimic_*_column`` field: a misspelt name fell through
    to another source (the reference model's losses) or failed at the first step in the scorer's terms."""
    names = getattr(dataset, "column_names", None)
    if not isinstance(names, list):  # a stream whose features are unknown: its columns arrive with its examples
        return
    names = [name for name in names if name != ROW_INDEX_KEY]  # ours, added to name the samples
    for column in getattr(scorer, "extra_columns", ()):
        if column not in names:
            fields = [name for name, value in vars(args).items() if name.startswith("mimic_") and value == column]
            field = f" (`{fields[0]}`)" if fields else ""
            raise ValueError(
                f"The scorer {scorer.name!r} reads the column {column!r}{field}, which train_dataset lacks; its "
                f"columns: {names}."
            )
