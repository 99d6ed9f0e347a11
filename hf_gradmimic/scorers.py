"""Sample-utility scorers: Grad-Mimic and its rivals behind one interface (issue #6).

Each method is a few small pure functions with its formula in the docstring, as in Opacus's
``grad_sample/``, plus a thin `SampleScorer` subclass that reads what it needs from a
`ScoreContext` (what `MimicTrainer` has at hand after its hooked forward) and returns one float32
score per sample, **higher = more useful**. Scores become per-sample loss weights through
`weights_from_scores` in one of two modes:

- ``"reweight"``: ``w = softmax(score / τ)`` over the batch (Grad-Mimic's own update);
- ``"select"``: keep the top ``ratio`` of the candidate batch, ``w = 1/k`` on those ``k`` and 0
  elsewhere (the online batch selection of RHO-LOSS and Bayesian data selection).

AGRA is a filter, not a ranking: in ``"reweight"`` mode it gives weight 0 to the samples whose
cosine is at or below its threshold and uniform weight to the rest (its update is the plain mean
loss of the kept samples). `check_mode` refuses the combinations that have no meaning
(see each scorer's ``refused_modes``).

Registry: ``SCORERS[name]`` and ``get_scorer(name, **kwargs)``.

===========  ==================  =================  ===========================================
name         needs output grads  modes              reads from the context
===========  ==================  =================  ===========================================
mimic        yes                 reweight, select   direction, direction_norm
grand        yes                 select, reweight   (layers only)
agra         yes                 reweight (filter)  comparison_grad
rho_loss     no                  select, reweight   irreducible_losses | reference_logits | model
bayesian     no                  select             logits, labels, features, zero_shot_log_probs
===========  ==================  =================  ===========================================

Every ghost quantity (``mimic``, ``grand``, ``agra``) needs ``output_grads[name] = ∂(Σ_i ℓ_i)/∂z``
at each chosen layer's output ``z``: the gradient of the **sum** of per-sample losses, so that row
``i`` is ``∂ℓ_i/∂z_i``. All maths runs in float32 (float64 for the Bayesian Cholesky factors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .ghost import linear_inner_product, linear_sq_norm
from .losses import logits_of, sequence_classification_loss, token_loss

MODES: tuple[str, ...] = ("reweight", "select")

AGRA_EPS = 1e-6
"""Added to ``‖g_i‖·‖G‖`` in the AGRA cosine, as the authors' code does: a zero gradient scores 0."""

ComparisonGrad = Mapping[str, torch.Tensor]
"""``{"layer.weight": G_w, "layer.bias": G_b}``: a dense gradient over the chosen layers."""


# ---------------------------------------------------------------------------------------------
# Context


@dataclass
class ScoreContext:
    """What the trainer has for one (micro-)batch of ``B`` samples; each scorer reads a few fields.

    Args:
        losses: per-sample losses ``ℓ_i``, float32 ``[B]``.
        logits: the student's logits (``[B, C]`` for classification).
        labels: the labels of the batch.
        layers: ``{name: nn.Linear}`` of the chosen ("mimic") layers, in a fixed order. Only used to
            know which layers have a bias.
        activations: ``{name: a}``, each layer's input ``[B, ..., in]`` (detached).
        outputs: ``{name: z}``, each layer's output (may still carry the graph).
        output_grads: ``{name: δ}``, ``δ = ∂(Σ_i ℓ_i)/∂z`` ``[B, ..., out]``.
        direction: Grad-Mimic's ``v = θ_ref − θ_t`` keyed ``"name.weight"`` / ``"name.bias"``.
        direction_norm: ``‖v‖₂`` over all of ``direction``.
        reference_logits: a reference (irreducible-loss) model's logits on the batch (RHO-LOSS).
        irreducible_losses: precomputed irreducible losses ``[B]``, e.g. an ``irreducible_loss``
            dataset column (RHO-LOSS).
        features: ``φ``, the input of the classification head ``[B, d]`` (Bayesian selection); with
            the head among the chosen layers this is ``activations[head]``.
        zero_shot_log_probs: ``log p_zs(c | x)`` ``[B, C]`` from `hf_gradmimic.zero_shot` (Bayesian).
        comparison_grad: AGRA's mean gradient of a comparison batch (`comparison_gradient`), or a
            zero-argument callable returning it (so it is only computed when a scorer asks).
        inputs: the model inputs of the batch, for scorers that run another model on it.
    """

    losses: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    layers: Mapping[str, nn.Linear] = field(default_factory=dict)
    activations: Mapping[str, torch.Tensor] = field(default_factory=dict)
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    output_grads: Mapping[str, torch.Tensor] | None = None
    direction: Mapping[str, torch.Tensor] | None = None
    direction_norm: torch.Tensor | float | None = None
    reference_logits: torch.Tensor | None = None
    irreducible_losses: torch.Tensor | None = None
    features: torch.Tensor | None = None
    zero_shot_log_probs: torch.Tensor | None = None
    comparison_grad: ComparisonGrad | Callable[[], ComparisonGrad] | None = None
    inputs: Mapping[str, Any] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.losses.shape[0])

    def require(self, name: str, scorer: str) -> Any:
        """The field ``name``, or a ValueError saying which scorer needs it."""
        value = getattr(self, name)
        if value is None or (isinstance(value, Mapping) and not value):
            raise ValueError(f"The {scorer!r} scorer needs `ScoreContext.{name}`, which is not set.")
        return value


