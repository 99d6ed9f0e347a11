"""`MimicConfig`: `TrainingArguments` plus the Grad-Mimic settings (`MimicArguments`), in the style of trl's configs."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .filter import DEFAULT_METHOD as DEFAULT_FILTER_METHOD
from .filter import METHODS as FILTER_METHOD_CHOICES
from .layer_lookup import parse_layer_map
from .scorers import MODES as MODE_CHOICES
from .scorers import SCORE_TERMS as SCORE_TERMS_CHOICES
from .scorers import SCORERS
from .training.reference_verdict import LOG_REFERENCE_LOSS_CHOICES
from .training.token_weighting import TOKEN_WEIGHTING_CHOICES

NORMALIZE_CHOICES = ("step", "micro")
MIN_TEMPERATURE = 1e-30
REWEIGHT_SCOPE_CHOICES = ("all", "layer")
SCORER_CHOICES = tuple(SCORERS)


_SCALARS = {"float": float, "int": int, "bool": bool, "str": str}
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def annotation_name(annotation: object) -> str:
    """A dataclass field's annotation as its source spelling (``"float"``, ``"Optional[int]"``). With ``from __future__
    import annotations`` it is that string; transformers' ``HfArgumentParser`` replaces it by the resolved type in the
    dataclass's own fields (``field.type = type_hints[...]``), so a type is spelt back here."""
    if isinstance(annotation, str):
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return f"Optional[{getattr(inner, '__name__', str(inner))}]"
    return getattr(annotation, "__name__", str(annotation))


def coerce_field(name: str, value: object, annotation: str) -> object:
    """``value`` as the scalar type ``annotation`` names (``"float"``, ``"Optional[int]"``...): a number or a boolean
    given as a string (a JSON or YAML config) is converted; anything else of the wrong type is a TypeError naming it."""
    optional = annotation.startswith("Optional[")
    kind = _SCALARS.get(annotation[len("Optional[") : -1] if optional else annotation)
    if kind is None or (value is None and optional):
        return value
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):  # True is an int too
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if kind is bool and text in _TRUE + _FALSE:
                return text in _TRUE
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(
        f"`{name}` must be {'a ' + kind.__name__ if kind is not int else 'an int'}"
        f"{' or None' if optional else ''}; got {value!r} ({type(value).__name__})."
    )


