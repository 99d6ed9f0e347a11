"""The Grad-Mimic step (`hf_gradmimic.training.step.MimicStep`) against per-sample gradients from torch.func.

For a small MLP whose head is the mimic layer, every sample's gradient ``g_i`` is computed here with
``vmap(grad(ℓ_i))``; the oracle's score is ``m_i = ⟨−g_i, v⟩ / ‖v‖`` with ``v = θ_ref − θ`` over the head
(Huang et al., arXiv 2501.06708), its weights ``softmax(m / τ)``, and the gradient of the step's loss
``Σ_i w_i g_i``. Each `Backward` plan must give that gradient; its loss's value must be the plain mean loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from hf_gradmimic import MimicConfig
from hf_gradmimic.losses import SampleLoss
from hf_gradmimic.score_log_io import STATUS_NONFINITE, STATUS_SCORED
from hf_gradmimic.scorers.mimic import MimicScorer
from hf_gradmimic.training.coupled import GhostReader
from hf_gradmimic.training.mimic_layers import MimicLayers
from hf_gradmimic.training.step import Backward, MicroBatch, MimicStep, StepCounts
from hf_gradmimic.training.step_softmax import StepSoftmax

from tiny_models import TinyMLP

TEMPERATURE = 0.7
BATCH = 6


def user_loss(outputs, inputs):
    return F.cross_entropy(outputs.logits, inputs["labels"], reduction="none")


def single_process_step(model, layers, scorer, mode, args, loss_fn=None, **options) -> MimicStep:
    """A `MimicStep` on one process, with a step softmax that gathers nothing (``options``: e.g. a comparison batch)."""
    return MimicStep(
        SampleLoss(model, loss_fn),
        layers,
        scorer,
        mode,
        args,
        StepSoftmax("step", 1, lambda packed: packed, lambda: []),
        GhostReader(batch_coupled=False, check_user_loss=loss_fn is not None),
        model,
        num_processes=1,
        uses_backward_possible=True,
        **options,
    )


def setup(tmp_path, *, scope="all", frozen_backbone=False, loss_fn=None, mode="reweight", two_pass=False):
    model = TinyMLP(seed=1)
    if frozen_backbone:
        model.hidden.requires_grad_(False)
    generator = torch.Generator().manual_seed(5)
    reference = {
        name: param.detach() + 0.3 * torch.randn(param.shape, generator=generator)
        for name, param in model.named_parameters()
        if name.startswith("head.")
    }
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        mimic_temperature=TEMPERATURE,
        mimic_reweight_scope=scope,
        report_to=[],
        use_cpu=True,
    )
    layers = MimicLayers(model, args.mimic_layer_map)
    scorer = MimicScorer(reference, layers.current_tensors)
    step = single_process_step(model, layers, scorer, mode, args, loss_fn)
    if not two_pass:
        step.one_backward = True  # `Backward.SPLIT` for the head too (by default only with an embedding's use)
    generator = torch.Generator().manual_seed(7)
    inputs = {
        "x": torch.randn(BATCH, 8, generator=generator),
        "labels": torch.randint(0, 4, (BATCH,), generator=generator),
    }
    return model, reference, step, inputs


def oracle(model, reference, inputs, rows):
    """Per-sample losses and gradients of ``rows`` by torch.func, the mimic scores and their softmax weights."""
    params = {name: param.detach() for name, param in model.named_parameters()}

    def loss_of(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)).logits, y[None])

    x, y = inputs["x"][rows], inputs["labels"][rows]
    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    losses = vmap(loss_of, in_dims=(None, 0, 0))(params, x, y)
    direction = {name: reference[name] - params[name] for name in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    scores = -sum((per_sample[name] * v).flatten(1).sum(1) for name, v in direction.items()) / norm
    return losses, per_sample, scores, torch.softmax(scores / TEMPERATURE, dim=0)


@pytest.mark.parametrize(
    ("options", "plan"),
    [
        ({}, Backward.SPLIT),
        ({"two_pass": True}, Backward.LOGITS),
        ({"frozen_backbone": True}, Backward.USES),
        ({"loss_fn": user_loss}, Backward.LOSS),
        ({"scope": "layer"}, Backward.LOSS),
    ],
    ids=["split", "logits", "uses", "loss", "layer-scope"],
)
def test_each_backward_plan_gives_the_weighted_sum_of_per_sample_gradients(tmp_path, options, plan):
    model, reference, step, inputs = setup(tmp_path, **options)
    assert step.backward_plan() is plan
    rows = torch.arange(BATCH)
    losses, per_sample, scores, weights = oracle(model, reference, inputs, rows)

    scored = step.score(model, MicroBatch(dict(inputs), rows), 0, plan)
    torch.testing.assert_close(scored.scores, scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scored.losses.detach(), losses, rtol=1e-5, atol=1e-6)
    assert (scored.status == STATUS_SCORED).all()

    model.zero_grad(set_to_none=True)
    step.step_softmax = StepSoftmax("step", 1, lambda packed: packed, lambda: [])  # a fresh step
    loss, _ = step.reweight(model, MicroBatch(dict(inputs), rows), StepCounts(0, 1))
    loss.backward()
    torch.testing.assert_close(loss.detach(), losses.mean(), rtol=1e-5, atol=1e-6)  # the plain loss, as Trainer logs
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None
            continue
        # scope 'layer' keeps the plain mean gradient outside the mimic layer
        w = (
            torch.full_like(weights, 1 / BATCH)
            if options.get("scope") == "layer" and name in ("hidden.weight", "hidden.bias")
            else weights
        )
        expected = (w.view(-1, *[1] * (param.dim())) * per_sample[name]).sum(0)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_sample_gets_weight_zero_and_the_rest_their_softmax(tmp_path):
    model, reference, step, inputs = setup(tmp_path)
    inputs["x"][2] = float("nan")
    rows = torch.arange(BATCH)
    finite = torch.tensor([i for i in range(BATCH) if i != 2])
    losses, per_sample, scores, weights = oracle(model, reference, inputs, finite)

    loss, _ = step.reweight(model, MicroBatch(dict(inputs), rows), StepCounts(0, 1))
    loss.backward()
    torch.testing.assert_close(loss.detach(), losses.mean(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        expected = (weights.view(-1, *[1] * param.dim()) * per_sample[name]).sum(0)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    records = step.step_softmax.finish(0)
    assert records.status[2] == STATUS_NONFINITE and (records.status[finite.numpy()] == STATUS_SCORED).all()
    torch.testing.assert_close(torch.as_tensor(records.scores[finite.numpy()]), scores, rtol=1e-4, atol=1e-6)


def test_select_candidates_are_scored_without_a_graph_left_behind(tmp_path):
    """A candidate is scored from a graph that starts at the mimic layer: the trainable layer below it runs without
    one (its output does not require grad), and the scores are the oracle's."""
    model, reference, step, inputs = setup(tmp_path, mode="select")
    rows = torch.arange(BATCH)
    _, _, scores, _ = oracle(model, reference, inputs, rows)
    below = []
    handle = model.hidden.register_forward_hook(lambda module, args, output: below.append(output.requires_grad))
    candidates = step.candidates(model, MicroBatch(dict(inputs), rows), 0)
    handle.remove()
    assert below == [False] and torch.is_grad_enabled()
    torch.testing.assert_close(candidates.scores, scores, rtol=1e-4, atol=1e-6)
    assert not candidates.losses.requires_grad and not candidates.scores.requires_grad
    assert all(param.grad is None for param in model.parameters())


