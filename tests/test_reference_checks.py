"""What cannot be a reference is refused early by name (`hf_gradmimic.reference.loading`): a quantised tensor without its
scale, a meta-device model, a checkpoint index without ``weight_map``, an index or adapter config that is not JSON;
and a ``reference=`` argument that differs from the config's ``mimic_reference`` (`training.checks`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_gradmimic import MimicConfig, MimicTrainer
from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors
from hf_gradmimic.reference.adapters import adapter_metadata

from tiny_models import TinyMLP, mlp_dataset

NAMES = ["head.weight", "head.bias"]


def head_tensors(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if name in NAMES}


def test_an_int8_reference_without_its_scale_is_refused_naming_the_tensor(tmp_path):
    tensors = head_tensors(TinyMLP())
    tensors["head.weight"] = (tensors["head.weight"] * 100).to(torch.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ReferenceLoadError, match=r"'head.weight' of .*model.safetensors is int8, not floating point.*dequantised"
    ):
        load_reference_tensors(tmp_path, NAMES)
    with pytest.raises(ReferenceLoadError, match=r"'head.weight' of the reference tensor dict is int8"):
        load_reference_tensors(tensors, NAMES)


def test_a_meta_device_reference_is_refused_by_name():
    with torch.device("meta"):
        empty = TinyMLP()
    with pytest.raises(ReferenceLoadError, match=r"'head.weight' of reference model TinyMLP is on the meta device"):
        load_reference_tensors(empty, NAMES)


@pytest.mark.parametrize(
    "index, message",
    [
        (
            {"metadata": {}},
            r"checkpoint index .*model.safetensors.index.json has no `weight_map`.*found the keys \['metadata'\]",
        ),
        ("{not json", r"checkpoint index .*model.safetensors.index.json is not valid JSON"),
        ([1, 2], r"checkpoint index .*model.safetensors.index.json holds a JSON list, not an object"),
    ],
)
def test_a_broken_checkpoint_index_is_named(tmp_path, index, message):
    save_file(head_tensors(TinyMLP()), str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(ReferenceLoadError, match=message):
        load_reference_tensors(tmp_path, NAMES)


def test_an_adapter_config_that_is_not_json_is_named(tmp_path):
    save_file(head_tensors(TinyMLP()), str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{'r': 8")
    with pytest.raises(ValueError, match=r"adapter config .*adapter_config.json is not valid JSON"):
        adapter_metadata(tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors")


def test_a_reference_argument_that_differs_from_the_configs_is_refused(tmp_path):
    model = TinyMLP()
    save_file(head_tensors(model), str(tmp_path / "ref.safetensors"))
    args = MimicConfig(
        output_dir=str(tmp_path / "out"),
        mimic_layers=["head"],
        max_steps=1,
        report_to=[],
        use_cpu=True,
        mimic_reference=str(tmp_path / "ref.safetensors"),
        mimic_alignment_check=False,
    )
    with pytest.raises(
        ValueError,
        match=r"Two references were given: `reference=` \(an in-memory dict\) and the "
        r"config's `mimic_reference=.*ref.safetensors'`.*Pass only one",
    ):
        MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=8), reference=head_tensors(model))
    # The same reference twice is no ambiguity.
    MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=8), reference=str(tmp_path / "ref.safetensors"))


def test_the_model_card_names_the_reference_given_as_an_argument(tmp_path):
    from hf_gradmimic.cards import render_model_card

    model = TinyMLP()
    path = str(tmp_path / "ref.safetensors")
    save_file(head_tensors(model), path)
    args = MimicConfig(
        output_dir=str(tmp_path / "out"),
        mimic_layers=["head"],
        max_steps=1,
        report_to=[],
        use_cpu=True,
        mimic_alignment_check=False,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=8), reference=path)
    text = render_model_card(trainer).text
    assert f"| reference model | `{path}` |" in text and "in-memory" not in text
    in_memory = MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=8), reference=head_tensors(model))
    assert "| reference model | `in-memory reference (dict)` |" in render_model_card(in_memory).text
