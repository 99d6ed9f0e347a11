"""PEFT adapters as Grad-Mimic references: where the adapter's files are, what base checkpoint it names, how its keys are spelled.

A LoRA reference (Grad-Mimic, Huang et al., arXiv 2501.06708, with the adapter's matrices as mimic tensors) is an
ordinary PEFT adapter: a folder or Hub repo holding ``adapter_config.json`` and ``adapter_model.safetensors``.
Only those two files are read. PEFT saves the matrices without the adapter's name
(``...q_proj.lora_A.weight``), while the student's parameters carry it (``...q_proj.lora_A.default.weight``):
`without_adapter_name` relates the two. The base checkpoint the adapter was trained on is the config's
``base_model_name_or_path`` (and ``revision``), which the trainer compares with the student's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..fileio import read_json_object

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_ADAPTER_SEGMENT = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.(weight|bias)$")


class AdapterReferenceError(ValueError):
    """A PEFT adapter folder or repo that cannot serve as a reference."""


def without_adapter_name(key: str) -> str:
    """``...q_proj.lora_A.default.weight`` → ``...q_proj.lora_A.weight``, as PEFT saves it; other keys unchanged."""
    return _ADAPTER_SEGMENT.sub(r".\1.\2", key)


def local_adapter(directory: Path) -> tuple[Path, Path] | None:
    """``(adapter_config.json, adapter_model.safetensors)`` of a PEFT adapter folder, or None for another folder."""
    config = directory / ADAPTER_CONFIG_NAME
    if not config.is_file():
        return None
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterReferenceError(
            f"{directory} holds {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME} (found "
            f"{sorted(p.name for p in directory.iterdir())[:10]}). Save the adapter with "
            "`model.save_pretrained(folder)` (safetensors, PEFT's default)."
        )
    return config, weights


def hub_adapter(repo_id: str, revision: str | None, token: str | bool | None) -> tuple[Path, Path] | None:
    """The two files of a PEFT adapter repo, downloaded (nothing else is), or None when the repo has no
    ``adapter_config.json``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = Path(hf_hub_download(repo_id, ADAPTER_CONFIG_NAME, revision=revision, token=token))
    except EntryNotFoundError:
        return None
    try:
        weights = Path(hf_hub_download(repo_id, ADAPTER_WEIGHTS_NAME, revision=revision, token=token))
    except EntryNotFoundError:
        raise AdapterReferenceError(
            f"Hub repo {repo_id} holds {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}: push the adapter saved "
            "with `model.save_pretrained` (safetensors, PEFT's default)."
        ) from None
    return config, weights


def adapter_metadata(config: Path, weights: Path) -> dict[str, str]:
    """The reference's provenance: the weights' safetensors metadata (what `hf_gradmimic.build_reference` wrote),
    with ``base_model`` / ``base_revision`` taken from the adapter config's ``base_model_name_or_path`` / ``revision``."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    settings = read_json_object(config, "The adapter config", "save the adapter again with `save_pretrained`.")
    metadata["base_model"] = str(settings.get("base_model_name_or_path") or "")
    metadata["base_revision"] = str(settings.get("revision") or "")
    metadata["lora_scaling"] = json.dumps(lora_scaling(settings), sort_keys=True)
    return metadata


LORA_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")
"""The LoRA settings that make an adapter's weight change from its matrices (``lora_alpha / r``, or ``/ √r`` with
rsLoRA, per module with the patterns; DoRA's magnitude; a bias on B): a reference's A and B matrices are in the
student's coordinates only when these are the student's."""


def lora_scaling(settings: dict) -> dict:
    """The `LORA_SCALING_FIELDS` of a LoRA config (its JSON dict, or a `peft.LoraConfig`'s ``to_dict()``); a switch
    an older PEFT did not write is off."""
    return {
        field: (settings.get(field) or {})
        if field.endswith("_pattern")
        else bool(settings.get(field))
        if field.startswith(("use_", "lora_bias"))
        else settings.get(field)
        for field in LORA_SCALING_FIELDS
    }
