"""Bad input, the output folder (`hf_gradmimic.training.score_log`): a fresh run in a folder holding an earlier
run's score log moves that log aside, losing nothing."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradmimic import MimicTrainer, load_scores

from bad_input import config, head_reference
from tiny_models import (
    TinyMLP,
    mlp_dataset,
)


def test_a_fresh_run_in_a_used_output_dir_moves_the_earlier_log_aside(tmp_path):
    model = TinyMLP()
    args = config(tmp_path, mimic_layers=["head"], max_steps=2, per_device_train_batch_size=8)
    MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=16), reference=head_reference(model)).train()
    first = load_scores(tmp_path).to_pandas()
    with pytest.warns(UserWarning, match=r"held a score log from an earlier run.*moved it to .*mimic_scores.previous-"):
        MimicTrainer(
            model=TinyMLP(seed=3), args=args, train_dataset=mlp_dataset(n=16, seed=5), reference=head_reference(model)
        ).train()
    (aside,) = tmp_path.glob("mimic_scores.previous-*")
    kept = load_scores(aside).to_pandas()
    np.testing.assert_array_equal(kept.mimic_score.values, first.mimic_score.values)  # nothing lost
    assert len(load_scores(tmp_path)) == 16  # the new run's own log
