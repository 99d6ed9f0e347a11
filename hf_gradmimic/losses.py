"""Per-sample losses ``ℓ_i`` computed from the model's logits, in float32.

Grad-Mimic needs one loss per sample; a model's own ``outputs.loss`` is already reduced over the
batch, so it is not used ("don't trust the model's own loss"). Conventions follow `Trainer`:
labels equal to ``-100`` are ignored, token losses are averaged over each sample's own label
tokens (how samples of different lengths then weigh: `training.token_weighting`), causal LMs shift
labels by one, sequence classification follows the model's ``config.problem_type`` (the mean of the
per-sample losses is the model's own loss), and ``label_smoothing_factor`` is honoured (the same
formula as transformers' ``LabelSmoother``: ``(1-ε)·nll + ε·mean_c(-log p_c)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

PerSampleLossFn = Callable[[Any, dict[str, Any]], torch.Tensor]

RETURNS_PER_SAMPLE_LOSSES = "returns_per_sample_losses"
"""The attribute `returns_per_sample_losses` sets on a ``compute_loss_func``."""


def returns_per_sample_losses(compute_loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark a `Trainer` ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` as returning one loss per
    sample (``reduction="none"``, shape ``[B]``) when ``num_items_in_batch`` is None, so that `MimicTrainer` can weight
    its terms. `Trainer` itself then averages them in evaluation. Returns the function itself, marked; usable as a
    decorator."""
    setattr(compute_loss_func, RETURNS_PER_SAMPLE_LOSSES, True)
    return compute_loss_func


def loss_fn_from_compute_loss_func(
    compute_loss_func: Callable[..., torch.Tensor] | None, per_sample_loss_fn: PerSampleLossFn | None, trainer_name: str
) -> PerSampleLossFn | None:
    """The per-sample loss function a trainer uses: ``per_sample_loss_fn``, or a `Trainer` ``compute_loss_func`` marked
    with `returns_per_sample_losses` (called with the batch's labels and ``num_items_in_batch=None``; as with `Trainer`,
    the model's forward then gets no labels). An unmarked one returns a single loss for the batch, which cannot be
    weighted per sample: refused, naming the two ways out."""
    if compute_loss_func is None:
        return per_sample_loss_fn
    if per_sample_loss_fn is not None:
        raise ValueError(f"{trainer_name} got both `compute_loss_func` and `per_sample_loss_fn`; pass one of them.")
    if not getattr(compute_loss_func, RETURNS_PER_SAMPLE_LOSSES, False):
        raise ValueError(
            f"{trainer_name} weights each sample's loss, and this `compute_loss_func` is not marked as returning one "
            "loss per sample: a loss for the whole batch cannot be weighted per sample. Either make it return one loss "
            "per sample (reduction='none', shape [batch]) when num_items_in_batch is None and mark it with "
            "`hf_gradmimic.returns_per_sample_losses`, or pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[batch]`."
        )

    @functools.wraps(compute_loss_func)  # keeps its marks (`batch_coupled` too)
    def loss_fn(outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        return compute_loss_func(outputs, inputs.get("labels"), num_items_in_batch=None)

    loss_fn.model_gets_labels = False  # as Trainer pops the labels before the forward when compute_loss_func is set
    return loss_fn


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def problem_type_of(model: nn.Module | None, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """The sequence-classification problem as transformers' models decide it (``BertForSequenceClassification``,
    ``ForSequenceClassificationLoss``): ``config.problem_type`` when set, else regression for one label, single-label
    classification for integer labels, multi-label classification otherwise. Like those models, an unset
    ``config.problem_type`` is set, so that the saved config says what was trained. A model without a config
    (a plain ``nn.Module``) is read from the shapes: one logit and float labels is regression, float labels shaped
    like the logits multi-label, anything else single-label."""
    if hasattr(model, "get_base_model"):  # PEFT: the base model's config
        model = model.get_base_model()
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if config is None or num_labels is None:
        if logits.shape[-1] == 1 and labels.is_floating_point() and labels.dim() == 1:
            return "regression"
        if labels.is_floating_point() and labels.shape == logits.shape:
            return "multi_label_classification"
        return "single_label_classification"
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"The model's `config.problem_type` is {config.problem_type!r}; expected one of "
            f"{PROBLEM_TYPES} (or pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[B]`)."
        )
    return config.problem_type


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, problem_type: str | None = None
) -> torch.Tensor:
    """``ℓ_i`` per sample of the loss transformers' sequence-classification models average over the batch: squared
    error (``regression``, averaged over the sample's outputs), cross entropy (``single_label_classification``,
    integer labels only: float labels are refused as the model's ``CrossEntropyLoss`` refuses them) or binary cross
    entropy averaged over the labels (``multi_label_classification``, float labels). ``problem_type=None``: read from
    the shapes (`problem_type_of` without a model)."""
    logits = logits.float()
    problem_type = problem_type or problem_type_of(None, logits, labels)
    if problem_type == "regression":
        if logits.shape[-1] == 1:  # the model's MSELoss(logits.squeeze(), labels.squeeze()): integer targets too
            return (logits.reshape(-1) - labels.reshape(-1).float()).square()
        return (logits - labels.float()).square().reshape(len(logits), -1).mean(dim=1)
    if problem_type == "multi_label_classification":
        if not labels.is_floating_point():
            raise ValueError(
                f"multi_label_classification needs float `labels` (one 0/1 target per class, shape "
                f"{tuple(logits.shape)}) as the model's BCEWithLogitsLoss does; got dtype {labels.dtype}, shape "
                f"{tuple(labels.shape)}."
            )
        per_label = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        return per_label.reshape(len(logits), -1).mean(dim=1)
    if labels.is_floating_point():
        raise ValueError(
            f"single_label_classification needs integer `labels` (torch.long class indices) as the model's "
            f"CrossEntropyLoss does; got dtype {labels.dtype}. For soft or multi-hot targets set "
            "`config.problem_type='multi_label_classification'`, for a score set num_labels=1 (regression), or pass "
            "`per_sample_loss_fn`."
        )
    return F.cross_entropy(
        logits.view(-1, logits.shape[-1]), labels.reshape(-1).long(), reduction="none", label_smoothing=label_smoothing
    )


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, shift: bool = False
) -> torch.Tensor:
    """``ℓ_i`` = mean token cross entropy over sample ``i``'s label tokens (``-100`` ignored).

    With ``shift`` (causal LM), position ``t`` predicts label ``t + 1``. A sample without any label
    token gets loss 0 and therefore a zero gradient.
    """
    if labels.is_floating_point():  # transformers' token losses (cross entropy over class ids) refuse them too
        raise ValueError(f"Token `labels` must be integer class or token ids (torch.long); got dtype {labels.dtype}.")
    if shift:
        # Shift the labels, not the logits: slicing [B, T, vocab] logits copies them, and its backward
        # fills a zero tensor of that size (transformers' causal-LM loss does the same).
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    batch_size, length, vocab = logits.shape
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, vocab),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(batch_size, length)
    label_counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / label_counts


