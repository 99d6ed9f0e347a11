"""A reference far from the student (‖θ_ref − θ‖² beyond float32) still gets the right mimic scores
(`hf_gradmimic.scorers.mimic.MimicScorer.direction`), against a float64 oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from tiny_models import TinyMLP, mlp_dataset, per_sample_grads


@pytest.mark.parametrize("magnitude", [1e30, 1e37])
def test_scores_of_a_reference_of_huge_magnitude_are_finite_and_right(tmp_path, magnitude):
    model, data = TinyMLP(), mlp_dataset(n=16)
    generator = torch.Generator().manual_seed(1)
    reference = {
        n: p.detach() + magnitude * torch.rand(p.shape, generator=generator)
        for n, p in model.named_parameters()
        if n.startswith("head.")
    }
    before = copy.deepcopy(model)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        max_steps=1,
        per_device_train_batch_size=16,
        learning_rate=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        mimic_alignment_check=False,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    logged = load_scores(tmp_path).to_pandas().sort_values("sample_id")
    grads = per_sample_grads(before, data, list(reference))
    params = dict(before.named_parameters())
    direction = {n: reference[n].double() - params[n].detach().double() for n in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    oracle = (-sum((grads[n].double() * direction[n]).flatten(1).sum(1) for n in reference) / norm).numpy()
    assert np.isfinite(logged.mimic_score.values).all() and (logged.status.values == 0).all()
    np.testing.assert_allclose(logged.mimic_score.values, oracle, rtol=1e-4, atol=1e-6 * np.abs(oracle).max())
