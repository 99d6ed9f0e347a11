"""Progress bars (`hf_gradmimic.progress`): drawn where work is long, and hidden by each switch that hides the bars
of `datasets`, `transformers` and `huggingface_hub` (the real libraries' switches, flipped and restored)."""

from __future__ import annotations

import io
import warnings

import datasets
import huggingface_hub.utils
import pytest
import transformers.utils.logging
from test_filter_streaming import random_log, write_shards

from hf_gradmimic.clip_filter import clip_scores
from hf_gradmimic.filter import FilterWarning, build_filter
from hf_gradmimic.progress import ENVIRONMENT_SWITCHES, progress_bar, progress_bars_disabled

from tiny_dual_encoders import pair_dataset, tiny_clip

SWITCHES = {
    "datasets.disable_progress_bars": (datasets.disable_progress_bars, datasets.enable_progress_bars),
    "datasets.utils.logging.disable_progress_bar": (
        datasets.utils.logging.disable_progress_bar,
        datasets.utils.logging.enable_progress_bar,
    ),
    "transformers.utils.logging.disable_progress_bar": (
        transformers.utils.logging.disable_progress_bar,
        transformers.utils.logging.enable_progress_bar,
    ),
    "huggingface_hub.utils.disable_progress_bars": (
        huggingface_hub.utils.disable_progress_bars,
        huggingface_hub.utils.enable_progress_bars,
    ),
}


@pytest.fixture(autouse=True)
def bars_enabled(monkeypatch):
    """Every switch off at the start (the environment may set one), so that a hidden bar means the switch tested."""
    for name in ENVIRONMENT_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    if progress_bars_disabled():
        pytest.skip("a progress-bar switch is set in a way this test cannot undo")


def _drawn(**kwargs) -> str:
    stream = io.StringIO()
    for _ in progress_bar(range(3), desc="Counting", file=stream, **kwargs):
        pass
    return stream.getvalue()


def test_a_bar_is_drawn_by_default():
    assert "Counting: 100%" in _drawn() and "3/3" in _drawn()


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_library_switch_hides_the_bar(switch):
    disable, enable = SWITCHES[switch]
    disable()
    try:
        assert progress_bars_disabled()
        assert _drawn() == ""
    finally:
        enable()
    assert "Counting" in _drawn()  # and it is back once the switch is undone


@pytest.mark.parametrize("variable", ENVIRONMENT_SWITCHES)
@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_each_environment_switch_hides_the_bar(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert _drawn() == ""
    monkeypatch.setenv(variable, "0")
    assert "Counting" in _drawn()


def _filter_bars(tmp_path, capsys) -> str:
    write_shards(random_log(1, signals=True), tmp_path, rows=400)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        build_filter(tmp_path, windows=2)
    return capsys.readouterr().err


def test_build_filter_shows_its_steps_and_each_switch_hides_them(tmp_path, capsys, monkeypatch):
    shown = _filter_bars(tmp_path / "a", capsys)
    assert "Checking the score log's shards" in shown and "Reading the score log" in shown
    assert "Keep posterior" in shown
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    assert _filter_bars(tmp_path / "b", capsys) == ""
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS")
    transformers.utils.logging.disable_progress_bar()
    try:
        assert _filter_bars(tmp_path / "c", capsys) == ""
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_clip_scores_counts_the_examples(capsys):
    model, data = tiny_clip(seed=1), pair_dataset(20)
    capsys.readouterr()
    clip_scores(model, data, batch_size=6)
    drawn = capsys.readouterr().err
    assert "CLIP scores: 100%" in drawn and "20/20" in drawn
    datasets.disable_progress_bars()
    try:
        clip_scores(model, data, batch_size=6)
    finally:
        datasets.enable_progress_bars()
    assert "CLIP scores" not in capsys.readouterr().err


def test_the_reference_feature_pass_counts_the_examples(capsys):
    from hf_gradmimic.reference import layer_inputs
    from hf_gradmimic.testing.digits import digits_model, load_noisy_digits

    data = load_noisy_digits(noise_rate=0.4, seed=0)["train"].select(range(50)).remove_columns(["is_clean"])
    capsys.readouterr()
    layer_inputs(digits_model(), data, "classifier", batch_size=16)
    drawn = capsys.readouterr().err
    assert "Reference features (classifier): 100%" in drawn and "50/50" in drawn
    huggingface_hub.utils.disable_progress_bars()
    try:
        layer_inputs(digits_model(), data, "classifier", batch_size=16)
    finally:
        huggingface_hub.utils.enable_progress_bars()
    assert "Reference features" not in capsys.readouterr().err


def test_a_streamed_push_counts_its_rows_and_the_hub_switch_hides_it(hub_server, tmp_path, capsys, monkeypatch):
    import numpy as np
    from test_filter import make_log
    from test_filter_streamed_data import parquet_shards, streamed

    from hf_gradmimic import hub
    from hf_gradmimic.hub import push_scored_dataset

    table, _ = make_log(n=600, epochs=2, batch=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        mimic_filter = build_filter(table, method="threshold")
    data = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(600)], "label": np.zeros(600, int).tolist()})
    monkeypatch.setattr(hub, "STREAM_SHARD_ROWS", 250)
    capsys.readouterr()
    push_scored_dataset(
        streamed(parquet_shards(data, tmp_path / "a")), mimic_filter, "user/bar", local_dir=tmp_path / "l"
    )
    drawn = capsys.readouterr().err
    assert "Pushing the scored stream to user/bar" in drawn and "600 rows" in drawn
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    push_scored_dataset(
        streamed(parquet_shards(data, tmp_path / "b")), mimic_filter, "user/bar", local_dir=tmp_path / "m"
    )
    assert "Pushing the scored stream" not in capsys.readouterr().err
