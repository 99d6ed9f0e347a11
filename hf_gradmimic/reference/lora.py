"""The LoRA reference recipe: train a copy of the student's own adapter on trusted data, save it as an ordinary PEFT adapter.

With a LoRA adapter's matrices as mimic tensors, Grad-Mimic's direction ``θ_ref − θ_t`` (Huang et al., arXiv
2501.06708) compares two adapters coordinate by coordinate. A LoRA update ``B A`` does not determine ``A`` and ``B``
(``(B R⁻¹)(R A)`` is the same update), so two adapters share coordinates only when they start from the same ``A``:
the reference is trained from the student's adapter as it is before fine-tuning, on the student's frozen base
model. The student is left as it was. The adapter's initial A matrices are fingerprinted in the weights' metadata
(``adapter_init``), so that a trainer can tell a reference trained from another initialisation (`check_adapter_init`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write
from ..lora import lora_layers
from ..losses import IGNORE_INDEX, per_sample_loss
from .adapters import ADAPTER_WEIGHTS_NAME, lora_scaling, without_adapter_name
from .loading import checkpoint_name


def adapter_init(tensors: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of an adapter's A matrices (keys without the adapter name, so both spellings agree)."""
    digest = hashlib.sha256()
    for key in sorted((key for key in tensors if ".lora_A." in key), key=without_adapter_name):
        digest.update(without_adapter_name(key).encode())
        digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def active_lora_config(model: Any) -> Any:
    """The `peft.LoraConfig` of ``model``'s active adapter (None without one)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapter", None)
    return configs.get(active if isinstance(active, str) else next(iter(configs), None))


def module_adapter_metadata(model: Any) -> dict[str, str]:
    """What `check_adapter_scaling` reads of a reference given as a `PeftModel` in memory: its adapter's scaling."""
    config = active_lora_config(model)
    return {} if config is None else {"lora_scaling": json.dumps(lora_scaling(config.to_dict()), sort_keys=True)}


def check_adapter_scaling(metadata: dict[str, str], model: Any, reference_name: str) -> None:
    """Refuse a LoRA reference whose adapter scales its update otherwise than the student's (``lora_alpha``, ``r``,
    rsLoRA, the rank and alpha patterns): the same A and B matrices would then be another weight change, and
    ``θ_ref − θ`` over them would not point to the reference's weights."""
    saved = metadata.get("lora_scaling")
    config = active_lora_config(model)
    if not saved or config is None:
        return
    reference, student = json.loads(saved), lora_scaling(config.to_dict())
    differing = {
        field: (reference[field], student[field])
        for field in reference
        if field in student and reference[field] != student[field]
    }
    if differing:
        listed = ", ".join(
            f"{field}: reference {theirs!r}, student {ours!r}" for field, (theirs, ours) in differing.items()
        )
        raise ValueError(
            f"The LoRA reference {reference_name} scales its adapter otherwise than the student ({listed}): its A and B "
            "matrices would be another weight change in the student's adapter, and the mimic direction would not point "
            "to the reference. Train the reference with the student's LoraConfig (hf_gradmimic.build_reference(..., "
            "method='lora') does), or give the student the reference's."
        )


def check_adapter_init(
    metadata: Mapping[str, str], student_tensors: Mapping[str, torch.Tensor], reference_name: str
) -> None:
    """Warn when a LoRA reference was trained from another initial adapter than the student's.

    Only a fresh student adapter (every B zero, PEFT's default start) is compared: once trained, its A has moved."""
    recorded = metadata.get("adapter_init")
    fresh = any(".lora_B." in key for key in student_tensors) and all(
        not tensor.detach().any() for key, tensor in student_tensors.items() if ".lora_B." in key
    )
    if not recorded or not fresh or adapter_init(student_tensors) == recorded:
        return
    warnings.warn(
        f"The LoRA reference {reference_name} was trained from another initial adapter than the student's (its A "
        "matrices differ). Adapters share coordinates only when they start from the same A, so the mimic scores "
        "compare unrelated matrices. Build the reference from the student itself (build_reference(student, ..., "
        "method='lora')), or create both adapters with the same seed.",
        UserWarning,
        stacklevel=4,
    )


