"""Bad input, the samples (`hf_gradmimic.training.guards`): a sample whose loss or score is not finite, or that has no
supervised label, gets weight 0, no gradient and its flag in the score log; a step without any finite sample is
skipped, and too many such steps stop training. Checked against per-sample-gradient oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_gradmimic import MimicTrainer, load_scores
from hf_gradmimic.score_log_io import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED

from bad_input import config, head_reference
from tiny_models import (
    TinyMLP,
    lm_dataset,
    mlp_dataset,
    oracle_scores_from_grads,
    per_sample_grads,
    per_sample_lm_grads,
    tiny_gpt2,
)


def with_nan_rows(data, rows):
    x = np.asarray(data["x"]).copy()
    x[rows, 0] = np.nan
    import datasets

    return datasets.Dataset.from_dict({"x": x, "labels": np.asarray(data["labels"])}).with_format("torch")


@pytest.mark.parametrize("scope, accumulation", [("all", 1), ("all", 2), ("layer", 1)])
def test_a_nan_sample_gets_weight_zero_and_no_gradient(tmp_path, scope, accumulation):
    """One sample with a NaN input: the update equals −Σ w_i g_i over the 15 other samples, w the softmax of their
    oracle scores (torch.func per-sample gradients); the sample is flagged, counted and named in a warning."""
    clean = mlp_dataset(n=16)
    data = with_nan_rows(clean, [3])
    model = TinyMLP()
    reference = head_reference(model)
    before = copy.deepcopy(model)
    good = [i for i in range(16) if i != 3]
    good_data = clean.select(good)
    names = [n for n, _ in before.named_parameters()]
    grads = per_sample_grads(before, good_data, names)
    scores = oracle_scores_from_grads({n: grads[n] for n in reference}, before, reference)
    weights = torch.softmax(torch.tensor(scores / 0.5), 0).float()

    args = config(
        tmp_path,
        mimic_layers=["head"],
        mimic_reweight_scope=scope,
        per_device_train_batch_size=16 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss or score.*ids \[3\]"):
        trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    for name, param in before.named_parameters():
        reweighted = scope == "all" or name.startswith("head.")
        step = torch.einsum("b,b...->...", weights, grads[name]) if reweighted else grads[name].mean(0)
        torch.testing.assert_close(after[name].detach(), param.detach() - step, rtol=1e-4, atol=1e-6, msg=name)

    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert table.loc[3, "status"] == STATUS_NONFINITE and table.loc[3, "weight"] == 0
    assert (table.drop(index=3).status == STATUS_SCORED).all()
    np.testing.assert_allclose(table.loc[good, "weight"].values, weights.numpy(), rtol=1e-4)
    assert trainer.nonfinite_guard.nonfinite_samples == 1
    logged = [entry for entry in trainer.state.log_history if "mimic/nonfinite_samples" in entry]
    assert logged[-1]["mimic/nonfinite_samples"] == 1
    assert np.isfinite(logged[-1]["loss"])  # the finite samples' mean, not 0 and not NaN


class TokenAndFeatures(torch.nn.Module):
    """``head(tanh(hidden(x + emb(tok))))``: an embedding whose gradient MimicTrainer forms in its one backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.hidden, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x, tok, labels=None):
        return SequenceClassifierOutput(logits=self.head(torch.tanh(self.hidden(x + self.emb(tok)))))


def test_a_nan_sample_in_the_first_batch_of_an_embedding_mimic_layer(tmp_path):
    """The one-backward update of an embedding is checked against autograd at the first batch: with a NaN row in it,
    that check failed (``atol must be greater than or equal to zero, but got -nan``). It waits for a finite batch;
    the update is the uniform mean over the 15 finite samples (τ = 1e6), from per-sample autograd."""
    import datasets

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    x[3, 0] = np.nan
    tokens, labels = rng.integers(0, 10, 16), rng.integers(0, 4, 16)
    data = datasets.Dataset.from_dict({"x": x, "tok": tokens, "labels": labels}).with_format("torch")
    model = TokenAndFeatures()
    before = copy.deepcopy(model)
    reference = {"emb.weight": model.emb.weight.detach() + 0.5}
    args = config(tmp_path, mimic_layers=["emb"], per_device_train_batch_size=16, mimic_temperature=1e6)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss or score.*ids \[3\]"):
        MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    good = torch.tensor([i for i in range(16) if i != 3])
    loss = torch.nn.functional.cross_entropy(
        before(torch.as_tensor(x)[good], torch.as_tensor(tokens)[good]).logits, torch.as_tensor(labels)[good]
    )
    loss.backward()
    for (name, param), original in zip(model.named_parameters(), before.parameters()):
        torch.testing.assert_close(param.detach(), original.detach() - original.grad, rtol=1e-4, atol=1e-6, msg=name)


class OverflowOnToken(torch.nn.Module):
    """A sequence classifier whose activations overflow to inf for any sample containing token 7: a non-finite sample
    caused by its integer inputs, which no zeroing of floating-point inputs could repair."""

    def __init__(self):
        super().__init__()
        from tiny_models import TinySeq

        self.inner = TinySeq()

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = torch.tanh(self.inner.proj(self.inner.embed(input_ids)))
        hidden = hidden + torch.where((input_ids == 7).any(1), torch.inf, 0.0)[:, None, None]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.inner.head((hidden * mask).sum(1) / mask.sum(1)))


