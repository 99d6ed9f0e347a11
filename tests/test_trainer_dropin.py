"""MimicTrainer as a drop-in `transformers.Trainer`: the same behaviours, run with both trainers, give the same
results (τ = 1e6, a reference for the model's last Linear layer), or a clear refusal naming the alternative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer
from tiny_models import tiny_gpt2, tiny_llama

PLAIN = dict(learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)


def lm_reference(model, scale: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = model.lm_head.weight.detach()
    return {"lm_head.weight": weight + scale * torch.randn(weight.shape, generator=generator)}


def assert_same_parameters(expected, got, atol=1e-6):
    for (name, p_expected), (_, p_got) in zip(expected.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(p_got, p_expected, atol=atol, rtol=0, msg=name)


def uneven_lm_dataset():
    """Samples with 2 to 8 labelled tokens: a per-sample mean and Trainer's per-token mean then differ."""
    import datasets

    ids = np.random.default_rng(0).integers(0, 40, size=(16, 9))
    labels = ids.copy()
    for row in range(16):
        labels[row, 2 + row % 7:] = -100
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).with_format("torch")


TOKEN_RUN = {**PLAIN, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2}


@pytest.fixture(scope="module")
def plain_trainer_llama(tmp_path_factory):
    """A Llama trained by plain `Trainer` on `uneven_lm_dataset` (once for both scopes)."""
    output_dir = str(tmp_path_factory.mktemp("plain"))
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=output_dir, **TOKEN_RUN),
                      train_dataset=uneven_lm_dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize("scope", ["all", "layer"])
def test_token_weighting_reproduces_trainer_for_a_causal_lm_under_gradient_accumulation(tmp_path, scope,
                                                                                        plain_trainer_llama):
    """Trainer averages over every labelled token of the step (num_items_in_batch); so does ``token`` weighting.
    (A Llama: for GPT-2, whose ``loss_type`` transformers 5.25 leaves unset, Trainer counts the unshifted labels.)"""
    mimic_model = tiny_llama()
    args = MimicConfig(output_dir=str(tmp_path / "mimic"), mimic_layers=["lm_head"], mimic_temperature=1e6,
                       mimic_reweight_scope=scope, mimic_alignment_check=False, **TOKEN_RUN)
    assert args.mimic_token_weighting == "token"  # the default is the one that reproduces Trainer
    trainer = MimicTrainer(model=mimic_model, args=args, train_dataset=uneven_lm_dataset(),
                           reference=lm_reference(mimic_model))
    trainer.train()
    assert_same_parameters(plain_trainer_llama.model, mimic_model)
    logged = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (plain_trainer_llama, trainer)]
    np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5)  # the logged loss is Trainer's token mean too


def test_sample_weighting_is_the_per_sample_mean(tmp_path):
    """``sample``: the update is the mean over samples of each sample's mean token loss (an oracle by hand)."""
    data = uneven_lm_dataset()
    shared = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 1}
    model, oracle = tiny_gpt2(dropout=0.0), tiny_gpt2(dropout=0.0)
    args = MimicConfig(output_dir=str(tmp_path), mimic_layers=["lm_head"], mimic_temperature=1e6,
                       mimic_alignment_check=False, mimic_token_weighting="sample", **shared)
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=lm_reference(model))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    ids, labels = batch["input_ids"], batch["labels"]
    logits = oracle(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="none").view(targets.shape)
    per_sample = token_losses.sum(1) / (targets != -100).sum(1)
    per_sample.mean().backward()
    with torch.no_grad():
        for param in oracle.parameters():
            param -= 0.1 * param.grad
    assert_same_parameters(oracle, model, atol=1e-5)