@dataclass
class MimicArguments:
    r"""
    The Grad-Mimic settings (every ``mimic_*`` field), defined once for every trainer configuration that has them.

    A dataclass mixin: put it first among the bases of a `TrainingArguments` subclass, as `MimicConfig` (for
    `MimicTrainer`) and `hf_gradmimic.sft.MimicSFTConfig` (trl's `SFTConfig`, for `MimicSFTTrainer`) do::

        @dataclass
        class MyMimicConfig(MimicArguments, MyTrainingArguments):
            _VALID_DICT_FIELDS = MyTrainingArguments._VALID_DICT_FIELDS + ["mimic_layers"]

    Its ``__post_init__`` runs the base configuration's first, then checks the ``mimic_*`` values.

    Grad-Mimic (Huang, Bilkhu, Sala, Movellan, arXiv 2501.06708) weights sample ``i`` of a batch by

    .. math::
        m_i = \frac{\langle -g_i,\ \theta_{ref} - \theta_t \rangle}{\lVert \theta_{ref} - \theta_t \rVert_2},
        \qquad w_i = \operatorname{softmax}_i(m_i / \tau),

    where ``g_i`` is the sample's loss gradient restricted to the mimic layers. Note the **plus** sign inside the
    softmax: the paper prints ``exp(-m_i/τ)``, a typo; samples whose negative gradient points toward the reference
    get more weight.
    """

    mimic_reference: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where the reference weights come from: a Hub repo id, a local directory saved with "
            "`save_pretrained`, a PEFT adapter (folder or repo with adapter_config.json and "
            "adapter_model.safetensors), or a `.safetensors` file. Only the mimic layers' tensors are read. "
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
            "help": "Student modules whose gradients are compared with the reference, e.g. `classifier`: "
            "`nn.Linear`, transformers' `Conv1D` or `nn.Embedding` (hf_gradmimic.ghost lists the supported types). "
            "`lora`: every LoRA A and B matrix of a PEFT model's active adapter (a LoRA layer's path: its own two). "
            "A tensor another module shares (a tied lm_head) counts every use. For a head renamed in the reference, "
            "give `student=reference` (or a dict in Python). Several layers give one score over their "
            "concatenated parameters."
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
    mimic_token_weighting: str = field(
        default="token",
        metadata={
            "help": "How a sample's weight w_i spreads over its supervised tokens (causal LM, token classification). "
            "`token`: every labelled token of sample i weighs w_i, normalised over all tokens of the optimizer step, "
            "as `Trainer` averages its loss over the step's tokens (num_items_in_batch): uniform weights (τ → ∞) "
            "train exactly as `Trainer`. `sample`: each sample's mean token loss weighs w_i, so a short completion "
            "counts as much as a long one. The recorded weights are w_i either way; one target per sample "
            "(sequence classification) makes both the same, and a `per_sample_loss_fn` is weighted per sample.",
            "choices": list(TOKEN_WEIGHTING_CHOICES),
        },
    )
    mimic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps with uniform weights before reweighting starts (scores are still recorded)."
        },
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
    mimic_score_terms: str = field(
        default="full",
        metadata={
            "help": "For a head, m_i splits into the reference's margin on the student's features, −⟨g_i, θ_ref⟩/‖v‖, "
            "plus the student's own, ⟨g_i, θ_t⟩/‖v‖. `full`: both (v = θ_ref − θ_t, the paper). `reference`: only the "
            "reference-margin term, which keeps favouring clean samples when the self term (hard samples, i.e. "
            "mislabeled ones) dominates.",
            "choices": list(SCORE_TERMS_CHOICES),
        },
    )
    mimic_log_reference_loss: str = field(
        default="auto",
        metadata={
            "help": "Record the reference's per-sample loss on the student's current features in the score log "
            "(`reference_loss`, a Stage-2 signal; with it, for a head making classification logits, the reference's "
            "margin, `reference_margin`). 'auto': where it costs one matmul over [batch, classes] logits (a "
            "classification head that makes the logits); 'always': also for a language model's head (an lm_head-sized "
            "matmul, which the 'mimic' scorer's inner product at that head then shares) and other mimic layers (a "
            "no-grad forward with the reference's tensors); 'reference_model': the reference model's own verdict "
            "instead, on the features it was trained on: a no-grad forward of the student's weights as training "
            "found them with the reference's tensors (for full fine-tuning, where the layers below a probed head "
            "move and its verdict on the student's current features drifts; each row is judged once, when first "
            "seen, and its later records repeat it: a forward of the first epoch's rows (of every batch, for a "
            "stream), two float32 per row, and a copy of the trainable weights outside the mimic layers and of the "
            "buffers, saved in each checkpoint); 'never'.",
            "choices": list(LOG_REFERENCE_LOSS_CHOICES),
        },
    )
    mimic_monitor_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimizer steps, log the two terms of the score and the loss of the reference "
            "head on the student's current features (`mimic/monitor_*`), and warn when the self term dominates. "
            "0: at every logging step (`logging_steps`); for a mimic layer that is not the head making the logits "
            "(LoRA matrices, an inner layer), whose monitor runs two no-grad forwards, at most every 50 steps."
        },
    )
    mimic_clean_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column of `train_dataset` with ground-truth clean flags (1 clean, 0 noisy), for simulations and "
            "audits. At each evaluation the filter built from the scores so far is scored against it "
            "(`eval_mimic_filter_*`). The column never reaches the model."
        },
    )
    mimic_filter_method: str = field(
        default=DEFAULT_FILTER_METHOD,
        metadata={
            "help": "Identification used by the running filter metric (see `build_filter`).",
            "choices": list(FILTER_METHOD_CHOICES),
        },
    )
    mimic_scorer: str = field(
        default="mimic",
        metadata={
            "help": "Sample-utility score: `mimic` (Grad-Mimic), `grand` (gradient norm, Paul et al. 2021), `agra` "
            "(gradient cosine with a comparison batch, Sedova et al. 2023), `rho_loss` (reducible loss, Mindermann "
            "et al. 2022), `bayesian` (Deng et al. 2023), `clip_score` (a reference image–text model's image–caption "
            "cosine, DataComp's CLIP-score filtering; `mimic_reference` is that model).",
            "choices": list(SCORER_CHOICES),
        },
    )
    mimic_mode: Optional[str] = field(
        default=None,
        metadata={
            "help": "`reweight`: weights softmax(score/τ) over the batch. `select`: keep the top `mimic_select_ratio` "
            "of each (candidate) batch for the backward, as RHO-LOSS and Bayesian selection do. Default: the "
            "scorer's own (reweight for mimic and agra, select for grand, rho_loss, bayesian and clip_score).",
            "choices": list(MODE_CHOICES),
        },
    )
    mimic_select_ratio: float = field(
        default=0.1,
        metadata={"help": "Fraction of each candidate batch kept in `select` mode (the papers keep 10 percent)."},
    )
    mimic_irreducible_loss_column: Optional[str] = field(
        default=None,
        metadata={"help": "For `rho_loss`: a precomputed irreducible-loss column; otherwise the reference model runs."},
    )
    mimic_zero_shot_column: Optional[str] = field(
        default=None, metadata={"help": "For `bayesian`: a column of zero-shot logits per sample (paid once)."}
    )
    mimic_max_nonfinite_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "A sample with a non-finite loss or score gets weight 0 and no gradient; a step in which no "
            "sample is finite is skipped with a warning (its NaN loss is logged as `Trainer` logs one, under "
            "`logging_nan_inf_filter`). None: training goes on, as with `Trainer`; N: it stops with an error "
            "after N skipped steps in a row."
        },
    )
    mimic_agra_threshold: float = field(
        default=0.0,
        metadata={
            "help": "For `agra`: a sample is excluded from the update when the cosine of its gradient with the "
            "comparison batch's mean gradient is at or below this (the authors use 0)."
        },
    )
    mimic_bayesian_alpha: float = field(
        default=0.5,
        metadata={
            "help": "For `bayesian`: α, the weight of the posterior's expected log-likelihood against the "
            "zero-shot log-probability (1 − α), in [0, 1]."
        },
    )
    mimic_bayesian_num_effective_data: Optional[float] = field(
        default=None,
        metadata={
            "help": "For `bayesian`: N, the effective data size scaling the Laplace precision. Default: the "
            "training set's size."
        },
    )
    mimic_bayesian_prior_precision: float = field(
        default=1.0, metadata={"help": "For `bayesian`: λ, the Gaussian prior's precision (> 0)."}
    )
    mimic_bayesian_momentum: float = field(
        default=0.99,
        metadata={"help": "For `bayesian`: ρ, the moving-average momentum of the Kronecker factors, in [0, 1)."},
    )
    mimic_bayesian_num_samples: int = field(
        default=256, metadata={"help": "For `bayesian`: S, the posterior logit samples per candidate."}
    )
    mimic_bayesian_exact_covariance: bool = field(
        default=False,
        metadata={
            "help": "For `bayesian`: sample the posterior's own covariance U⁻¹ instead of the authors' "
            "(L_UᵀL_U)⁻¹ (equal only for a diagonal U)."
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the TrainingArguments subclass this mixin completes
            parent()
        for name, spec in self.__dataclass_fields__.items():
            # A None where None is the default is allowed, whatever HfArgumentParser made of the Optional[...].
            if name.startswith("mimic_") and not (getattr(self, name) is None and spec.default is None):
                setattr(self, name, coerce_field(name, getattr(self, name), annotation_name(spec.type)))
        if not self.mimic_temperature >= MIN_TEMPERATURE:
            # Below, m/τ overflows float32 for scores of order 1, and the softmax of ±inf is NaN.
            raise ValueError(
                f"`mimic_temperature` must be at least {MIN_TEMPERATURE} (the softmax temperature τ: m/τ must stay "
                f"finite in float32); got {self.mimic_temperature}."
            )
        if self.mimic_warmup_steps < 0:
            raise ValueError(f"`mimic_warmup_steps` must be >= 0; got {self.mimic_warmup_steps}.")
        for name, value, choices in (
            ("mimic_normalize", self.mimic_normalize, NORMALIZE_CHOICES),
            ("mimic_reweight_scope", self.mimic_reweight_scope, REWEIGHT_SCOPE_CHOICES),
            ("mimic_score_terms", self.mimic_score_terms, SCORE_TERMS_CHOICES),
            ("mimic_scorer", self.mimic_scorer, SCORER_CHOICES),
            ("mimic_mode", self.mimic_mode, MODE_CHOICES + (None,)),
            ("mimic_filter_method", self.mimic_filter_method, FILTER_METHOD_CHOICES),
            ("mimic_log_reference_loss", self.mimic_log_reference_loss, LOG_REFERENCE_LOSS_CHOICES),
            ("mimic_token_weighting", self.mimic_token_weighting, TOKEN_WEIGHTING_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {tuple(c for c in choices if c)}; got {value!r}.")
        if not 0 < self.mimic_select_ratio <= 1:
            raise ValueError(f"`mimic_select_ratio` must be in (0, 1]; got {self.mimic_select_ratio}.")
        if self.mimic_max_nonfinite_steps is not None and self.mimic_max_nonfinite_steps < 1:
            raise ValueError(f"`mimic_max_nonfinite_steps` must be >= 1 or None; got {self.mimic_max_nonfinite_steps}.")
        if self.mimic_monitor_steps < 0:
            raise ValueError(f"`mimic_monitor_steps` must be >= 0; got {self.mimic_monitor_steps}.")
        # The scorers' own settings, refused here by their field names (the scorers check their arguments too).
        for name, valid, expected in (
            # a cosine is at most 1: a threshold there or above excludes every sample, and NaN compares false
            ("mimic_agra_threshold", self.mimic_agra_threshold < 1, "a cosine threshold below 1"),
            ("mimic_bayesian_alpha", 0 <= self.mimic_bayesian_alpha <= 1, "in [0, 1]"),
            ("mimic_bayesian_prior_precision", self.mimic_bayesian_prior_precision > 0, "> 0"),
            ("mimic_bayesian_momentum", 0 <= self.mimic_bayesian_momentum < 1, "in [0, 1)"),
            ("mimic_bayesian_num_samples", self.mimic_bayesian_num_samples >= 1, ">= 1"),
            (
                "mimic_bayesian_num_effective_data",
                self.mimic_bayesian_num_effective_data is None or self.mimic_bayesian_num_effective_data > 0,
                "> 0 or None",
            ),
        ):
            if not valid:
                raise ValueError(f"`{name}` must be {expected}; got {getattr(self, name)}.")
        if not parse_layer_map(self.mimic_layers):
            raise ValueError("`mimic_layers` is empty: name at least one module of the student, e.g. ['classifier'].")

    @property
    def mimic_layer_map(self) -> dict[str, str]:
        """``{student_module: reference_module}`` parsed from `mimic_layers`."""
        return parse_layer_map(self.mimic_layers)


@dataclass
class MimicConfig(MimicArguments, TrainingArguments):
    r"""
    Configuration for [`MimicTrainer`]: every [`~transformers.TrainingArguments`] field, plus the Grad-Mimic ones
    (`MimicArguments`).

    Grad-Mimic (Huang, Bilkhu, Sala, Movellan, arXiv 2501.06708) weights sample ``i`` of a batch by
    ``softmax_i(m_i / τ)`` with ``m_i = ⟨−g_i, θ_ref − θ_t⟩ / ‖θ_ref − θ_t‖`` over the mimic layers.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["mimic_layers"]