def decodes_from_labels(model: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART) that would build its decoder's input from the ``labels`` of
    ``inputs``: it has no ``decoder_input_ids`` (or embeddings) of its own, and the model can make them."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return (
        bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        and inputs.get("labels") is not None
        and "decoder_input_ids" not in inputs
        and "decoder_inputs_embeds" not in inputs
        and callable(getattr(model, "prepare_decoder_input_ids_from_labels", None))
    )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its labels are shifted), looking through a PEFT wrapper: a
    ``PeftModel`` made without ``task_type="CAUSAL_LM"`` is named neither like a causal LM nor like anything else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    name = type(model).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel"))


def logits_of(outputs: Any) -> torch.Tensor:
    """The predictions in a forward's outputs (made without labels): ``outputs.logits``; for a plain dict without a
    ``logits`` key, its first entry that is not the loss, as `Trainer.prediction_step` reads it; the first element of
    a tuple; a tensor itself."""
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, dict):
        if "logits" in outputs:
            return outputs["logits"]
        for key, value in outputs.items():
            if key != "loss" and isinstance(value, torch.Tensor):
                return value
        raise TypeError(
            f"The model's outputs (a dict with keys {sorted(outputs)}) hold no predictions besides the loss; pass "
            "`per_sample_loss_fn=(outputs, inputs) -> Tensor[B]` to MimicTrainer."
        )
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise TypeError(
        f"Cannot find logits in the model's outputs of type {type(outputs).__name__}; pass "
        "`per_sample_loss_fn=(outputs, inputs) -> Tensor[B]` to MimicTrainer."
    )


