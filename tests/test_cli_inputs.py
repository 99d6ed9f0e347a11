"""The CLI refuses bad paths before any work (`hf_gradmimic.cli`): an existing file as the output folder, a local
model path that does not exist."""

from __future__ import annotations

from hf_gradmimic.cli import main


def test_filter_output_that_is_an_existing_file_fails_before_reading_the_log(tmp_path, capsys):
    scores = tmp_path / "run" / "mimic_scores"
    scores.mkdir(parents=True)
    (scores / "rank00000-steps000000001-000000004.parquet").write_bytes(b"not parquet")  # reading would fail on it
    output = tmp_path / "existing.txt"
    output.write_text("keep me")
    assert main(["filter", str(tmp_path / "run"), "--output", str(output)]) == 2
    assert f"--output {output} is an existing file, not a folder" in capsys.readouterr().err  # not the shard's error
    assert output.read_text() == "keep me"


def test_train_with_a_model_path_that_does_not_exist_says_so(tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,0\nb,1\n")
    code = main(
        [
            "train",
            "--model",
            "/nonexistent/model",
            "--dataset",
            str(data),
            "--text_column",
            "text",
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--model /nonexistent/model: the path does not exist" in err and "Repo id" not in err


def test_train_maps_label_values_to_the_ids_its_config_names():
    """`train` names the classes in the model's config (id2label) and maps the label column's values to those ids:
    a ClassLabel keeps its own; integers 0-11 keep their value as id, 10 and 11 after 9 (not after 1, as text sorts
    them); strings get the position of their sorted name."""
    import datasets

    from hf_gradmimic.cli import _label_ids

    named = datasets.Dataset.from_dict(
        {"label": [1, 0]}, features=datasets.Features({"label": datasets.ClassLabel(names=["neg", "pos"])})
    )
    assert _label_ids(named, "label")[0] == ["neg", "pos"] and _label_ids(named, "label")[1]([1, 0]) == [1, 0]
    numbers = datasets.Dataset.from_dict({"label": [11, 2, 10, 0, 1, 3, 4, 5, 6, 7, 8, 9]})
    names, to_ids = _label_ids(numbers, "label")
    assert names == [str(value) for value in range(12)] and to_ids([11, 2, 10]) == [11, 2, 10]
    words = datasets.Dataset.from_dict({"label": ["pos", "neg", "pos"]})
    names, to_ids = _label_ids(words, "label")
    assert names == ["neg", "pos"] and to_ids(["pos", "neg", "pos"]) == [1, 0, 1]
