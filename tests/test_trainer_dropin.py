"""MimicTrainer as a drop-in `transformers.Trainer`: the same behaviours, run with both trainers, give the same
results (τ = 1e6, a reference for the model's last Linear layer), or a clear refusal naming the alternative."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores, returns_per_sample_losses
from hf_gradmimic.ghost import UnsupportedLayerError

from tiny_models import tiny_gpt2, tiny_llama
from trainer_pairs import (
    ADAPTER_ATOL,
    PLAIN,
    RegressionModel,
    assert_same_logs,
    assert_same_parameters,
    both_trainers,
    head_reference,
    lm_reference,
    regression_dataset,
)


def uneven_lm_dataset():
    """Samples with 2 to 8 labelled tokens: a per-sample mean and Trainer's per-token mean then differ."""
    import datasets

    ids = np.random.default_rng(0).integers(0, 40, size=(16, 9))
    labels = ids.copy()
    for row in range(16):
        labels[row, 2 + row % 7 :] = -100
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).with_format("torch")


TOKEN_RUN = {**PLAIN, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2}


@pytest.fixture(scope="module")
def plain_trainer_llama(tmp_path_factory):
    """A Llama trained by plain `Trainer` on `uneven_lm_dataset` (once for both scopes)."""
    output_dir = str(tmp_path_factory.mktemp("plain"))
    trainer = Trainer(
        model=tiny_llama(),
        args=TrainingArguments(output_dir=output_dir, **TOKEN_RUN),
        train_dataset=uneven_lm_dataset(),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("scope", ["all", "layer"])
def test_token_weighting_reproduces_trainer_for_a_causal_lm_under_gradient_accumulation(
    tmp_path, scope, plain_trainer_llama
):
    """Trainer averages over every labelled token of the step (num_items_in_batch); so does ``token`` weighting.
    (A Llama: for GPT-2, whose ``loss_type`` transformers 5.25 leaves unset, Trainer counts the unshifted labels.)"""
    mimic_model = tiny_llama()
    args = MimicConfig(
        output_dir=str(tmp_path / "mimic"),
        mimic_layers=["lm_head"],
        mimic_temperature=1e6,
        mimic_reweight_scope=scope,
        mimic_alignment_check=False,
        **TOKEN_RUN,
    )
    assert args.mimic_token_weighting == "token"  # the default is the one that reproduces Trainer
    trainer = MimicTrainer(
        model=mimic_model, args=args, train_dataset=uneven_lm_dataset(), reference=lm_reference(mimic_model)
    )
    trainer.train()
    assert_same_parameters(plain_trainer_llama.model, mimic_model)
    logged = [
        [entry["loss"] for entry in run.state.log_history if "loss" in entry] for run in (plain_trainer_llama, trainer)
    ]
    np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5)  # the logged loss is Trainer's token mean too


