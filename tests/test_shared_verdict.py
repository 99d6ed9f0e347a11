"""The reference's verdict on a linear head sharing its matmul with the Grad-Mimic score
(`hf_gradmimic.training.reference_verdict.SharedHead`).

With ``mimic_log_reference_loss`` recording the reference head's loss, the head's output change along
``v = θ_ref − θ`` gives both the reference's logits ``z + dz`` and the score's ``⟨g_i, v⟩ = Σ_t δ_t · dz_t``
(Huang et al., arXiv 2501.06708). Under each `Backward` plan that applies, for a classification head and an
untied GPT-2 ``lm_head``: the scores must equal those of the unshared path and ``⟨−g_i, v⟩/‖v‖`` from per-sample
gradients by torch.func; the reference's losses must equal ``F.cross_entropy(reduction="none")`` of the
reference head applied here to the model's features; and the score must not form the head's inner product again.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from hf_gradmimic import MimicConfig
from hf_gradmimic.ghost import linear as ghost_linear
from hf_gradmimic.losses import SampleLoss
from hf_gradmimic.scorers.mimic import MimicScorer
from hf_gradmimic.training.coupled import GhostReader
from hf_gradmimic.training.mimic_layers import MimicLayers
from hf_gradmimic.training.reference_verdict import ReferenceVerdict
from hf_gradmimic.training.step import Backward, MicroBatch, MimicStep
from hf_gradmimic.training.step_softmax import StepSoftmax

from tiny_models import TinyMLP, lm_dataset, tiny_gpt2

PLANS = {
    "logits": (Backward.LOGITS, {}),
    "split": (Backward.SPLIT, {"one_backward": True}),  # only the head is scored: the step takes LOGITS
    "uses": (Backward.USES, {"frozen_backbone": True}),
    "layer-scope": (Backward.LOSS, {"scope": "layer"}),
}


def make_model(kind, tied=False):
    return TinyMLP(seed=1) if kind == "mlp" else tiny_gpt2(dropout=0.0, tied=tied)


def head_name(kind):
    return "head" if kind == "mlp" else "lm_head"


def make_inputs(kind):
    generator = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return {"x": torch.randn(6, 8, generator=generator), "labels": torch.randint(0, 4, (6,), generator=generator)}
    batch = lm_dataset(n=6)[:]
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


def make_step(tmp_path, model, reference, *, shared, scope="all", frozen_backbone=False, one_backward=False):
    """A `MimicStep` recording the reference's verdict ('always'); ``shared`` hands it the scorer's direction."""
    name = next(iter(reference)).rsplit(".", 1)[0]
    if frozen_backbone:
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith(name + "."))
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=[name],
        mimic_reweight_scope=scope,
        mimic_log_reference_loss="always",
        report_to=[],
        use_cpu=True,
    )
    layers = MimicLayers(model, args.mimic_layer_map)
    scorer = MimicScorer(reference, layers.current_tensors)
    sample_loss = SampleLoss(model, None)
    verdict = ReferenceVerdict(
        "always", scorer.reference_on_device, layers, model, sample_loss, scorer.scored_direction if shared else None
    )
    step = MimicStep(
        sample_loss,
        layers,
        scorer,
        "reweight",
        args,
        StepSoftmax("step", 1, lambda packed: packed, lambda: []),
        GhostReader(batch_coupled=False, check_user_loss=False),
        model,
        num_processes=1,
        uses_backward_possible=True,
        reference_verdict=verdict,
    )
    step.one_backward = one_backward
    return step


def perturbed_head(model, kind, scale=0.3):
    generator = torch.Generator().manual_seed(5)
    prefix = head_name(kind) + "."
    return {
        name: param.detach() + scale * torch.randn(param.shape, generator=generator)
        for name, param in model.named_parameters(remove_duplicate=False)  # a tied lm_head under its own name
        if name.startswith(prefix)
    }


def per_sample_loss_of(kind, logits, labels):
    """The per-sample loss written out here: cross entropy (a causal LM: shifted, the mean over label tokens)."""
    if kind == "mlp":
        return F.cross_entropy(logits, labels, reduction="none")
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return tokens.sum(1) / (labels[:, 1:] != -100).sum(1).clamp(min=1)


def features_of(kind, model, inputs):
    with torch.no_grad():
        if kind == "mlp":
            return torch.tanh(model.hidden(inputs["x"]))
        return model.transformer(input_ids=inputs["input_ids"]).last_hidden_state


def oracle(kind, model, reference, inputs):
    """``⟨−g_i, v⟩/‖v‖`` from per-sample gradients (vmap of grad) and the reference head's losses, both here."""
    params = {name: param.detach() for name, param in model.named_parameters()}
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def loss_of(p, sample, label):
        one = {k: v[None] for k, v in sample.items()}
        return per_sample_loss_of(kind, functional_call(model, p, (), one).logits, label[None])[0]

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, model_inputs, labels)
    direction = {name: reference[name] - params[name] for name in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    scores = -sum((per_sample[name] * v).flatten(1).sum(1) for name, v in direction.items()) / norm
    head = head_name(kind)
    reference_logits = features_of(kind, model, inputs) @ reference[f"{head}.weight"].T
    if f"{head}.bias" in reference:
        reference_logits = reference_logits + reference[f"{head}.bias"]
    return scores, per_sample_loss_of(kind, reference_logits, labels)


@pytest.fixture
def count_head_inner_products(monkeypatch):
    """Counts the ghost's own linear inner products (the matmul the shared path leaves out)."""
    calls = []
    original = ghost_linear.linear_inner_product

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(ghost_linear, "linear_inner_product", counting)
    return calls


@pytest.mark.parametrize("plan_id", list(PLANS))
@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_the_shared_verdict_gives_the_oracles_scores_and_reference_losses(
    tmp_path, kind, plan_id, count_head_inner_products
):
    plan, options = PLANS[plan_id]
    model = make_model(kind)
    model.train()  # dropout 0: train mode is the oracle's function too
    reference = perturbed_head(model, kind)
    inputs = make_inputs(kind)
    rows = torch.arange(len(inputs["labels"]))
    expected_scores, expected_losses = oracle(kind, model, reference, inputs)

    results = {}
    for shared in (True, False):
        step = make_step(tmp_path / str(shared), copy.deepcopy(model), reference, shared=shared, **options)
        assert step.backward_plan() is plan
        count_head_inner_products.clear()
        scored = step.score(step.model, MicroBatch(dict(inputs), rows), 0, plan)
        results[shared] = (scored.scores, scored.recorded["reference_loss"], len(count_head_inner_products))
        own_losses = scored.losses.detach()
    shared_scores, shared_losses, shared_matmuls = results[True]
    plain_scores, plain_losses, plain_matmuls = results[False]
    assert (shared_matmuls, plain_matmuls) == (0, 1)  # the score formed no inner product of its own when shared
    torch.testing.assert_close(shared_scores, plain_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_scores, expected_scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shared_losses, plain_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shared_losses, own_losses)  # the reference's, not the student's


def test_the_shared_pass_is_chunked_and_unchanged_by_the_chunk_size(tmp_path, monkeypatch):
    """A chunk of one sample (as for a real vocabulary) gives the same losses and scores as the whole batch at once."""
    from hf_gradmimic.training import reference_verdict

    model = make_model("gpt2")
    reference = perturbed_head(model, "gpt2")
    inputs = make_inputs("gpt2")
    rows = torch.arange(len(inputs["labels"]))
    results = []
    for chunk_logits in (reference_verdict.MONITOR_CHUNK_LOGITS, 1):
        monkeypatch.setattr(reference_verdict, "MONITOR_CHUNK_LOGITS", chunk_logits)
        step = make_step(tmp_path, copy.deepcopy(model), reference, shared=True)
        scored = step.score(step.model, MicroBatch(dict(inputs), rows), 0, Backward.LOGITS)
        results.append((scored.scores, scored.recorded["reference_loss"]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_a_tied_head_is_not_shared_and_still_scores_as_the_oracle(tmp_path, count_head_inner_products):
    """A tied ``lm_head`` is also the token embedding: the reference's verdict swaps both (a forward), so the head
    is not shared and the score forms its inner products itself, still ``⟨−g_i, v⟩/‖v‖``."""
    from tiny_models import oracle_scores_from_grads, per_sample_lm_grads

    model = tiny_gpt2(dropout=0.0, tied=True)
    reference = perturbed_head(model, "gpt2")
    inputs = make_inputs("gpt2")
    step = make_step(tmp_path, model, reference, shared=True)
    expected = oracle_scores_from_grads(per_sample_lm_grads(model, lm_dataset(n=6), list(reference)), model, reference)
    count_head_inner_products.clear()
    scored = step.score(model, MicroBatch(dict(inputs), torch.arange(6)), 0, step.backward_plan())
    assert len(count_head_inner_products) == 1  # the lm_head's own use (the embedding's rule is another)
    torch.testing.assert_close(scored.scores.double(), torch.as_tensor(expected), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        swapped = functional_call(model, reference, (), {"input_ids": inputs["input_ids"]}, strict=False).logits
    torch.testing.assert_close(
        scored.recorded["reference_loss"], per_sample_loss_of("gpt2", swapped, inputs["labels"]), rtol=1e-5, atol=1e-6
    )


def test_the_reference_score_terms_are_not_shared(tmp_path):
    """``score_terms="reference"`` scores along ``θ_ref``, not ``θ_ref − θ``: nothing to share."""
    model = make_model("mlp")
    scorer = MimicScorer(perturbed_head(model, "mlp"), lambda: dict(model.head.named_parameters(prefix="head")))
    assert scorer.scored_direction(0) is not None
    scorer.score_terms_mode = "reference"
    assert scorer.scored_direction(0) is None