def test_agra_comparison_gradient_is_the_mean_gradient_from_a_graph_that_starts_at_the_head(tmp_path):
    """AGRA's comparison batch (Sedova et al. 2023) is forwarded while the scored batch's graph is alive: its graph
    starts at the mimic layer (the hidden layer's output needs no grad), and its gradient is the mean of the batch's
    per-sample gradients of the head, from torch.func."""
    from hf_gradmimic.scorers.agra import AgraScorer

    model, reference, mimic_step, inputs = setup(tmp_path)
    step = single_process_step(
        model,
        mimic_step.layers,
        AgraScorer(),
        "reweight",
        mimic_step.args,
        comparison_batch=lambda global_step: dict(inputs),
    )
    _, per_sample, _, _ = oracle(model, reference, inputs, torch.arange(BATCH))
    below = []
    handle = model.hidden.register_forward_hook(lambda module, args, output: below.append(output.requires_grad))
    comparison = step.comparison_gradient(0)
    handle.remove()
    assert below == [False] and torch.is_grad_enabled()
    assert set(comparison) == {"head.weight", "head.bias"}
    for key, gradient in comparison.items():
        torch.testing.assert_close(gradient, per_sample[key].mean(0), rtol=1e-4, atol=1e-6, msg=key)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.parametrize("layer", ["transformer.h.1.mlp.c_fc", "transformer.wte"])
