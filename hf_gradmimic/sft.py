"""`MimicSFTConfig` and `MimicSFTTrainer`: TRL's supervised fine-tuning trainer with Grad-Mimic's per-sample weights.

Grad-Mimic (Huang, Bilkhu, Sala, Movellan, arXiv 2501.06708) weights every sample of a batch by
``softmax_i(m_i/τ)``, ``m_i = ⟨−g_i, θ_ref − θ_t⟩/‖θ_ref − θ_t‖``. For instruction tuning the mimic tensors are
usually a LoRA adapter's matrices (``mimic_layers=["lora"]``, the default here) and the reference an adapter trained
on trusted pairs (`hf_gradmimic.build_reference(..., method="lora")`).

The sample's loss ``ℓ_i`` is the mean token loss over its supervised tokens: those whose label is not −100 after
TRL's dataset preparation, which already applied the completion-only (prompt-completion data) and assistant-only
(conversational data) masks. Its forward is TRL's fused LM head (per-token log-probabilities without the
``[batch, length, vocab]`` logits). With τ → ∞ every supervised token of the step weighs the same, as `SFTTrainer`
averages over them (``mimic_token_weighting="token"``, `hf_gradmimic.training.token_weighting`); with ``"sample"``
the update is the mean over samples of their mean token loss.

Padding-free batches and packing put several samples in one row; the ghost maths reads a sample per row, so both
are refused. Requires ``pip install 'hf-gradmimic[trl]'`` (trl and peft).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # an optional extra: `import hf_gradmimic` works without it
    raise ImportError(
        "MimicSFTConfig and MimicSFTTrainer need TRL (and PEFT for LoRA adapters): pip install 'hf-gradmimic[trl]'."
    ) from error

from .config import MimicArguments
from .losses import PerSampleLossFn, SampleLoss, logits_of, supervised_counts, token_loss
from .reference.loading import ReferenceSource
from .scorers import SampleScorer
from .trainer import MimicTrainerMixin


@dataclass
class MimicSFTConfig(MimicArguments, SFTConfig):
    r"""
    Configuration for [`MimicSFTTrainer`]: every trl [`~trl.SFTConfig`] field, plus the Grad-Mimic ones
    (`hf_gradmimic.config.MimicArguments`, the same definitions as `MimicConfig`'s).

    ``mimic_layers`` defaults to ``["lora"]``: every A and B matrix of the PEFT adapter being trained. ``packing``
    and ``padding_free`` must stay off (a sample per batch row).

    Two of TRL's defaults are resolved so that the defaults run everywhere, without warnings:

    - ``bf16`` left unset is TRL's ``True`` (without ``fp16``) wherever transformers accepts it (a bf16 GPU or XPU, or
      ``use_cpu=True``), and ``False`` on a machine with neither, where `SFTConfig` would refuse to be built.
    - activation checkpointing stays on by default (TRL's ``gradient_checkpointing=True``), set through
      ``activation_checkpointing``, transformers' current name, so that no deprecation warning is emitted.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["mimic_layers"]

    mimic_layers: Optional[list[str]] = field(
        default_factory=lambda: ["lora"], metadata=dict(MimicArguments.__dataclass_fields__["mimic_layers"].metadata)
    )
    gradient_checkpointing: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (transformers). Left unset, activation "
            "checkpointing is on, as TRL's default."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = bool(self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available())
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", None) is None:
            if "activation_checkpointing" in self.__dataclass_fields__:
                self.activation_checkpointing = True
            else:  # a transformers release from before the rename
                self.gradient_checkpointing = True
        super().__post_init__()


def check_sft_setup(args: Any, compute_loss_func: Any) -> None:
    """Refuse, before any work, the SFT settings under which a batch row is not one sample or the loss is not SFT's."""
    if args is None:
        return
    if not isinstance(args, MimicSFTConfig):
        raise TypeError(
            f"MimicSFTTrainer needs `args` to be a MimicSFTConfig (SFTConfig plus the mimic_* fields), got "
            f"{type(args).__name__}."
        )
    for name in ("packing", "padding_free"):
        if getattr(args, name):
            raise ValueError(
                f"MimicSFTTrainer does not support `{name}=True`: it puts several samples in one batch row, while the "
                "per-sample scores (ghost inner products) read one sample per row. Set `packing=False` and "
                "`padding_free=False` in MimicSFTConfig."
            )
    if args.loss_type not in ("nll", "chunked_nll", "dft"):
        raise ValueError(
            f"MimicSFTTrainer knows the per-sample form of loss_type 'nll' and 'dft', not {args.loss_type!r}."
        )
    if compute_loss_func is not None:
        raise ValueError(
            "MimicSFTTrainer computes one loss per sample; `compute_loss_func` returns the batch's. Pass "
            "`per_sample_loss_fn=(outputs, inputs) -> Tensor[batch]` instead."
        )


def check_fused_head_layers(trainer: Any) -> None:
    """Refuse a mimic layer at the LM head while TRL's fused head computes the loss: it reads the head's weight
    without calling the module, whose hooks then never run (the run failed at its first step)."""
    sample_loss, layers = getattr(trainer, "sample_loss", None), getattr(trainer, "mimic_layers", None)
    if sample_loss is None or layers is None or not sample_loss.fused_head:
        return
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    named = [
        name
        for name, module in layers.layers.items()
        if weight is not None and getattr(module, "weight", None) is weight
    ]
    if named:
        raise ValueError(
            f"Mimic layer(s) {named} are the LM head, which TRL's fused LM head (MimicSFTTrainer's loss) reads by its "
            "weight without calling it, so it never runs. Name layers below it (e.g. the LoRA adapters, "
            "mimic_layers=['lora']), or pass per_sample_loss_fn=, whose forward computes the whole logits."
        )


def fused_per_sample_loss(outputs: Any, loss_type: str = "nll") -> torch.Tensor:
    r"""``ℓ_i`` from TRL's fused LM head: the mean over sample ``i``'s supervised tokens of ``−log p`` (``nll``) or
    of ``−p̄ log p`` with ``p̄`` detached (``dft``, Dynamic Fine-Tuning), as `SFTTrainer` weighs each token.

    .. math:: \ell_i = \frac{\sum_t m_{i,t}\, c_{i,t}}{\max(1, \sum_t m_{i,t})},\qquad c = -\log p\ (\text{or } -\bar p \log p)
    """
    per_token = -outputs.log_probs  # zero where the label is −100
    if loss_type == "dft":
        per_token = per_token * outputs.log_probs.exp().detach()
    return per_token.float().sum(dim=1) / outputs.label_mask.sum(dim=1).clamp(min=1)


class SFTSampleLoss(SampleLoss):
    """`SampleLoss` for `MimicSFTTrainer`: every forward asks for TRL's fused LM head, as `SFTTrainer` does, and
    ``ℓ_i`` is SFT's token loss averaged over the sample's supervised tokens (labels ≠ −100), unless a
    ``loss_fn`` is given.

    Args:
        model: the unwrapped model.
        loss_fn: a user's per-sample loss function, or None for SFT's.
        label_smoothing: ``label_smoothing_factor``.
        loss_type: `SFTConfig.loss_type` (``"nll"``, ``"chunked_nll"`` or ``"dft"``).
    """

    def __init__(
        self, model: Any, loss_fn: PerSampleLossFn | None, label_smoothing: float = 0.0, loss_type: str = "nll"
    ) -> None:
        self.sft_loss = loss_fn is None
        super().__init__(model, self.sft_per_sample_losses if loss_fn is None else loss_fn, label_smoothing)
        self.loss_type = loss_type
        # Label smoothing (``nll`` only) and a user's loss function need the whole logits; else the forward returns
        # the fused head's outputs.
        self.fused_head = loss_fn is None and not (label_smoothing and loss_type != "dft")
        self.token_counts: tuple[torch.Tensor, ...] | None = None  # of the last training forward: SFT's metrics

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Every forward (training, scoring, diagnostics) asks for the fused head, as SFTTrainer does.
        return {**super().model_inputs(inputs), "use_cache": False, "fused_lm_head": self.fused_head}

    def sft_per_sample_losses(self, outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """``ℓ_i``: SFT's token loss averaged over the sample's supervised tokens (labels ≠ −100). A training forward
        also keeps the token counts of SFT's metrics (supervised tokens, entropy sum, correct top-1 predictions)."""
        if getattr(outputs, "log_probs", None) is None:  # label smoothing: from the logits, as SFTTrainer does
            return token_loss(logits_of(outputs), inputs["labels"], self.label_smoothing, shift=True)
        if torch.is_grad_enabled() and outputs.entropy is not None:
            self.token_counts = (outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum())
        return fused_per_sample_loss(outputs, self.loss_type)

    def supervised_counts(self, outputs: Any, labels: Any) -> torch.Tensor | None:
        # Samples without a supervised token get weight 0 (`training.guards`); the fused head's mask says which.
        if not self.sft_loss or labels is None:
            return None
        if getattr(outputs, "label_mask", None) is not None:
            return outputs.label_mask.sum(dim=1)
        return supervised_counts(self.model, outputs, labels)


class MimicSFTTrainer(MimicTrainerMixin, SFTTrainer):
    """trl's `SFTTrainer` that reweights every sample by its Grad-Mimic score (arXiv 2501.06708).

    Use it exactly like `SFTTrainer`, with a `MimicSFTConfig`, a LoRA ``peft_config`` and a reference adapter::

        args = MimicSFTConfig(output_dir="out", mimic_reference="org/lora-reference")
        trainer = MimicSFTTrainer(model=model, args=args, train_dataset=pairs, peft_config=LoraConfig(...))
        trainer.train()
        mimic_filter = hf_gradmimic.build_filter("out")

    Every argument is `SFTTrainer`'s (``compute_loss_func`` excepted), plus the keyword arguments of
    `MimicTrainerMixin` (``reference``, ``per_sample_loss_fn``, ``scorer``, ``zero_shot``). With SFT's own loss the
    training logs keep its ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` next to the ``mimic/*`` metrics
    (label smoothing and a ``per_sample_loss_fn`` read the whole logits, not the fused head's outputs, and log
    neither).
    """

    mimic_config_class = MimicSFTConfig
    _tag_names = ["trl", "sft", *MimicTrainerMixin._tag_names]

    def __init__(
        self,
        model: Any,
        args: MimicSFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        *,
        reference: ReferenceSource | None = None,
        per_sample_loss_fn: Callable | None = None,
        scorer: SampleScorer | None = None,
        zero_shot: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        check_sft_setup(args, compute_loss_func)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
            reference=reference,
            scorer=scorer,
            zero_shot=zero_shot,
            per_sample_loss_fn=per_sample_loss_fn,
            **kwargs,
        )
        check_fused_head_layers(self)
        if self.aux_loss_enabled:
            raise ValueError(
                "MimicSFTTrainer scores samples one by one, but this mixture-of-experts model adds the router's "
                "load-balancing loss, a term of the whole batch. Set `router_aux_loss_coef=0.0` in MimicSFTConfig."
            )

    def create_sample_loss(self, loss_fn: PerSampleLossFn | None) -> SFTSampleLoss:
        """SFT's per-sample losses through TRL's fused LM head (`SFTSampleLoss`), or ``loss_fn`` when given."""
        model = self.accelerator.unwrap_model(self.model)
        return SFTSampleLoss(model, loss_fn, self.args.label_smoothing_factor, self.args.loss_type)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """In training, the mixin's reweighted loss, with SFT's token metrics logged; elsewhere `SFTTrainer`'s."""
        training = self.is_mimic_step(model)
        if training:
            self.sample_loss.token_counts = None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if training and self.sample_loss.sft_loss and self.sample_loss.fused_head:
            self._log_sft_metrics(inputs, self.sample_loss.token_counts)
        return result

    def _log_sft_metrics(self, inputs: dict[str, Any], counts: tuple[torch.Tensor, ...] | None) -> None:
        """SFTTrainer's training metrics (entropy, token accuracy, tokens seen), which its own compute_loss would log.
        Called once per micro-batch on every process (the gathers are collectives).

        The one place that touches TRL's private state: `SFTTrainer.log` averages ``self._metrics`` into the logs,
        ``self._total_train_tokens`` is the running token count it also reports in evaluation, and ``self._tp_size``
        its tensor-parallel divisor. trl 1.16 has no public method to add a metric, so they are written as
        `SFTTrainer.compute_loss` writes them."""
        device = inputs["input_ids"].device
        counts = counts or tuple(torch.zeros((), device=device) for _ in range(3))
        gather = self.accelerator.gather_for_metrics
        num_valid, entropy_sum, num_correct = (gather(value.reshape(1)).sum() for value in counts)
        self._metrics["train"]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics["train"]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        self._total_train_tokens += gather(inputs["attention_mask"].sum().reshape(1)).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
