"""MimicTrainer's running filter metric (mimic_clean_column) and its model card."""

from __future__ import annotations

import re

import numpy as np
import pytest
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer, build_filter
from hf_gradmimic.metrics import accuracy_compute_metrics, compute_filter_metrics
from hf_gradmimic.testing.digits import digits_model, load_noisy_digits


@pytest.mark.timeout(300)
def test_running_filter_metric_at_each_evaluation(tmp_path):
    data = load_noisy_digits(noise_rate=0.4, seed=0)
    train = data["train"].remove_columns(["clean_label"])
    reference = digits_model()
    reference.classifier.weight.data.normal_()  # any reference: this test checks the bookkeeping, not quality
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["classifier"],
        mimic_clean_column="is_clean",
        mimic_filter_method="threshold",
        num_train_epochs=3,
        per_device_train_batch_size=64,
        eval_strategy="epoch",
        logging_strategy="epoch",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        mimic_alignment_check=False,
    )
    trainer = MimicTrainer(
        model=digits_model(),
        args=args,
        train_dataset=train,
        eval_dataset=data["test"],
        compute_metrics=accuracy_compute_metrics,
        reference=dict(reference.named_parameters()),
    )
    trainer.train()
    curve = [entry for entry in trainer.state.log_history if "eval_mimic_filter_discard_f1" in entry]
    assert [entry["epoch"] for entry in curve] == [1.0, 2.0, 3.0]
    # The last point equals the filter built offline from the finished log, scored by the metric module.
    final = build_filter(tmp_path, method="threshold")
    clean = np.asarray(train["is_clean"])[final.sample_ids]
    expected = compute_filter_metrics(final.keep, clean, final.keep_prob)
    assert curve[-1]["eval_mimic_filter_discard_f1"] == pytest.approx(expected["discard_f1"])
    assert curve[-1]["eval_mimic_filter_retained_fraction"] == pytest.approx(expected["retained_fraction"])
    assert "eval_accuracy" in trainer.state.log_history[-2] or any(
        "eval_accuracy" in e for e in trainer.state.log_history
    )


def test_clean_column_never_reaches_the_model(tmp_path):
    from tiny_models import TinyMLP, mlp_dataset

    seen = set()

    class Recording(TinyMLP):
        def forward(self, x, labels=None, **kwargs):
            seen.update(kwargs)
            return super().forward(x, labels)

    data = mlp_dataset(n=16).add_column("clean", [1] * 16)
    model = Recording()
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        mimic_clean_column="clean",
        max_steps=2,
        per_device_train_batch_size=8,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        mimic_alignment_check=False,
    )
    reference = {n: p.detach() + 0.1 for n, p in model.named_parameters() if n.startswith("head.")}
    trainer = MimicTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=mlp_dataset(n=8), reference=reference
    )
    trainer.train()
    trainer.evaluate()
    assert not seen & {"clean", "mimic_row_index"}, seen


def test_model_card_shows_the_mimic_settings(tmp_path):
    from tiny_models import TinyMLP, mlp_dataset

    model = TinyMLP()
    reference = {n: p.detach() + 0.1 for n, p in model.named_parameters() if n.startswith("head.")}
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        mimic_temperature=0.25,
        mimic_normalize="micro",
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=8), reference=reference)
    trainer.create_model_card(model_name="tiny-mimic")
    card = ModelCard.load(tmp_path / "README.md")  # the Hub client's reading: the YAML header and the text
    assert card.data.model_name == "tiny-mimic"
    assert card.data.tags[:3] == ["grad-mimic", "data-filtering", "hf-gradmimic"]
    # Each setting in its own row of the settings table, with the value the config was given (not a substring
    # that the rest of the card could hold: "head" and "0.25" appear in other places too).
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", card.text, flags=re.MULTILINE))
    assert rows["mimic layers"] == "`head`", rows
    assert rows["temperature τ"] == "0.25", rows
    assert rows["softmax normalisation"] == "micro", rows
    assert rows["reference model"] == "`in-memory reference (dict)`", rows
    # Trainer.create_model_card's arguments (Trainer.push_to_hub passes them) reach the metadata as plain Trainer's
    # card has them; they were dropped.
    card_args = dict(license="mit", language="en", finetuned_from="org/base-model", dataset="org/data")
    trainer.create_model_card(**card_args)
    plain = Trainer(model=TinyMLP(), args=TrainingArguments(output_dir=str(tmp_path / "plain"), report_to=[]))
    plain.create_model_card(**card_args)
    ours, theirs = (ModelCard.load(folder / "README.md").data for folder in (tmp_path, tmp_path / "plain"))
    for field in ("license", "language", "base_model"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.datasets == ["org/data"]  # Trainer puts it in the model index only
