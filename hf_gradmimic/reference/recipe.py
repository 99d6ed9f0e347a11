"""`build_reference`: a Grad-Mimic reference that shares the student's coordinates, by the recipe named, optionally pushed.

The recipes themselves are `hf_gradmimic.reference.probe` (a linear probe of the student's own frozen features) and
`hf_gradmimic.reference.lora` (a copy of the student's own LoRA adapter); this module picks one, checks the settings
that concern the choice, and uploads the folder when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .config import ReferenceRecipeConfig, ReferenceResult
from .lora import sft_prepared_rows, train_lora_reference
from .probe import train_probe_reference

RECIPES = ("linear_probe", "lora")


def build_reference(
    model: nn.Module, train_dataset: Any, config: ReferenceRecipeConfig | None = None, **settings: Any
) -> ReferenceResult:
    """Build a Grad-Mimic reference that shares the student's coordinates: a linear probe of its own pretrained
    features, or (``method="lora"``) its own LoRA adapter trained on trusted data.

    Trains only the mimic layer(s) — each must be the head, i.e. its output is the model's logits —
    on the frozen features of ``model`` (the student's pretrained checkpoint, before fine-tuning),
    using trusted data (a clean subset, a curated split, or the training set filtered by another
    method). The model itself is not modified.

    Args:
        model: the student's pretrained checkpoint (loaded as the same class the student uses).
        train_dataset: trusted, labelled data in the model's input format (a `datasets.Dataset`).
        config: the recipe's settings (`ReferenceRecipeConfig`); default: its defaults.
        **settings: any field of `ReferenceRecipeConfig` given as a keyword (``layers=["classifier"]``,
            ``epochs=30``, ``output_dir=...``), taking precedence over ``config``'s.

    Returns:
        A `ReferenceResult` with the saved path, the tensors (student names) and the metadata.
    """
    config = _settled(config, settings)
    if config.method == "lora":
        if config.layers is not None and list(config.layers) != ["lora"]:
            raise ValueError(
                f"method='lora' trains every matrix of the student's adapter; got layers "
                f"{list(config.layers)}: leave `layers` unset or pass ('lora',)."
            )
        train_dataset, sft_collator = sft_prepared_rows(
            model, train_dataset, config.processing_class, config.sft_config
        )
        eval_dataset = config.eval_dataset
        if eval_dataset is not None:
            eval_dataset, eval_collator = sft_prepared_rows(
                model, eval_dataset, config.processing_class, config.sft_config
            )
            sft_collator = sft_collator or eval_collator
        path, tensors, metadata, history = train_lora_reference(
            model,
            train_dataset,
            output_dir=config.output_dir,
            eval_dataset=eval_dataset,
            data_collator=config.data_collator or sft_collator,
            **config.optimizer_settings(),
            base_model=config.base_model,
            base_revision=config.base_revision,
            data_description=config.data_description,
            seed=config.seed,
        )
        result = ReferenceResult(path=path, tensors=tensors, metadata=metadata, history=history)
        _push(config, f"Grad-Mimic LoRA reference for {metadata['base_model']}")
        return result
    if config.method != "linear_probe":
        raise ValueError(f"Unknown reference recipe {config.method!r}; available: {', '.join(map(repr, RECIPES))}.")
    result = train_probe_reference(model, train_dataset, config)
    _push(config, f"Grad-Mimic reference for {result.metadata['base_model']}")
    return result


def _settled(config: ReferenceRecipeConfig | None, settings: dict[str, Any]) -> ReferenceRecipeConfig:
    """``config`` (or the defaults) with the keyword ``settings`` put over it; an unknown keyword is a TypeError, as
    for any function."""
    if config is not None and not isinstance(config, ReferenceRecipeConfig):
        raise TypeError(f"build_reference's `config` is a ReferenceRecipeConfig; got a {type(config).__name__}.")
    known = {field.name for field in dataclasses.fields(ReferenceRecipeConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(
            f"build_reference() got unexpected keyword argument(s) {unknown}; the settings are "
            f"ReferenceRecipeConfig's fields: {sorted(known)}."
        )
    return dataclasses.replace(config or ReferenceRecipeConfig(), **settings)


def _push(config: ReferenceRecipeConfig, message: str) -> None:
    """Upload the reference folder (without the feature cache) when asked."""
    if not config.push_to_hub:
        return
    if not config.repo_id:
        raise ValueError("`push_to_hub=True` needs a `repo_id`.")
    from huggingface_hub import HfApi

    api = HfApi(token=config.token)
    repo_id = api.create_repo(config.repo_id, exist_ok=True).repo_id  # a bare name lands in the user's namespace
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(config.output_dir),
        ignore_patterns=["feature_cache/*", "*.tmp"],
        commit_message=message,
    )
