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
            copy of its adapter is trained on the data (``input_ids``, ``labels`` with −100 on prompts) with AdamW
            for ``epochs``, then saved to ``output_dir`` as an ordinary PEFT adapter (`hf_gradmimic.reference.lora`),
            loadable with ``PeftModel.from_pretrained``; the student is left unchanged.
        output_dir: where the weights and their ``README.md`` card go.
        eval_dataset: held-out data for the accuracy (or loss) written to the card (else training figures only).
        data_collator: batches the rows (default: transformers' ``default_data_collator``; for ``"lora"``, padding).
        epochs: passes over the trusted data.
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        batch_size: rows per optimizer step.
        base_model: the base checkpoint recorded in the metadata; default ``model.config._name_or_path``.
        base_revision: its revision, recorded in the metadata.
        data_description: what the trusted data is, recorded in the metadata and the card.
        cache_dir: where the probe's features are cached (default ``output_dir/feature_cache``).
        push_to_hub: also upload the folder to the Hub.
        repo_id: the Hub repo for ``push_to_hub``.
        token: the Hub token for ``push_to_hub`` (default: the logged-in one).
        seed: the seed of the batch order (and of LoRA's dropout).
    """

    layers: Sequence[str] | None = None
    method: str = "linear_probe"
    output_dir: str | os.PathLike = "mimic_reference"
    eval_dataset: Any = None
    data_collator: Any = None
    epochs: int = 100
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    base_model: str | None = None
    base_revision: str | None = None
    data_description: str | None = None
    cache_dir: str | os.PathLike | None = None
    push_to_hub: bool = False
    repo_id: str | None = None
    token: str | None = None
    seed: int = 0


@dataclass
class ReferenceResult:
    """What `build_reference` produced."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    history: list[float] = field(default_factory=list)
