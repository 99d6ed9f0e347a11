"""The features transformers' own Trainer tests exercise (tests/trainer/ of transformers 5.x: core, evaluation,
checkpointing, callbacks, data), each run with `Trainer` and with `MimicTrainer` (τ = 1e6, a reference for the model's
head made from its own weights perturbed, so the Grad-Mimic scorer runs): the same parameters, logs and metrics, or a
refusal naming the reason. Why these are written here rather than vendored: README.md beside this file."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from tiny_models import tiny_llama
from trainer_pairs import (
    ADAPTER_ATOL,
    PLAIN,
    RegressionModel,
    assert_same_parameters,
    head_reference,
    lm_reference,
    trainer_logs,
)

# ------------------------------------------------------------ transformers' test data, as plain Python datasets


class RegressionDataset:
    """transformers' tests/trainer RegressionDataset: a map-style class (not `datasets`), y = 2x + 3 + noise, one
    or several label columns."""

    def __init__(self, length: int = 64, seed: int = 42, label_names: tuple[str, ...] = ("labels",)):
        rng = np.random.RandomState(seed)
        self.x = rng.normal(size=(length,)).astype(np.float32)
        self.ys = {
            name: (2 * self.x + 3 + rng.normal(scale=0.1, size=length)).astype(np.float32) for name in label_names
        }

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_x": self.x[i], **{name: y[i] for name, y in self.ys.items()}}


class SampleIterableDataset(IterableDataset):
    """transformers' SampleIterableDataset: the regression rows as a torch stream, without ids."""

    def __init__(self, length: int = 64):
        self.rows = RegressionDataset(length)

    def __iter__(self):
        for i in range(len(self.rows)):
            yield self.rows[i]


