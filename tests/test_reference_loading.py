"""Bad input, the reference (`hf_gradmimic.reference.loading`): non-finite tensors, a missing local-looking path, a
Hub lookup that fails, a corrupt safetensors file, each named; a dict of NumPy arrays is a reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicTrainer, load_scores

from bad_input import config, head_reference
from tiny_models import (
    TinyMLP,
    mlp_dataset,
)


def test_a_reference_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path):
    from hf_gradmimic.reference import ReferenceLoadError

    model = TinyMLP()
    reference = head_reference(model)
    reference["head.bias"][1] = float("inf")
    with pytest.raises(ReferenceLoadError, match=r"'head.bias'.*1 non-finite value"):
        MimicTrainer(
            model=model,
            args=config(tmp_path, mimic_layers=["head"]),
            train_dataset=mlp_dataset(n=16),
            reference=reference,
        )


def test_a_missing_local_looking_path_fails_at_once_naming_it(tmp_path, monkeypatch):
    import time

    from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors

    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").mkdir()
    for source in ("some_dir/reference.safetensors", "refs/probe", "./probe", "a/b/c"):
        started = time.monotonic()
        with pytest.raises(
            ReferenceLoadError, match=rf"Reference path {source} does not exist \(looked for .*not looked up on the Hub"
        ):
            load_reference_tensors(source, ["head.weight"])
        assert time.monotonic() - started < 2.0, source  # no Hub round trips


def test_a_hub_lookup_failure_says_what_was_tried_and_names_offline_mode(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_gradmimic.reference import load_reference_tensors

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # configuration, as HF_HUB_OFFLINE=1 at import would set
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception) as caught:
        load_reference_tensors("my-org/probe-reference", ["head.weight"])
    message = str(caught.value)
    assert "looked for the reference 'my-org/probe-reference' as a local path" in message, message
    assert str(tmp_path / "my-org" / "probe-reference") in message and "HF_HUB_OFFLINE=1" in message


def test_a_corrupt_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors

    path = tmp_path / "reference.safetensors"
    save_file({"head.weight": torch.zeros(4, 16)}, str(path))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ReferenceLoadError, match=rf"Reference file {path} is not a readable safetensors file"):
        load_reference_tensors(path, ["head.weight"])
    with pytest.raises(ReferenceLoadError, match=rf"Reference file {path} is not a readable"):  # from its folder too
        load_reference_tensors(tmp_path, ["head.weight"])


def test_a_dict_of_numpy_arrays_is_a_reference(tmp_path):
    model = TinyMLP()
    reference = head_reference(model)
    args = config(tmp_path / "torch", mimic_layers=["head"])
    MimicTrainer(model=copy.deepcopy(model), args=args, train_dataset=mlp_dataset(n=16), reference=reference).train()
    args = config(tmp_path / "numpy", mimic_layers=["head"])
    as_numpy = {name: tensor.numpy() for name, tensor in reference.items()}
    MimicTrainer(model=copy.deepcopy(model), args=args, train_dataset=mlp_dataset(n=16), reference=as_numpy).train()
    np.testing.assert_allclose(
        load_scores(tmp_path / "numpy")["mimic_score"], load_scores(tmp_path / "torch")["mimic_score"]
    )
    from hf_gradmimic.reference import ReferenceLoadError

    with pytest.raises(
        ReferenceLoadError, match=r"'head.weight' of the reference tensor dict is a list; expected a torch.Tensor"
    ):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "list", mimic_layers=["head"]),
            train_dataset=mlp_dataset(n=16),
            reference={"head.weight": [[0.0]], "head.bias": [0.0]},
        )


def test_a_tied_head_is_read_under_the_name_its_checkpoint_saved_it(tmp_path):
    """A tied GPT-2's `save_pretrained` keeps its head once, as ``transformer.wte.weight``: a tied student scoring
    ``lm_head`` reads that tensor (safetensors' own reading of the file is the oracle), from the folder and from the
    in-memory model."""
    from safetensors.torch import load_file

    from hf_gradmimic import MimicConfig

    from tiny_models import lm_dataset, tiny_gpt2

    reference = tiny_gpt2(dropout=0.0, tied=True)
    with torch.no_grad():
        reference.transformer.wte.weight.add_(1.0)
    reference.save_pretrained(tmp_path / "ref")
    saved = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert "lm_head.weight" not in saved
    for source in (str(tmp_path / "ref"), reference):
        args = MimicConfig(
            output_dir=str(tmp_path / "run"), mimic_layers=["lm_head"], report_to=[], use_cpu=True, max_steps=1
        )
        trainer = MimicTrainer(
            model=tiny_gpt2(dropout=0.0, tied=True), args=args, train_dataset=lm_dataset(n=8), reference=source
        )
        assert torch.equal(trainer.scorer.reference["lm_head.weight"], saved["transformer.wte.weight"])
