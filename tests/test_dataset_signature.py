"""The dataset check sees every row (`hf_gradmimic.tables.dataset_signature`): a filter whose ids are row
indices refuses a dataset with any two rows swapped, and accepts the same rows in any format or chunking."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hf_gradmimic import MimicConfig, MimicTrainer, build_filter, tables

from tiny_models import TinyMLP, mlp_dataset


def test_swapping_two_rows_anywhere_changes_the_signature_and_chunking_does_not(monkeypatch):
    from hf_gradmimic.tables import dataset_signature

    monkeypatch.setattr(tables, "SIGNATURE_CHUNK_ROWS", 64)  # several slices, their boundaries inside chunks
    data = mlp_dataset(n=300).with_format(None)
    signature = dataset_signature(data)
    rechunked = pa.Table.from_batches(data.data.table.to_batches(max_chunksize=7))
    assert dataset_signature(rechunked) == dataset_signature(data.to_pandas()) == signature
    for i, j in [(0, 1), (150, 151), (298, 299), (5, 250)]:
        order = np.arange(300)
        order[[i, j]] = order[[j, i]]
        assert dataset_signature(data.select(order))["x"] != signature["x"]


def test_apply_refuses_a_dataset_with_two_rows_swapped_that_a_sample_of_rows_would_miss(tmp_path):
    data = mlp_dataset(n=200)
    model = TinyMLP()
    reference = {n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        max_steps=25,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        mimic_alignment_check=False,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    mimic_filter = build_filter(tmp_path, method="threshold", aggregate="majority")
    sampled = set(np.unique(np.linspace(0, 199, tables.SIGNATURE_ROWS).astype(int)).tolist())
    i = next(r for r in range(1, 199) if r not in sampled and r + 1 not in sampled)
    order = np.arange(200)
    order[[i, i + 1]] = order[[i + 1, i]]
    with pytest.raises(ValueError, match=r"rows differ from it \(column\(s\) \['x', 'labels'\] in some row\)"):
        mimic_filter.apply(data.select(order))
    assert len(mimic_filter.apply(data.with_format(None).to_pandas())) == int(mimic_filter.keep.sum())