class DynamicShapesDataset:
    """transformers' DynamicShapesDataset: every 8 consecutive rows share a length, drawn from 1 to 19, so evaluation
    pads predictions and labels across batches."""

    def __init__(self, length: int = 64, seed: int = 42, batch_size: int = 8):
        rng = np.random.RandomState(seed)
        sizes = rng.randint(1, 20, (length // batch_size,)).repeat(batch_size)
        self.xs = [rng.normal(size=(s,)).astype(np.float32) for s in sizes]
        self.ys = [rng.normal(size=(s,)).astype(np.float32) for s in sizes]

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_x": self.xs[i], "labels": self.ys[i]}


class RegressionDictModel(RegressionModel):
    """transformers' RegressionDictModel: outputs a dict ``{"output": y, "loss": ...}`` (no ``logits`` key)."""

    def forward(self, input_x, labels=None):
        y = self.head(input_x.unsqueeze(-1)).squeeze(-1)
        return {"output": y} if labels is None else {"output": y, "loss": nn.functional.mse_loss(y, labels)}


class DoubleOutputModel(RegressionModel):
    """transformers' RegressionModel with ``double_output=True``: two prediction tensors."""

    def forward(self, input_x, labels=None):
        y = self.head(input_x.unsqueeze(-1)).squeeze(-1)
        return (y, y) if labels is None else (nn.functional.mse_loss(y, labels), y, y)


class TwoLabelModel(RegressionModel):
    """A model whose own loss reads a second label column (transformers' ``label_names=["labels", "labels_2"]``)."""

    def forward(self, input_x, labels=None, labels_2=None):
        y = self.head(input_x.unsqueeze(-1)).squeeze(-1)
        if labels is None:
            return (y,)
        return (nn.functional.mse_loss(y, labels) + nn.functional.mse_loss(y, labels_2), y)


def almost_accuracy(prediction) -> dict[str, float]:
    """transformers' AlmostAccuracy metric."""
    predictions, labels = prediction
    return {"accuracy": float((np.abs(predictions - labels) <= 0.25).mean())}


class BatchedMeanError:
    """A ``batch_eval_metrics`` metric: the mean absolute error, accumulated batch by batch."""

    def __init__(self):
        self.errors: list[float] = []

    def __call__(self, prediction, compute_result: bool):
        self.errors.append(float((prediction.predictions - prediction.label_ids).abs().mean()))
        if compute_result:
            result, self.errors = {"mean_error": float(np.mean(self.errors))}, []
            return result
        return None


def lm_rows(n: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows of 3 to 9 ids, unpadded: the collator pads them (labels -100 past each row's end)."""
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 40, size=int(k)).tolist()} for k in rng.integers(3, 10, size=n)]


def pad_lm_batch(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    length = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ------------------------------------------------------------------------------------------ the scenarios


@dataclass
class Scenario:
    """One Trainer feature, as transformers' tests use it: the arguments, data and trainer keywords for both trainers."""

    args: dict[str, Any] = field(default_factory=dict)
    model: Any = RegressionModel
    train: Any = RegressionDataset
    eval: Any = None
    trainer_kwargs: Any = dict  # called per trainer: fresh callbacks and metric objects
    mimic_layer: str = "head"
    language_model: bool = False


def evaluation(**args: Any) -> dict[str, Any]:
    return {"eval_strategy": "steps", "eval_steps": 2, **args}


def causal_lm(eval: Any = None, **args: Any) -> Scenario:
    """A tiny Llama on unpadded token rows, padded by the collator, its ``lm_head`` the mimic layer."""
    return Scenario(
        args={"remove_unused_columns": False, "per_device_train_batch_size": 4, **args},
        model=tiny_llama,
        train=lm_rows,
        eval=eval,
        trainer_kwargs=lambda: {"data_collator": pad_lm_batch},
        mimic_layer="lm_head",
        language_model=True,
    )


SCENARIOS: dict[str, Scenario] = {
    # core: data and models as transformers' tests give them
    "map-style class dataset": Scenario(eval=lambda: RegressionDataset(16, seed=1)),
    "list of dicts dataset": Scenario(train=lambda: [RegressionDataset()[i] for i in range(64)]),
    "dict outputs without logits": Scenario(model=RegressionDictModel, eval=lambda: RegressionDataset(16, seed=1)),
    "two prediction outputs": Scenario(model=DoubleOutputModel, eval=lambda: RegressionDataset(16, seed=1)),
    "gradient accumulation": Scenario(args={"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2}),
    "epochs, epoch strategies": Scenario(
        args={"max_steps": -1, "num_train_epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch"},
        eval=lambda: RegressionDataset(16, seed=1),
    ),
    "adamw, warmup, clipping": Scenario(
        args={"optim": "adamw_torch", "lr_scheduler_type": "linear", "warmup_steps": 2, "max_grad_norm": 1.0}
    ),
    "optimizer_cls_and_kwargs": Scenario(trainer_kwargs=lambda: {"optimizer_cls_and_kwargs": (torch.optim.Adam, {})}),
    "auto_find_batch_size": Scenario(args={"auto_find_batch_size": True}),
    "dataloader_drop_last": Scenario(args={"dataloader_drop_last": True, "per_device_train_batch_size": 7}),
    "dataloader_num_workers": Scenario(args={"dataloader_num_workers": 2}),
    "full_determinism": Scenario(args={"full_determinism": True}),
    "torch_empty_cache_steps": Scenario(args={"torch_empty_cache_steps": 1}),
    "include_num_input_tokens_seen": Scenario(args={"include_num_input_tokens_seen": True}),
    # evaluation
    "compute_metrics": Scenario(args=evaluation(), eval=lambda: RegressionDataset(16, seed=1)),
    "batch_eval_metrics": Scenario(
        args=evaluation(batch_eval_metrics=True),
        eval=lambda: RegressionDataset(16, seed=1),
        trainer_kwargs=lambda: {"compute_metrics": BatchedMeanError()},
    ),
    "eval_on_start": Scenario(args=evaluation(eval_on_start=True), eval=lambda: RegressionDataset(16, seed=1)),
    "several eval datasets": Scenario(
        args=evaluation(), eval=lambda: {"a": RegressionDataset(16, seed=1), "b": RegressionDataset(8, seed=2)}
    ),
    "dynamic shapes in evaluation": Scenario(eval=DynamicShapesDataset),
    # checkpointing and callbacks
    "best model, save_total_limit": Scenario(
        args=evaluation(
            save_strategy="steps",
            save_steps=2,
            save_total_limit=1,
            load_best_model_at_end=True,
            metric_for_best_model="accuracy",
        ),
        eval=lambda: RegressionDataset(16, seed=1),
        trainer_kwargs=lambda: {"compute_metrics": almost_accuracy},
    ),
    "early stopping": Scenario(
        args=evaluation(eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True, max_steps=30),
        eval=lambda: RegressionDataset(16, seed=1),
        trainer_kwargs=lambda: {"callbacks": [EarlyStoppingCallback(early_stopping_patience=1)]},
    ),
    "save_only_model": Scenario(args={"save_strategy": "steps", "save_steps": 2, "save_only_model": True}),
    # language models: padding collator, NEFTune, activation checkpointing, label smoothing, token counts
    "causal LM, padding collator": causal_lm(eval=lm_rows),
    "causal LM, NEFTune": causal_lm(neftune_noise_alpha=5.0),
    "causal LM, activation checkpointing": causal_lm(activation_checkpointing=True),
    "causal LM, label smoothing": causal_lm(label_smoothing_factor=0.1),
}


def untimed(logs: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k} for entry in logs]


def build(kind: str, scenario: Scenario, tmp_path) -> Trainer:
    arguments = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 4, **scenario.args}
    model = scenario.model()
    data = {"train_dataset": scenario.train(), "eval_dataset": None if scenario.eval is None else scenario.eval()}
    if "compute_metrics" not in scenario.trainer_kwargs() and data["eval_dataset"] is not None:
        data["compute_metrics"] = None if scenario.language_model else almost_accuracy
    kwargs = {**data, **scenario.trainer_kwargs()}
    output_dir = str(tmp_path / kind)
    if kind == "plain":
        return Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **arguments), **kwargs)
    config = MimicConfig(output_dir=output_dir, mimic_layers=[scenario.mimic_layer], mimic_temperature=1e6, **arguments)
    reference = lm_reference(model) if scenario.language_model else head_reference(model)
    return MimicTrainer(model=model, args=config, reference=reference, **kwargs)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_feature_trains_evaluates_and_predicts_as_trainer(tmp_path, name):
    scenario = SCENARIOS[name]
    # Each built and trained in turn: both draw NEFTune's noise from the global generator that Trainer seeds at
    # construction, so the runs must not interleave.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # alignment-check advice about the perturbed reference
        plain = build("plain", scenario, tmp_path)
        plain.train()
        mimic = build("mimic", scenario, tmp_path)
        mimic.train()
    assert_same_parameters(plain.model, mimic.model, atol=ADAPTER_ATOL)
    expected, got = untimed(trainer_logs(plain)), untimed(trainer_logs(mimic))
    assert [sorted(entry) for entry in got] == [sorted(entry) for entry in expected]
    for want, have in zip(expected, got):
        for key in want:
            np.testing.assert_allclose(have[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert plain.state.best_model_checkpoint == (
        None
        if mimic.state.best_model_checkpoint is None
        else mimic.state.best_model_checkpoint.replace("mimic", "plain")
    )
    assert len(load_scores(mimic.args.output_dir)) > 0  # the scorer ran and its records were written
    if scenario.eval is not None:
        held_out = scenario.eval()
        held_out = next(iter(held_out.values())) if isinstance(held_out, dict) else held_out
        want, have = plain.predict(held_out), mimic.predict(held_out)
        assert sorted(untimed([have.metrics])[0]) == sorted(untimed([want.metrics])[0])
        np.testing.assert_allclose(have.metrics["test_loss"], want.metrics["test_loss"], rtol=1e-4)
        predictions = [p[0] if isinstance(p, tuple) else p for p in (want.predictions, have.predictions)]
        np.testing.assert_allclose(predictions[1], predictions[0], atol=1e-4)


# ------------------------------------------------------------------------------------- refused, with the reason


def test_a_model_whose_own_loss_differs_from_the_built_in_one_is_refused_before_any_update(tmp_path):
    """transformers' tests train models whose loss reads several label columns (``label_names``): Trainer trains on
    that loss; MimicTrainer, which recomputes per-sample losses from the predictions, refuses the model at the first
    batch (it used to train a different loss without a word), and trains it as Trainer does given the loss per
    sample."""
    data = RegressionDataset(label_names=("labels", "labels_2"))
    arguments = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 4, "label_names": ["labels", "labels_2"]}
    model = TwoLabelModel()
    before = model.head.weight.detach().clone()
    mimic = MimicTrainer(
        model=model,
        args=MimicConfig(output_dir=str(tmp_path / "mimic"), mimic_layers=["head"], **arguments),
        train_dataset=data,
        reference=head_reference(model),
    )
    with pytest.raises(
        ValueError, match=r"own loss.*TwoLabelModel computes its loss in its own way.*per_sample_loss_fn"
    ):
        mimic.train()
    torch.testing.assert_close(model.head.weight, before)  # refused before any update

    def both_columns(outputs, inputs):
        prediction = outputs[1]  # the model gets the labels too: (loss, prediction)
        return (prediction - inputs["labels"]).square() + (prediction - inputs["labels_2"]).square()

    plain_model, mimic_model = TwoLabelModel(), TwoLabelModel()
    plain = Trainer(
        model=plain_model, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **arguments), train_dataset=data
    )
    mimic = MimicTrainer(
        model=mimic_model,
        args=MimicConfig(output_dir=str(tmp_path / "ok"), mimic_layers=["head"], mimic_temperature=1e6, **arguments),
        train_dataset=data,
        reference=head_reference(mimic_model),
        per_sample_loss_fn=both_columns,
    )
    plain.train(), mimic.train()
    assert_same_parameters(plain_model, mimic_model, atol=ADAPTER_ATOL)


def test_a_torch_stream_without_sample_ids_is_refused_naming_the_id_column(tmp_path):
    """transformers' SampleIterableDataset yields rows without ids: Trainer trains on it; MimicTrainer must name each
    sample in its score log, and refuses at the first batch, naming ``mimic_id_column`` and ``mimic_row_index``."""
    model = RegressionModel()
    config = MimicConfig(output_dir=str(tmp_path), mimic_layers=["head"], **{**PLAIN, "max_steps": 2})
    trainer = MimicTrainer(
        model=model, args=config, train_dataset=SampleIterableDataset(), reference=head_reference(model)
    )
    with pytest.raises(ValueError, match=re.escape("Set `mimic_id_column`") + r".*mimic_row_index"):
        trainer.train()