def _bias_of(layers: Mapping[str, nn.Linear], name: str) -> bool:
    return getattr(layers[name], "bias", None) is not None


# ---------------------------------------------------------------------------------------------
# Grad-Mimic


def mimic_scores(
    layers: Mapping[str, nn.Linear],
    activations: Mapping[str, torch.Tensor],
    output_grads: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    direction_norm: torch.Tensor | float,
) -> torch.Tensor:
    r"""Grad-Mimic score ``m_i = ⟨−g_i, v⟩ / ‖v‖₂`` (Huang et al., arXiv 2501.06708, Alg. 1).

    .. math:: m_i = -\frac{1}{\lVert v\rVert}\sum_{l}\Big(\sum_t \delta^l_{i,t}{}^\top V_l a^l_{i,t}
              + \big\langle \textstyle\sum_t \delta^l_{i,t},\ v^l_b\big\rangle\Big)

    with ``v = θ_ref − θ_t``; NaN for every sample when ``‖v‖ = 0`` (the caller falls back).
    """
    inner = _sum_over_layers(
        linear_inner_product(
            activations[name],
            output_grads[name],
            direction[f"{name}.weight"],
            direction.get(f"{name}.bias") if _bias_of(layers, name) else None,
        )
        for name in layers
    )
    return -inner / direction_norm


# ---------------------------------------------------------------------------------------------
# GraNd


