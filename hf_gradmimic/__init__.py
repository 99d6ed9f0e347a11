"""hf-gradmimic: Grad-Mimic data selection as a drop-in `transformers.Trainer`.

Grad-Mimic (Huang, Bilkhu, Sala, Movellan, "Evaluating Sample Utility for Data Selection by
Mimicking Model Weights", arXiv 2501.06708) weights every sample in a batch by how well its
negative gradient points from the current weights toward a reference model's weights.

Public names are imported lazily so that `import hf_gradmimic` stays cheap (no torch import
for the CLI's `--help`, for instance).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "MimicConfig": "hf_gradmimic.config",
    "MimicTrainer": "hf_gradmimic.trainer",
    "load_scores": "hf_gradmimic.score_log_io",
    "load_reference_tensors": "hf_gradmimic.reference",
    "build_filter": "hf_gradmimic.filter",
    "MimicFilter": "hf_gradmimic.filter",
    "estimate_quality": "hf_gradmimic.filter",
    "report": "hf_gradmimic.reporting",
    "push_scored_dataset": "hf_gradmimic.hub",
    "load_filter_metric": "hf_gradmimic.metrics",
    "build_reference": "hf_gradmimic.reference",
    "ReferenceRecipeConfig": "hf_gradmimic.reference",
    "batch_coupled": "hf_gradmimic.contrastive",
    "returns_per_sample_losses": "hf_gradmimic.losses",
    "ContrastiveLoss": "hf_gradmimic.contrastive",
    "clip_scores": "hf_gradmimic.clip_filter",
    "clip_score_filter": "hf_gradmimic.clip_filter",
}
# Names that need an optional extra (`pip install 'hf-gradmimic[trl]'`): importing them without it says so.
_OPTIONAL_EXPORTS = {
    "MimicSFTConfig": "hf_gradmimic.sft",
    "MimicSFTTrainer": "hf_gradmimic.sft",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .clip_filter import clip_score_filter, clip_scores
    from .config import MimicConfig
    from .contrastive import ContrastiveLoss, batch_coupled
    from .filter import MimicFilter, build_filter, estimate_quality
    from .hub import push_scored_dataset
    from .losses import returns_per_sample_losses
    from .metrics import load_filter_metric
    from .reference import ReferenceRecipeConfig, build_reference, load_reference_tensors
    from .reporting import report
    from .score_log_io import load_scores
    from .sft import MimicSFTConfig, MimicSFTTrainer
    from .trainer import MimicTrainer


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name) or _OPTIONAL_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_gradmimic' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return __all__ + sorted(_OPTIONAL_EXPORTS)
