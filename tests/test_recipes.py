"""build_reference: a linear probe on the student's own frozen features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hf_gradmimic import MimicConfig, MimicTrainer, build_reference, load_scores
from hf_gradmimic.reference import layer_inputs, read_reference_metadata
from hf_gradmimic.testing.digits import digits_model, load_noisy_digits


@pytest.fixture(scope="module")
def digits():
    data = load_noisy_digits(noise_rate=0.4, seed=0)
    clean = data["train"].remove_columns(["label", "is_clean"]).rename_column("clean_label", "label")
    return data, clean


def test_reads_only_the_layer_inputs_and_changes_no_parameter(tmp_path, digits):
    data, clean = digits
    model = digits_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = layer_inputs(model, clean, "classifier", cache_dir=tmp_path)
    expected = model.features(torch.as_tensor(np.asarray(clean["pixel_values"])))
    torch.testing.assert_close(features, expected.detach())
    # Cached: the second call reads the file, even if the model would now give other features.
    cached = layer_inputs(model, clean, "classifier", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1
    torch.testing.assert_close(cached, features)

    result = build_reference(
        model, clean, layers=["classifier"], output_dir=tmp_path / "ref", eval_dataset=data["test"], epochs=30
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert float(result.metadata["eval_accuracy"]) > 0.9


def test_saved_file_holds_only_the_named_tensors_with_metadata(tmp_path, digits):
    data, clean = digits
    result = build_reference(
        digits_model(),
        clean,
        layers=["classifier"],
        output_dir=tmp_path,
        epochs=5,
        base_model="org/digits-mlp",
        base_revision="abc123",
    )
    with safe_open(str(result.path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["classifier.bias", "classifier.weight"]
    metadata = read_reference_metadata(tmp_path)
    assert metadata["base_model"] == "org/digits-mlp" and metadata["base_revision"] == "abc123"
    card = (tmp_path / "README.md").read_text()
    assert "org/digits-mlp" in card and "classifier" in card and metadata["train_accuracy"] in card


def test_refuses_a_layer_that_is_not_the_head(tmp_path, digits):
    _, clean = digits
    with pytest.raises(ValueError, match="'backbone' is not the model's head"):
        build_reference(digits_model(), clean, layers=["backbone"], output_dir=tmp_path)


def test_probe_reference_drives_mimic_trainer_from_its_folder(tmp_path, digits):
    data, clean = digits
    build_reference(digits_model(), clean, layers=["classifier"], output_dir=tmp_path / "ref", epochs=30)
    args = MimicConfig(
        output_dir=str(tmp_path / "run"),
        mimic_reference=str(tmp_path / "ref"),
        mimic_layers=["classifier"],
        per_device_train_batch_size=64,
        num_train_epochs=2,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    MimicTrainer(model=digits_model(), args=args, train_dataset=data["train"]).train()
    scores = load_scores(tmp_path / "run").to_pandas()
    is_clean = np.asarray(data["train"]["is_clean"])[scores.sample_id.values]
    assert scores.mimic_score[is_clean].mean() > scores.mimic_score[~is_clean].mean()


def test_mismatch_warning_names_both_checkpoints(tmp_path, digits):
    _, clean = digits
    from hf_gradmimic.testing.digits import DigitsClassifier

    for name, seed in (("student_ckpt", 0), ("other_ckpt", 3)):
        digits_model(backbone_seed=seed).save_pretrained(tmp_path / name)
    other = DigitsClassifier.from_pretrained(tmp_path / "other_ckpt")
    build_reference(other, clean, layers=["classifier"], output_dir=tmp_path / "ref_other", epochs=2)
    student_path = str(tmp_path / "student_ckpt")
    build_reference(
        DigitsClassifier.from_pretrained(student_path),
        clean,
        layers=["classifier"],
        output_dir=tmp_path / "ref_own",
        epochs=2,
    )

    def construct(reference_dir):
        args = MimicConfig(
            output_dir=str(tmp_path / "run"),
            mimic_reference=str(reference_dir),
            mimic_layers=["classifier"],
            report_to=[],
            use_cpu=True,
        )
        return MimicTrainer(
            model=DigitsClassifier.from_pretrained(student_path).freeze_backbone(), args=args, train_dataset=clean
        )

    with pytest.warns(UserWarning, match=r"built from checkpoint '.*other_ckpt'.*student starts from '.*student_ckpt'"):
        construct(tmp_path / "ref_other")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        construct(tmp_path / "ref_own")


def test_a_local_checkpoint_is_one_checkpoint_whichever_path_names_it(tmp_path, digits, monkeypatch):
    """A reference built from ``./student_ckpt`` (relative, as typed in its folder) and a student loaded from the
    folder's absolute path, or with a trailing slash, are the same checkpoint: no warning. The metadata records the
    resolved path, so the check holds from another working directory too."""
    import warnings

    from hf_gradmimic.reference import read_reference_metadata
    from hf_gradmimic.testing.digits import DigitsClassifier

    _, clean = digits
    digits_model().save_pretrained(tmp_path / "student_ckpt")
    monkeypatch.chdir(tmp_path)
    build_reference(
        DigitsClassifier.from_pretrained("./student_ckpt"),
        clean,
        layers=["classifier"],
        output_dir=tmp_path / "ref",
        epochs=2,
    )
    assert read_reference_metadata(tmp_path / "ref")["base_model"] == str((tmp_path / "student_ckpt").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for student in (str(tmp_path / "student_ckpt"), str(tmp_path / "student_ckpt") + "/", "../student_ckpt"):
        args = MimicConfig(
            output_dir=str(tmp_path / "run"),
            mimic_reference=str(tmp_path / "ref"),
            mimic_layers=["classifier"],
            report_to=[],
            use_cpu=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            MimicTrainer(model=DigitsClassifier.from_pretrained(student), args=args, train_dataset=clean)


def _monitored_run(tmp_path, clean_train, reference, **overrides):
    settings = dict(
        mimic_layers=["classifier"],
        per_device_train_batch_size=64,
        max_steps=4,
        logging_steps=1,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        mimic_alignment_check=False,
    )
    args = MimicConfig(output_dir=str(tmp_path), **{**settings, **overrides})
    trainer = MimicTrainer(model=digits_model(), args=args, train_dataset=clean_train, reference=reference)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "mimic/monitor_self_term" in entry]


def test_monitor_terms_sum_to_the_recorded_score(tmp_path, digits):
    data, _ = digits
    reference = build_reference(
        digits_model(),
        data["train"].remove_columns(["is_clean"]),
        layers=["classifier"],
        output_dir=tmp_path / "ref",
        epochs=5,
    ).tensors
    logged = _monitored_run(tmp_path / "run", data["train"], reference)
    assert len(logged) == 4
    scores = load_scores(tmp_path / "run").to_pandas()
    for entry in logged:
        step_mean = scores[scores.global_step == entry["step"]].mimic_score.mean()
        assert entry["mimic/monitor_reference_term"] + entry["mimic/monitor_self_term"] == pytest.approx(
            step_mean, rel=1e-4, abs=1e-6
        )
        assert entry["mimic/monitor_reference_loss"] > 0


def test_reference_only_terms_match_the_oracle(tmp_path):
    """mimic_score_terms='reference': m_i = −⟨g_i, θ_ref⟩ / ‖θ_ref − θ‖, against torch.func per-sample gradients."""
    import copy

    from tiny_models import TinyMLP, mlp_dataset, per_sample_grads

    model, data = TinyMLP(), mlp_dataset(n=16)
    params = dict(model.named_parameters())
    reference = {n: params[n].detach() + torch.randn(params[n].shape) for n in ("head.weight", "head.bias")}
    grads = per_sample_grads(copy.deepcopy(model), data, list(reference))
    norm = torch.sqrt(sum((reference[n] - params[n].detach()).square().sum() for n in reference))
    expected = -sum((grads[n] * reference[n]).flatten(1).sum(1) for n in reference) / norm
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        mimic_score_terms="reference",
        max_steps=1,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    table = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    np.testing.assert_allclose(table.mimic_score.values, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_monitor_warns_when_the_self_term_dominates(tmp_path, digits):
    data, _ = digits
    # A reference far from anything the student's features support: its margin varies little, the
    # student's own margin drives the ranking.
    reference = {"classifier.weight": torch.zeros(10, 256), "classifier.bias": torch.zeros(10)}
    with pytest.warns(UserWarning, match="self term"):
        _monitored_run(tmp_path, data["train"], reference, learning_rate=0.5)


def monitor_logs(tmp_path, model, data, reference, layer, **settings):
    """The log entries that hold the monitor's metrics, of a MimicTrainer run logging every step on ``layer``."""
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=[layer],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        mimic_alignment_check=False,
        **settings,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    trainer.train()
    assert trainer.mimic_diagnostics.head_outputs_logits is (layer != "hidden")
    return [e for e in trainer.state.log_history if "mimic/monitor_reference_loss" in e]


