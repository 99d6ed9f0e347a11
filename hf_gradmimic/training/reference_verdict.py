"""The reference's verdict on each training sample: its per-sample loss (and margin) on the student's current features.

Grad-Mimic's reference (Huang et al., arXiv 2501.06708) is a model whose mimic layers read the student's own
features (a head probed on them, `hf_gradmimic.build_reference`). Its loss on a sample is the "reference
argmax ≠ label" signal made continuous, a label-noise detector on its own and one of Stage 2's signals
(``reference_loss`` in the score log); for a head making single-label classification logits its margin is
recorded beside it (``reference_margin``: negative where its argmax is another class). Two ways to get them:

- a single mimic layer whose output *is* the logits (a head): the reference's layer applied to the features the
  training forward captured, one matmul (`reference_head_columns`); train mode, as the student's own loss. When
  the head is an ``nn.Linear`` scored along ``v = θ_ref − θ`` (`MimicScorer.scored_direction`), that matmul is
  shared with the score (`SharedHead`): the reference's logits are the student's plus the head's output change
  along ``v``, ``z + dz`` with ``dz = a Vᵀ + v_b``, and the head's ghost inner product is
  ``⟨g_i, v⟩ = Σ_t δ_t · dz_t``, so the score needs no ``[B·T, vocab] × [vocab, H]`` matmul of its own;
- any other mimic layers: a no-grad forward of the student with its mimic tensors swapped for the reference's
  (`swapped_losses`), eval mode; it costs a forward.

Both read the student's *current* features. A third way reads the features the reference was trained on: the
reference model's own verdict, a no-grad forward (eval mode) of the student's weights as training found them
(`hf_gradmimic.training.starting_weights`) with the reference's mimic tensors (`reference_model_columns`). It is
for full fine-tuning, where the layers below a head move and the reference's head on them drifts from the model
the reference was trained as. That model does not change, so its verdict on a sample is the same at every visit
(unless the data are augmented at random): for a dataset of known size it is computed the first time a process
sees each row and kept (two float32 per row), and the later visits record the kept values. It costs a forward of
the first epoch's rows (every visit's, for a stream), those values, and a copy of the trainable weights outside
the mimic layers and of the buffers (`hf_gradmimic.training.starting_weights`).

`ReferenceVerdict` picks one per micro-batch by ``MimicConfig.mimic_log_reference_loss``: ``"auto"`` records it
only where it is one matmul over ``[B, classes]`` logits (a classification head: measured in ``make bench``),
``"always"`` everywhere (a language model's head costs an ``lm_head``-sized matmul, shared with the score where
`SharedHead` applies; other layers a forward), ``"reference_model"`` the reference model's own verdict everywhere,
``"never"`` not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ghost import GhostBatch, UnsupportedLayerError, ghost_rule_for
from ..ghost.linear import LINEAR_RULE, linear_output_along
from ..losses import SampleLoss, classification_margins, logits_of
from .batch import rows_of
from .capture import Capture
from .starting_weights import StartingWeights

__all__ = [
    "LOG_REFERENCE_LOSS_CHOICES",
    "VERDICT_COLUMNS",
    "ReferenceVerdict",
    "SharedHead",
    "reference_head_columns",
    "reference_head_losses",
    "reference_model_columns",
    "shared_head_pass",
    "swapped_losses",
]

LOG_REFERENCE_LOSS_CHOICES = ("auto", "always", "reference_model", "never")

VERDICT_COLUMNS = ("reference_loss", "reference_margin")
"""The score-log columns of the reference's verdict (`hf_gradmimic.score_log_io.OPTIONAL_SCORE_COLUMNS`)."""

MONITOR_CHUNK_LOGITS = 1 << 22
"""At most this many reference logits are alive at once when a head is applied to captured features."""


