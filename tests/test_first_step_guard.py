"""A run whose labels are all -100 is refused at its first optimizer step, before any update
(`hf_gradmimic.training.guards.NonFiniteStepGuard`), instead of training to the end on weight decay alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicConfig, MimicTrainer

from tiny_models import lm_dataset, tiny_gpt2


def test_every_label_ignored_is_refused_before_the_first_update(tmp_path):
    import datasets

    data = lm_dataset(n=8)
    data = datasets.Dataset.from_dict(
        {"input_ids": np.asarray(data["input_ids"]), "labels": np.full_like(np.asarray(data["labels"]), -100)}
    ).with_format("torch")
    model = tiny_gpt2(dropout=0.0)
    before = copy.deepcopy(model.state_dict())
    reference = {"lm_head.weight": model.lm_head.weight.detach() + 0.1}
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["lm_head"],
        max_steps=20,
        per_device_train_batch_size=4,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        mimic_alignment_check=False,
    )
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    with pytest.raises(
        ValueError,
        match=r"first optimizer step has 4 sample\(s\) and none with a supervised label.*"
        r"every label is -100",
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    for name, value in model.state_dict().items():  # no update, not even weight decay
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
