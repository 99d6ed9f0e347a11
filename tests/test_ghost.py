"""The per-layer ghost rules against per-sample gradients from torch.func (vmap of grad), one test per layer type.

As Opacus tests each grad sampler: a tiny model around the layer, the layer's input and output gradient
captured with hooks written here, and the ghost inner product, squared norm and summed gradient compared
with what the materialised per-sample gradients give.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_gradmimic.ghost import GhostBatch, LayerUse, UnsupportedLayerError, ghost_rule_for, supported_layer_types


class Around(nn.Module):
    """``head(tanh(layer(x)))`` pooled over positions: the layer under test sits inside a real loss."""

    def __init__(self, layer: nn.Module, width: int, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = layer
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.layer(x))
        if hidden.dim() == 3:
            hidden = hidden.mean(dim=1)
        return self.head(hidden)


def _linear(bias: bool) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(5, 6, bias=bias)


def _conv1d() -> Conv1D:
    torch.manual_seed(1)
    layer = Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs
    nn.init.normal_(layer.bias)
    return layer


def _embedding() -> nn.Embedding:
    torch.manual_seed(1)
    return nn.Embedding(11, 6, padding_idx=0)


def _inputs(kind: str, batch: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    if kind == "ids":
        ids = torch.randint(0, 11, (batch, 9), generator=generator)
        ids[:, -2:] = 0  # padding positions: their row gets no gradient
        ids[0, :4] = 3  # a repeated id inside one sample: its row gathers several positions
        return ids
    if kind == "2d":
        return torch.randn(batch, 5, generator=generator)
    return torch.randn(batch, 4, 5, generator=generator)


CASES = {
    "linear-2d-bias": (lambda: _linear(True), "2d"),
    "linear-2d-nobias": (lambda: _linear(False), "2d"),
    "linear-3d-bias": (lambda: _linear(True), "3d"),
    "conv1d-3d": (_conv1d, "3d"),
    "conv1d-2d": (_conv1d, "2d"),
    "embedding-padding-idx": (_embedding, "ids"),
}


def _capture(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, labels: torch.Tensor):
    """Inputs and ∂(Σℓ)/∂(outputs) of ``modules`` (every call), by hooks of this test's own."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0].detach(), out)))
        for name, module in modules.items()
    ]
    logits = model(x)
    for handle in handles:
        handle.remove()
    losses = F.cross_entropy(logits, labels, reduction="none")
    grads = torch.autograd.grad(losses.sum(), [out for _, _, out in calls])
    return [(name, a, g) for (name, a, _), g in zip(calls, grads)]


def _oracle(model: nn.Module, names: list[str], x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(chosen, xi, yi):
        logits = torch.func.functional_call(model, {**params, **chosen}, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, labels)


def _layer_case(case: str):
    """The case's layer inside `Around`, its parameters' names, per-sample gradients (the oracle), and the layer's
    captured input and output gradient."""
    make_layer, kind = CASES[case]
    layer = make_layer()
    model = Around(layer, width=6)
    x = _inputs(kind)
    labels = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    names = [f"layer.{n}" for n, _ in layer.named_parameters()]
    ((_, a, delta),) = _capture(model, {"layer": layer}, x, labels)
    return layer, names, _oracle(model, names, x, labels), a, delta


@pytest.mark.parametrize("case", list(CASES))
def test_ghost_rule_matches_per_sample_gradients(case):
    layer, names, oracle, a, delta = _layer_case(case)
    ghost = GhostBatch([LayerUse("layer", layer, a, delta, {n.split(".")[1]: n for n in names})])
    generator = torch.Generator().manual_seed(4)
    direction = {n: torch.randn(oracle[n].shape[1:], generator=generator) for n in names}
    expected_inner = sum((oracle[n] * direction[n]).flatten(1).sum(1) for n in names)
    torch.testing.assert_close(ghost.inner_product(direction), expected_inner, rtol=1e-5, atol=1e-6)
    expected_norm = sum(oracle[n].flatten(1).square().sum(1) for n in names)
    torch.testing.assert_close(ghost.sq_norm(), expected_norm, rtol=1e-5, atol=1e-7)
    summed = ghost.summed_gradient()
    for n in names:
        torch.testing.assert_close(summed[n], oracle[n].sum(0), rtol=1e-5, atol=1e-7)
    # Each part on its own: a direction over the weight alone.
    weight_only = {names[0]: direction[names[0]]}
    torch.testing.assert_close(
        ghost.inner_product(weight_only),
        (oracle[names[0]] * direction[names[0]]).flatten(1).sum(1),
        rtol=1e-5,
        atol=1e-6,
    )
    if case.startswith("embedding"):  # the padding row never gets a gradient
        assert oracle["layer.weight"][:, 0].abs().max() == 0


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_summed_gradient_matches_per_sample_gradients(case):
    """``summed_gradient(..., sample_scale=c)`` is ``Σ_i c_i g_i`` of the materialised per-sample gradients, laid out
    as the parameter and contiguous (what the optimizer reads)."""
    layer, names, oracle, a, delta = _layer_case(case)
    coefficients = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(5)) * 2
    params = [n.split(".")[1] for n in names]
    formed = ghost_rule_for(layer).summed_gradient(layer, a, delta, params, coefficients)
    for n, own in zip(names, params):
        expected = torch.einsum("b,b...->...", coefficients, oracle[n])
        torch.testing.assert_close(formed[own], expected, rtol=1e-5, atol=1e-6)
        assert formed[own].shape == dict(layer.named_parameters())[own].shape and formed[own].is_contiguous()