def _reference_head_logits(
    layers: Any, reference: dict[str, torch.Tensor], capture: Capture, labels: Any
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The reference's head on the features the training forward just captured, without gradients: ``(logits,
    labels)`` a few samples at a time, so that at most `MONITOR_CHUNK_LOGITS` logits are alive (a language model's
    are vocabulary-sized)."""
    ((name, layer),) = layers.layers.items()
    features = capture.activations()[name]
    params = {
        local: reference[f"{name}.{local}"].to(features.dtype) for local, _ in layer.named_parameters(recurse=False)
    }
    with torch.no_grad():
        one = torch.func.functional_call(layer, params, (features[:1],))
        chunk = max(1, MONITOR_CHUNK_LOGITS // max(1, one.numel()))
        for start in range(0, len(features), chunk):
            rows = slice(start, start + chunk)
            yield torch.func.functional_call(layer, params, (features[rows],)), labels[rows]


def reference_head_losses(
    layers: Any, reference: dict[str, torch.Tensor], capture: Capture, labels: Any, sample_loss: SampleLoss
) -> torch.Tensor:
    """Per-sample losses (float32) of the reference's head on the features the training forward just captured,
    without gradients, in chunks (`_reference_head_logits`)."""
    return reference_head_columns(layers, reference, capture, labels, sample_loss)["reference_loss"]


def reference_head_columns(
    layers: Any, reference: dict[str, torch.Tensor], capture: Capture, labels: Any, sample_loss: SampleLoss
) -> dict[str, torch.Tensor | None]:
    """The score log's ``reference_loss`` and ``reference_margin`` of the reference's head on the captured features:
    its per-sample loss, and for single-label classification logits its margin (the given label's logit minus the
    largest other: "reference argmax ≠ label" where it is negative; None for other logits)."""
    losses, margins = [], []
    for logits, rows in _reference_head_logits(layers, reference, capture, labels):
        losses.append(sample_loss.per_sample_losses({"logits": logits}, {"labels": rows}))
        margins.append(classification_margins(logits, rows))
    return _columns(torch.cat(losses), margins)


def _columns(losses: torch.Tensor, margins: list[torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """``{"reference_loss": losses, "reference_margin": margins or None}``, float32, from a verdict's chunks."""
    margin = torch.cat(margins).float() if margins and all(m is not None for m in margins) else None
    return {"reference_loss": losses.float(), "reference_margin": margin}


def shared_head_pass(
    features: torch.Tensor,
    logits: torch.Tensor,
    output_grads: torch.Tensor | None,
    direction: Mapping[str, torch.Tensor],
    labels: Any,
    sample_loss: SampleLoss,
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None]:
    r"""The reference's per-sample losses (and margins) and the head's ``⟨g_i, v⟩``, from one ``[B·T, in] × [in, out]``
    matmul.

    For a linear head ``z = a Wᵀ + b`` and ``v = (V, v_b) = θ_ref − θ``, the reference's logits on the same features
    are ``z + dz`` with ``dz = a Vᵀ + v_b`` (`linear_output_along`), and by the chain rule (Grad-Mimic, arXiv
    2501.06708, the score's inner product at the head)

    .. math:: \langle g_i, v\rangle = \sum_t \delta_{i,t}^\top (V a_{i,t} + v_b) = \sum_t \delta_{i,t} \cdot dz_{i,t}.

    ``dz`` is formed from ``v`` itself, with float32 operands as `hf_gradmimic.ghost.linear_inner_product` forms
    ``⟨g_i, v⟩`` (not as the difference of two logits, which would cancel where ``v`` is small), a few samples at a
    time so that at most `MONITOR_CHUNK_LOGITS` of it are alive. Without gradients.

    Args:
        features: the head's input ``a``, ``[B, ..., in]``.
        logits: its output ``z``, ``[B, ..., out]``.
        output_grads: ``δ = ∂Σℓ/∂z``, shaped as ``logits``; None: the losses only.
        direction: ``{"weight": V, "bias": v_b}`` (a missing part counts as zero).
        labels: the batch's labels.
        sample_loss: the per-sample losses of the logits.

    Returns:
        The score log's columns of the reference (`reference_head_columns`), and ``⟨g_i, v⟩`` float32 ``[B]`` (None
        without ``output_grads``).
    """
    batch = len(features)
    chunk = max(1, MONITOR_CHUNK_LOGITS // max(1, logits[:1].numel()))
    losses, inner, margins = [], [], []
    with torch.no_grad():
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            change = linear_output_along(features[rows], direction.get("weight"), direction.get("bias"))
            if output_grads is not None:
                inner.append(torch.linalg.vecdot(change.flatten(1), output_grads[rows].flatten(1).to(change.dtype)))
            reference_logits = change.add_(logits[rows].detach())  # in place: the chunk's only logits-sized tensor
            losses.append(sample_loss.per_sample_losses({"logits": reference_logits}, {"labels": labels[rows]}))
            margins.append(classification_margins(reference_logits, labels[rows]))
    return _columns(torch.cat(losses), margins), (torch.cat(inner).float() if inner else None)


@dataclass
class SharedHead:
    """The reference's verdict on a linear head whose score direction is ``θ_ref − θ``, put off until δ at the head
    is known (`finish`): then one matmul gives both (`shared_head_pass`). It holds the student's logits until then,
    in `Backward.LOGITS` through the backward that gives δ (one ``[B, T, vocab]`` tensor in the logits' dtype, the
    price of leaving out an ``lm_head``-sized matmul)."""

    name: str
    layer: nn.Module
    features: torch.Tensor
    logits: torch.Tensor
    labels: Any
    direction: Mapping[str, torch.Tensor]
    sample_loss: SampleLoss

    def finish(self, ghost: Any) -> dict[str, torch.Tensor | None]:
        """The reference's columns of the score log (`reference_head_columns`; float32, detached); the head's
        ``⟨g_i, v⟩`` handed to ``ghost`` (`GhostBatch.remember_inner_product`) when the head is its only use. Frees
        the logits."""
        head_use = isinstance(ghost, GhostBatch) and len(ghost.uses) == 1 and ghost.uses[0].module is self.layer
        # the head's tensors as the ghost keys them, so that the scorer's lookup finds exactly these
        keys = (
            ghost.uses[0].tensor_keys
            if head_use
            else {own: f"{self.name}.{own}" for own, _ in self.layer.named_parameters(recurse=False)}
        )
        local = {own: self.direction[key] for own, key in keys.items() if key in self.direction}
        grads = ghost.uses[0].output_grads if head_use else None
        columns, inner = shared_head_pass(self.features, self.logits, grads, local, self.labels, self.sample_loss)
        if inner is not None:
            ghost.remember_inner_product(0, self.direction, inner)
        self.logits = self.features = None
        return columns


def swapped_losses(
    model: torch.nn.Module,
    layers: Any,
    reference: dict[str, torch.Tensor],
    model_inputs: dict[str, Any],
    inputs: dict[str, Any],
    sample_loss: SampleLoss,
    *,
    with_own: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-sample losses of the student (unless ``with_own`` is False: None), and of the student with its mimic
    tensors swapped for the reference's (so the reference reads the student's current features), both in eval
    mode and without gradients."""
    with _evaluating(model):
        own = sample_loss.per_sample_losses(model(**model_inputs), inputs) if with_own else None
        outputs = _swapped_forward(model, _mimic_tensors(layers, reference), model_inputs)
        with_reference = sample_loss.per_sample_losses(outputs, inputs)
    return own, with_reference


def reference_model_columns(
    model: torch.nn.Module,
    layers: Any,
    reference: dict[str, torch.Tensor],
    starting: Mapping[str, torch.Tensor],
    model_inputs: dict[str, Any],
    inputs: dict[str, Any],
    labels: Any,
    sample_loss: SampleLoss,
) -> dict[str, torch.Tensor | None]:
    """The score log's ``reference_loss`` and ``reference_margin`` of the reference model itself: the student's
    ``starting`` weights (`hf_gradmimic.training.starting_weights`) with the reference's mimic tensors, in eval mode
    and without gradients. For a linear-probe reference that is the model its head was trained on (the frozen
    starting features), whatever training has done to the layers below it since."""
    with _evaluating(model):
        outputs = _swapped_forward(model, {**starting, **_mimic_tensors(layers, reference)}, model_inputs)
        losses = sample_loss.per_sample_losses(outputs, inputs)
        margins = classification_margins(logits_of(outputs), labels)
    return _columns(losses, [margins])


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _mimic_tensors(layers: Any, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's mimic tensors in the student's dtypes, keyed by parameter name on the unwrapped model."""
    return {key: reference[key].to(param.dtype) for key, param in layers.tensors.items()}


def _swapped_forward(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], model_inputs: dict[str, Any]) -> Any:
    """The model's forward with ``tensors`` in place of its own (tied uses follow: tie_weights)."""
    return torch.func.functional_call(model, dict(tensors), args=(), kwargs=model_inputs, strict=False)


