"""Modules called on a tensor that the batch shares (rows that are not samples), against per-sample autograd.

DeBERTa-v2 projects its relative position embeddings (``[1, 2k, d]``) with each layer's key projection; MPNet looks up
its relative attention bias with ``[T, T]`` bucket ids. As a mimic layer, such a module is refused (its rows are not
samples); elsewhere in the model it must not change the model's forward, nor the weighted update formed in one
backward (`hf_gradmimic.training.full_update`), even when ``T`` equals the batch size.
"""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.ghost import UnsupportedLayerError

from sgd_args import SGD_ARGS

TEMPERATURE = 0.5
TINY = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=3,
    initializer_range=0.4,
)


def tiny_deberta():
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=30,
        max_position_embeddings=16,
        relative_attention=True,
        position_buckets=4,
        max_relative_positions=8,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,  # the key projection is also applied to the relative embeddings
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pad_token_id=0,
        **TINY,
    )
    return DebertaV2ForSequenceClassification(config)


def tiny_mpnet():
    torch.manual_seed(0)
    return MPNetForSequenceClassification(
        MPNetConfig(vocab_size=30, max_position_embeddings=40, relative_attention_num_buckets=32, **TINY)
    )


def token_data(n: int, length: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict(
        {"input_ids": rng.integers(3, 30, size=(n, length)), "labels": rng.integers(0, 3, size=n)}
    ).with_format("torch")


def reference_for(model, layer: str) -> dict[str, torch.Tensor]:
    """The layer's tensors a random step away."""
    generator = torch.Generator().manual_seed(1)
    tensors = {f"{layer}.{local}": param.detach() for local, param in model.get_submodule(layer).named_parameters()}
    return {name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()}


def per_sample_grads(model, data) -> dict[str, torch.Tensor]:
    """Each sample's gradient of every parameter, one backward per sample (the oracle)."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for row in data:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=row["input_ids"][None]).logits
        F.cross_entropy(logits, row["labels"][None]).backward()
        for name, param in params.items():
            grads[name].append(torch.zeros_like(param) if param.grad is None else param.grad.detach().clone())
    return {name: torch.stack(values) for name, values in grads.items()}


def train_one_step(tmp_path, model, data, layer: str, reference) -> None:
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=[layer],
        mimic_temperature=TEMPERATURE,
        mimic_alignment_check=False,
        per_device_train_batch_size=len(data),
        max_steps=1,
        **{**SGD_ARGS, "learning_rate": 1.0},
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()


def test_a_mimic_layer_also_called_on_a_tensor_the_batch_shares_is_refused(tmp_path):
    """DeBERTa's key projection of layer 1 is called on the hidden states ([8, 6, 16]) and on the relative embeddings
    ([1, 8, 16]); the second call's one row would be broadcast onto every sample's score. Refused, naming both."""
    model = tiny_deberta()
    layer = "deberta.encoder.layer.1.attention.self.key_proj"
    with pytest.raises(UnsupportedLayerError, match=rf"{layer}.*shape \(1, 8, 16\).*batch of 8 samples"):
        train_one_step(tmp_path, model, token_data(8, 6), layer, reference_for(model, layer))


@pytest.mark.parametrize(
    "make_model,length",
    [(tiny_deberta, 6), (tiny_mpnet, 8)],
    ids=["deberta-relative-embeddings", "mpnet-relative-bias-T-equals-B"],
)
def test_shared_calls_elsewhere_keep_the_scores_and_the_weighted_update(tmp_path, make_model, length):
    """The token embedding as mimic layer, every parameter trained: the scores are the per-sample oracle's, and every
    parameter moves by −Σ_i softmax(m/τ)_i g_i. DeBERTa repeats its relative embeddings' projections itself (a batch
    broadcast put on them made its forward fail); MPNet's bias lookup has T = 8 rows for 8 samples, which a check with
    equal coefficients took for samples (a wrong update of the bias table)."""
    model = make_model()
    data = token_data(8, length)
    layer = f"{model.base_model_prefix}.embeddings.word_embeddings"
    reference = reference_for(model, layer)
    before = copy.deepcopy(model)
    grads = per_sample_grads(model, data)
    key = f"{layer}.weight"
    direction = reference[key] - before.get_parameter(key).detach()
    scores = -(grads[key] * direction).flatten(1).sum(1) / direction.norm()
    coefficients = torch.softmax(scores / TEMPERATURE, 0)

    train_one_step(tmp_path, model, data, layer, reference)

    recorded = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(recorded.mimic_score, scores.numpy(), rtol=1e-4, atol=1e-6)
    for name, param in before.named_parameters():
        expected = param.detach() - torch.einsum("b,b...->...", coefficients, grads[name])
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=1e-4, atol=1e-5, msg=name)