@pytest.mark.parametrize("case", ["mlp-head", "gpt2-lm-head-chunked", "mlp-inner"])
def test_monitor_losses_match_the_swapped_model(tmp_path, monkeypatch, case):
    """The monitor's reference loss is the student with its mimic layer swapped for the reference, on this
    batch; its student loss is the student's own. A head reads both off the training forward (in chunks of
    samples), an inner layer runs two forwards: both must match the swapped model computed here. The two score
    terms must match torch.func per-sample gradients: −⟨g_i, θ_ref⟩/‖v‖ and ⟨g_i, θ⟩/‖v‖, batch means."""
    import hf_gradmimic.training.reference_verdict as verdict_module
    from hf_gradmimic.losses import per_sample_loss

    from tiny_models import TinyMLP, lm_dataset, mlp_dataset, per_sample_grads, tiny_gpt2

    make_model, data, layer = {
        "mlp-head": (TinyMLP, mlp_dataset(n=16), "head"),
        "gpt2-lm-head-chunked": (lambda: tiny_gpt2(dropout=0.0), lm_dataset(n=16), "lm_head"),
        "mlp-inner": (TinyMLP, mlp_dataset(n=16), "hidden"),
    }[case]
    if case == "gpt2-lm-head-chunked":
        monkeypatch.setattr(verdict_module, "MONITOR_CHUNK_LOGITS", 2 * 9 * 40 + 1)  # two samples per chunk
    model = make_model()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(5)
    names = [n for n in params if n.startswith(f"{layer}.")]
    reference = {n: params[n].detach() + 0.5 * torch.randn(params[n].shape, generator=generator) for n in names}
    batch = {k: v for k, v in data[:].items()}
    labels = batch.pop("labels")
    with torch.no_grad():
        own = per_sample_loss(model, model(**batch), labels).mean()
        swapped = torch.func.functional_call(model, reference, args=(), kwargs=batch, strict=False)
        expected = per_sample_loss(model, swapped, labels).mean()
    terms = None
    if case.startswith("mlp"):
        grads = per_sample_grads(model, data, names)
        norm = torch.sqrt(sum((reference[n] - params[n].detach()).square().sum() for n in names))
        terms = {
            "reference_term": -sum((grads[n] * reference[n]).flatten(1).sum(1) for n in names).mean() / norm,
            "self_term": sum((grads[n] * params[n].detach()).flatten(1).sum(1) for n in names).mean() / norm,
        }
    (entry,) = monitor_logs(tmp_path, model, data, reference, layer, max_steps=1, per_device_train_batch_size=16)
    assert entry["mimic/monitor_reference_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert entry["mimic/monitor_student_loss"] == pytest.approx(float(own), rel=1e-5)
    assert abs(float(expected) - float(own)) > 1e-3  # the swap changed the loss: the test can tell them apart
    for key, value in (terms or {}).items():
        assert entry[f"mimic/monitor_{key}"] == pytest.approx(float(value), rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    ("layer", "monitor_steps", "monitored_steps"),
    [
        ("head", 0, 6),  # a head's monitor reads the training forward: every logging step
        ("hidden", 0, 1),  # two forwards each: at most every 50 steps by default, so step 0 only of 6
        ("hidden", 2, 3),  # asked for explicitly: every 2 steps, forwards or not
    ],
)
def test_the_default_monitor_of_a_layer_that_needs_forwards_runs_at_most_every_50_steps(
    tmp_path, layer, monitor_steps, monitored_steps
):
    from tiny_models import TinyMLP, mlp_dataset

    model, data = TinyMLP(), mlp_dataset(n=16)
    params = dict(model.named_parameters())
    reference = {n: p.detach() + 0.1 for n, p in params.items() if n.startswith(f"{layer}.")}
    # logging_steps=1 (trl's default is 10): every logged step would pay a layer's forwards without the floor.
    logged = monitor_logs(
        tmp_path,
        model,
        data,
        reference,
        layer,
        mimic_monitor_steps=monitor_steps,
        max_steps=6,
        per_device_train_batch_size=8,
    )
    assert len(logged) == monitored_steps


def test_a_config_object_builds_what_the_keywords_build(tmp_path, digits):
    """`build_reference(model, data, config=ReferenceRecipeConfig(...))` is the keyword call; a keyword given beside
    the config wins; a keyword that is no setting is refused by name."""
    from hf_gradmimic import ReferenceRecipeConfig

    _, clean = digits
    by_keywords = build_reference(
        digits_model(), clean, layers=["classifier"], output_dir=tmp_path / "kw", epochs=3, learning_rate=5e-3, seed=1
    )
    config = ReferenceRecipeConfig(
        layers=["classifier"], output_dir=tmp_path / "cfg", epochs=3, learning_rate=5e-3, seed=1
    )
    by_config = build_reference(digits_model(), clean, config=config)
    assert len(by_config.history) == 3 and by_config.path.parent == tmp_path / "cfg"
    for name, tensor in by_keywords.tensors.items():
        torch.testing.assert_close(by_config.tensors[name], tensor, rtol=0, atol=0)
    overridden = build_reference(digits_model(), clean, config, epochs=1, output_dir=tmp_path / "one")
    assert len(overridden.history) == 1 and config.epochs == 3  # the caller's config is not changed
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['epoch'\].*'epochs'"):
        build_reference(digits_model(), clean, epoch=3)
    with pytest.raises(TypeError, match="`config` is a ReferenceRecipeConfig; got a dict"):
        build_reference(digits_model(), clean, {"epochs": 3})


def test_the_feature_cache_tells_apart_two_checkpoints_of_one_name(tmp_path):
    """Two BERT classifiers of one name with the same embeddings (the first tensors) but another encoder, as two
    revisions of a model fine-tuned with frozen embeddings: each gets its own features from the shared cache folder
    (the classifier's input, the pooled output, recomputed here from the model itself)."""
    import copy

    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, num_labels=2
    )
    first = BertForSequenceClassification(config).eval()
    first.config._name_or_path = "org/bert-classifier"
    second = copy.deepcopy(first)
    with torch.no_grad():
        for name, param in second.named_parameters():
            if ".encoder." in name:
                param.add_(0.5 * torch.randn_like(param))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, size=(32, 8))
    data = datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": rng.integers(0, 2, 32)}
    )
    layer_inputs(first, data, "classifier", cache_dir=tmp_path)
    got = layer_inputs(second, data, "classifier", cache_dir=tmp_path)
    with torch.no_grad():
        expected = second.bert(
            input_ids=torch.as_tensor(ids), attention_mask=torch.ones(32, 8, dtype=torch.long)
        ).pooler_output
    torch.testing.assert_close(got, expected)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
