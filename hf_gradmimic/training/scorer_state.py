"""A scorer's state in a checkpoint folder, written and read without pickle (safetensors + JSON).

A stateful scorer (the Bayesian selection's Laplace factors and noise generator, arXiv 2308.10544) must
survive a SIGKILL and a resume, so `SampleScorer.state_dict` goes into every checkpoint. Checkpoints are
shared and downloaded, and unpickling one runs any code it holds, so the state is stored as tensors in
``mimic_scorer.safetensors`` and the other values (numbers, strings, lists, None) in ``mimic_scorer.json``.
Nothing is read for a scorer without state. A checkpoint written by hf-gradmimic 0.1's first releases holds
``mimic_scorer.pt`` (a pickle): it is read with ``torch.load(weights_only=True)``, which accepts tensors
and plain containers only, and anything else in it is refused with the file's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write, write_json

__all__ = ["LEGACY_STATE_NAME", "STATE_JSON_NAME", "STATE_TENSORS_NAME", "load_scorer_state", "save_scorer_state"]

STATE_TENSORS_NAME = "mimic_scorer.safetensors"
"""The scorer's tensors inside each checkpoint folder."""
STATE_JSON_NAME = "mimic_scorer.json"
"""The scorer's other values inside each checkpoint folder (written after the tensors: the mark of a whole state)."""
LEGACY_STATE_NAME = "mimic_scorer.pt"
"""The pickle of earlier versions; read with ``weights_only=True`` only."""

_JSON_TYPES = (bool, int, float, str, type(None))


def save_scorer_state(folder: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a scorer's ``state_dict`` into ``folder``: tensors to safetensors, other values to JSON.

    A value that is neither a tensor nor JSON (numbers, strings, None, lists and dicts of them) is refused,
    naming its key: a scorer's state must be data, never an object to rebuild.
    """
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif _is_json_data(value):
            values[key] = value
        else:
            raise TypeError(
                f"Scorer state entry {key!r} is a {type(value).__name__}; a scorer's state_dict may hold tensors and "
                "JSON values (numbers, strings, None, lists and dicts of them) only."
            )
    atomic_write(os.path.join(folder, STATE_TENSORS_NAME), lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(folder, STATE_JSON_NAME), {"tensors": sorted(tensors), "values": values})


def load_scorer_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The scorer state saved in checkpoint ``folder``, or None when it holds none.

    Raises a ValueError naming the file when the state is incomplete or unreadable, and when a legacy
    ``mimic_scorer.pt`` holds anything but tensors and plain containers (e.g. a pickled object whose
    loading would run code).
    """
    json_path = os.path.join(folder, STATE_JSON_NAME)
    tensors_path = os.path.join(folder, STATE_TENSORS_NAME)
    if os.path.isfile(json_path):
        return _load_safe(json_path, tensors_path)
    legacy = os.path.join(folder, LEGACY_STATE_NAME)
    if os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:  # the weights-only unpickler refuses globals it does not allow
            raise ValueError(
                f"The scorer state {legacy} holds more than tensors and plain values, so it is not loaded (loading "
                f"it could run code). Delete it to resume without the scorer's state, or resume from a checkpoint "
                f"written by this version ({STATE_TENSORS_NAME} + {STATE_JSON_NAME}). Cause: {error}"
            ) from error
        if not isinstance(state, dict):
            raise ValueError(f"The scorer state {legacy} is a {type(state).__name__}, not a dict of values.")
        return state
    return None


def _load_safe(json_path: str, tensors_path: str) -> dict[str, Any]:
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
        tensor_names, values = document["tensors"], document["values"]
        if not isinstance(values, dict) or not isinstance(tensor_names, list):
            raise TypeError("'tensors' must be a list and 'values' an object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"The scorer state {json_path} is not readable: {error}.") from error
    tensors = load_file(tensors_path) if tensor_names else {}
    missing = sorted(set(tensor_names) - set(tensors))
    if missing:
        raise ValueError(f"The scorer state {tensors_path} lacks the tensor(s) {missing} that {json_path} lists.")
    return {**values, **{name: tensors[name] for name in tensor_names}}


def _is_json_data(value: Any) -> bool:
    if isinstance(value, _JSON_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_data(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json_data(item) for key, item in value.items())
    return False
