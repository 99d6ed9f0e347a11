"""Scorer state in checkpoints (`hf_gradmimic.training.scorer_state`): no code runs from a checkpoint file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicConfig, MimicTrainer
from hf_gradmimic.scorers.bayesian import BayesianScorer
from hf_gradmimic.training.scorer_state import LEGACY_STATE_NAME, load_scorer_state, save_scorer_state

from tiny_models import TinyMLP, mlp_dataset


class _Payload:
    """Unpickling this creates ``marker``: the proof that a checkpoint file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(folder, marker) -> None:
    with open(folder / LEGACY_STATE_NAME, "wb") as handle:
        pickle.dump({"feature_factor": _Payload(str(marker))}, handle)


def config(tmp_path, **overrides) -> MimicConfig:
    settings = dict(
        mimic_layers=["head"],
        per_device_train_batch_size=16,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return MimicConfig(output_dir=str(tmp_path), **{**settings, **overrides})


def test_a_pickle_payload_in_a_checkpoint_is_not_run_on_resume(tmp_path):
    """The default scorer has no state: nothing is read; a stateful scorer refuses the payload, naming the file."""
    data = mlp_dataset(n=32)
    torch.manual_seed(0)
    reference = TinyMLP()
    MimicTrainer(model=TinyMLP(), args=config(tmp_path / "run"), train_dataset=data, reference=reference).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "ran"
    plant_payload(checkpoint, marker)
    # Plain pickle runs it: the payload is live, so the assertions below can fail.
    with open(checkpoint / LEGACY_STATE_NAME, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()
    marker.unlink()

    resumed = MimicTrainer(model=TinyMLP(), args=config(tmp_path / "run"), train_dataset=data, reference=reference)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()

    with pytest.raises(ValueError, match=LEGACY_STATE_NAME):
        load_scorer_state(checkpoint)
    assert not marker.exists()


def test_bayesian_state_round_trips_through_safetensors_and_json(tmp_path):
    scorer = BayesianScorer(num_samples=4)
    scorer.feature_factor = torch.randn(5, 5, dtype=torch.float64)
    scorer.grad_factor = torch.randn(3, 3)
    scorer.num_updates, scorer.num_data = 7, 112
    torch.randn(3, generator=scorer.generator)
    save_scorer_state(tmp_path, scorer.state_dict())
    restored = BayesianScorer(num_samples=4)
    restored.load_state_dict(load_scorer_state(tmp_path))
    torch.testing.assert_close(restored.feature_factor, scorer.feature_factor, rtol=0, atol=0)
    torch.testing.assert_close(restored.grad_factor, scorer.grad_factor, rtol=0, atol=0)
    assert (restored.num_updates, restored.num_data) == (7, 112)
    np.testing.assert_array_equal(
        torch.randn(8, generator=restored.generator).numpy(), torch.randn(8, generator=scorer.generator).numpy()
    )
    assert not (tmp_path / LEGACY_STATE_NAME).exists()


def test_a_legacy_state_of_tensors_still_loads(tmp_path):
    state = {"feature_factor": torch.eye(3), "num_updates": 2}
    torch.save(state, tmp_path / LEGACY_STATE_NAME)
    loaded = load_scorer_state(tmp_path)
    torch.testing.assert_close(loaded["feature_factor"], torch.eye(3))
    assert loaded["num_updates"] == 2


def test_state_that_is_not_data_is_refused_by_key(tmp_path):
    with pytest.raises(TypeError, match="'hook'"):
        save_scorer_state(tmp_path, {"hook": object()})
