"""Contrastive losses and streams under 2-process DDP (gloo on CPU) against one process with the whole batch.

CLIP and SigLIP gather every rank's embeddings as negatives, so each sample's term and score on 2 ranks × b must
equal those of one process with 2b; a stream is dispatched by rank 0 (accelerate's default for iterables) or read
shard by shard on each rank, and every record must keep its sample's id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_scripts.mimic_worker import build, run
from test_distributed import assert_same_run, assert_two_ranks, launch, records, spec

from stream_data import mlp_rows, offline_losses
from tiny_dual_encoders import CLIP_LAYERS

CLIP_TOWERS = CLIP_LAYERS["both"][:2]  # the last MLP layer of each tower
SIGLIP_LAYERS = ["vision_model.encoder.layers.1.mlp.fc1", "text_model.head"]
STREAM = {"mimic_layers": ["hidden", "head"], "n": 64, "stream": 2}
STREAM_ARGS = {"mimic_id_column": "id", "max_steps": 4}


def clip_spec(folder: Path, name: str, model: str = "clip", **args) -> dict:
    layers = SIGLIP_LAYERS if model == "siglip" else CLIP_TOWERS
    return spec(folder / name, model=model, n=48, mimic_layers=layers, args={"max_steps": 3, **args})


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp-coupled")
    launch(
        [
            clip_spec(folder, "clip-2x8", per_device_train_batch_size=8),
            clip_spec(folder, "clip-2x2x4", per_device_train_batch_size=4, gradient_accumulation_steps=2),
            clip_spec(folder, "siglip-2x8", model="siglip", per_device_train_batch_size=8),
            spec(folder / "stream-dispatched-2x8", **STREAM, args={**STREAM_ARGS, "per_device_train_batch_size": 8}),
            spec(
                folder / "stream-sharded-2x8",
                **STREAM,
                args={
                    **STREAM_ARGS,
                    "per_device_train_batch_size": 8,
                    "accelerator_config": {"dispatch_batches": False},
                },
            ),
        ],
        folder,
    )
    return folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name, expected_args",
    [
        ("clip-2x8", {"per_device_train_batch_size": 16}),
        ("clip-2x2x4", {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}),
        ("siglip-2x8", {"per_device_train_batch_size": 16}),
    ],
)
def test_contrastive_terms_and_scores_on_two_processes_match_one_process_with_the_whole_batch(
    two_process_runs, tmp_path, name, expected_args
):
    model = name.split("-")[0]
    run(clip_spec(tmp_path, "single", model=model, **expected_args))
    assert_two_ranks(two_process_runs / name, per_rank=8)
    assert_same_run(two_process_runs / name, tmp_path / "single")


@pytest.mark.timeout(300)
def test_a_stream_dispatched_by_rank_0_matches_one_process_reading_it(two_process_runs, tmp_path):
    run(spec(tmp_path / "single", **STREAM, args={**STREAM_ARGS, "per_device_train_batch_size": 16}))
    assert_two_ranks(two_process_runs / "stream-dispatched-2x8", per_rank=8)
    assert_same_run(two_process_runs / "stream-dispatched-2x8", tmp_path / "single")


def test_a_stream_read_shard_by_shard_keeps_every_id_with_its_sample(two_process_runs):
    """dispatch_batches=False: each rank reads its own shard of the stream; every sample once, and each record's loss at
    the first step is that of the example with its id."""
    table = records(two_process_runs / "stream-sharded-2x8")
    assert sorted(table["rank"].unique()) == [0, 1] and table.sample_id.is_unique and len(table) == 64
    model, _, _ = build(spec(Path("unused"), **STREAM))
    expected = offline_losses(model, mlp_rows(64, "str"))
    first = table[table.global_step == 1]
    np.testing.assert_allclose(first.loss, [expected[i] for i in first.sample_id], rtol=1e-5)
    by_rank = {rank: set(part.sample_id) for rank, part in table.groupby("rank")}
    ids = [row["id"] for row in mlp_rows(64, "str")]
    assert by_rank == {0: set(ids[:32]), 1: set(ids[32:])}  # shard r is the r-th half of the stream
