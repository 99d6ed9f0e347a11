"""`gradmimic report --clean-dataset` matches the clean flags by id (`--id-column`), refuses what it cannot match,
and refuses clean flags that are not booleans or 0/1 (as `mimic_clean_column` is refused by the trainer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_gradmimic import MimicConfig, MimicTrainer, build_filter
from hf_gradmimic.cli import main

from tiny_models import TinyMLP, mlp_dataset


def trained_filter(tmp_path, id_column=None):
    """A run on 32 rows whose ``uid`` ids run opposite to the row order; the dataset plus clean flags, on disk."""
    data = mlp_dataset(n=32).add_column("uid", [f"id{31 - i:02d}" for i in range(32)])
    model = TinyMLP()
    reference = {n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}
    args = MimicConfig(
        output_dir=str(tmp_path / "run"),
        mimic_layers=["head"],
        max_steps=8,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        mimic_alignment_check=False,
        mimic_id_column=id_column,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    data = data.add_column("is_clean", [bool(i % 3) for i in range(32)])
    mimic_filter = build_filter(tmp_path / "run", method="threshold", aggregate="majority")
    mimic_filter.save(tmp_path / "filter")
    data.with_format(None).save_to_disk(str(tmp_path / "clean"))
    return data.with_format(None), mimic_filter


def discard_f1(keep, clean):
    """Discard as the positive class, from the counts (the oracle)."""
    tp = np.sum(~keep & ~clean)
    fp = np.sum(~keep & clean)
    fn = np.sum(keep & ~clean)
    return 2 * tp / (2 * tp + fp + fn)


def test_report_matches_clean_flags_by_id_and_refuses_what_it_cannot_match(tmp_path, capsys):
    data, mimic_filter = trained_filter(tmp_path, id_column="uid")
    flag_of = dict(zip(data["uid"], data["is_clean"]))
    clean = np.array([flag_of[uid] for uid in mimic_filter.sample_ids.tolist()])
    assert (
        main(
            [
                "report",
                str(tmp_path / "filter"),
                "--clean-dataset",
                str(tmp_path / "clean"),
                "--id-column",
                "uid",
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    reported = json.loads((tmp_path / "report" / "report.json").read_text())["filter_metrics"]
    assert reported["discard_f1"] == pytest.approx(discard_f1(mimic_filter.keep, clean))
    # Without --id-column the ids cannot be row indices: refused, saying which column to pass.
    assert (
        main(
            [
                "report",
                str(tmp_path / "filter"),
                "--clean-dataset",
                str(tmp_path / "clean"),
                "--output",
                str(tmp_path / "report2"),
            ]
        )
        == 2
    )
    assert "values of the column 'uid'" in capsys.readouterr().err
    # A dataset missing some of the scored ids: refused, naming them.
    data.select(range(30)).save_to_disk(str(tmp_path / "partial"))
    assert (
        main(
            [
                "report",
                str(tmp_path / "filter"),
                "--clean-dataset",
                str(tmp_path / "partial"),
                "--id-column",
                "uid",
                "--output",
                str(tmp_path / "report3"),
            ]
        )
        == 2
    )
    assert "2 sample id(s) in the scores are not in the dataset's 'uid' column" in capsys.readouterr().err


def test_report_refuses_clean_flags_that_are_not_booleans(tmp_path, capsys):
    data, _ = trained_filter(tmp_path)
    data.map(lambda row: {"is_clean": "clean" if row["is_clean"] else "noisy"}).save_to_disk(str(tmp_path / "words"))
    assert (
        main(
            [
                "report",
                str(tmp_path / "filter"),
                "--clean-dataset",
                str(tmp_path / "words"),
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 2
    )
    assert "Column 'is_clean' of --clean-dataset must hold clean flags" in capsys.readouterr().err


def test_a_mimic_clean_column_of_words_is_refused_naming_it(tmp_path):
    data = mlp_dataset(n=16).add_column("status", ["clean", "noisy"] * 8)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        max_steps=1,
        report_to=[],
        use_cpu=True,
        mimic_clean_column="status",
        mimic_alignment_check=False,
    )
    model = TinyMLP()
    with pytest.raises(ValueError, match=r"`mimic_clean_column='status'` must hold clean flags.*'clean', 'noisy'"):
        MimicTrainer(
            model=model,
            args=args,
            train_dataset=data,
            reference={n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")},
        )
