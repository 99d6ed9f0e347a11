"""What a reference recipe is asked to build (`ReferenceRecipeConfig`) and what it hands back (`ReferenceResult`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ReferenceRecipeConfig:
    """The settings of `hf_gradmimic.build_reference`, one object instead of seventeen keyword arguments.

    Attributes:
        layers: the mimic layer names, as in `MimicConfig.mimic_layers` (default ``("classifier",)``; for ``"lora"``,
            ``("lora",)``: every matrix of the adapter).
        method: ``"linear_probe"``, or ``"lora"``: the model is the student's PEFT model before fine-tuning, and a
            copy of its adapter is trained on the data with AdamW for ``epochs``, then saved to ``output_dir`` as an
            ordinary PEFT adapter (`hf_gradmimic.reference.lora`), loadable with ``PeftModel.from_pretrained``; the
            student is left unchanged. The rows are those `SFTTrainer` takes (prompt-completion, conversational,
            text), prepared by trl as `SFTTrainer` prepares them, or tokenized rows (``input_ids``, ``labels`` −100
            on prompts).
        output_dir: where the weights and their ``README.md`` card go.
        eval_dataset: held-out data for the accuracy (or loss) written to the card (else training figures only).
        data_collator: batches the rows (default: transformers' ``default_data_collator``; for ``"lora"``, padding).
        epochs: passes over the trusted data; None: the recipe's own default (the probe: 100 over the cached
            features; LoRA: 3).
        learning_rate: AdamW's learning rate; None: the recipe's (1e-2; LoRA 1e-3).
        weight_decay: AdamW's weight decay; None: the recipe's (1e-4; LoRA 0).
        batch_size: rows per optimizer step; None: the recipe's (256; LoRA 8).
        base_model: the base checkpoint recorded in the metadata; default ``model.config._name_or_path``.
        base_revision: its revision, recorded in the metadata.
        data_description: what the trusted data is, recorded in the metadata and the card.
        cache_dir: where the probe's features are cached (default ``output_dir/feature_cache``).
        push_to_hub: also upload the folder to the Hub.
        repo_id: the Hub repo for ``push_to_hub``.
        token: the Hub token for ``push_to_hub`` (default: the logged-in one).
        seed: the seed of the batch order (and of LoRA's dropout).
        processing_class: for ``"lora"`` with text rows, the tokenizer given to `MimicSFTTrainer` (default: the one
            of ``model.config._name_or_path``, as `SFTTrainer` loads it).
        sft_config: for ``"lora"`` with text rows, the `MimicSFTConfig` (or `SFTConfig`) the student will be trained
            with: its dataset settings (``max_length``, ``completion_only_loss``, ``assistant_only_loss``,
            ``dataset_text_field``…) prepare the rows the same way.
    """

    layers: Sequence[str] | None = None
    method: str = "linear_probe"
    output_dir: str | os.PathLike = "mimic_reference"
    eval_dataset: Any = None
    data_collator: Any = None
    epochs: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    base_model: str | None = None
    base_revision: str | None = None
    data_description: str | None = None
    cache_dir: str | os.PathLike | None = None
    push_to_hub: bool = False
    repo_id: str | None = None
    token: str | None = None
    seed: int = 0
    processing_class: Any = None
    sft_config: Any = None

    def optimizer_settings(self) -> dict[str, Any]:
        """The optimizer settings given (not None): the recipe's own defaults fill the others."""
        return {
            name: getattr(self, name)
            for name in ("epochs", "learning_rate", "weight_decay", "batch_size")
            if getattr(self, name) is not None
        }


@dataclass
class ReferenceResult:
    """What `build_reference` produced."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    history: list[float] = field(default_factory=list)
