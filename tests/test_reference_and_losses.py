"""Reference tensor loading (only what is needed) and per-sample losses against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification
from transformers.trainer_pt_utils import LabelSmoother

from hf_gradmimic.losses import per_sample_loss, token_loss
from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors

from tiny_models import tiny_gpt2


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99, num_labels=3
    )
    return BertForSequenceClassification(config)


def test_reference_from_sharded_directory_reads_only_needed_shards(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    head_shard = index["weight_map"]["classifier.weight"]
    # Corrupt every shard that does not hold the head: reading one of them would fail.
    for shard in shards - {head_shard, index["weight_map"]["classifier.bias"]}:
        (tmp_path / shard).write_bytes(b"not a safetensors file")
    tensors = load_reference_tensors(tmp_path, ["classifier.weight", "classifier.bias"])
    torch.testing.assert_close(tensors["classifier.weight"], model.classifier.weight.detach())
    assert set(tensors) == {"classifier.weight", "classifier.bias"}


def test_reference_from_file_module_and_prefixed_keys(tmp_path):
    model = tiny_bert()
    path = tmp_path / "head.safetensors"
    # A checkpoint saved from a wrapper: every key carries a prefix.
    save_file(
        {
            "wrapper.classifier.weight": model.classifier.weight.detach().contiguous(),
            "wrapper.classifier.bias": model.classifier.bias.detach().contiguous(),
        },
        str(path),
    )
    from_file = load_reference_tensors(path, ["classifier.weight", "classifier.bias"])
    from_module = load_reference_tensors(model, ["classifier.weight", "classifier.bias"])
    for name in from_file:
        torch.testing.assert_close(from_file[name], from_module[name])
    with pytest.raises(ReferenceLoadError, match="'classifier.gamma' is missing.*Close names"):
        load_reference_tensors(path, ["classifier.gamma"])
    with pytest.raises(ReferenceLoadError, match="does not exist"):
        load_reference_tensors(str(tmp_path / "nowhere"), ["classifier.weight"])


def test_causal_lm_per_sample_loss_matches_the_models_own_loss_per_row():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    labels = ids.clone()
    labels[1, 5:] = -100
    outputs = model(input_ids=ids)
    losses = per_sample_loss(model, outputs, labels)
    for row in range(3):
        expected = model(input_ids=ids[row : row + 1], labels=labels[row : row + 1]).loss
        torch.testing.assert_close(losses[row], expected, rtol=1e-5, atol=1e-6)


def test_token_classification_and_label_smoothing_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    labels[0, :3] = -100
    losses = token_loss(logits, labels, label_smoothing=0.1)
    for row in range(4):
        # transformers' LabelSmoother averages over the row's own label tokens.
        expected = LabelSmoother(epsilon=0.1)({"logits": logits[row : row + 1]}, labels[row : row + 1])
        torch.testing.assert_close(losses[row], expected, rtol=1e-5, atol=1e-6)
    plain = per_sample_loss(tiny_bert(), {"logits": logits[:, 0]}, labels[:, 0].clamp(min=0))
    torch.testing.assert_close(plain, F.cross_entropy(logits[:, 0], labels[:, 0].clamp(min=0), reduction="none"))
