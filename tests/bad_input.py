"""What the bad-input tests share (tests/test_guards.py, test_sample_ids.py, test_config_values.py,
test_reference_loading.py, test_score_log_dir.py, test_provenance.py): one SGD step of lr 1 on a tiny model, so that
a sample's effect on the parameters is its gradient, and a reference head a fixed random step away."""

from __future__ import annotations

import torch

from hf_gradmimic import MimicConfig

from sgd_args import SGD_ARGS

COMMON = {**SGD_ARGS, "learning_rate": 1.0, "mimic_alignment_check": False}


def config(tmp_path, **overrides) -> MimicConfig:
    return MimicConfig(
        output_dir=str(tmp_path), **{**COMMON, "per_device_train_batch_size": 16, "max_steps": 1, **overrides}
    )


def head_reference(model, scale=0.5):
    generator = torch.Generator().manual_seed(1)
    return {
        n: p.detach() + scale * torch.randn(p.shape, generator=generator)
        for n, p in model.named_parameters()
        if n.startswith("head.")
    }
