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
