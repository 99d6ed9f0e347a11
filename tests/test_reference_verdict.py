"""The reference's per-sample loss in the score log (`hf_gradmimic.training.reference_verdict`), against the
reference model computed here: its head on the student's features, or the student with the reference's tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from tiny_models import TinyMLP, lm_dataset, mlp_dataset, tiny_gpt2


def verdict_args(output_dir, layers, setting, **settings) -> MimicConfig:
    defaults = dict(
        per_device_train_batch_size=16,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        mimic_alignment_check=False,
    )
    return MimicConfig(
        output_dir=str(output_dir), mimic_layers=layers, mimic_log_reference_loss=setting, **(defaults | settings)
    )


def train_one_step(tmp_path, model, data, layers, reference, setting, **settings):
    args = verdict_args(tmp_path, layers, setting, **settings)
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    return load_scores(tmp_path).to_pandas().sort_values("sample_id")


def perturbed(model, prefix, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + 0.5 * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
        if name.startswith(prefix)
    }


@pytest.mark.parametrize("setting", ["auto", "always"])
def test_a_heads_reference_loss_is_the_reference_head_on_the_students_features(tmp_path, setting):
    model, data = TinyMLP(), mlp_dataset(n=16)
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    table = train_one_step(tmp_path, model, data, ["head"], reference, setting)
    batch = data[:]
    with torch.no_grad():
        features = torch.tanh(before.hidden(batch["x"]))
        expected = F.cross_entropy(
            features @ reference["head.weight"].T + reference["head.bias"], batch["labels"], reduction="none"
        )
    np.testing.assert_allclose(table.reference_loss.values, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(table.reference_loss.values, table.loss.values)  # not the student's own loss


def test_an_inner_layers_reference_loss_needs_always_and_swaps_the_tensors(tmp_path):
    data = mlp_dataset(n=16)
    model = TinyMLP()
    before = copy.deepcopy(model)
    reference = perturbed(model, "hidden.")
    assert (
        "reference_loss"
        not in train_one_step(tmp_path / "auto", copy.deepcopy(model), data, ["hidden"], reference, "auto").columns
    )
    table = train_one_step(tmp_path / "always", model, data, ["hidden"], reference, "always")
    batch = data[:]
    with torch.no_grad():
        swapped = torch.func.functional_call(before, reference, args=(batch["x"],), strict=False)
        expected = F.cross_entropy(swapped.logits, batch["labels"], reduction="none")
    np.testing.assert_allclose(table.reference_loss.values, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_language_model_head_records_it_only_when_asked(tmp_path):
    """'auto' leaves out an lm_head (an lm_head-sized matmul per step); 'never' records nothing."""
    data = lm_dataset(n=16)
    model = tiny_gpt2(dropout=0.0)
    reference = perturbed(model, "lm_head.")
    for setting in ("auto", "never"):
        table = train_one_step(tmp_path / setting, copy.deepcopy(model), data, ["lm_head"], reference, setting)
        assert "reference_loss" not in table.columns
    table = train_one_step(tmp_path / "always", model, data, ["lm_head"], reference, "always")
    assert np.isfinite(table.reference_loss.values).all() and len(table) == 16


def test_the_students_margin_is_recorded_from_the_training_forward(tmp_path):
    """The score log's ``margin``: the given label's logit minus the largest other, of the logits the step trained on
    (written out here on the model before its update)."""
    model, data = TinyMLP(), mlp_dataset(n=16)
    before = copy.deepcopy(model)
    table = train_one_step(tmp_path, model, data, ["head"], perturbed(model, "head."), "never")
    batch = data[:]
    with torch.no_grad():
        logits = before(batch["x"]).logits.numpy()
    labels = batch["labels"].numpy()
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    expected = logits[rows, labels] - others.max(axis=1)
    np.testing.assert_allclose(table.margin.values, expected, rtol=1e-5, atol=1e-6)
    assert "reference_loss" not in table.columns


def test_a_language_model_heads_reference_loss_and_score_share_the_reference_logits(tmp_path):
    """'always' on an untied ``lm_head`` (`reference_verdict.SharedHead`): the reference's loss is the reference head
    on the student's last hidden states (shifted cross entropy, the mean over each sample's label tokens), and the
    score is still ``⟨−g_i, θ_ref − θ⟩/‖θ_ref − θ‖`` from per-sample gradients (torch.func)."""
    from tiny_models import oracle_scores_from_grads, per_sample_lm_grads

    data = lm_dataset(n=16)
    model = tiny_gpt2(dropout=0.0)
    before = copy.deepcopy(model)
    reference = perturbed(model, "lm_head.")
    table = train_one_step(tmp_path, model, data, ["lm_head"], reference, "always")
    batch = data[:]
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        features = before.transformer(input_ids=ids).last_hidden_state
        logits = features @ reference["lm_head.weight"].T
        tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        expected = tokens.sum(1) / (labels[:, 1:] != -100).sum(1)
    np.testing.assert_allclose(table.reference_loss.values, expected.numpy(), rtol=1e-5, atol=1e-6)
    scores = oracle_scores_from_grads(per_sample_lm_grads(before, data, ["lm_head.weight"]), before, reference)
    np.testing.assert_allclose(table.mimic_score.values, scores, rtol=1e-4, atol=1e-6)


def margins_of(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The given label's logit minus the largest other, in NumPy."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(axis=1)


@pytest.mark.parametrize("score_terms", ["full", "reference"])  # shared with the score's matmul, or on its own
def test_a_classification_heads_reference_margin_is_recorded_beside_its_loss(tmp_path, score_terms):
    model, data = TinyMLP(), mlp_dataset(n=16)
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    table = train_one_step(tmp_path, model, data, ["head"], reference, "auto", mimic_score_terms=score_terms)
    batch = data[:]
    with torch.no_grad():
        features = torch.tanh(before.hidden(batch["x"]))
        reference_logits = (features @ reference["head.weight"].T + reference["head.bias"]).numpy()
    expected = margins_of(reference_logits, batch["labels"].numpy())
    np.testing.assert_allclose(table.reference_margin.values, expected, rtol=1e-5, atol=1e-5)
    assert (expected < 0).any() and (expected > 0).any()  # the reference disagrees with some labels, not all
    assert not np.allclose(table.reference_margin.values, table.margin.values)  # not the student's own margin


def test_no_reference_margin_where_the_verdict_is_no_classification_head(tmp_path):
    """An inner layer's verdict is a forward with the reference's tensors (its loss only); a language model's head
    has no single-label classification margin."""
    inner = perturbed(TinyMLP(), "hidden.")
    table = train_one_step(tmp_path / "inner", TinyMLP(), mlp_dataset(n=16), ["hidden"], inner, "always")
    assert "reference_loss" in table.columns and "reference_margin" not in table.columns
    model = tiny_gpt2(dropout=0.0)
    table = train_one_step(
        tmp_path / "lm", model, lm_dataset(n=16), ["lm_head"], perturbed(model, "lm_head."), "always"
    )
    assert "reference_loss" in table.columns and "reference_margin" not in table.columns


def reference_model_verdict(model, reference, data) -> tuple[np.ndarray, np.ndarray]:
    """The reference model's own loss and margin on ``data``: ``model`` (the student as training found it) with the
    reference's tensors, written out with torch.func, in eval mode."""
    weights = {name: p.detach() for name, p in model.named_parameters()} | reference
    batch = data[:]
    with torch.no_grad():
        logits = torch.func.functional_call(model.eval(), weights, args=(batch["x"],)).logits
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    return losses.numpy(), margins_of(logits.numpy(), batch["labels"].numpy())


