"""Batch-coupled per-sample losses (hf_gradmimic.contrastive) against the models' own losses and a direct formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_gradmimic.contrastive import (
    ContrastiveLoss,
    batch_coupled,
    clip_per_sample_loss,
    contrastive_loss_for,
    in_batch_negatives_loss,
    is_batch_coupled,
    siglip_per_sample_loss,
)

from tiny_dual_encoders import pair_batch, tiny_clip, tiny_dual_encoder, tiny_siglip

MODELS = {"clip": tiny_clip, "siglip": tiny_siglip, "dual-encoder": tiny_dual_encoder}


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_terms_average_to_the_models_own_loss(name):
    model = MODELS[name]().eval()
    batch = pair_batch(6)
    with torch.no_grad():
        outputs = model(**batch, return_loss=True)
    loss_fn = contrastive_loss_for(model)
    assert isinstance(loss_fn, ContrastiveLoss) and loss_fn.kind == ("siglip" if name == "siglip" else "clip")
    losses = loss_fn(outputs, batch)
    assert losses.shape == (6,) and losses.dtype == torch.float32
    torch.testing.assert_close(losses.mean(), outputs.loss.float(), rtol=1e-5, atol=1e-6)
    assert losses.std() > 0  # terms of their own, not the mean repeated


def test_clip_term_of_one_sample_by_hand():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    scale = torch.tensor(math.log(3.0))
    losses = clip_per_sample_loss(images, texts, scale, gather=False)
    i = 2
    text_row = [3.0 * float(texts[i] @ images[j]) for j in range(5)]
    image_row = [3.0 * float(images[i] @ texts[j]) for j in range(5)]
    expected = 0.5 * (
        -text_row[i]
        + math.log(sum(math.exp(s) for s in text_row))
        - image_row[i]
        + math.log(sum(math.exp(s) for s in image_row))
    )
    assert losses[i].item() == pytest.approx(expected, rel=1e-5)


def test_siglip_term_of_one_sample_by_hand():
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    scale, bias = torch.tensor(math.log(2.0)), torch.tensor(-1.5)

    def pair(t, m):  # −log σ(y z) for text t and image m
        z = 2.0 * float(texts[t] @ images[m]) - 1.5
        y = 1.0 if t == m else -1.0
        return math.log1p(math.exp(-y * z))

    i = 1
    expected = 0.5 * (sum(pair(i, j) for j in range(4)) + sum(pair(j, i) for j in range(4)))
    assert siglip_per_sample_loss(images, texts, scale, bias, gather=False)[i].item() == pytest.approx(
        expected, rel=1e-5
    )


def test_a_sample_with_a_non_finite_embedding_gets_nan_and_is_nobodys_negative():
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    broken = images.clone()
    broken[3] = float("nan")
    scale, bias = torch.tensor(1.0), torch.tensor(0.0)
    keep = [0, 1, 2, 4]
    for loss_of in (
        lambda i, t: clip_per_sample_loss(i, t, scale, gather=False),
        lambda i, t: siglip_per_sample_loss(i, t, scale, bias, gather=False),
    ):
        losses = loss_of(broken, texts)
        assert torch.isnan(losses[3]) and torch.isfinite(losses[keep]).all()
        torch.testing.assert_close(losses[keep], loss_of(images[keep], texts[keep]))


def test_in_batch_negatives_is_the_cross_entropy_over_the_batchs_positives():
    generator = torch.Generator().manual_seed(3)
    queries, positives = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    scores = 20.0 * F.normalize(queries, dim=-1) @ F.normalize(positives, dim=-1).t()
    expected = F.cross_entropy(scores, torch.arange(4), reduction="none")
    torch.testing.assert_close(in_batch_negatives_loss(queries, positives, gather=False), expected)


def test_marking_a_loss_batch_coupled_and_refusing_a_model_without_the_parameters():
    def plain(outputs, inputs):
        return outputs

    assert not is_batch_coupled(plain) and not is_batch_coupled(None)
    assert batch_coupled(plain) is plain and is_batch_coupled(plain)
    assert is_batch_coupled(batch_coupled(len))  # a built-in is wrapped
    assert contrastive_loss_for(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="needs the model's `logit_bias`"):
        ContrastiveLoss(tiny_clip(), kind="siglip")
    with pytest.raises(ValueError, match="no `image_embeds`"):
        ContrastiveLoss(tiny_clip())({"text_embeds": torch.zeros(2, 8)}, {})
