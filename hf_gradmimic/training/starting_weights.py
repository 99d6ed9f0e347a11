"""The student's trainable weights as training found them, kept for the reference model's own verdict.

A linear-probe reference (`hf_gradmimic.build_reference`; Grad-Mimic, Huang et al., arXiv 2501.06708) is a head
trained on the features of the student's *starting* weights. When training also moves the layers below the head
(full fine-tuning), the reference's head on the student's current features drifts away from the verdict of the
model the reference was trained as. With ``MimicConfig.mimic_log_reference_loss="reference_model"`` that model's
verdict is recorded instead: a no-grad forward of these weights with the reference's mimic tensors
(`hf_gradmimic.training.reference_verdict`). Kept: the trainable tensors outside the mimic layers (the frozen ones
never move; the mimic layers' are the reference's) and the buffers (training updates a batch norm's running
statistics, which eval mode reads). They go into every checkpoint (`STARTING_WEIGHTS_NAME`, safetensors: no
pickle), so that a resumed run reads the same model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import atomic_write

__all__ = ["STARTING_WEIGHTS_NAME", "StartingWeights", "moving_tensors"]

STARTING_WEIGHTS_NAME = "mimic_starting_weights.safetensors"
"""The starting weights inside each checkpoint folder."""


def moving_tensors(model: nn.Module, layers: Any) -> dict[str, torch.Tensor]:
    """What training may change besides the mimic tensors, by name on the unwrapped model: the trainable parameters
    that are not mimic tensors (a tied use of a mimic tensor counts as one) and the buffers."""
    mimic = {id(param) for param in layers.tensors.values()}
    params = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in mimic}
    return {**params, **dict(model.named_buffers())}


class StartingWeights:
    """A copy of `moving_tensors` taken when training starts (`snapshot`), or read back from the
    checkpoint a run resumes from (`load`); `tensors` are on the parameters' devices and in their dtypes."""

    def __init__(self, model: nn.Module, layers: Any) -> None:
        self.model = model
        self.layers = layers
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The copy by name, on the devices of the model's own tensors (moved if the model moved since)."""
        if self._tensors is None:
            raise RuntimeError("The starting weights are read before training started (`snapshot` or `load` first).")
        live = moving_tensors(self.model, self.layers)
        for name, tensor in self._tensors.items():  # a model moved to its device after the snapshot
            if tensor.device != live[name].device:
                self._tensors[name] = tensor.to(live[name].device)
        return self._tensors

    def snapshot(self) -> None:
        """Copy the weights now: call before the first optimizer step."""
        live = moving_tensors(self.model, self.layers)
        self._tensors = {name: param.detach().clone() for name, param in live.items()}

    def save(self, folder: str | os.PathLike) -> None:
        """Write them into checkpoint ``folder`` (atomically)."""
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors.items()}
        atomic_write(os.path.join(folder, STARTING_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))

    def load(self, folder: str | os.PathLike) -> None:
        """Read them from checkpoint ``folder``, refusing a file that does not match the model's `moving_tensors`."""
        path = os.path.join(folder, STARTING_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`mimic_log_reference_loss='reference_model'` records the verdict of the student's starting weights "
                f"with the reference's, but the checkpoint {folder} holds no {STARTING_WEIGHTS_NAME} (it was written "
                "with another setting). Resume with the setting it was written with, or train from the start."
            )
        loaded = load_file(path)
        live = moving_tensors(self.model, self.layers)
        missing, extra = sorted(set(live) - set(loaded)), sorted(set(loaded) - set(live))
        wrong = sorted(name for name in set(live) & set(loaded) if loaded[name].shape != live[name].shape)
        if missing or extra or wrong:
            raise ValueError(
                f"{path} does not hold the model's trainable tensors outside the mimic layers and its buffers: "
                f"missing {missing[:5]}, unexpected {extra[:5]}, of another shape {wrong[:5]}. Resume with the model "
                "and the mimic layers the checkpoint was written with."
            )
        self._tensors = {name: loaded[name].to(device=live[name].device, dtype=live[name].dtype) for name in live}