def test_reference_model_records_the_verdict_of_the_starting_weights_with_the_references_head(tmp_path):
    """Full fine-tuning moves the layer below the head: 'reference_model' keeps recording the model the reference
    was trained as (the starting ``hidden`` with the reference's head), where 'auto' reads the moved features."""
    data = mlp_dataset(n=64)
    model = TinyMLP()
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    settings = dict(max_steps=8, learning_rate=0.5)  # two epochs of 4 steps: the second reads moved features
    table = train_one_step(tmp_path / "model", model, data, ["head"], reference, "reference_model", **settings)
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    for epoch in (0, 1):
        rows = table[(table.global_step - 1) // 4 == epoch].sort_values("sample_id")  # steps 1-4, then 5-8
        assert len(rows) == 64
        np.testing.assert_allclose(rows.reference_loss.values, expected_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rows.reference_margin.values, expected_margin, rtol=1e-5, atol=1e-5)
    drifted = train_one_step(tmp_path / "auto", copy.deepcopy(before), data, ["head"], reference, "auto", **settings)
    second = drifted[drifted.global_step > 4].sort_values("sample_id")
    assert np.abs(second.reference_margin.values - expected_margin).max() > 0.05  # the head on moved features


def test_reference_model_verdict_survives_a_resume_and_refuses_a_checkpoint_without_it(tmp_path):
    """The starting weights go into each checkpoint: a run resumed after the layer below the head moved records the
    same reference model; a resume with another setting, or from a checkpoint without the file, is refused."""
    data = mlp_dataset(n=64)
    model = TinyMLP()
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")

    def trainer(output, setting, net):
        args = verdict_args(
            output, ["head"], setting, max_steps=8, learning_rate=0.5, save_strategy="steps", save_steps=4
        )
        return MimicTrainer(model=net, args=args, train_dataset=data, reference=reference)

    trainer(tmp_path / "run", "reference_model", copy.deepcopy(before)).train()
    resumed = trainer(tmp_path / "run", "reference_model", copy.deepcopy(before))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    table = load_scores(tmp_path / "run").to_pandas()
    second = table[table.global_step > 4].sort_values("sample_id")
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    np.testing.assert_allclose(second.reference_margin.values, expected_margin, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.reference_loss.values, expected_loss, rtol=1e-5, atol=1e-6)

    # a resume may not change what the log's verdict columns mean
    with pytest.raises(ValueError, match=r'mimic_log_reference_loss\): was "reference_model", now "auto"'):
        trainer(tmp_path / "run", "auto", copy.deepcopy(before)).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4")
        )
    (tmp_path / "run" / "checkpoint-4" / "mimic_starting_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mimic_starting_weights.safetensors"):
        trainer(tmp_path / "run", "reference_model", copy.deepcopy(before)).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4")
        )