def pad_batch(examples: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with −100, or the ids when there are none)."""
    length = max(len(example["input_ids"]) for example in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# What `SFTTrainer` prepares from its rows (as in its dataset preparation): the other rows are refused by name.
SFT_ROW_FORMATS = (
    "prompt-completion pairs (`prompt`, `completion`), conversations (`messages`, or ShareGPT "
    "`conversations`), plain text (the config's `dataset_text_field`, default `text`), or tokenized rows "
    "(`input_ids`, with `labels` −100 on unsupervised tokens)"
)
# The SFTConfig fields that decide how rows become `input_ids` and `labels`; training settings are not read.
SFT_PREPARATION_FIELDS = (
    "dataset_text_field",
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "chat_template_path",
    "eos_token",
    "dataset_num_proc",
)


def sft_prepared_rows(
    model: nn.Module, dataset: Any, processing_class: Any = None, sft_config: Any = None
) -> tuple[Any, Callable | None]:
    """``dataset`` as `SFTTrainer` prepares it for ``model``: tokenized, with ``labels`` −100 where the completion-only
    or assistant-only mask says so, truncated to ``max_length``; and `SFTTrainer`'s collator (None for rows that are
    already tokenized, which are used as they are).

    The preparation is trl's own: an `SFTTrainer` is built on the rows with ``sft_config``'s dataset settings
    (`SFT_PREPARATION_FIELDS`; default `SFTConfig`'s) and its prepared ``train_dataset`` is read. Like `SFTTrainer`,
    it loads the tokenizer of ``model.config._name_or_path`` when ``processing_class`` is None, and sets the tokenizer's
    pad token when it has none. A list of dicts is read as a `datasets.Dataset`.
    """
    import datasets

    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"method='lora' needs the trusted rows as a datasets.Dataset or a list of dicts (it is read "
            f"several times, by index); got a {type(dataset).__name__}."
        )
    columns = set(dataset.column_names)
    if "input_ids" in columns:
        return dataset, None
    text_field = getattr(sft_config, "dataset_text_field", None) or "text"
    if not ({"prompt", "completion"} <= columns or columns & {"messages", "conversations", text_field}):
        raise ValueError(
            f"build_reference(method='lora') takes the rows SFTTrainer takes: {SFT_ROW_FORMATS}; got "
            f"columns {sorted(columns)}."
        )
    if processing_class is None and not getattr(getattr(model, "config", None), "_name_or_path", ""):
        raise ValueError(
            "The trusted rows are text, and the model names no checkpoint to load a tokenizer from: pass "
            "`processing_class=tokenizer` (the one given to MimicSFTTrainer)."
        )
    import tempfile

    from trl import SFTConfig, SFTTrainer

    settings = {name: getattr(sft_config, name) for name in SFT_PREPARATION_FIELDS if hasattr(sft_config, name)}
    no_checkpointing = (
        {"activation_checkpointing": False}
        if "activation_checkpointing" in SFTConfig.__dataclass_fields__
        else {"gradient_checkpointing": False}
    )
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as scratch:  # the trainer is built for its preparation only, never trained
        args = SFTConfig(
            output_dir=scratch,
            report_to=[],
            bf16=False,
            fp16=False,
            packing=False,
            padding_free=False,
            shuffle_dataset=False,
            use_cpu=device.type == "cpu",
            **no_checkpointing,
            **settings,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processing_class)
    return trainer.train_dataset.select_columns(["input_ids", "labels"]), trainer.data_collator


def _mean_loss(model: nn.Module, dataset: Any, collate: Callable, batch_size: int) -> float:
    """The mean over samples of their mean token loss, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in collate(
                        [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                    ).items()
                }
                labels = batch.pop("labels")
                total += float(per_sample_loss(model, model(**batch), labels).sum())
    finally:
        model.train(was_training)
    return total / len(dataset)


def train_lora_reference(
    model: nn.Module,
    train_dataset: Any,
    *,
    output_dir: str | os.PathLike,
    eval_dataset: Any = None,
    data_collator: Callable | None = None,
    epochs: int = 3,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 8,
    base_model: str | None = None,
    base_revision: str | None = None,
    data_description: str | None = None,
    seed: int = 0,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, str], list[float]]:
    """Train the active LoRA adapter of ``model`` (a PEFT model, before fine-tuning) on trusted data, save it to
    ``output_dir`` as ``adapter_config.json`` + ``adapter_model.safetensors``, and put the student back as it was.

    Args:
        model: the student: its base model with the fresh adapter it will be fine-tuned with.
        train_dataset: trusted examples with ``input_ids`` and ``labels`` (−100 where unsupervised, e.g. prompts).
        data_collator: batches examples; default `pad_batch`.
        epochs / learning_rate / weight_decay / batch_size / seed: AdamW on the adapter's matrices, mean over samples
            of each sample's mean token loss (as `MimicSFTTrainer` weighs them with ``mimic_token_weighting="sample"``).

    Returns:
        The weights' path, the trained tensors (student names), the metadata written, and the epoch losses.
    """
    from peft import get_peft_model_state_dict

    if not hasattr(model, "peft_config") or not any(True for _ in lora_layers(model)):
        raise ValueError("method='lora' trains the student's LoRA adapter: pass the PEFT model (peft.get_peft_model).")
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    initial = {name: param.detach().clone() for name, param in trainable.items()}
    collate = data_collator or (lambda rows: pad_batch(rows, getattr(model.config, "pad_token_id", None) or 0))
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history: list[float] = []
    was_training = model.training
    try:
        torch.manual_seed(seed)  # the LoRA dropout masks
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=learning_rate, weight_decay=weight_decay)
        model.train()
        for _ in range(epochs):
            order, total = torch.randperm(len(train_dataset), generator=generator).tolist(), 0.0
            for start in range(0, len(order), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in collate([train_dataset[i] for i in order[start : start + batch_size]]).items()
                }
                labels = batch.pop("labels")
                losses = per_sample_loss(model, model(**batch), labels)
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
                total += float(losses.detach().sum())
            history.append(total / len(train_dataset))
        metadata = {
            "base_model": checkpoint_name(base_model or str(getattr(model.config, "_name_or_path", "") or "")),
            "base_revision": base_revision or "",
            "layers": json.dumps(["lora"]),
            "method": "lora",
            "train_rows": str(len(train_dataset)),
            "train_loss": f"{history[-1]:.4f}" if history else "",
            "eval_loss": f"{_mean_loss(model, eval_dataset, collate, batch_size):.4f}"
            if eval_dataset is not None
            else "",
            "data": data_description or "",
            "adapter_init": adapter_init(initial),
            "format": "pt",
        }
        trained = {name: param.detach().clone() for name, param in trainable.items()}
        # Copies: the state dict shares storage with the parameters, which are put back next.
        weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    finally:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(initial[name])
        model.train(was_training)
    _save_adapter(model, adapter, output_dir, weights, metadata)
    return Path(output_dir) / ADAPTER_WEIGHTS_NAME, trained, metadata, history


def _save_adapter(
    model: nn.Module,
    adapter: str,
    output_dir: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """``adapter_config.json`` (naming the base checkpoint) and ``adapter_model.safetensors`` (PEFT's keys, our
    metadata in its header), as `PeftModel.from_pretrained` reads them, and the card."""
    import copy

    from safetensors.torch import save_file

    from ..cards import render_lora_reference_card

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[adapter])
    config.base_model_name_or_path = metadata["base_model"] or None
    config.revision = metadata["base_revision"] or None
    config.inference_mode = True
    config.save_pretrained(str(output_dir))
    atomic_write(output_dir / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata=metadata))
    atomic_write(output_dir / "README.md", render_lora_reference_card(metadata).save)
