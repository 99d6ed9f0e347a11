"""MimicTrainer on streams (datasets.IterableDataset, torch IterableDataset of dicts): scores recorded by id, through
collators, dataloader workers and a SIGKILL followed by a resume."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import COMMON, perturbed_reference

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.score_log_io import STATUS_NONFINITE, STATUS_SCORED

from stream_data import TorchStream, mlp_rows, mlp_stream, offline_losses, string_id
from tiny_models import TinyMLP, mlp_dataset

LAYERS = ["hidden", "head"]


def config(tmp_path, **overrides) -> MimicConfig:
    settings = {
        **COMMON,
        "per_device_train_batch_size": 8,
        "max_steps": 6,
        "mimic_alignment_check": False,
        "mimic_id_column": "id",
        **overrides,
    }
    return MimicConfig(output_dir=str(tmp_path), mimic_layers=LAYERS, **settings)


def reference_for(model) -> dict[str, torch.Tensor]:
    return perturbed_reference(model, [f"{layer}.{part}" for layer in LAYERS for part in ("weight", "bias")])


def records(output_dir):
    return load_scores(output_dir).to_pandas().sort_values(["global_step", "sample_id"]).reset_index(drop=True)


@pytest.mark.parametrize("ids", ["int", "str"])
def test_a_stream_trains_as_the_same_rows_in_order_and_records_them_by_id(tmp_path, ids):
    """A `datasets.IterableDataset` against the map-style dataset of the same rows read in order (itself tested against
    per-sample gradients): same ids at the same steps, same scores and weights, same parameters."""
    model = TinyMLP()
    reference = reference_for(model)
    expected_model = copy.deepcopy(model)
    rows = mlp_dataset(n=64).add_column("id", [r["id"] for r in mlp_rows(64, ids)])
    MimicTrainer(
        model=expected_model,
        args=config(tmp_path / "map", train_sampling_strategy="sequential"),
        train_dataset=rows,
        reference=reference,
    ).train()
    MimicTrainer(
        model=model, args=config(tmp_path / "stream"), train_dataset=mlp_stream(64, ids), reference=reference
    ).train()
    got, expected = records(tmp_path / "stream"), records(tmp_path / "map")
    assert len(got) == 6 * 8 and got.sample_id.is_unique  # 48 of the 64 samples, once each
    assert got.sample_id.tolist() == expected.sample_id.tolist()
    if ids == "str":
        assert string_id(0) in set(got.sample_id)
    np.testing.assert_allclose(got.mimic_score, expected.mimic_score, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.weight, expected.weight, rtol=1e-5, atol=1e-8)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, dict(expected_model.named_parameters())[name], msg=name)


@pytest.mark.parametrize(
    "make_stream",
    [lambda: TorchStream(32, "str"), lambda: mlp_stream(32, "str", shards=2)],
    ids=["torch-iterable", "datasets-iterable-2-shards"],
)
def test_two_dataloader_workers_keep_every_id_with_its_sample(tmp_path, make_stream):
    """Two workers each reading half of the stream: every sample once per pass, each record's loss at the first step
    is the loss of the example with that id."""
    model = TinyMLP()
    expected = offline_losses(model, mlp_rows(32, "str"))
    args = config(tmp_path, max_steps=4, dataloader_num_workers=2, per_device_train_batch_size=8)
    MimicTrainer(model=model, args=args, train_dataset=make_stream(), reference=reference_for(model)).train()
    table = records(tmp_path)
    assert sorted(table.sample_id) == sorted(expected)  # 4 steps × 8 = the 32 samples, once each
    first = table[table.global_step == 1]
    np.testing.assert_allclose(first.loss, [expected[i] for i in first.sample_id], rtol=1e-5)


def test_the_row_index_advice_works_and_a_stream_without_ids_is_refused(tmp_path):
    model = TinyMLP()
    rows = [{"x": row["x"], "labels": row["labels"], "mimic_row_index": 500 + k} for k, row in enumerate(mlp_rows(16))]
    stream = TorchStream(16)
    stream.rows = rows
    MimicTrainer(
        model=model,
        args=config(tmp_path / "rows", mimic_id_column=None, max_steps=2),
        train_dataset=stream,
        reference=reference_for(model),
    ).train()
    assert sorted(records(tmp_path / "rows").sample_id) == list(range(500, 516))
    provenance = json.loads((tmp_path / "rows" / "mimic_scores" / "provenance.json").read_text())
    assert provenance["sample_ids"]["column"] == "mimic_row_index"
    with pytest.raises(ValueError, match=r"no row index to record scores by.*`mimic_id_column`.*mimic_row_index"):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "none", mimic_id_column=None),
            train_dataset=mlp_stream(16),
            reference=reference_for(model),
        )
    with pytest.raises(ValueError, match=r"no column 'uid' \(`mimic_id_column`\)"):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "uid", mimic_id_column="uid"),
            train_dataset=TorchStream(16),
            reference=reference_for(model),
        ).train()
    with pytest.raises(ValueError, match="`mimic_clean_column` is read from train_dataset before training"):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "clean", mimic_clean_column="clean"),
            train_dataset=mlp_stream(16),
            reference=reference_for(model),
        )


def test_a_string_id_too_long_to_travel_is_named(tmp_path):
    model = TinyMLP()
    stream = TorchStream(16, "str")
    stream.rows[3]["id"] = "x" * 200
    with pytest.raises(ValueError, match=r"Sample id 'x{200}'.*1 to 128 UTF-8 bytes"):
        MimicTrainer(model=model, args=config(tmp_path), train_dataset=stream, reference=reference_for(model)).train()


KILLED_STREAM = Path(__file__).resolve().parent / "dist_scripts" / "killed_stream.py"


@pytest.mark.parametrize("n", [64, 24], ids=["within-one-pass", "across-passes"])
def test_a_stream_killed_and_resumed_records_every_step_once_with_the_same_samples(tmp_path, n):
    """SIGKILL at the end of step 5 (checkpoint-4 complete, step 5's records not yet flushed), then resume: the
    (step, id) records, scores and parameters equal an uninterrupted run's. With 24 samples a pass over the stream
    is 3 steps, so the checkpoint falls in the second pass."""
    import subprocess
    import sys

    sys.path.insert(0, str(KILLED_STREAM.parent))
    from killed_stream import stream_trainer

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(KILLED_STREAM.parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    killed = subprocess.run(
        [sys.executable, str(KILLED_STREAM), str(tmp_path / "run"), str(n), "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = stream_trainer(str(tmp_path / "run"), n)
    resumed.train(resume_from_checkpoint=True)
    whole = stream_trainer(str(tmp_path / "whole"), n)
    whole.train()
    got, expected = records(tmp_path / "run"), records(tmp_path / "whole")
    assert not got.duplicated(["global_step", "sample_id"]).any()
    assert got[["global_step", "sample_id"]].values.tolist() == expected[["global_step", "sample_id"]].values.tolist()
    np.testing.assert_allclose(got.mimic_score, expected.mimic_score, rtol=1e-5, atol=1e-7)
    for (name, param), other in zip(resumed.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(param, other, msg=name)


def test_an_id_seen_again_in_the_same_pass_is_flagged_repeated_by_id_not_row(tmp_path):
    """A stream of 16 whose 12th example repeats the 3rd's id: that record is flagged, once per pass (the stream is read
    twice in 4 steps of 8); the ids are large integers, not row indices."""
    model = TinyMLP()
    stream = TorchStream(16)
    stream.rows[11]["id"] = stream.rows[2]["id"]
    MimicTrainer(
        model=model, args=config(tmp_path, max_steps=4), train_dataset=stream, reference=reference_for(model)
    ).train()
    table = load_scores(tmp_path, drop_repeated=False).to_pandas()
    repeated = table[table.repeated]
    assert len(table) == 32 and len(repeated) == 2
    assert set(repeated.sample_id) == {stream.rows[2]["id"]} and sorted(repeated.global_step) == [2, 4]
    assert len(load_scores(tmp_path)) == 30


def test_a_non_finite_sample_of_a_stream_is_named_by_its_id_and_flagged(tmp_path):
    """A stream whose 6th example has a NaN input: it is left out of the update and named by its id in the warning
    (its id is looked up before the step's ids are forgotten), flagged non-finite in the log; the others are scored."""
    model = TinyMLP()
    stream = TorchStream(16)
    stream.rows[5]["x"] = stream.rows[5]["x"].clone()
    stream.rows[5]["x"][0] = float("nan")
    bad_id = stream.rows[5]["id"]
    trainer = MimicTrainer(
        model=model, args=config(tmp_path, max_steps=2), train_dataset=stream, reference=reference_for(model)
    )
    with pytest.warns(RuntimeWarning, match=rf"non-finite loss or score.*ids \[{bad_id}\]"):
        trainer.train()
    assert all(torch.isfinite(param).all() for param in model.parameters())
    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert len(table) == 16 and table.loc[bad_id, "status"] == STATUS_NONFINITE
    assert (table.drop(index=bad_id).status == STATUS_SCORED).all()


@pytest.mark.parametrize("checkpoint", [4, 2])
def test_a_stream_resumed_to_train_longer_reads_on_where_it_stopped(tmp_path, checkpoint):
    """A 64-example stream (8 batches a pass) trained for 4 steps, then resumed from ``checkpoint-<checkpoint>`` with
    ``max_steps=8``: each step reads the ids an uninterrupted 8-step run reads (steps 5-8: examples 32-63). The
    checkpoint's epoch counts batches against its own run's max_steps, not the resumed run's."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    model = TinyMLP()
    reference = reference_for(model)
    MimicTrainer(
        model=model, args=config(tmp_path / "run", **settings), train_dataset=mlp_stream(64), reference=reference
    ).train()
    longer = config(tmp_path / "run", **{**settings, "max_steps": 8})
    MimicTrainer(model=model, args=longer, train_dataset=mlp_stream(64), reference=reference).train(
        resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{checkpoint}")
    )
    got = records(tmp_path / "run")
    stream_ids = [row["id"] for row in mlp_rows(64, "int")]
    expected = [
        (step, sample_id) for step in range(1, 9) for sample_id in sorted(stream_ids[8 * (step - 1) : 8 * step])
    ]
    assert got[["global_step", "sample_id"]].values.tolist() == [list(pair) for pair in expected]