def test_reference_model_judges_each_sample_once_also_in_micro_batches_mixing_judged_and_new_rows(tmp_path):
    """56 samples in batches of 16 with the last partial batch dropped: each epoch leaves 8 samples out, so later
    micro-batches mix judged rows with rows seen for the first time. Every record holds the reference model's
    verdict, and its forward (the only one that swaps in a copy of ``hidden``) ran once per distinct sample."""
    data = mlp_dataset(n=56)
    model = TinyMLP()
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    forwarded, live = [], model.hidden.weight

    def count_reference_model_rows(module, args, out):
        if module.weight is not live:  # torch.func.functional_call swapped the starting copy in
            forwarded.append(len(out))

    model.hidden.register_forward_hook(count_reference_model_rows)
    table = train_one_step(
        tmp_path, model, data, ["head"], reference, "reference_model", max_steps=9, dataloader_drop_last=True
    )
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    ids = table.sample_id.values
    np.testing.assert_allclose(table.reference_margin.values, expected_margin[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.reference_loss.values, expected_loss[ids], rtol=1e-5, atol=1e-6)
    first_visits = table.sort_values("global_step").drop_duplicates("sample_id").groupby("global_step").size()
    assert (first_visits.reindex(range(1, 10), fill_value=0) % 16 != 0).any()  # some steps mix judged and new rows
    assert sum(forwarded) == table.sample_id.nunique() < len(table)


def test_the_provenance_names_the_verdict_only_for_a_scorer_with_a_reference(tmp_path):
    """The log's provenance says what its reference columns hold; GraNd scores without a reference, records neither
    column, and its provenance names no verdict (so that a resume may change the unused setting)."""
    import json

    data = mlp_dataset(n=16)
    model = TinyMLP()
    train_one_step(tmp_path / "mimic", model, data, ["head"], perturbed(model, "head."), "reference_model")
    train_one_step(tmp_path / "grand", TinyMLP(), data, ["head"], None, "reference_model", mimic_scorer="grand")
    verdicts = {
        run: json.loads((tmp_path / run / "mimic_scores" / "provenance.json").read_text())["reference_verdict"]
        for run in ("mimic", "grand")
    }
    assert verdicts == {"mimic": "reference_model", "grand": None}


class NormedMLP(torch.nn.Module):
    """``head(tanh(norm(hidden(x))))``: a batch norm whose running statistics training updates."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.norm, self.head = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)

    def forward(self, x, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(torch.tanh(self.norm(self.hidden(x))))
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def test_reference_model_reads_the_starting_buffers(tmp_path):
    """Eval mode reads a batch norm's running statistics, which training updates: the reference model keeps the
    starting ones (the oracle: the model before training, in eval mode, with the reference's head)."""
    data = mlp_dataset(n=64)
    model = NormedMLP()
    model.norm.running_mean += 0.3  # statistics the first training steps move away from
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    table = train_one_step(tmp_path, model, data, ["head"], reference, "reference_model", max_steps=8)
    assert not torch.allclose(model.norm.running_mean, before.norm.running_mean)
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    ids = table.sample_id.values
    np.testing.assert_allclose(table.reference_margin.values, expected_margin[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.reference_loss.values, expected_loss[ids], rtol=1e-5, atol=1e-6)


def test_reference_model_on_a_stream_judges_every_visit(tmp_path):
    """A stream has no row count to keep verdicts by: each visit is judged, and every record (two passes over 32
    samples) holds the reference model's verdict on its sample."""
    from stream_data import int_id, mlp_stream

    data = mlp_dataset(n=32)
    model = TinyMLP()
    before = copy.deepcopy(model)
    reference = perturbed(model, "head.")
    table = train_one_step(
        tmp_path,
        model,
        mlp_stream(32, "int"),
        ["head"],
        reference,
        "reference_model",
        max_steps=4,
        learning_rate=0.5,
        mimic_id_column="id",
    )
    assert len(table) == 64 and table.sample_id.nunique() == 32
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    row_of = {int_id(i): i for i in range(32)}
    rows = np.array([row_of[sample_id] for sample_id in table.sample_id])
    np.testing.assert_allclose(table.reference_margin.values, expected_margin[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.reference_loss.values, expected_loss[rows], rtol=1e-5, atol=1e-6)


def test_reference_model_of_a_peft_student_keeps_its_starting_adapter(tmp_path):
    """A PEFT student: LoRA on ``hidden`` trains, the head is a `modules_to_save` copy scored as the mimic layer. The
    reference model is the starting adapter with the reference's head (written out on the PeftModel before training)."""
    peft = pytest.importorskip("peft")
    data = mlp_dataset(n=64)
    config = peft.LoraConfig(r=4, target_modules=["hidden"], modules_to_save=["head"], init_lora_weights=False)
    model = peft.get_peft_model(TinyMLP(), config)
    before = copy.deepcopy(model)
    head = "base_model.model.head.modules_to_save.default"
    reference = perturbed(model, head + ".")
    table = train_one_step(tmp_path, model, data, [head], reference, "reference_model", max_steps=8, learning_rate=0.5)
    lora_b = "base_model.model.hidden.lora_B.default.weight"
    assert not torch.allclose(dict(model.named_parameters())[lora_b], dict(before.named_parameters())[lora_b])
    expected_loss, expected_margin = reference_model_verdict(before, reference, data)
    ids = table.sample_id.values
    np.testing.assert_allclose(table.reference_margin.values, expected_margin[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.reference_loss.values, expected_loss[ids], rtol=1e-5, atol=1e-6)