def grand_scores(
    layers: Mapping[str, nn.Linear],
    activations: Mapping[str, torch.Tensor],
    output_grads: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    r"""GraNd: per-sample gradient norm over the chosen layers (Paul, Ganguli, Dziugaite,
    "Deep Learning on a Data Diet", NeurIPS 2021).

    .. math:: \mathrm{GraNd}_i = \Big(\sum_l \lVert g^l_i\rVert^2\Big)^{1/2},\qquad
              \lVert g^l_i\rVert^2 = \langle \delta_i\delta_i^\top, a_i a_i^\top\rangle
              + \Big\lVert \textstyle\sum_t \delta_{i,t}\Big\rVert^2

    (``‖δ_i‖²‖a_i‖²`` for 2-D inputs; the bias term only for layers with a bias), from
    `ghost.linear_sq_norm`: no per-sample gradient is built. The paper averages the norm over
    several initialisations early in training and prunes the low scores once; here it is the
    current model's norm, used online (keep the high scores).
    """
    sq_norm = _sum_over_layers(
        linear_sq_norm(activations[name], output_grads[name], with_bias=_bias_of(layers, name)) for name in layers
    )
    # The Gram form is a sum of products that can round to a tiny negative number.
    return sq_norm.clamp_min(0.0).sqrt()


# ---------------------------------------------------------------------------------------------
# AGRA


def comparison_gradient(
    layers: Mapping[str, nn.Linear],
    activations: Mapping[str, torch.Tensor],
    output_grads: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    r"""Mean gradient of a comparison batch over the chosen layers (AGRA's aggregated gradient).

    .. math:: G^l_w = \frac{1}{B_c}\sum_i\sum_t \delta^l_{i,t} a^l_{i,t}{}^\top,\qquad
              G^l_b = \frac{1}{B_c}\sum_i\sum_t \delta^l_{i,t}

    One matmul per layer over the whole batch: an aggregate, not per-sample gradients. With
    ``output_grads`` of the summed loss this is the gradient of the comparison batch's mean loss.

    Returns:
        ``{"name.weight": [out, in], "name.bias": [out]}`` (bias only for layers with one), float32.
    """
    gradient: dict[str, torch.Tensor] = {}
    for name in layers:
        a = activations[name].float()
        delta = output_grads[name].float()
        batch_size = a.shape[0]
        a = a.reshape(-1, a.shape[-1])
        delta = delta.reshape(-1, delta.shape[-1])
        gradient[f"{name}.weight"] = delta.t() @ a / batch_size
        if _bias_of(layers, name):
            gradient[f"{name}.bias"] = delta.sum(dim=0) / batch_size
    return gradient


def agra_cosine(
    layers: Mapping[str, nn.Linear],
    activations: Mapping[str, torch.Tensor],
    output_grads: Mapping[str, torch.Tensor],
    comparison: ComparisonGrad,
) -> torch.Tensor:
    r"""AGRA score: cosine of each sample's gradient with a comparison batch's mean gradient
    (Sedova, Zellinger, Roth, "Learning with noisy labels by adaptive gradient-based outlier
    removal", ECML PKDD 2023).

    .. math:: \cos_i = \frac{\langle g_i, G\rangle}{\lVert g_i\rVert\,\lVert G\rVert + 10^{-6}}

    over the weights and biases of all chosen layers flattened together. ``⟨g_i, G⟩`` is a ghost
    inner product with direction ``G`` and ``‖g_i‖`` the ghost norm (as in `grand_scores`); the
    ``10⁻⁶`` is the authors' and makes a zero gradient score 0.
    """
    inner = _sum_over_layers(
        linear_inner_product(
            activations[name],
            output_grads[name],
            comparison[f"{name}.weight"],
            comparison[f"{name}.bias"] if _bias_of(layers, name) else None,
        )
        for name in layers
    )
    sample_norm = grand_scores(layers, activations, output_grads)
    keys = [f"{name}.weight" for name in layers] + [f"{name}.bias" for name in layers if _bias_of(layers, name)]
    comparison_norm = torch.sqrt(sum(comparison[key].float().square().sum() for key in keys))
    return inner / (sample_norm * comparison_norm + AGRA_EPS)


# ---------------------------------------------------------------------------------------------
# RHO-LOSS


def reference_losses(
    reference_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, shift_labels: bool = False
) -> torch.Tensor:
    """Per-sample losses of a reference model's logits, with the student's loss conventions
    (`hf_gradmimic.losses`: cross entropy for ``[B, C]``, mean token loss for ``[B, T, V]``)."""
    if reference_logits.dim() == 3:
        return token_loss(reference_logits, labels, label_smoothing, shift=shift_labels)
    return sequence_classification_loss(reference_logits, labels, label_smoothing)


def reducible_loss(losses: torch.Tensor, irreducible_losses: torch.Tensor) -> torch.Tensor:
    r"""RHO-LOSS score (Mindermann et al., "Prioritized Training on Points that are Learnable,
    Worth Learning, and Not Yet Learnt", ICML 2022):

    .. math:: \mathrm{RHO}_i = L[y_i \mid x_i; \mathcal D_t] - L[y_i \mid x_i; \mathcal D_{ho}]

    the student's loss minus the irreducible loss of a model trained on holdout data.
    """
    return losses.float() - irreducible_losses.to(losses.device).float()


# ---------------------------------------------------------------------------------------------
# Bayesian data selection


def ce_logit_grad(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``g = softmax(z) − onehot(y)``, the cross-entropy gradient at the logits ``[B, C]``."""
    logits = logits.float()
    return torch.softmax(logits, dim=-1) - F.one_hot(labels.long(), logits.shape[-1]).to(logits.dtype)


def moving_average_factor(
    factor: torch.Tensor | None, rows: torch.Tensor, momentum: float
) -> torch.Tensor:
    r"""One moving-average step of a Kronecker factor from a batch of rows ``r`` ``[b, k]``:

    .. math:: F \leftarrow \rho F + (1-\rho)\,\frac{r^\top r}{b},\qquad
              F \leftarrow \frac{r^\top r}{b} \text{ on the first update (factor is None)}
    """
    rows = rows.double()
    batch_cov = rows.t() @ rows / rows.shape[0]
    if factor is None:
        return batch_cov
    return momentum * factor + (1.0 - momentum) * batch_cov


def _safe_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor, with growing diagonal jitter if the matrix is only semi-definite."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    base = float(matrix.diagonal().abs().mean().clamp_min(1.0))
    for jitter in [0.0] + [base * 10.0 ** power for power in range(-8, 2)]:
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if int(info) == 0:
            return factor
    raise torch.linalg.LinAlgError("The Laplace precision is not positive definite, even with diagonal jitter.")


def laplace_logit_samples(
    logits: torch.Tensor,
    features: torch.Tensor,
    feature_factor: torch.Tensor,
    grad_factor: torch.Tensor,
    num_effective_data: float,
    prior_precision: float,
    noise: torch.Tensor,
    exact_covariance: bool = False,
) -> torch.Tensor:
    r"""Logit samples from a last-layer Kronecker-factored Laplace posterior (Deng, Cui, Zhu 2023).

    With feature factor ``A`` [d, d] and logit-gradient factor ``G`` [C, C]:

    .. math:: V = \sqrt N A + \sqrt\lambda I,\quad U = \sqrt N G + \sqrt\lambda I = L_U L_U^\top,\quad
              s_i^2 = \max(\varphi_i^\top V^{-1}\varphi_i,\ 10^{-6}),\quad
              z_{i,s} = z_i + s_i\,\varepsilon_{i,s} L_U^{-\top}

    with ``ε`` a standard-normal row vector, exactly as the authors' code (``randn @ L_U.T.inverse()``)
    and this project's spec write it. The clamp is the authors' too. Note the covariance: a row
    ``ε L_U^{-T}`` has covariance ``L_U^{-1} L_U^{-T} = (L_U^T L_U)^{-1}``, which equals ``U⁻¹`` only
    for diagonal ``U``, whereas the head's matrix-normal posterior ``MN(W, U⁻¹, V⁻¹)`` pushed through
    ``φ_i`` gives ``z_i ~ N(Wφ_i, s_i² U⁻¹)``. ``exact_covariance=True`` samples that instead,
    ``z_{i,s} = z_i + s_i ε_{i,s} L_U^{-1}``.

    Args:
        logits: ``z`` ``[B, C]``. features: ``φ`` ``[B, d]``.
        noise: ``ε`` ``[B, S, C]`` (or ``[S, C]``, shared by the batch), standard normal.
        exact_covariance: False for the authors' (and the spec's) ``ε L_U^{-T}``.

    Returns:
        ``[B, S, C]`` float64.
    """
    logits, features = logits.double(), features.double()
    scale_n, scale_prior = math.sqrt(num_effective_data), math.sqrt(prior_precision)
    eye_d = torch.eye(feature_factor.shape[0], dtype=torch.float64, device=features.device)
    eye_c = torch.eye(grad_factor.shape[0], dtype=torch.float64, device=features.device)
    chol_v = _safe_cholesky(scale_n * feature_factor.double() + scale_prior * eye_d)
    chol_u = _safe_cholesky(scale_n * grad_factor.double() + scale_prior * eye_c)
    # s_i² = φ_iᵀ V⁻¹ φ_i through a solve rather than V⁻¹ itself.
    solved = torch.cholesky_solve(features.t(), chol_v)  # [d, B]
    scales = (features.t() * solved).sum(dim=0).clamp_min(1e-6).sqrt()  # [B]
    chol_u_inv = torch.linalg.solve_triangular(chol_u, eye_c, upper=False)  # L_U^{-1}
    transform = chol_u_inv if exact_covariance else chol_u_inv.t()
    return logits[:, None, :] + scales[:, None, None] * (noise.to(features.device).double() @ transform)


def bayesian_selection_score(
    logit_samples: torch.Tensor,
    labels: torch.Tensor,
    zero_shot_log_probs: torch.Tensor,
    alpha: float = 0.5,
) -> torch.Tensor:
    r"""Bayesian data selection objective (Deng, Cui, Zhu, "Towards Accelerated Model Training via
    Bayesian Data Selection", NeurIPS 2023, arXiv 2308.10544), as their public code computes it:

    .. math:: \mathrm{score}_i = \alpha\,\frac1S\sum_s \log \mathrm{softmax}(z_{i,s})_{y_i}
              + (1-\alpha)\log p_{zs}(y_i\mid x_i)
              - \log \frac1S\sum_s \mathrm{softmax}(z_{i,s})_{y_i}

    Args:
        logit_samples: ``z_{i,s}`` ``[B, S, C]`` (`laplace_logit_samples`).
        labels: ``y`` ``[B]``.
        zero_shot_log_probs: ``log p_zs(· | x)`` ``[B, C]``.
    """
    log_probs = torch.log_softmax(logit_samples.double(), dim=-1)  # [B, S, C]
    labels = labels.long().to(log_probs.device)
    index = labels.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
    label_log_probs = log_probs.gather(-1, index).squeeze(-1)  # [B, S]
    expected_log_lik = label_log_probs.mean(dim=1)
    # log of the mean probability, in log space for stability.
    log_predictive = torch.logsumexp(label_log_probs, dim=1) - math.log(label_log_probs.shape[1])
    zero_shot = zero_shot_log_probs.double().to(log_probs.device).gather(-1, labels.view(-1, 1)).squeeze(-1)
    return (alpha * expected_log_lik + (1.0 - alpha) * zero_shot - log_predictive).float()


# ---------------------------------------------------------------------------------------------
# Weights


def num_selected(batch_size: int, ratio: float) -> int:
    """``k = max(1, ⌊ratio · B⌋)`` (the authors' ``int(B * select_rate)``, at least one)."""
    return max(1, int(math.floor(ratio * batch_size + 1e-9)))


def weights_from_scores(
    scores: torch.Tensor,
    mode: str,
    temperature: float = 1.0,
    ratio: float = 0.1,
    threshold: float | None = None,
) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (summing to 1, or all 0 for an empty filter) from scores.

    - ``"reweight"``: ``softmax(scores / temperature)``; a batch with a non-finite score gets
      uniform weights (as `MimicTrainer` does). With ``threshold`` set (a filter, AGRA): weight 0
      for ``score ≤ threshold`` (and NaN), uniform over the rest, and all zeros if none is kept:
      the caller should then skip the batch, as AGRA does.
    - ``"select"``: the ``k = max(1, ⌊ratio·B⌋)`` highest scores get ``1/k``, the rest 0. NaN
      ranks last; ties go to the earlier sample.

    This is the softmax of one micro-batch; a trainer normalising over a whole optimizer step
    uses ``scores / temperature`` as its online-softmax logits instead.
    """
    _check_mode_name(mode)
    scores = scores.detach().float()
    if mode == "reweight":
        if threshold is not None:
            kept = scores > threshold  # NaN compares False: excluded
            return kept.float() / kept.sum().clamp_min(1)
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0; got {temperature}.")
        if not torch.isfinite(scores).all():
            return torch.full_like(scores, 1.0 / scores.numel())
        return torch.softmax(scores / temperature, dim=0)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1]; got {ratio}.")
    k = num_selected(scores.numel(), ratio)
    ranked = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    order = torch.sort(ranked, descending=True, stable=True).indices
    weights = torch.zeros_like(scores)
    weights[order[:k]] = 1.0 / k
    return weights


def _check_mode_name(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid modes: {', '.join(MODES)}.")


def check_mode(scorer: "SampleScorer", mode: str) -> None:
    """Raise a ValueError if ``scorer`` cannot run in ``mode``, saying why."""
    _check_mode_name(mode)
    if mode not in scorer.supports_modes:
        reason = scorer.refused_modes.get(mode, "")
        raise ValueError(
            f"The {scorer.name!r} scorer does not support mode {mode!r}{': ' + reason if reason else ''}. "
            f"Supported: {', '.join(sorted(scorer.supports_modes))}."
        )


# ---------------------------------------------------------------------------------------------
# Scorer interface


class SampleScorer:
    """One sample-utility method: ``score(ctx) -> Tensor[B]`` (higher = more useful).

    Class attributes tell the trainer what to prepare:

    - ``needs_output_grads``: run ``autograd.grad(Σℓ, layer outputs)`` before scoring;
    - ``requires``: the `ScoreContext` fields `score` reads;
    - ``supports_modes`` / ``default_mode``; ``refused_modes`` says why a mode is refused.

    `observe` is called with the final weights after each scored batch; stateful scorers
    (`BayesianScorer`) update there. `state_dict` / `load_state_dict` let a trainer checkpoint them.
    """

    name: ClassVar[str] = ""
    needs_output_grads: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    supports_modes: ClassVar[frozenset[str]] = frozenset(MODES)
    default_mode: ClassVar[str] = "reweight"
    refused_modes: ClassVar[dict[str, str]] = {}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def weights(
        self, scores: torch.Tensor, mode: str | None = None, temperature: float = 1.0, ratio: float = 0.1
    ) -> torch.Tensor:
        """`weights_from_scores` after `check_mode` (``mode`` defaults to ``default_mode``)."""
        mode = mode or self.default_mode
        check_mode(self, mode)
        return weights_from_scores(scores, mode, temperature=temperature, ratio=ratio)

    def observe(self, ctx: ScoreContext, weights: torch.Tensor) -> None:
        """Called after the batch is weighted; stateless scorers ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def _ghost_inputs(self, ctx: ScoreContext) -> tuple[Mapping[str, nn.Linear], Mapping, Mapping]:
        layers = ctx.require("layers", self.name)
        activations = ctx.require("activations", self.name)
        output_grads = ctx.require("output_grads", self.name)
        missing = [name for name in layers if name not in activations or name not in output_grads]
        if missing:
            raise ValueError(f"The {self.name!r} scorer has no activation or output gradient for layer(s) {missing}.")
        return layers, activations, output_grads

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MimicScorer(SampleScorer):
    """Grad-Mimic (arXiv 2501.06708): ``m_i = ⟨−g_i, θ_ref − θ_t⟩ / ‖θ_ref − θ_t‖`` (`mimic_scores`).

    The paper reweights (``softmax(m/τ)``); ``"select"`` keeps the top ``ratio`` by ``m``.
    """

    name = "mimic"
    needs_output_grads = True
    requires = ("layers", "activations", "output_grads", "direction", "direction_norm")
    default_mode = "reweight"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layers, activations, output_grads = self._ghost_inputs(ctx)
        return mimic_scores(
            layers, activations, output_grads, ctx.require("direction", self.name), ctx.require("direction_norm", self.name)
        )


class GrandScorer(SampleScorer):
    """GraNd (Paul et al. 2021): per-sample gradient norm over the chosen layers (`grand_scores`).

    ``"select"`` keeps the highest norms (the paper prunes the lowest); ``"reweight"`` is a soft
    variant ``softmax(‖g_i‖/τ)`` that is not in the paper.
    """

    name = "grand"
    needs_output_grads = True
    requires = ("layers", "activations", "output_grads")
    default_mode = "select"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return grand_scores(*self._ghost_inputs(ctx))


class AgraScorer(SampleScorer):
    """AGRA (Sedova et al., ECML PKDD 2023): cosine with a comparison batch's mean gradient
    (`agra_cosine`); samples with ``cos ≤ threshold`` are excluded from the update.

    AGRA's decision is absolute (the number kept varies per batch), so its only mode is
    ``"reweight"`` as a filter: weight 0 below the threshold, uniform over the kept samples (its
    update is their plain mean loss). ``ctx.comparison_grad`` is `comparison_gradient` of a batch
    drawn independently from the training set (or a callable producing it).
    """

    name = "agra"
    needs_output_grads = True
    requires = ("layers", "activations", "output_grads", "comparison_grad")
    supports_modes = frozenset({"reweight"})
    default_mode = "reweight"
    refused_modes = {
        "select": "AGRA is a filter with an absolute threshold (a sample is kept when its cosine with the "
        "comparison gradient exceeds it), not a ranking; use mode='reweight', which excludes the samples at "
        "or below the threshold and weights the rest uniformly",
    }

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layers, activations, output_grads = self._ghost_inputs(ctx)
        comparison = ctx.require("comparison_grad", self.name)
        if callable(comparison):
            comparison = comparison()
        return agra_cosine(layers, activations, output_grads, comparison)

    def weights(
        self, scores: torch.Tensor, mode: str | None = None, temperature: float = 1.0, ratio: float = 0.1
    ) -> torch.Tensor:
        mode = mode or self.default_mode
        check_mode(self, mode)
        return weights_from_scores(scores, mode, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"AgraScorer(threshold={self.threshold})"


class RhoLossScorer(SampleScorer):
    """RHO-LOSS (Mindermann et al., ICML 2022): reducible loss ``ℓ_i − ℓ^IL_i`` (`reducible_loss`).

    The irreducible loss ``ℓ^IL`` comes from, in this order: ``ctx.irreducible_losses`` (a
    precomputed ``irreducible_loss`` column), ``ctx.reference_logits``, or ``reference`` given
    here: an ``nn.Module`` run without grad on ``ctx.inputs`` (labels dropped; put in eval mode
    here), or a callable ``(ctx) -> logits``. Reference logits get the student's loss conventions
    (``label_smoothing``, ``shift_labels`` for causal LMs). The paper selects the top 10% of each
    candidate batch (``"select"``, ratio 0.1); ``"reweight"`` is a soft variant not in the paper.
    """

    name = "rho_loss"
    needs_output_grads = False
    requires = ("losses",)
    default_mode = "select"

    def __init__(
        self,
        reference: nn.Module | Callable[[ScoreContext], torch.Tensor] | None = None,
        label_smoothing: float = 0.0,
        shift_labels: bool = False,
    ) -> None:
        if isinstance(reference, nn.Module):
            reference.eval()
        self.reference = reference
        self.label_smoothing = label_smoothing
        self.shift_labels = shift_labels

    def irreducible_losses(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.irreducible_losses is not None:
            return ctx.irreducible_losses
        logits = ctx.reference_logits
        if logits is None:
            logits = self._reference_logits(ctx)
        labels = ctx.require("labels", self.name)
        return reference_losses(logits, labels, self.label_smoothing, self.shift_labels)

    def _reference_logits(self, ctx: ScoreContext) -> torch.Tensor:
        if self.reference is None:
            raise ValueError(
                "The 'rho_loss' scorer needs irreducible losses: set `ScoreContext.irreducible_losses` (e.g. an "
                "`irreducible_loss` column), `ScoreContext.reference_logits`, or pass `reference=` (a model or a "
                "callable returning logits) to the scorer."
            )
        with torch.no_grad():
            if isinstance(self.reference, nn.Module):
                inputs = {k: v for k, v in ctx.require("inputs", self.name).items() if k != "labels"}
                return logits_of(self.reference(**inputs)).detach()
            return self.reference(ctx).detach()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return reducible_loss(ctx.require("losses", self.name), self.irreducible_losses(ctx))


class BayesianScorer(SampleScorer):
    """Bayesian data selection (Deng, Cui, Zhu, NeurIPS 2023, arXiv 2308.10544), as their code does.

    A last-layer Kronecker-factored Laplace posterior on the head's weight (bias ignored), whose
    factors are moving averages over the trained points (`update`):
    ``A ← ρA + (1−ρ) φᵀφ/b``, ``G ← ρG + (1−ρ) gᵀg/b`` with ``g = softmax(z) − onehot(y)``; the
    first update copies. Scores: `laplace_logit_samples` then `bayesian_selection_score`.

    Defaults are the authors': ``alpha=0.5``, ``num_effective_data=10000``, ``prior_precision=1``,
    ``momentum=0.99``, ``num_samples=256``, select ``ratio=0.1`` of a 320-sample candidate batch,
    and a zero-shot logit scale of 12 (in `hf_gradmimic.zero_shot`). As their code does, before
    the first update the posterior is a point mass: ``z_s = z`` (one sample).

    Where their code and paper differ this follows the code: ``G`` is the empirical Fisher
    ``E[ggᵀ]``, not the GGN ``E[diag(p) − ppᵀ]`` (their code keeps that one commented out), and the
    factors are moving averages, not sums over the data seen. One deliberate difference from their
    code: the zero-shot logits use the cosine of image and text embeddings (their CLIP classifier
    leaves the image embedding unnormalised). And one caveat kept from their code and the spec: the
    noise ``ε L_U^{-T}`` has covariance ``(L_UᵀL_U)⁻¹``, not the posterior's ``U⁻¹``
    (`laplace_logit_samples`); ``exact_covariance=True`` samples ``U⁻¹``.

    ``ctx.features`` is the head's input ``φ`` ``[B, d]``; without it, ``ctx.activations[head]``.
    The noise ``ε`` comes from a CPU ``torch.Generator`` seeded with ``seed``, so scores are
    reproducible whatever the device; `score` also takes ``noise`` explicitly.
    """

    name = "bayesian"
    needs_output_grads = False
    requires = ("logits", "labels", "features", "zero_shot_log_probs")
    supports_modes = frozenset({"select"})
    default_mode = "select"
    refused_modes = {
        "reweight": "its posterior factors are moving averages over the trained (selected) points and its "
        "objective ranks candidates; under reweighting every point is trained with a weight, which the method "
        "does not define. Use mode='select'",
    }

    def __init__(
        self,
        alpha: float = 0.5,
        num_effective_data: float = 10000,
        prior_precision: float = 1.0,
        momentum: float = 0.99,
        num_samples: int = 256,
        head: str | None = None,
        seed: int = 0,
        exact_covariance: bool = False,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]; got {alpha}.")
        if not prior_precision > 0 or not num_effective_data > 0:
            raise ValueError("`prior_precision` and `num_effective_data` must be > 0.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); got {momentum}.")
        self.alpha = float(alpha)
        self.num_effective_data = float(num_effective_data)
        self.prior_precision = float(prior_precision)
        self.momentum = float(momentum)
        self.num_samples = int(num_samples)
        self.head = head
        self.seed = seed
        self.exact_covariance = exact_covariance
        self.generator = torch.Generator().manual_seed(seed)
        self.feature_factor: torch.Tensor | None = None  # A [d, d], float64
        self.grad_factor: torch.Tensor | None = None  # G [C, C], float64
        self.num_updates = 0
        self.num_data = 0

    def update(self, features: torch.Tensor, logit_grads: torch.Tensor) -> None:
        """Fold a batch of trained points into ``A`` and ``G`` (``φ`` ``[b, d]``, ``g`` ``[b, C]``)."""
        if features.shape[0] == 0:
            return
        if features.dim() != 2 or logit_grads.dim() != 2 or features.shape[0] != logit_grads.shape[0]:
            raise ValueError(
                f"BayesianScorer.update needs features [b, d] and logit gradients [b, C]; got "
                f"{tuple(features.shape)} and {tuple(logit_grads.shape)}."
            )
        self.feature_factor = moving_average_factor(self.feature_factor, features.detach(), self.momentum)
        self.grad_factor = moving_average_factor(self.grad_factor, logit_grads.detach(), self.momentum)
        self.num_updates += 1
        self.num_data += int(features.shape[0])

    def _features(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.features is not None:
            features = ctx.features
        elif self.head is not None and self.head in ctx.activations:
            features = ctx.activations[self.head]
        else:
            raise ValueError(
                "The 'bayesian' scorer needs the head's input features: set `ScoreContext.features` [B, d], or "
                "pass `head=` (a layer name present in `ScoreContext.activations`)."
            )
        if features.dim() != 2:
            raise ValueError(f"The 'bayesian' scorer needs 2-D head features [B, d]; got {tuple(features.shape)}.")
        return features.detach()

    def logit_samples(self, ctx: ScoreContext, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``z_{i,s}`` ``[B, S, C]``; ``[B, 1, C] = z`` before the first update."""
        logits = ctx.require("logits", self.name).detach()
        if self.feature_factor is None:
            return logits.double()[:, None, :]
        if noise is None:
            shape = (logits.shape[0], self.num_samples, logits.shape[-1])
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return laplace_logit_samples(
            logits,
            self._features(ctx),
            self.feature_factor.to(logits.device),
            self.grad_factor.to(logits.device),
            self.num_effective_data,
            self.prior_precision,
            noise,
            self.exact_covariance,
        )

    def score(self, ctx: ScoreContext, noise: torch.Tensor | None = None) -> torch.Tensor:
        samples = self.logit_samples(ctx, noise)
        return bayesian_selection_score(
            samples, ctx.require("labels", self.name), ctx.require("zero_shot_log_probs", self.name), self.alpha
        ).to(ctx.losses.device)

    def observe(self, ctx: ScoreContext, weights: torch.Tensor) -> None:
        """Update the posterior factors with the points that were trained (``weight > 0``)."""
        trained = (weights > 0).to(ctx.require("logits", self.name).device)
        logits = ctx.logits.detach()[trained]
        labels = ctx.require("labels", self.name).to(trained.device)[trained]
        self.update(self._features(ctx)[trained], ce_logit_grad(logits, labels))

    def state_dict(self) -> dict[str, Any]:
        return {
            "feature_factor": self.feature_factor,
            "grad_factor": self.grad_factor,
            "num_updates": self.num_updates,
            "num_data": self.num_data,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.feature_factor = state["feature_factor"]
        self.grad_factor = state["grad_factor"]
        self.num_updates = int(state["num_updates"])
        self.num_data = int(state["num_data"])
        self.generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        return (
            f"BayesianScorer(alpha={self.alpha}, num_effective_data={self.num_effective_data}, "
            f"prior_precision={self.prior_precision}, momentum={self.momentum}, num_samples={self.num_samples})"
        )


# ---------------------------------------------------------------------------------------------
# Registry


SCORERS: dict[str, type[SampleScorer]] = {
    "mimic": MimicScorer,
    "grand": GrandScorer,
    "agra": AgraScorer,
    "rho_loss": RhoLossScorer,
    "bayesian": BayesianScorer,
}


def get_scorer(name: str, **kwargs: Any) -> SampleScorer:
    """An instance of the scorer registered as ``name``, built with ``kwargs``."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; valid names: {', '.join(SCORERS)}.") from None
    return cls(**kwargs)


def _sum_over_layers(terms: Any) -> torch.Tensor:
    total = None
    for term in terms:
        total = term if total is None else total + term
    if total is None:
        raise ValueError("No layers to score: `ScoreContext.layers` is empty.")
    return total
