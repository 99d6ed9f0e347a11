"""Per-sample losses that follow the model as `Trainer` does: ``config.problem_type`` (regression, single- and
multi-label classification), against the model's own ``outputs.loss`` and against plain `Trainer`."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.losses import per_sample_loss

from sgd_args import SGD_ARGS
from trainer_pairs import assert_same_parameters

PLAIN = {**SGD_ARGS, "learning_rate": 0.1, "per_device_train_batch_size": 4, "max_steps": 3}


def tiny_bert(num_labels: int, problem_type: str | None) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        vocab_size=30,
        num_labels=num_labels,
        problem_type=problem_type,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def labels_for(problem_type: str, num_labels: int, batch: int, integer: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if problem_type == "single_label_classification":
        return torch.randint(0, num_labels, (batch,), generator=generator)
    if problem_type == "multi_label_classification":
        return torch.randint(0, 2, (batch, num_labels), generator=generator).float()
    if integer:  # regression with integer targets, as a dataset of star ratings gives them
        return torch.randint(0, 5, (batch,), generator=generator)
    return torch.randn((batch,) if num_labels == 1 else (batch, num_labels), generator=generator)


CASES = {
    "regression": ("regression", 1, False),
    "regression-integer-targets": ("regression", 1, True),
    "regression-3-outputs": ("regression", 3, False),
    "single-label": ("single_label_classification", 3, False),
    "multi-label": ("multi_label_classification", 3, False),
    "unset-one-label-is-regression": (None, 1, False),
    "unset-float-labels-is-multi-label": (None, 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mean_per_sample_loss_is_the_models_own_loss(case):
    problem_type, num_labels, integer = CASES[case]
    expected_type = problem_type or ("regression" if num_labels == 1 else "multi_label_classification")
    labels = labels_for(expected_type, num_labels, 6, integer)
    model = tiny_bert(num_labels, problem_type).eval()
    ids = torch.randint(1, 30, (6, 5), generator=torch.Generator().manual_seed(0))
    own = model(input_ids=ids, labels=labels).loss  # the model settles an unset problem_type on this call
    ours_model = tiny_bert(num_labels, problem_type).eval()
    losses = per_sample_loss(ours_model, ours_model(input_ids=ids), labels)
    assert losses.shape == (6,)
    torch.testing.assert_close(losses.mean(), own, rtol=1e-5, atol=1e-6)
    assert ours_model.config.problem_type == model.config.problem_type  # set as the model sets it


def test_float_labels_for_single_label_classification_are_refused_as_the_model_refuses_them():
    model = tiny_bert(3, "single_label_classification").eval()
    ids = torch.randint(1, 30, (4, 5))
    soft = torch.tensor([0.9, 0.1, 2.0, 1.0])
    with pytest.raises(RuntimeError):  # transformers' own loss: CrossEntropyLoss refuses float class indices
        model(input_ids=ids, labels=soft)
    with pytest.raises(ValueError, match=r"single_label_classification needs integer `labels`.*torch.long.*float32"):
        per_sample_loss(model, model(input_ids=ids), soft)


def sequence_dataset(labels: torch.Tensor) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(len(labels), 5))
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels.numpy()}).with_format("torch")


def train_both(tmp_path, problem_type, num_labels, labels):
    data = sequence_dataset(labels)
    plain_model, mimic_model = tiny_bert(num_labels, problem_type), tiny_bert(num_labels, problem_type)
    Trainer(
        model=plain_model, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **PLAIN), train_dataset=data
    ).train()
    reference = {name: param.detach() + 0.3 for name, param in mimic_model.classifier.named_parameters()}
    reference = {f"classifier.{name}": tensor for name, tensor in reference.items()}
    config = MimicConfig(
        output_dir=str(tmp_path / "mimic"), mimic_temperature=1e6, mimic_alignment_check=False, **PLAIN
    )
    MimicTrainer(model=mimic_model, args=config, train_dataset=data, reference=reference).train()
    return plain_model, mimic_model


@pytest.mark.parametrize("case", ["regression-integer-targets", "regression-3-outputs", "multi-label"])
def test_each_problem_type_trains_as_plain_trainer_at_infinite_temperature(tmp_path, case):
    problem_type, num_labels, integer = CASES[case]
    labels = labels_for(problem_type, num_labels, 12, integer)
    plain_model, mimic_model = train_both(tmp_path, problem_type, num_labels, labels)
    for (name, p_plain), (_, p_mimic) in zip(plain_model.named_parameters(), mimic_model.named_parameters()):
        torch.testing.assert_close(p_mimic, p_plain, atol=1e-5, rtol=0, msg=name)


def test_float_labels_stop_mimic_trainer_where_they_stop_trainer(tmp_path):
    data = sequence_dataset(torch.tensor([0.9, 0.1, 2.0, 1.0] * 3))
    with pytest.raises(RuntimeError):
        Trainer(
            model=tiny_bert(3, "single_label_classification"),
            args=TrainingArguments(output_dir=str(tmp_path / "plain"), **PLAIN),
            train_dataset=data,
        ).train()
    model = tiny_bert(3, "single_label_classification")
    reference = {f"classifier.{name}": p.detach() + 0.3 for name, p in model.classifier.named_parameters()}
    config = MimicConfig(output_dir=str(tmp_path / "mimic"), mimic_alignment_check=False, **PLAIN)
    trainer = MimicTrainer(model=model, args=config, train_dataset=data, reference=reference)
    with pytest.raises(ValueError, match=r"integer `labels`.*torch.long"):
        trainer.train()


def test_gradient_accumulation_gives_one_big_batchs_update_where_trainer_5_25_does_not(tmp_path):
    """A sequence classifier under 2 × 4 accumulation: MimicTrainer (τ = 1e6) takes plain Trainer's 1 × 8 update.
    transformers 5.25's Trainer itself does not divide such a model's mean loss by the accumulation steps (the model
    takes loss keyword arguments but ignores num_items_in_batch), the exception the README names: pinned here."""
    data = sequence_dataset(labels_for("single_label_classification", 3, 8))
    one_batch = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 1}
    accumulated = {**one_batch, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    models = {}
    for name, arguments in (("big", one_batch), ("accumulated", accumulated)):
        models[name] = tiny_bert(3, None)
        Trainer(
            model=models[name], args=TrainingArguments(output_dir=str(tmp_path / name), **arguments), train_dataset=data
        ).train()
    mimic = tiny_bert(3, None)
    reference = {f"classifier.{name}": p.detach() + 0.3 for name, p in mimic.classifier.named_parameters()}
    config = MimicConfig(
        output_dir=str(tmp_path / "mimic"), mimic_temperature=1e6, mimic_alignment_check=False, **accumulated
    )
    MimicTrainer(model=mimic, args=config, train_dataset=data, reference=reference).train()
    for (name, big), (_, ours) in zip(models["big"].named_parameters(), mimic.named_parameters()):
        torch.testing.assert_close(ours, big, atol=1e-6, rtol=0, msg=name)
    assert not torch.allclose(models["accumulated"].classifier.weight, models["big"].classifier.weight, atol=1e-4)


def test_float_token_labels_are_refused_as_the_models_token_loss_refuses_them():
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=30, num_labels=3
    )
    model = BertForTokenClassification(config).eval()
    ids = torch.randint(1, 30, (2, 5))
    labels = torch.randint(0, 3, (2, 5)).float()
    with pytest.raises(RuntimeError):
        model(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match=r"Token `labels` must be integer.*torch.long.*float32"):
        per_sample_loss(model, model(input_ids=ids), labels)


def tiny_seq2seq(kind: str):
    """A T5 or BART built from a config; its decoder reads the labels shifted right when it is given them."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(
            vocab_size=40,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=False,
            dropout_rate=0.0,
        )
        return T5ForConditionalGeneration(config)
    config = BartConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        tie_word_embeddings=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return BartForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_encoder_decoder_decodes_from_its_labels_as_under_trainer(tmp_path, kind):
    """T5 and BART (source 7 tokens, targets 6 with -100 padding): each sample's score is the per-sample oracle's
    from the model's own loss on that sample alone (its decoder fed the labels shifted right, as the model does), and
    with uniform weights (τ = 1e6) training equals plain `Trainer`'s."""
    rng = np.random.default_rng(0)
    source, target = rng.integers(3, 40, (8, 7)), rng.integers(3, 40, (8, 6))
    for row in range(8):
        target[row, 1 + row % 5 :] = -100
    data = datasets.Dataset.from_dict({"input_ids": source, "labels": target}).with_format("torch")
    student = tiny_seq2seq(kind)
    head = student.lm_head.weight
    generator = torch.Generator().manual_seed(1)
    reference = {"lm_head.weight": head.detach() + 0.5 * torch.randn(head.shape, generator=generator)}
    direction = reference["lm_head.weight"] - head.detach()
    oracle = []
    for row in data:
        student.zero_grad()
        student(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss.backward()
        oracle.append(float(-(head.grad * direction).sum() / direction.norm()))
    student.zero_grad(set_to_none=True)

    settings = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 2}
    plain = tiny_seq2seq(kind)
    Trainer(
        model=plain, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **settings), train_dataset=data
    ).train()
    args = MimicConfig(
        output_dir=str(tmp_path / "mimic"),
        mimic_layers=["lm_head"],
        mimic_temperature=1e6,
        mimic_alignment_check=False,
        **settings,
    )
    MimicTrainer(model=student, args=args, train_dataset=data, reference=reference).train()
    first = load_scores(tmp_path / "mimic").to_pandas().query("global_step == 1").sort_values("sample_id")
    np.testing.assert_allclose(first.mimic_score, oracle, rtol=1e-4, atol=1e-6)
    assert_same_parameters(plain, student, atol=1e-5)