@pytest.mark.parametrize("width_in, width_out", [(3, 50), (50, 3)])
def test_linear_weighted_summed_gradient_either_side(width_in, width_out):
    """The coefficients scale the narrower of ``a`` and ``δ`` (both branches), against an einsum re-derivation."""
    from hf_gradmimic.ghost import linear_summed_gradient

    generator = torch.Generator().manual_seed(6)
    a = torch.randn(4, 5, width_in, generator=generator)
    delta = torch.randn(4, 5, width_out, generator=generator)
    coefficients = torch.randn(4, generator=generator)
    formed = linear_summed_gradient(a, delta, sample_scale=coefficients)
    torch.testing.assert_close(formed["weight"], torch.einsum("b,bto,bti->oi", coefficients, delta, a))
    torch.testing.assert_close(formed["bias"], torch.einsum("b,bto->o", coefficients, delta))
    transposed = linear_summed_gradient(a, delta, sample_scale=coefficients, input_major=True)["weight"]
    torch.testing.assert_close(transposed, formed["weight"].t())
    assert transposed.is_contiguous()


def test_tied_tensor_sums_every_use():
    """GPT-2 with a tied lm_head: the per-sample gradient of the shared tensor is the sum over the head and the
    token embedding; the ghost batch of both uses matches per-sample autograd of the tensor, and the head alone
    does not (the defect this registry fixes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=40,
        n_positions=12,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (6, 8), generator=generator)

    calls = []
    modules = {"lm_head": model.lm_head, "transformer.wte": model.transformer.wte}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, mod, args[0].detach(), out)))
        for name, m in modules.items()
    ]
    logits = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="none")
    losses = token_losses.view(6, 7).mean(1)
    grads = torch.autograd.grad(losses.sum(), [out for *_, out in calls])
    uses = [LayerUse(name, mod, a, g, {"weight": "lm_head.weight"}) for (name, mod, a, _), g in zip(calls, grads)]

    shared = model.lm_head.weight.detach()

    def loss_of(weight, sample):
        out = torch.func.functional_call(model, {"lm_head.weight": weight}, kwargs={"input_ids": sample.unsqueeze(0)})
        return F.cross_entropy(out.logits[0, :-1], sample[1:])

    oracle = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0))(shared, ids)
    direction = torch.randn(shared.shape, generator=generator)
    expected = (oracle * direction).flatten(1).sum(1)
    both = GhostBatch(uses)
    assert both.shared_keys == {"lm_head.weight"}
    torch.testing.assert_close(both.inner_product({"lm_head.weight": direction}), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.sq_norm(), oracle.flatten(1).square().sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(both.summed_gradient()["lm_head.weight"], oracle.sum(0), rtol=1e-4, atol=1e-6)
    head_only = GhostBatch([use for use in uses if use.name == "lm_head"]).inner_product({"lm_head.weight": direction})
    relative_error = ((head_only - expected).norm() / expected.norm()).item()
    assert relative_error > 0.05, relative_error


def test_unsupported_layer_names_the_type_and_the_supported_ones():
    with pytest.raises(
        UnsupportedLayerError, match=r"'encoder.conv' is a torch.nn.modules.conv.Conv2d.*torch.nn.modules.linear.Linear"
    ):
        ghost_rule_for(nn.Conv2d(1, 1, 3), "encoder.conv")
    assert {
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.sparse.Embedding",
        "transformers.pytorch_utils.Conv1D",
    } <= set(supported_layer_types())


def test_subclass_with_its_own_forward_is_refused_and_a_plain_subclass_accepted():
    class Quantised(nn.Linear):
        def forward(self, x):  # computes something else than F.linear with its weight
            return super().forward(x.round())

    with pytest.raises(UnsupportedLayerError, match="Quantised"):
        ghost_rule_for(Quantised(2, 2))
    ghost_rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))  # same forward as nn.Linear


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"max_norm": 1.0}, "max_norm"),
        ({"sparse": True}, "sparse"),
    ],
)
def test_embedding_configurations_without_per_sample_gradients_are_refused(kwargs, message):
    with pytest.raises(UnsupportedLayerError, match=f"'wte'.*{message}"):
        ghost_rule_for(nn.Embedding(5, 3, **kwargs), "wte")


@pytest.mark.parametrize("case", list(CASES))
def test_output_along_a_direction_pairs_with_the_output_gradient_into_the_per_sample_inner_product(case):
    """``output_along`` (the output's change along a direction, for batch-coupled losses): paired with the output
    gradient of an independent-sample loss it must give ⟨g_i, v⟩ from torch.func per-sample gradients; and for the
    parameter-linear layers it equals torch.func.jvp of the layer along the direction."""
    layer, names, oracle, a, delta = _layer_case(case)
    generator = torch.Generator().manual_seed(4)
    direction = {n.split(".")[1]: torch.randn(oracle[n].shape[1:], generator=generator) for n in names}
    dz = ghost_rule_for(layer).output_along(layer, a, direction)
    assert dz.shape == delta.shape
    expected = sum((oracle[f"layer.{n}"] * v).flatten(1).sum(1) for n, v in direction.items())
    torch.testing.assert_close((delta * dz).flatten(1).sum(1), expected, rtol=1e-5, atol=1e-6)
    params = dict(layer.named_parameters())
    _, jvp = torch.func.jvp(lambda p: torch.func.functional_call(layer, p, (a,)), (params,), (direction,))
    if case.startswith("embedding"):  # the padding row's change is left out, as its gradient is
        jvp = jvp * (a != layer.padding_idx).unsqueeze(-1)
    torch.testing.assert_close(dz, jvp, rtol=1e-5, atol=1e-6)