def test_select_candidates_of_an_inner_layer_match_per_sample_gradient_norms(tmp_path, layer):
    """GraNd in select mode on GPT-2's inner ``Conv1D`` (its graph starts there: the blocks below run without one)
    and on the token embedding (the first module: a graph over the whole network), against the norms of per-sample
    gradients from torch.func (Paul et al., NeurIPS 2021)."""
    from hf_gradmimic.scorers.grand import GrandScorer

    from tiny_models import lm_dataset, tiny_gpt2

    model = tiny_gpt2(dropout=0.0)
    args = MimicConfig(
        output_dir=str(tmp_path), mimic_layers=[layer], mimic_token_weighting="sample", report_to=[], use_cpu=True
    )
    layers = MimicLayers(model, args.mimic_layer_map)
    step = single_process_step(model, layers, GrandScorer(), "select", args)
    data = lm_dataset(n=6)
    ids, labels = data[:]["input_ids"], data[:]["labels"]
    named = {name: param.detach() for name, param in model.named_parameters()}
    scored = [f"{layer}.{local}" for local, _ in model.get_submodule(layer).named_parameters()]

    def loss_of(params, sample_ids, sample_labels):
        logits = functional_call(model, {**named, **params}, (), {"input_ids": sample_ids[None]}).logits
        return F.cross_entropy(logits[0, :-1], sample_labels[1:], ignore_index=-100)

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))({name: named[name] for name in scored}, ids, labels)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))

    first_block = []
    handle = model.transformer.h[0].register_forward_hook(
        lambda module, args, output: first_block.append(output[0].requires_grad)
    )
    candidates = step.candidates(model, MicroBatch({"input_ids": ids, "labels": labels}, torch.arange(6)), 0)
    handle.remove()
    assert first_block == [layer == "transformer.wte"]
    torch.testing.assert_close(candidates.scores, norms, rtol=1e-4, atol=1e-6)
    assert all(param.grad is None for param in model.parameters())


HEAD_CUT_CASES = {
    "inner-conv1d": (False, ["transformer.h.1.mlp.c_fc"]),
    "tied-lm-head": (True, ["lm_head"]),
    "inner-and-head": (False, ["transformer.h.0.attn.c_attn", "lm_head"]),
    "embedding": (False, ["transformer.wte"]),
}


