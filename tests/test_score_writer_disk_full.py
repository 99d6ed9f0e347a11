"""A full disk at the score log's final write loses no record (`hf_gradmimic.score_log_io.ScoreWriter`): the error names the
score log, and the records are kept in a file it names."""

from __future__ import annotations

import errno
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

import hf_gradmimic.score_log_io as scores_module
from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from tiny_models import TinyMLP, mlp_dataset


def train(output_dir):
    model = TinyMLP()
    reference = {n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}
    args = MimicConfig(
        output_dir=str(output_dir),
        mimic_layers=["head"],
        max_steps=3,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        mimic_alignment_check=False,
    )
    MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=32), reference=reference).train()


def test_a_full_disk_at_the_final_write_keeps_every_record_in_a_named_file(tmp_path, monkeypatch):
    train(tmp_path / "whole")
    expected = load_scores(tmp_path / "whole").to_pandas()

    real_write = scores_module.atomic_write

    def disk_full_in_the_log(destination, write):
        if "mimic_scores" in str(destination):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(destination, write)

    monkeypatch.setattr(scores_module, "atomic_write", disk_full_in_the_log)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(
        OSError,
        match=r"Could not write the score-log shard .*rank00000-steps000000001-000000003.parquet "
        r"of the score log in .*mimic_scores \(No space left on device\)\. Its 24 records "
        r"\(steps 1..3\) were saved to (?P<spare>\S+) instead",
    ) as raised:
        train(tmp_path / "full")
    spare = str(raised.value).split(" were saved to ")[1].split(" instead")[0]
    kept = pq.read_table(spare).to_pandas()
    np.testing.assert_array_equal(kept.sample_id.values, expected.sample_id.values)
    np.testing.assert_allclose(kept.mimic_score.values, expected.mimic_score.values, rtol=1e-6)
