"""build_reference: a linear probe on the student's own frozen features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hf_gradmimic import MimicConfig, MimicTrainer, build_reference, load_scores
from hf_gradmimic.digits import digits_model, load_noisy_digits
from hf_gradmimic.recipes import layer_inputs
from hf_gradmimic.reference import read_reference_metadata


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

    result = build_reference(model, clean, layers=["classifier"], output_dir=tmp_path / "ref", eval_dataset=data["test"], epochs=30)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert float(result.metadata["eval_accuracy"]) > 0.9


def test_saved_file_holds_only_the_named_tensors_with_metadata(tmp_path, digits):
    data, clean = digits
    result = build_reference(digits_model(), clean, layers=["classifier"], output_dir=tmp_path, epochs=5,
                             base_model="org/digits-mlp", base_revision="abc123")
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
    args = MimicConfig(output_dir=str(tmp_path / "run"), mimic_reference=str(tmp_path / "ref"), mimic_layers=["classifier"],
                       per_device_train_batch_size=64, num_train_epochs=2, learning_rate=5e-2, report_to=[],
                       save_strategy="no", use_cpu=True, disable_tqdm=True)
    MimicTrainer(model=digits_model(), args=args, train_dataset=data["train"]).train()
    scores = load_scores(tmp_path / "run").to_pandas()
    is_clean = np.asarray(data["train"]["is_clean"])[scores.sample_id.values]
    assert scores.mimic_score[is_clean].mean() > scores.mimic_score[~is_clean].mean()
