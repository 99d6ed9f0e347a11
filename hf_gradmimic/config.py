"""`MimicConfig`: `TrainingArguments` plus the Grad-Mimic settings, in the style of trl's configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

NORMALIZE_CHOICES = ("step", "micro")
REWEIGHT_SCOPE_CHOICES = ("all", "layer")


def parse_layer_map(mimic_layers: list[str] | dict[str, str] | str | None) -> dict[str, str]:
    """Normalise ``mimic_layers`` to an ordered ``{student_module: reference_module}`` map.

    Accepts a list of module names (same name in both models), a dict for renamed heads, or
    strings of the form ``"student=reference"`` (how the dict travels through the command line).
    """
    if mimic_layers is None:
        return {}
    if isinstance(mimic_layers, str):
        mimic_layers = [part for part in mimic_layers.replace(",", " ").split() if part]
    if isinstance(mimic_layers, dict):
        return {str(student): str(reference) for student, reference in mimic_layers.items()}
    layer_map: dict[str, str] = {}
    for entry in mimic_layers:
        student, _, reference = str(entry).partition("=")
        student = student.strip()
        if not student:
            raise ValueError(f"`mimic_layers` has an empty module name in {entry!r}; expected 'name' or 'student=reference'.")
        layer_map[student] = reference.strip() or student
    return layer_map


@dataclass
class MimicConfig(TrainingArguments):
    r"""
    Configuration for [`MimicTrainer`]: every [`~transformers.TrainingArguments`] field, plus the Grad-Mimic ones.

    Grad-Mimic (Huang, Bilkhu, Sala, Movellan, arXiv 2501.06708) weights sample ``i`` of a batch by

    .. math::
        m_i = \frac{\langle -g_i,\ \theta_{ref} - \theta_t \rangle}{\lVert \theta_{ref} - \theta_t \rVert_2},
        \qquad w_i = \operatorname{softmax}_i(m_i / \tau),

    where ``g_i`` is the sample's loss gradient restricted to the mimic layers. Note the **plus** sign inside the
    softmax: the paper prints ``exp(-m_i/τ)``, a typo; samples whose negative gradient points toward the reference
    get more weight.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["mimic_layers"]

    mimic_reference: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where the reference weights come from: a Hub repo id, a local directory saved with "
            "`save_pretrained`, or a `.safetensors` file. Only the mimic layers' tensors are read. "
            "`MimicTrainer(reference=...)` also takes a model or a `{name: tensor}` dict. The reference must share "
            "the student's coordinates: the same pretrained checkpoint, or a head trained on the same frozen "
            "backbone (see `hf_gradmimic.build_reference`)."
        },
    )
    mimic_reference_revision: Optional[str] = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit sha) of `mimic_reference`."}
    )
    mimic_layers: Optional[list[str]] = field(
        default_factory=lambda: ["classifier"],
        metadata={
            "help": "Student modules (each an `nn.Linear`) whose gradients are compared with the reference, e.g. "
            "`classifier`. For a head renamed in the reference, give `student=reference` (or a dict in Python). "
            "Several layers give one score over their concatenated parameters."
        },
    )
    mimic_temperature: float = field(
        default=0.5,
        metadata={
            "help": "Softmax temperature τ of the weights softmax(m/τ). Small τ concentrates the update on the best "
            "aligned samples; τ → ∞ gives the plain mean gradient. The paper uses 0.5."
        },
    )
    mimic_normalize: str = field(
        default="step",
        metadata={
            "help": "Over which batch the softmax runs. `step`: the whole optimizer-step batch (all gradient "
            "accumulation micro-batches on all processes), so results do not depend on how the batch is split. "
            "`micro`: each micro-batch on each process separately.",
            "choices": list(NORMALIZE_CHOICES),
        },
    )
    mimic_reweight_scope: str = field(
        default="all",
        metadata={
            "help": "Which parameters get the reweighted gradient. `all`: every trainable parameter (backward of "
            "Σ w_i ℓ_i). `layer`: only the mimic layers, the others get the plain mean gradient (the authors' "
            "default).",
            "choices": list(REWEIGHT_SCOPE_CHOICES),
        },
    )
    mimic_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps with uniform weights before reweighting starts (scores are still recorded)."},
    )
    mimic_id_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column of `train_dataset` holding sample ids for the score log. Default: the row index."},
    )
    mimic_record_scores: bool = field(
        default=True,
        metadata={"help": "Write per-sample records of every step to `<output_dir>/mimic_scores/` (Parquet)."},
    )
    mimic_alignment_check: bool = field(
        default=True,
        metadata={
            "help": "At the first step, compare the student's loss with its mimic layers swapped for the reference "
            "and warn when the reference is no better: a sign that it does not share the student's coordinates."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mimic_temperature > 0:
            raise ValueError(f"`mimic_temperature` must be > 0 (the softmax temperature τ); got {self.mimic_temperature}.")
        if self.mimic_normalize not in NORMALIZE_CHOICES:
            raise ValueError(f"`mimic_normalize` must be one of {NORMALIZE_CHOICES}; got {self.mimic_normalize!r}.")
        if self.mimic_reweight_scope not in REWEIGHT_SCOPE_CHOICES:
            raise ValueError(
                f"`mimic_reweight_scope` must be one of {REWEIGHT_SCOPE_CHOICES}; got {self.mimic_reweight_scope!r}."
            )
        if self.mimic_warmup_steps < 0:
            raise ValueError(f"`mimic_warmup_steps` must be >= 0; got {self.mimic_warmup_steps}.")
        if not parse_layer_map(self.mimic_layers):
            raise ValueError("`mimic_layers` is empty: name at least one `nn.Linear` module of the student, e.g. ['classifier'].")

    @property
    def mimic_layer_map(self) -> dict[str, str]:
        """``{student_module: reference_module}`` parsed from `mimic_layers`."""
        return parse_layer_map(self.mimic_layers)
