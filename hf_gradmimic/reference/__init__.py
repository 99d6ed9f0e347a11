"""References, in one home: reading a reference's mimic-layer tensors, and the recipes that build one.

- `loading`: only the mimic-layer tensors, read from a file, a folder, the Hub, a model or a dict;
- `adapters`: PEFT adapters as references (where their two files are, how their keys are spelled);
- `config`: what a recipe is asked (`ReferenceRecipeConfig`) and what it hands back (`ReferenceResult`);
- `recipe`: `build_reference`, which runs the recipe that the config names and pushes the result when asked;
- `probe`: the linear-probe recipe, a head trained on the student's own frozen features;
- `lora`: the LoRA recipe, a copy of the student's own adapter trained on trusted data.
"""

from .adapters import AdapterReferenceError
from .config import ReferenceRecipeConfig, ReferenceResult
from .loading import (
    REFERENCE_WEIGHTS_NAME,
    ReferenceLoadError,
    ReferenceSource,
    load_reference_tensors,
    read_reference_metadata,
)
from .lora import check_adapter_init, train_lora_reference
from .probe import layer_inputs, linear_probe, train_probe_reference
from .recipe import build_reference

__all__ = [
    "REFERENCE_WEIGHTS_NAME",
    "AdapterReferenceError",
    "ReferenceLoadError",
    "ReferenceRecipeConfig",
    "ReferenceResult",
    "ReferenceSource",
    "build_reference",
    "check_adapter_init",
    "layer_inputs",
    "linear_probe",
    "load_reference_tensors",
    "read_reference_metadata",
    "train_lora_reference",
    "train_probe_reference",
]