def test_layer_scope_on_gpt2_reproduces_trainer_in_every_tensor(tmp_path):
    """GPT-2 has no ``loss_type``, so transformers 5.25's `Trainer` divides by the unshifted label count. Scope ``layer``
    keeps `Trainer`'s loss outside the mimic layer; inside it, the step softmax's coefficients (summing to 1) were
    taken against plain weights summing to 31/37 here, and the mimic layer stepped 1.19 times as far as the rest of
    the model at uniform weights. Now every tensor equals plain `Trainer`'s (τ = 1e6)."""
    data = uneven_lm_dataset()
    plain = Trainer(
        model=tiny_gpt2(dropout=0.0),
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), **TOKEN_RUN),
        train_dataset=data,
    )
    plain.train()
    model, layer = tiny_gpt2(dropout=0.0), "transformer.h.0.mlp.c_fc"
    reference = {
        f"{layer}.{name}": param.detach() + 0.3 for name, param in model.get_submodule(layer).named_parameters()
    }
    args = MimicConfig(
        output_dir=str(tmp_path / "mimic"),
        mimic_layers=[layer],
        mimic_temperature=1e6,
        mimic_reweight_scope="layer",
        mimic_alignment_check=False,
        **TOKEN_RUN,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    assert_same_parameters(plain.model, model)


def test_a_masked_lm_decoder_whose_bias_its_parent_ties_is_scored_and_trains_as_trainer(tmp_path):
    """BERT's ``cls.predictions.decoder.bias`` is ``cls.predictions.bias`` (tied for resizing): the parent was taken for
    a second user of the tensor and refused ("BertLMPredictionHead, which the ghost maths does not support"). The
    scores are per-sample autograd's, and τ = 1e6 trains as plain `Trainer`."""
    import datasets
    from transformers import BertConfig, BertForMaskedLM

    def bert():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForMaskedLM(config)

    ids = np.random.default_rng(0).integers(0, 30, size=(8, 6))
    labels = np.where(np.random.default_rng(1).random((8, 6)) < 0.5, ids, -100)
    labels[:, 0] = ids[:, 0]  # a label in every sample
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).with_format("torch")
    run = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 1}
    plain = Trainer(model=bert(), args=TrainingArguments(output_dir=str(tmp_path / "plain"), **run), train_dataset=data)
    plain.train()
    model, layer = bert(), "cls.predictions.decoder"
    before = copy.deepcopy(model)
    reference = {f"{layer}.{name}": p.detach() + 0.1 for name, p in model.get_submodule(layer).named_parameters()}
    args = MimicConfig(
        output_dir=str(tmp_path / "mimic"),
        mimic_layers=[layer],
        mimic_temperature=1e6,
        mimic_alignment_check=False,
        **run,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    assert_same_parameters(plain.model, model)
    # (named_parameters names the tied tensors after their first holders: the word embeddings, cls.predictions.bias)
    direction = {name: target - before.get_parameter(name).detach() for name, target in reference.items()}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    expected = []
    for row in range(8):
        logits = before(input_ids=torch.as_tensor(ids[row : row + 1])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels[row]), ignore_index=-100)
        grads = torch.autograd.grad(loss, [before.get_parameter(name) for name in direction])
        expected.append(-sum((g * v).sum() for g, v in zip(grads, direction.values())) / norm)
    scores = load_scores(tmp_path / "mimic").to_pandas().sort_values("sample_id").mimic_score.to_numpy()
    np.testing.assert_allclose(scores, torch.stack(expected).detach().numpy(), rtol=1e-3, atol=1e-6)


def grand_select(tmp_path, ratio: float, **overrides) -> MimicConfig:
    """`TOKEN_RUN` in ``select`` mode with GraNd at the head, keeping ``ratio`` of each step's candidates."""
    return MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["lm_head"],
        mimic_scorer="grand",
        mimic_mode="select",
        mimic_select_ratio=ratio,
        mimic_alignment_check=False,
        **{**TOKEN_RUN, **overrides},
    )


@pytest.mark.parametrize("ratio, warmup", [(1.0, 0), (0.25, 2)])
def test_select_mode_keeping_every_sample_trains_as_trainer_over_tokens(tmp_path, plain_trainer_llama, ratio, warmup):
    """``select`` mode (GraNd) with a ratio of 1, or in its warmup steps (uniform weights: every candidate), trains
    every candidate: over their tokens, as Trainer does."""
    mimic_model = tiny_llama()
    args = grand_select(tmp_path, ratio, mimic_warmup_steps=warmup)
    trainer = MimicTrainer(model=mimic_model, args=args, train_dataset=uneven_lm_dataset())
    trainer.train()
    assert_same_parameters(plain_trainer_llama.model, mimic_model)


