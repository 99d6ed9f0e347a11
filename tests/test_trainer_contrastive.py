"""MimicTrainer on image–text dual encoders (batch-coupled losses) against one autograd pass per sample's loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_trainer import COMMON, perturbed_reference

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.contrastive import batch_coupled, contrastive_loss_for, in_batch_negatives_loss

from tiny_dual_encoders import (
    CLIP_LAYERS,
    DUAL_ENCODER_LAYERS,
    pair_dataset,
    tiny_clip,
    tiny_dual_encoder,
    tiny_siglip,
)

N = 12

CASES = {
    "clip-vision": (tiny_clip, CLIP_LAYERS["vision"]),
    "clip-text": (tiny_clip, CLIP_LAYERS["text"]),
    "clip-both-towers-and-projection": (tiny_clip, CLIP_LAYERS["both"]),
    "siglip-both": (tiny_siglip, ["vision_model.encoder.layers.1.mlp.fc1", "text_model.head"]),
    "dual-encoder-both": (tiny_dual_encoder, DUAL_ENCODER_LAYERS),
    "clip-early-layer-eager": (lambda: tiny_clip(attn="eager"), ["vision_model.encoder.layers.0.mlp.fc2"]),
}


def config(tmp_path, **overrides) -> MimicConfig:
    settings = {
        **COMMON,
        "per_device_train_batch_size": N,
        "max_steps": 1,
        "mimic_alignment_check": False,
        "remove_unused_columns": False,
        **overrides,
    }
    return MimicConfig(output_dir=str(tmp_path), **settings)


def layer_tensors(model, layers) -> list[str]:
    params = dict(model.named_parameters())
    return [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias") if f"{layer}.{kind}" in params]


def oracle(model, dataset, loss_fn, reference: dict[str, torch.Tensor]):
    """m_i = −⟨∇ℓ_i, v⟩/‖v‖ by one autograd pass per sample's term (the whole batch in one forward), and ∇ℓ_i.
    ``model`` is a copy, left as it was; ``loss_fn`` None means the model's contrastive loss."""
    loss_fn = loss_fn or contrastive_loss_for(model)
    batch = {key: torch.as_tensor(np.asarray(dataset[key])) for key in dataset.column_names if key != "uid"}
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    losses = loss_fn(model(**batch), batch)
    direction = {name: reference[name] - params[name].detach() for name in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    scores, grads = [], []
    for i in range(len(losses)):
        grad = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        grad = {name: g for name, g in zip(params, grad) if g is not None}
        grads.append(grad)
        scores.append(-sum((grad[name] * direction[name]).sum() for name in reference) / norm)
    return torch.stack(scores).detach().numpy(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_scores_and_update_match_one_autograd_pass_per_sample(tmp_path, case):
    make_model, layers = CASES[case]
    model = make_model()
    data = pair_dataset(N)
    names = layer_tensors(model, layers)
    reference = perturbed_reference(model, names, scale=0.5)
    start = copy.deepcopy(model)
    expected_scores, grads = oracle(copy.deepcopy(model), data, None, reference)

    trainer = MimicTrainer(
        model=model, args=config(tmp_path, mimic_layers=layers), train_dataset=data, reference=reference
    )
    assert trainer.batch_coupled
    trainer.train()
    records = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(records.mimic_score.values, expected_scores, rtol=1e-4, atol=1e-5)
    weights = records.weight.values
    assert weights.sum() == pytest.approx(1.0, abs=1e-5) and weights.std() > 0
    assert_update(start, model, grads, weights)


def assert_update(start, trained, grads, weights, lr=0.1) -> None:
    """One SGD step on Σ_i w_i ℓ_i: θ − lr Σ_i w_i ∇ℓ_i, for every parameter."""
    trained = dict(trained.named_parameters())
    for name, param in start.named_parameters():
        update = sum(float(w) * grads[i].get(name, torch.zeros_like(param)) for i, w in enumerate(weights))
        torch.testing.assert_close(trained[name].detach(), param.detach() - lr * update, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_scores_each_micro_batch_as_its_own_contrastive_batch(tmp_path):
    """2 micro-batches of 6 (sequential order): each is the negatives of its own samples; the softmax and the update
    span the step."""
    model = tiny_clip()
    data = pair_dataset(N)
    layers = CLIP_LAYERS["both"]
    reference = perturbed_reference(model, layer_tensors(model, layers), scale=0.5)
    start = copy.deepcopy(model)
    halves = [oracle(copy.deepcopy(model), data.select(range(k, k + 6)), None, reference) for k in (0, 6)]
    args = config(
        tmp_path,
        mimic_layers=layers,
        per_device_train_batch_size=6,
        gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    records = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(records.mimic_score.values, np.concatenate([h[0] for h in halves]), rtol=1e-4, atol=1e-5)
    assert (records.batch_size == N).all() and records.weight.sum() == pytest.approx(1.0, abs=1e-5)
    assert_update(start, model, halves[0][1] + halves[1][1], records.weight.values)


def test_bf16_scores_follow_the_float32_ones(tmp_path):
    model = tiny_clip()
    data = pair_dataset(N)
    layers = CLIP_LAYERS["both"]
    reference = perturbed_reference(model, layer_tensors(model, layers), scale=0.5)
    expected, _ = oracle(copy.deepcopy(model), data, None, reference)
    MimicTrainer(
        model=model, args=config(tmp_path, mimic_layers=layers, bf16=True), train_dataset=data, reference=reference
    ).train()
    scores = load_scores(tmp_path).to_pandas().sort_values("sample_id").mimic_score.values
    assert np.corrcoef(scores, expected)[0, 1] > 0.99
    np.testing.assert_allclose(scores, expected, rtol=0.1, atol=0.1 * np.abs(expected).max())


def test_a_user_in_batch_negatives_loss_is_scored_as_coupled(tmp_path):
    """sentence-transformers-style in-batch negatives on the CLIP towers' pooled outputs, marked batch-coupled."""
    model = tiny_clip()
    data = pair_dataset(N)

    @batch_coupled
    def loss_fn(outputs, inputs):
        return in_batch_negatives_loss(outputs.text_embeds, outputs.image_embeds)

    names = layer_tensors(model, CLIP_LAYERS["vision"])  # the images are the negatives: the coupled side
    reference = perturbed_reference(model, names)
    expected, _ = oracle(copy.deepcopy(model), data, loss_fn, reference)
    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_layers=CLIP_LAYERS["vision"]),
        train_dataset=data,
        reference=reference,
        per_sample_loss_fn=loss_fn,
    )
    trainer.train()
    records = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(records.mimic_score.values, expected, rtol=1e-4, atol=1e-5)


def test_an_unmarked_coupled_loss_is_refused_at_the_first_step(tmp_path):
    """Queries are texts, the batch's images their negatives: a layer of the image tower sees the coupling."""
    model = tiny_clip()

    def loss_fn(outputs, inputs):  # couples the samples, but says nothing
        return in_batch_negatives_loss(outputs.text_embeds, outputs.image_embeds)

    layers = CLIP_LAYERS["vision"]
    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_layers=layers),
        train_dataset=pair_dataset(N),
        reference=perturbed_reference(model, layer_tensors(model, layers)),
        per_sample_loss_fn=loss_fn,
    )
    with pytest.raises(
        ValueError, match=r"couples the samples.*'vision_model.encoder.layers.1.mlp.fc1'.*batch_coupled"
    ):
        trainer.train()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mimic_scorer": "grand"}, "'grand' scorer cannot score a batch-coupled"),
        ({"mimic_reweight_scope": "layer"}, "mimic_reweight_scope='layer'"),
    ],
)
def test_what_a_coupled_loss_cannot_do_is_refused_at_construction(tmp_path, overrides, message):
    model = tiny_clip()
    with pytest.raises(ValueError, match=message):
        MimicTrainer(
            model=model,
            args=config(tmp_path, mimic_layers=CLIP_LAYERS["vision"], **overrides),
            train_dataset=pair_dataset(N),
            reference=perturbed_reference(model, layer_tensors(model, CLIP_LAYERS["vision"])),
        )