@pytest.mark.parametrize("plan", [Backward.LOGITS, Backward.SPLIT])
@pytest.mark.parametrize("case", list(HEAD_CUT_CASES))
def test_one_pass_plans_give_every_parameter_its_weighted_gradient(tmp_path, case, plan):
    """With a mimic layer below GPT-2's ``lm_head``: `Backward.LOGITS` starts the weighted backward at the head's
    input (`capture.HeadCut`) and forms the head's gradient from δ; `Backward.SPLIT` forms every tensor's gradient
    from its module's recorded input and δ after one backward (`full_update`). Against torch.func per-sample
    gradients of EVERY parameter (a tied ``lm_head`` is also the token embedding), over two micro-batches of one step
    (the step-wide softmax rescales the first one's gradients): each must be Σ_i w_i g_i."""
    from tiny_models import lm_dataset, tiny_gpt2

    tied, layer_names = HEAD_CUT_CASES[case]
    model = tiny_gpt2(dropout=0.0, tied=tied)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=layer_names,
        mimic_token_weighting="sample",
        report_to=[],
        use_cpu=True,
    )
    layers = MimicLayers(model, args.mimic_layer_map)
    assert layers.head is model.lm_head
    generator = torch.Generator().manual_seed(3)
    reference = {
        key: tensor.detach() + 0.1 * torch.randn(tensor.shape, generator=generator)
        for key, tensor in layers.tensors.items()
    }
    params = [param for param in model.parameters() if param.requires_grad]
    step = MimicStep(
        SampleLoss(model, None),
        layers,
        MimicScorer(reference, layers.current_tensors),
        "reweight",
        args,
        StepSoftmax("step", 1, lambda packed: packed, lambda: [p.grad for p in params if p.grad is not None]),
        GhostReader(batch_coupled=False, check_user_loss=False),
        model,
        num_processes=1,
        uses_backward_possible=True,
    )
    assert step.full_update.owners is not None  # Conv1D, LayerNorm, Embedding: every GPT-2 tensor is covered
    # by default one backward only where a mimic tensor is used at the input (the embedding, a tied head)
    assert step.one_backward is (case in ("tied-lm-head", "embedding"))
    step.one_backward = True
    assert step.backward_plan() is Backward.SPLIT
    if plan is Backward.LOGITS:
        step.full_update.usable = False  # as after a failed first-batch check
        assert step.backward_plan() is Backward.LOGITS
    data = lm_dataset(n=8)
    ids, labels = data[:]["input_ids"], data[:]["labels"]

    # The oracle: per-sample gradients of every parameter (a tied tensor once, under its first name).
    named = dict(model.named_parameters())

    def loss_of(p, sample_ids, sample_labels):
        logits = functional_call(model, p, (), {"input_ids": sample_ids[None]}).logits
        return F.cross_entropy(logits[0, :-1], sample_labels[1:], ignore_index=-100)

    model.eval()
    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))({n: p.detach() for n, p in named.items()}, ids, labels)
    model.train()
    name_of = {id(param): name for name, param in named.items()}
    direction = {name_of[id(layers.tensors[key])]: reference[key] - layers.tensors[key].detach() for key in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    scores = -sum((per_sample[name] * v).flatten(1).sum(1) for name, v in direction.items()) / norm
    args.mimic_temperature = float(scores.std()) / 2  # weights far from uniform, whatever the scores' scale
    weights = torch.softmax(scores / args.mimic_temperature, dim=0)
    assert weights.max() > 4 * weights.min()

    # The step: two micro-batches of four; the first scored batch takes the head cut.
    halves = [torch.arange(0, 4), torch.arange(4, 8)]
    probe = step.score(model, MicroBatch({"input_ids": ids[:4], "labels": labels[:4]}, halves[0]), 0, plan)
    if plan is Backward.LOGITS:
        assert probe.from_logits.head is not None and probe.from_logits.head.module is model.lm_head
    else:
        assert probe.from_logits.update is not None and step.full_update.verified
    torch.testing.assert_close(probe.scores, scores[:4], rtol=1e-4, atol=1e-6)
    del probe
    for rows in halves:
        batch = MicroBatch({"input_ids": ids[rows], "labels": labels[rows]}, rows)
        loss, _ = step.reweight(model, batch, StepCounts(0, 2))
        loss.backward()
    for name, param in named.items():
        expected = (weights.view(-1, *[1] * param.dim()) * per_sample[name]).sum(0)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