def test_a_sample_made_non_finite_by_its_token_ids_never_reaches_the_parameters(tmp_path):
    from tiny_models import seq_dataset

    data = seq_dataset(n=16)
    bad = [i for i in range(16) if 7 in data[i]["input_ids"].tolist()]
    assert 0 < len(bad) < 16
    model = OverflowOnToken()
    generator = torch.Generator().manual_seed(1)
    reference = {
        n: p.detach() + 0.5 * torch.randn(p.shape, generator=generator)
        for n, p in model.named_parameters()
        if n.startswith("inner.head.")
    }
    trainer = MimicTrainer(
        model=model, args=config(tmp_path, mimic_layers=["inner.head"]), train_dataset=data, reference=reference
    )
    with pytest.warns(RuntimeWarning, match="non-finite loss or score"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert sorted(table.index[table.status == STATUS_NONFINITE]) == bad
    assert (table.loc[bad, "weight"] == 0).all()


def test_a_step_without_any_finite_sample_is_skipped_and_too_many_stop_training(tmp_path):
    """Every sample NaN: no parameter and no optimizer state changes (AdamW with weight decay would move the
    weights even with zero gradients); after mimic_max_nonfinite_steps such steps in a row, a clear error."""
    data = with_nan_rows(mlp_dataset(n=16), list(range(16)))
    model = TinyMLP()
    before = copy.deepcopy(model)
    args = config(
        tmp_path / "a",
        mimic_layers=["head"],
        per_device_train_batch_size=8,
        max_steps=2,
        optim="adamw_torch",
        weight_decay=0.1,
        learning_rate=0.1,
        mimic_max_nonfinite_steps=3,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=head_reference(model))
    with pytest.warns(RuntimeWarning, match="update was skipped"):
        trainer.train()
    for (name, p), (_, q) in zip(before.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name
    assert not trainer.optimizer.state  # AdamW never stepped a parameter
    assert trainer.nonfinite_guard.skipped == 2
    assert (load_scores(tmp_path / "a").to_pandas().status == STATUS_NONFINITE).all()

    args = config(
        tmp_path / "b", mimic_layers=["head"], per_device_train_batch_size=8, max_steps=4, mimic_max_nonfinite_steps=2
    )
    trainer = MimicTrainer(model=TinyMLP(), args=args, train_dataset=data, reference=head_reference(model))
    with pytest.raises(
        RuntimeError, match=r"no sample had a finite loss for 2 optimizer steps in a row.*mimic_max_nonfinite_steps=2"
    ):
        trainer.train()


def test_rows_without_a_supervised_label_get_weight_zero(tmp_path):
    """A prompt-only LM sample (every label -100) and one whose only label is the first token (nothing left after
    the causal shift) have loss 0 and no gradient: weight 0, status 'unlabeled', and the others keep the softmax of
    their oracle scores."""
    data = lm_dataset(n=8)
    labels = np.asarray(data["labels"]).copy()
    labels[2, :] = -100
    labels[5, 1:] = -100
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": np.asarray(data["input_ids"]), "labels": labels}).with_format(
        "torch"
    )
    model = tiny_gpt2(dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    reference = {
        "lm_head.weight": model.lm_head.weight.detach()
        + 0.1 * torch.randn(model.lm_head.weight.shape, generator=generator)
    }
    labelled = [i for i in range(8) if i not in (2, 5)]
    grads = per_sample_lm_grads(copy.deepcopy(model), data.select(labelled), ["lm_head.weight"])
    expected = torch.softmax(torch.tensor(oracle_scores_from_grads(grads, model, reference) / 0.5), 0).numpy()

    trainer = MimicTrainer(
        model=model,
        args=config(tmp_path, mimic_layers=["lm_head"], per_device_train_batch_size=8),
        train_dataset=data,
        reference=reference,
    )
    trainer.train()
    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert list(table.loc[[2, 5], "status"]) == [STATUS_UNLABELED, STATUS_UNLABELED]
    assert list(table.loc[[2, 5], "weight"]) == [0.0, 0.0]
    np.testing.assert_allclose(table.loc[labelled, "weight"].values, expected, rtol=1e-4)
    assert trainer.nonfinite_guard.unlabeled_samples == 2


def test_a_non_finite_sample_is_left_out_of_the_alignment_check_and_the_monitor(tmp_path):
    """One NaN input among 16: the alignment check and the monitor's losses are the 15 finite samples' (the student's
    and the head-swapped student's cross entropies, recomputed here with `torch.func.functional_call`), not NaN, and
    the check does not warn when the reference's median is the lower."""
    import warnings

    clean = mlp_dataset(n=16)
    data = with_nan_rows(clean, [3])
    model = TinyMLP()
    reference = head_reference(model)
    inputs, labels = torch.as_tensor(np.asarray(data["x"])), torch.as_tensor(np.asarray(data["labels"]))
    with torch.no_grad():
        own = torch.nn.functional.cross_entropy(model(inputs).logits, labels, reduction="none")
        params = {**dict(model.named_parameters()), **reference}
        swapped = torch.func.functional_call(model, params, (inputs,)).logits
        with_reference = torch.nn.functional.cross_entropy(swapped, labels, reduction="none")
    finite = torch.isfinite(own)
    args = config(tmp_path, mimic_layers=["head"], mimic_alignment_check=True)
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "mimic/alignment_student_loss" in entry)
    expected = {
        "mimic/alignment_student_loss": own[finite].mean(),
        "mimic/alignment_reference_loss": with_reference[finite].mean(),
        "mimic/alignment_student_loss_median": own[finite].median(),
        "mimic/alignment_reference_loss_median": with_reference[finite].median(),
        "mimic/monitor_student_loss": own[finite].mean(),
        "mimic/monitor_reference_loss": with_reference[finite].mean(),
    }
    for key, value in expected.items():
        assert logged[key] == pytest.approx(float(value), rel=1e-5), key
    warned = any("Alignment check" in str(warning.message) for warning in caught)
    assert warned == (not with_reference[finite].median() < own[finite].median())