def _is_linear(layer: nn.Module) -> bool:
    """Whether the ghost maths reads ``layer`` as an ``nn.Linear`` (a subclass keeping its ``forward``)."""
    try:
        return ghost_rule_for(layer) is LINEAR_RULE
    except UnsupportedLayerError:
        return False


class ReferenceVerdict:
    """The reference's per-sample loss of each training micro-batch, for the score log's ``reference_loss``.

    Args:
        setting: ``"auto"``, ``"always"``, ``"reference_model"`` or ``"never"``
            (`MimicConfig.mimic_log_reference_loss`).
        reference: returns the reference's mimic tensors on the training device (the scorer's).
        layers: the student's `MimicLayers`.
        model: the unwrapped student.
        sample_loss: the trainer's per-sample losses (`hf_gradmimic.losses.SampleLoss`).
        scored_direction: ``step -> v`` keyed by mimic tensor when the scorer's inner product is along
            ``v = θ_ref − θ`` (`MimicScorer.scored_direction`), else None: then a head's verdict shares its matmul
            with the score (`shared_head`).
        dataset_size: the training set's rows (None for a stream): ``"reference_model"`` computes its verdict once
            per row and process, and keeps it for the row's later visits.
    """

    def __init__(
        self,
        setting: str,
        reference: Callable[[], dict[str, torch.Tensor]],
        layers: Any,
        model: torch.nn.Module,
        sample_loss: SampleLoss,
        scored_direction: Callable[[int], Mapping[str, torch.Tensor] | None] | None = None,
        dataset_size: int | None = None,
    ) -> None:
        if setting not in LOG_REFERENCE_LOSS_CHOICES:
            raise ValueError(
                f"`mimic_log_reference_loss` must be one of {LOG_REFERENCE_LOSS_CHOICES}; got {setting!r}."
            )
        self.setting = setting
        self.reference = reference
        self.layers = layers
        self.model = model
        self.sample_loss = sample_loss
        self.scored_direction = scored_direction
        # the weights the reference model is made of besides its own tensors: taken or loaded when training starts
        self.starting = StartingWeights(model, layers) if setting == "reference_model" else None
        # the reference model's verdict on each row this process has judged (it does not change between visits)
        self._judged = np.zeros(dataset_size, dtype=bool) if self.starting is not None and dataset_size else None
        self._kept: dict[str, np.ndarray | None] = dict.fromkeys(VERDICT_COLUMNS)

    def on_head(self, capture: Capture, logits: torch.Tensor | None, labels: Any) -> bool:
        """Whether the verdict is recorded for this micro-batch as the reference's head on the captured features."""
        if self.setting in ("never", "reference_model") or labels is None:
            return False
        head = logits is not None and capture.only_output() is logits
        return head and (self.setting == "always" or logits.dim() == 2)

    def shared_head(self, capture: Capture, logits: torch.Tensor | None, labels: Any, step: int) -> SharedHead | None:
        """The verdict put off until δ is known, to share its matmul with the score (`SharedHead`), when it is one on
        a linear head scored along ``θ_ref − θ``; None otherwise (then `losses`, right away)."""
        if self.scored_direction is None or not self.on_head(capture, logits, labels):
            return None
        ((name, layer),) = self.layers.layers.items()
        if not _is_linear(layer):  # ref = z + dz needs a layer affine in its parameters, as nn.Linear
            return None
        direction = self.scored_direction(step)
        if direction is None:
            return None
        features = capture.activations()[name]
        return SharedHead(name, layer, features, logits.detach(), labels, direction, self.sample_loss)

    def columns(
        self,
        capture: Capture,
        logits: torch.Tensor | None,
        labels: Any,
        model_inputs: dict[str, Any],
        inputs: dict[str, Any],
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The score log's ``reference_loss`` and ``reference_margin`` (float32, detached; None where the setting
        leaves them out, and the margin where the verdict is not a head's single-label classification logits).
        ``rows``: the micro-batch's dataset rows (``"reference_model"`` judges each row once and reads it back).

        Call right after the training forward, while the captured features are alive."""
        if self.setting == "never" or labels is None:
            return dict.fromkeys(VERDICT_COLUMNS)
        if self.starting is not None:
            return self._reference_model_columns(model_inputs, inputs, labels, rows)
        if self.on_head(capture, logits, labels):
            return reference_head_columns(self.layers, self.reference(), capture, labels, self.sample_loss)
        if self.setting == "always":  # a forward with the reference's tensors; its margin is not recorded
            _, with_reference = swapped_losses(
                self.model, self.layers, self.reference(), model_inputs, inputs, self.sample_loss, with_own=False
            )
            return {"reference_loss": with_reference.float(), "reference_margin": None}
        return dict.fromkeys(VERDICT_COLUMNS)

    def _reference_model_columns(
        self, model_inputs: dict[str, Any], inputs: dict[str, Any], labels: Any, rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        """`reference_model_columns` of the micro-batch: computed for the rows not judged before (all of them for a
        stream), kept, and read back for every row."""
        if self._judged is None or rows is None:
            return self._reference_model(model_inputs, inputs, labels)
        rows = np.asarray(rows)
        fresh = ~self._judged[rows]
        if fresh.any():
            batch = len(labels)
            positions = torch.from_numpy(np.flatnonzero(fresh))
            judged = (
                self._reference_model(model_inputs, inputs, labels)
                if fresh.all()
                else self._reference_model(
                    rows_of(model_inputs, positions, batch),
                    rows_of(inputs, positions, batch),
                    labels[positions.to(labels.device)],
                )
            )
            for name, values in judged.items():
                if values is None:
                    continue
                if self._kept[name] is None:
                    self._kept[name] = np.full(len(self._judged), np.nan, dtype=np.float32)
                self._kept[name][rows[fresh]] = values.cpu().numpy()
            self._judged[rows[fresh]] = True
        device = labels.device
        return {
            name: None if kept is None else torch.from_numpy(kept[rows]).to(device) for name, kept in self._kept.items()
        }

    def _reference_model(
        self, model_inputs: dict[str, Any], inputs: dict[str, Any], labels: Any
    ) -> dict[str, torch.Tensor | None]:
        return reference_model_columns(
            self.model,
            self.layers,
            self.reference(),
            self.starting.tensors,
            model_inputs,
            inputs,
            labels,
            self.sample_loss,
        )