@pytest.mark.parametrize("ratio", [0.5, 0.125])
def test_select_mode_logs_the_token_mean_of_the_selected_samples(tmp_path, ratio):
    """``select`` mode trains on the selected samples' tokens, so the logged loss is their token mean, as `Trainer`
    trained on those samples alone logs it: recomputed by hand, with the untrained model, from the rows the score
    log marks as selected (weight > 0) at the one step. With one sample selected of the step's 2 × 4, a micro-batch
    has none, and adds nothing to the logged loss."""
    data = uneven_lm_dataset()
    trainer = MimicTrainer(model=tiny_llama(), args=grand_select(tmp_path, ratio, max_steps=1), train_dataset=data)
    trainer.train()
    scores = load_scores(tmp_path).to_pandas()
    selected = scores.sample_id[scores.weight > 0].to_numpy()
    assert len(selected) == int(ratio * 8)
    rows = data[selected]
    logits = tiny_llama()(input_ids=rows["input_ids"]).logits[:, :-1]
    targets = rows["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
    expected = (token_losses / (targets != -100).sum()).item()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    np.testing.assert_allclose(logged, [expected], rtol=1e-4)


def test_sample_weighting_is_the_per_sample_mean(tmp_path):
    """``sample``: the update is the mean over samples of each sample's mean token loss (an oracle by hand)."""
    data = uneven_lm_dataset()
    shared = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 1}
    model, oracle = tiny_gpt2(dropout=0.0), tiny_gpt2(dropout=0.0)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["lm_head"],
        mimic_temperature=1e6,
        mimic_alignment_check=False,
        mimic_token_weighting="sample",
        **shared,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=lm_reference(model))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    ids, labels = batch["input_ids"], batch["labels"]
    logits = oracle(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    per_sample = token_losses.sum(1) / (targets != -100).sum(1)
    per_sample.mean().backward()
    with torch.no_grad():
        for param in oracle.parameters():
            param -= 0.1 * param.grad
    assert_same_parameters(oracle, model, atol=1e-5)


# ---------------------------------------------------------------- the adapter: one behaviour, both trainers


class BareRegressionModel(nn.Module):
    """transformers' tests/trainer RegressionModel as it is: bare scalar parameters, no layer to score by."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        return (y,) if labels is None else (nn.functional.mse_loss(y, labels), y)


def test_train_evaluate_predict_match_trainer(tmp_path):
    data, held_out = regression_dataset(), regression_dataset(n=16, seed=7)
    plain, mimic = both_trainers(
        tmp_path,
        train_dataset=data,
        eval_dataset=held_out,
        args={"eval_strategy": "steps", "eval_steps": 2, "gradient_accumulation_steps": 2},
    )
    plain.train(), mimic.train()
    assert_same_parameters(plain.model, mimic.model, atol=ADAPTER_ATOL)
    assert_same_logs(plain, mimic)
    expected, got = plain.predict(held_out), mimic.predict(held_out)
    np.testing.assert_allclose(got.predictions, expected.predictions, atol=ADAPTER_ATOL)
    for expected_metrics, got_metrics, prefix in (
        (expected.metrics, got.metrics, "test"),
        (plain.evaluate(held_out), mimic.evaluate(held_out), "eval"),
    ):
        untimed = [
            {k for k in metrics if "runtime" not in k and "per_second" not in k}
            for metrics in (expected_metrics, got_metrics)
        ]
        assert untimed[1] == untimed[0]
        np.testing.assert_allclose(got_metrics[f"{prefix}_loss"], expected_metrics[f"{prefix}_loss"], rtol=1e-4)


def test_checkpoint_resume_matches_trainer(tmp_path):
    data = regression_dataset()
    arguments = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    plain, mimic = both_trainers(tmp_path, train_dataset=data, args=arguments)
    plain.train(), mimic.train()
    resumed_plain, resumed_mimic = both_trainers(tmp_path, train_dataset=data, args=arguments)
    resumed_plain.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))
    resumed_mimic.train(resume_from_checkpoint=str(tmp_path / "mimic" / "checkpoint-3"))
    assert_same_parameters(resumed_plain.model, resumed_mimic.model, atol=ADAPTER_ATOL)
    assert_same_parameters(plain.model, resumed_mimic.model, atol=ADAPTER_ATOL)
    assert_same_logs(resumed_plain, resumed_mimic)


class EventRecorder(TrainerCallback):
    def __init__(self):
        self.events: list[str] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            self.events.append(name)
        return super().__getattribute__(name)


def test_callbacks_list_and_events_match_trainer(tmp_path):
    data, held_out = regression_dataset(), regression_dataset(n=16, seed=7)
    plain_recorder, mimic_recorder = EventRecorder(), EventRecorder()
    arguments = {"eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2}
    plain, _ = both_trainers(
        tmp_path, train_dataset=data, eval_dataset=held_out, callbacks=[plain_recorder], args=arguments
    )
    _, mimic = both_trainers(
        tmp_path, name="-b", train_dataset=data, eval_dataset=held_out, callbacks=[mimic_recorder], args=arguments
    )
    assert mimic.callback_handler.callback_list == plain.callback_handler.callback_list
    listed = [[type(cb) for cb in trainer.callback_handler.callbacks] for trainer in (plain, mimic)]
    assert listed[1] == listed[0]
    plain.train(), mimic.train()
    assert mimic_recorder.events == plain_recorder.events
    assert len(load_scores(mimic.args.output_dir)) == 4 * 8  # the trainer's own callbacks still ran


def test_constructor_positional_order_matches_trainer():
    def positional(cls):
        return [
            name
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    assert positional(MimicTrainer) == positional(Trainer)


def test_compute_loss_func_marked_per_sample_trains_as_trainer_and_unmarked_is_refused(tmp_path):
    data = regression_dataset()
    calls = []

    @returns_per_sample_losses
    def absolute_error(outputs, labels, num_items_in_batch=None):
        """An L1 loss: per sample without num_items_in_batch, else Trainer's sum over the step's items."""
        calls.append(num_items_in_batch)
        per_sample = (outputs[0] - labels).abs()
        return per_sample if num_items_in_batch is None else per_sample.sum() / num_items_in_batch

    plain, mimic = both_trainers(
        tmp_path,
        train_dataset=data,
        compute_loss_func=absolute_error,
        args={"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
    )
    plain.train()
    calls.clear()
    mimic.train()
    assert calls and all(items is None for items in calls)  # used in training, asked for per-sample losses
    assert_same_parameters(plain.model, mimic.model, atol=ADAPTER_ATOL)
    assert_same_logs(plain, mimic)
    _, builtin = both_trainers(
        tmp_path,
        name="-builtin",
        train_dataset=data,
        args={"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
    )
    builtin.train()
    assert not torch.allclose(builtin.model.head.weight, mimic.model.head.weight)  # the L1 loss made a difference

    def mean_absolute_error(outputs, labels, num_items_in_batch=None):
        return (outputs[0] - labels).abs().mean()

    model = RegressionModel()
    with pytest.raises(
        ValueError,
        match=r"compute_loss_func.*not marked as returning one loss per sample"
        r".*returns_per_sample_losses.*per_sample_loss_fn",
    ):
        MimicTrainer(
            model=model,
            args=MimicConfig(output_dir=str(tmp_path / "x"), mimic_layers=["head"], **PLAIN),
            train_dataset=data,
            reference=head_reference(model),
            compute_loss_func=mean_absolute_error,
        )


def test_without_train_dataset_evaluate_and_predict_work_and_train_raises_as_trainer(tmp_path):
    held_out = regression_dataset(n=16, seed=7)
    plain, mimic = both_trainers(tmp_path, eval_dataset=held_out)
    np.testing.assert_allclose(mimic.evaluate()["eval_loss"], plain.evaluate()["eval_loss"], rtol=1e-6)
    np.testing.assert_allclose(mimic.predict(held_out).predictions, plain.predict(held_out).predictions)
    with pytest.raises(ValueError) as expected:
        plain.train()
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        mimic.train()
    plain.train_dataset = mimic.train_dataset = regression_dataset()  # given later, as Trainer allows
    plain.train(), mimic.train()
    assert_same_parameters(plain.model, mimic.model, atol=ADAPTER_ATOL)
    assert len(load_scores(mimic.args.output_dir)) == 4 * 8  # the samples were scored and logged


def test_model_init_trains_as_trainer_and_hyperparameter_search_is_reachable(tmp_path):
    data = regression_dataset()
    plain, mimic = both_trainers(tmp_path, train_dataset=data, model_init=lambda: RegressionModel(a=0.5))
    plain.train(), mimic.train()
    assert_same_parameters(plain.model, mimic.model, atol=ADAPTER_ATOL)
    assert_same_logs(plain, mimic)
    if importlib.util.find_spec("optuna") is None:  # not installed here: the same refusal as Trainer's, at call time
        with pytest.raises(RuntimeError) as expected:
            plain.hyperparameter_search(backend="optuna", n_trials=1)
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
            mimic.hyperparameter_search(backend="optuna", n_trials=1)
    else:

        def space(trial):
            return {"learning_rate": trial.suggest_float("learning_rate", 0.01, 0.1)}

        best = mimic.hyperparameter_search(backend="optuna", n_trials=2, direction="minimize", hp_space=space)
        assert np.isfinite(best.objective)


def test_non_finite_steps_go_on_as_with_trainer(tmp_path):
    """Every sample NaN for six steps: Trainer goes on, its logged loss filtered by logging_nan_inf_filter; so does
    MimicTrainer (skipping the updates), where it used to stop after five."""
    data = regression_dataset(n=48, nan_rows=tuple(range(48)))
    for nan_filter in (True, False):
        plain, mimic = both_trainers(
            tmp_path,
            name=str(nan_filter),
            train_dataset=data,
            args={"max_steps": 6, "logging_nan_inf_filter": nan_filter},
        )
        plain.train()
        with pytest.warns(RuntimeWarning, match="update was skipped"):
            mimic.train()
        expected = [entry["loss"] for entry in plain.state.log_history if "loss" in entry]
        got = [entry["loss"] for entry in mimic.state.log_history if "loss" in entry]
        np.testing.assert_array_equal(got, expected)


def test_resume_continues_the_mimic_logs_and_does_not_repeat_the_alignment_check(tmp_path):
    data = regression_dataset(nan_rows=(3, 20, 41, 60))  # non-finite samples, so the running counts move
    arguments = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "logging_steps": 2}

    def mimic_trainer(output_dir):
        model = RegressionModel()
        config = MimicConfig(
            output_dir=str(output_dir),
            mimic_layers=["head"],
            mimic_temperature=0.5,
            **{**PLAIN, "per_device_train_batch_size": 8, **arguments},
        )
        return MimicTrainer(model=model, args=config, train_dataset=data, reference=head_reference(model))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = mimic_trainer(tmp_path / "full")
        full.train()
        resumed = mimic_trainer(tmp_path / "full")
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))

    def mimic_logs(trainer, after):
        return [
            {k: v for k, v in entry.items() if k.startswith("mimic/")}
            for entry in trainer.state.log_history
            if entry["step"] > after and "loss" in entry
        ]

    assert any("mimic/alignment_student_loss" in entry for entry in full.state.log_history)
    expected, got = mimic_logs(full, after=4), mimic_logs(resumed, after=4)
    assert expected and [sorted(e) for e in got] == [sorted(e) for e in expected]  # no alignment keys again
    assert expected[-1]["mimic/nonfinite_samples"] > 0
    for want, have in zip(expected, got):
        for key in want:
            np.testing.assert_allclose(have[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_a_model_without_a_supported_layer_is_refused_naming_that(tmp_path):
    model = BareRegressionModel()
    config = MimicConfig(output_dir=str(tmp_path), **PLAIN)
    with pytest.raises(
        UnsupportedLayerError,
        match=r"BareRegressionModel has no layer of a supported type "
        r"\(.*Linear.*\)"
        r".*`mimic_layers` names 'classifier'",
    ):
        MimicTrainer(model=model, args=config, train_dataset=regression_dataset(), reference={})


def test_per_sample_loss_fn_attribute_names_the_loss_in_use(tmp_path):
    """`trainer.per_sample_loss_fn`, read by code written against earlier releases: the user's function or None."""
    data = regression_dataset()

    def absolute_error(outputs, inputs):
        return (outputs[0] - inputs["labels"]).abs()

    _, builtin = both_trainers(tmp_path, name="-builtin", train_dataset=data)
    assert builtin.per_sample_loss_fn is None
    model = RegressionModel()
    config = MimicConfig(output_dir=str(tmp_path / "user"), mimic_layers=["head"], **PLAIN)
    mimic = MimicTrainer(
        model=model,
        args=config,
        train_dataset=data,
        reference=head_reference(model),
        per_sample_loss_fn=absolute_error,
    )
    assert mimic.per_sample_loss_fn is absolute_error