def test_a_fused_attention_kernel_after_the_mimic_layer_gets_advice(tmp_path):
    model = tiny_clip(attn="sdpa")
    layers = ["vision_model.encoder.layers.0.mlp.fc1"]  # attention of layer 1 runs after it
    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_layers=layers),
        train_dataset=pair_dataset(N),
        reference=perturbed_reference(model, layer_tensors(model, layers)),
    )
    with pytest.raises(RuntimeError, match='attn_implementation="eager"'):
        trainer.train()


def test_a_pair_with_a_nan_image_is_left_out_and_the_others_train(tmp_path):
    """One NaN image in a CLIP batch: that pair gets weight 0 and the non-finite status, the other pairs keep finite
    terms (it is no one's negative), and every parameter stays finite."""
    import datasets

    model = tiny_clip()
    rows = pair_dataset(N).with_format(None)[:]
    rows["pixel_values"][5] = (np.full_like(np.asarray(rows["pixel_values"][5]), np.nan)).tolist()
    data = datasets.Dataset.from_dict(rows).with_format("torch")
    layers = CLIP_LAYERS["both"]
    with pytest.warns(RuntimeWarning, match=r"non-finite loss or score.*ids \[5\]"):
        MimicTrainer(
            model=model,
            args=config(tmp_path, mimic_layers=layers),
            train_dataset=data,
            reference=perturbed_reference(model, layer_tensors(model, layers)),
        ).train()
    records = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert records.loc[5, "status"] == 1 and records.loc[5, "weight"] == 0
    others = records.drop(index=5)
    assert np.isfinite(others.loss).all() and np.isfinite(others.mimic_score).all() and (others.status == 0).all()
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_when_only_the_mimic_layers_train_the_update_is_still_the_coupled_one(tmp_path):
    """Frozen towers with trainable mimic layers (LiT-style): the one-backward-through-the-uses shortcut weighs each
    row of δ by its own sample, which a contrastive loss breaks; the update must stay θ − lr Σ_i w_i ∇ℓ_i."""
    model = tiny_clip()
    layers = CLIP_LAYERS["both"]
    names = layer_tensors(model, layers)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    data = pair_dataset(N)
    reference = perturbed_reference(model, names, scale=0.5)
    start = copy.deepcopy(model)
    expected_scores, grads = oracle(copy.deepcopy(model), data, None, reference)
    MimicTrainer(
        model=model, args=config(tmp_path, mimic_layers=layers), train_dataset=data, reference=reference
    ).train()
    records = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(records.mimic_score.values, expected_scores, rtol=1e-4, atol=1e-5)
    assert_update(start, model, grads, records.weight.values)


def test_an_unmarked_coupled_loss_is_refused_also_when_only_the_mimic_layers_train(tmp_path):
    model = tiny_clip()
    layers = CLIP_LAYERS["vision"]
    names = layer_tensors(model, layers)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)

    def loss_fn(outputs, inputs):
        return in_batch_negatives_loss(outputs.text_embeds, outputs.image_embeds)

    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_layers=layers),
        train_dataset=pair_dataset(N),
        reference=perturbed_reference(model, names),
        per_sample_loss_fn=loss_fn,
    )
    with pytest.raises(ValueError, match="couples the samples"):
        trainer.train()