def per_sample_loss(model: nn.Module, outputs: Any, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Dispatch on the task: causal LM, token classification (3-D logits) or sequence classification."""
    logits = logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        return token_loss(logits, labels, label_smoothing, shift=is_causal_lm(model))
    if logits.dim() == 2:
        return sequence_classification_loss(logits, labels, label_smoothing, problem_type_of(model, logits, labels))
    if logits.dim() == 1 and labels.shape == logits.shape:  # one output per sample: a regression's prediction
        return sequence_classification_loss(logits.unsqueeze(-1), labels, problem_type="regression")
    raise ValueError(
        f"No built-in per-sample loss for logits of shape {tuple(logits.shape)} with labels of shape "
        f"{tuple(labels.shape)}; pass `per_sample_loss_fn=(outputs, inputs) -> Tensor[B]` to MimicTrainer."
    )


def supervised_counts(model: nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """How many supervised targets each sample has under `per_sample_loss`'s conventions (``-100`` ignored, causal
    LMs shifted). A sample with none has loss 0 and no gradient: nothing to score it by."""
    logits = logits_of(outputs)
    if logits.dim() == 3 and labels.dim() == 2:
        targets = labels[:, 1:] if is_causal_lm(model) else labels
        return (targets != IGNORE_INDEX).sum(dim=1)
    if labels.is_floating_point():
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
    return (labels.reshape(labels.shape[0], -1) != IGNORE_INDEX).sum(dim=1)


def classification_margins(logits: torch.Tensor | None, labels: Any) -> torch.Tensor | None:
    """Each sample's margin, its given label's logit minus the largest other logit (Pleiss, Zhang, Elenberg and
    Weinberger, "Identifying Mislabeled Data using the Area Under the Margin Ranking", NeurIPS 2020), for
    single-label classification (``[B, C]`` logits, ``C >= 2``, integer labels); None for any other task. A label
    outside ``[0, C)`` (``-100``) gets NaN. Detached, float32: it is recorded, never trained on."""
    if (
        logits is None
        or not isinstance(labels, torch.Tensor)
        or logits.dim() != 2
        or logits.shape[1] < 2
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.shape[0] != logits.shape[0]
    ):
        return None
    with torch.no_grad():
        logits = logits.detach().float()
        valid = (labels >= 0) & (labels < logits.shape[1])
        index = torch.where(valid, labels, torch.zeros_like(labels)).long().to(logits.device)
        given = logits.gather(1, index[:, None]).squeeze(1)
        others = logits.scatter(1, index[:, None], float("-inf")).amax(dim=1)
        return torch.where(valid.to(logits.device), given - others, torch.full_like(given, float("nan")))


class SampleLoss:
    """How a trainer turns a training batch into per-sample losses: what the forward gets, ``ℓ_i``, and each
    sample's supervised targets. The Grad-Mimic step (`hf_gradmimic.training.step`) and the reference checks read
    the batch only through it.

    The built-in losses read the logits (`per_sample_loss`; the model's head picks the task); a ``loss_fn``
    ``(outputs, inputs) -> Tensor[B]`` replaces them. A trainer builds one in
    `hf_gradmimic.trainer.MimicTrainerMixin.create_sample_loss`; a subclass changes what it needs by overriding
    the three public methods (`hf_gradmimic.sft.SFTSampleLoss` asks for TRL's fused LM head and reads its mask).

    Args:
        model: the unwrapped model (its head and ``config.problem_type`` pick the built-in loss).
        loss_fn: the user's per-sample loss function, or None for the built-in losses.
        label_smoothing: ``label_smoothing_factor`` of the built-in losses.
    """

    def __init__(self, model: nn.Module, loss_fn: PerSampleLossFn | None = None, label_smoothing: float = 0.0) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.label_smoothing = label_smoothing

    @property
    def reads_logits(self) -> bool:
        """Whether the loss reads the model only through its logits (the built-in losses): a backward can then
        start there (`hf_gradmimic.training.capture.BackwardFromLogits`)."""
        return self.loss_fn is None

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What the model's forward gets from a batch: the batch without the labels (their loss is ours), unless a
        user loss function reads the model's own outputs and needs them (not a ``compute_loss_func``: `Trainer` pops
        them too). Row ``i`` of the result depends on row ``i`` of ``inputs`` alone."""
        if self.loss_fn is not None and getattr(self.loss_fn, "model_gets_labels", True):
            return inputs
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        if decodes_from_labels(self.model, inputs):
            # What an encoder-decoder does with the labels it is given: its decoder reads them shifted right.
            model_inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        return model_inputs

    def per_sample_losses(self, outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """``ℓ_i``, float32 ``[B]``, from the forward's ``outputs`` and the batch (its ``labels`` included)."""
        if self.loss_fn is not None:
            losses = self.loss_fn(outputs, inputs)
        else:
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("The training batch has no `labels`; MimicTrainer needs them for per-sample losses.")
            losses = per_sample_loss(self.model, outputs, labels, self.label_smoothing)
        if losses.dim() != 1:
            raise ValueError(f"Per-sample losses must have shape [batch], got {tuple(losses.shape)}.")
        return losses.float()

    def supervised_counts(self, outputs: Any, labels: Any) -> torch.Tensor | None:
        """Supervised targets per sample under the built-in losses (None with a user loss function: unknown). A
        sample with none is not scored (`hf_gradmimic.training.guards`)."""
        if self.loss_fn is not None or labels is None:
            return None
        return supervised_counts(self.model, outputs, labels)
