"""The resume guard (`hf_gradmimic.training.resume_guard`): a resume that would change what the score log means is
refused, naming what changed; a change of τ is allowed, warned about and recorded in the provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

from tiny_models import TinyMLP, mlp_dataset

COMMON = dict(
    learning_rate=0.1,
    optim="sgd",
    lr_scheduler_type="constant",
    weight_decay=0.0,
    report_to=[],
    logging_steps=1,
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    mimic_alignment_check=False,
    per_device_train_batch_size=8,
    save_strategy="steps",
    save_steps=2,
)


def reference(model, scale=0.5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}


def first_run(tmp_path, data=None, **overrides):
    """Two steps and checkpoint-2 in ``tmp_path``; returns the dataset and the reference it used."""
    data = mlp_dataset(n=32) if data is None else data
    model = TinyMLP()
    ref = reference(model)
    args = MimicConfig(output_dir=str(tmp_path), mimic_layers=["head"], **{**COMMON, "max_steps": 2, **overrides})
    MimicTrainer(model=model, args=args, train_dataset=data, reference=ref).train()
    return data, ref


def resume(tmp_path, data, ref, **overrides):
    args = MimicConfig(output_dir=str(tmp_path), **{**COMMON, "max_steps": 4, "mimic_layers": ["head"], **overrides})
    return MimicTrainer(model=TinyMLP(), args=args, train_dataset=data, reference=ref).train(
        resume_from_checkpoint=True
    )


def test_each_checkpoint_records_what_the_log_means(tmp_path):
    first_run(tmp_path)
    record = json.loads((tmp_path / "checkpoint-2" / "mimic_run.json").read_text())
    assert record == json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    assert record["sample_ids"]["id_type"] == "int64" and set(record["sample_ids"]["train_content"]) == {"x", "labels"}


@pytest.mark.parametrize(
    "change, match",
    [
        ("reference", r"reference \(hash of its tensors\): was \"[0-9a-f]{64}\", now \"[0-9a-f]{64}\""),
        ("mimic_layers", r"mimic layers: was \{\"head\": \"head\"\}, now \{\"hidden\": \"hidden\"\}"),
        ("scorer", r"scorer and mode: was .*\"mimic\".*now .*\"grand\""),
        ("dataset", r"training set content"),
        ("id_column", r"id column: was \"\(row index\)\", now \"uid\""),
    ],
)
def test_a_resume_that_changes_what_the_log_means_is_refused_naming_it(tmp_path, change, match):
    data, ref = first_run(tmp_path)
    before = load_scores(tmp_path).to_pandas()
    overrides = {}
    if change == "reference":
        ref = reference(TinyMLP(), seed=7)
    elif change == "mimic_layers":
        overrides["mimic_layers"] = ["hidden"]
    elif change == "scorer":
        overrides["mimic_scorer"] = "grand"
    elif change == "dataset":  # two rows swapped: same rows, another order (every row is compared)
        data = data.select([1, 0, *range(2, len(data))])
    elif change == "id_column":
        data = data.add_column("uid", [f"s{i:03d}" for i in range(len(data))])
        overrides["mimic_id_column"] = "uid"
    with pytest.raises(
        ValueError,
        match=r"Resuming from .*checkpoint-2 would continue its score log with a different "
        rf"(.|\n)*{match}(.|\n)*start a fresh run",
    ):
        resume(tmp_path, data, ref, **overrides)
    after = load_scores(tmp_path).to_pandas()  # nothing written, nothing lost
    np.testing.assert_array_equal(after.mimic_score.values, before.mimic_score.values)
    assert json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())["mimic_layers"] == {"head": "head"}


def test_a_change_of_temperature_is_allowed_warned_about_and_recorded(tmp_path):
    data, ref = first_run(tmp_path, mimic_temperature=1.0)
    with pytest.warns(UserWarning, match=r"temperature τ changed from 1.0 to 0.25: the steps after 2"):
        resume(tmp_path, data, ref, mimic_temperature=0.25)
    provenance = json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    assert provenance["temperature"] == 0.25
    assert provenance["temperature_changes"] == [{"after_step": 2, "from": 1.0, "to": 0.25}]
    assert sorted(load_scores(tmp_path).to_pandas().global_step.unique()) == [1, 2, 3, 4]


def test_the_same_settings_and_rows_in_another_format_resume(tmp_path):
    data, ref = first_run(tmp_path)
    resume(tmp_path, data.with_format(None), ref)
    assert sorted(load_scores(tmp_path).to_pandas().global_step.unique()) == [1, 2, 3, 4]


def test_a_stream_resumed_with_ids_of_another_type_is_refused_before_writing(tmp_path):
    """A stream's ids are known only from its first batch: the first write of the resumed run checks them."""
    from stream_data import mlp_stream

    def stream_run(ids, max_steps):
        model = TinyMLP()
        args = MimicConfig(
            output_dir=str(tmp_path), max_steps=max_steps, mimic_id_column="id", **{**COMMON, "mimic_layers": ["head"]}
        )
        return MimicTrainer(model=model, args=args, train_dataset=mlp_stream(64, ids), reference=reference(model))

    stream_run("int", 2).train()
    before = load_scores(tmp_path).to_pandas()
    with pytest.raises(ValueError, match=r"holds int64 sample ids, and this run's are string .*could not be read"):
        stream_run("str", 4).train(resume_from_checkpoint=True)
    after = load_scores(tmp_path).to_pandas()  # still one readable log, as it was
    np.testing.assert_array_equal(after.sample_id.values, before.sample_id.values)


def assert_same_run(resumed: MimicTrainer, whole: MimicTrainer) -> None:
    """The resumed run's parameters and score log (samples, steps, scores) are the uninterrupted run's."""
    for (name, param), expected in zip(resumed.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-7, msg=name)
    records = [load_scores(trainer.args.output_dir).to_pandas() for trainer in (resumed, whole)]
    assert records[0][["global_step", "sample_id"]].equals(records[1][["global_step", "sample_id"]])
    np.testing.assert_allclose(records[0].mimic_score, records[1].mimic_score, rtol=1e-6)


class StopInsideStep(TrainerCallback):
    """Raises once, after the first micro-batch of optimizer step ``step`` (a Ctrl-C in a notebook)."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, True

    def on_substep_end(self, args, state, control, **kwargs):
        if self.armed and state.global_step == self.step - 1:
            self.armed = False
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", [{}, {"mimic_scorer": "grand", "mimic_mode": "select", "mimic_select_ratio": 0.5}])
def test_the_same_trainer_resumed_after_stopping_inside_a_step_equals_an_uninterrupted_run(tmp_path, mode):
    """Stopped after the first of two micro-batches of step 3, then resumed from checkpoint-2 by the same trainer: its
    step softmax still held the stopped micro-batch, added it to step 3 again (parameters off by 1e-2, 4 records
    twice). Now the parameters and the score log equal an uninterrupted run's."""

    def trainer(folder, callbacks=None):
        model = TinyMLP()
        settings = {**COMMON, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, **mode}
        args = MimicConfig(output_dir=str(tmp_path / folder), max_steps=4, mimic_layers=["hidden", "head"], **settings)
        data = mlp_dataset(n=40)
        return MimicTrainer(model=model, args=args, train_dataset=data, reference=reference(model), callbacks=callbacks)

    whole = trainer("whole")
    whole.train()
    stopped = trainer("stopped", [StopInsideStep(3)])
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    stopped.train(resume_from_checkpoint=True)
    assert_same_run(stopped, whole)


class StopAfterStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_select_mode_with_dropout_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path):
    """Select mode scored the step's candidates while `Trainer` fetched them, before it restores a resumed run's random
    state: resumed at checkpoint-3, inside an epoch of 5 steps, the candidates drew other dropout masks (scores off
    by up to 1.03, parameters by 6e-2). They are scored at the step's first micro-batch now: the same masks."""

    def trainer(folder, callbacks=None):
        model = TinyMLP(dropout=0.3)
        settings = {**COMMON, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "save_steps": 3}
        args = MimicConfig(
            output_dir=str(tmp_path / folder),
            max_steps=6,
            mimic_layers=["hidden", "head"],
            mimic_scorer="grand",
            mimic_mode="select",
            mimic_select_ratio=0.5,
            **settings,
        )
        return MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=40), callbacks=callbacks)

    whole = trainer("whole")
    whole.train()
    with pytest.raises(KeyboardInterrupt):
        trainer("run", [StopAfterStep(4)]).train()
    resumed = trainer("run")
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, whole)


def test_a_stream_read_shard_by_shard_is_resumed_only_with_as_many_readers(tmp_path):
    """Each process reading its own part of a stream (``dispatch_batches=False``) skips its part's batches on resume:
    2 such processes resumed on 1 trained 8 samples of the pass twice and never saw 8 others (a 2-process run,
    /tmp/audit/D/r11). Refused now, naming it; dispatched streams (one reader) resume on any number of processes."""
    from hf_gradmimic.training.resume_guard import check_resume, write_run_record
    from hf_gradmimic.training.score_log import run_provenance

    stream = mlp_dataset(n=16).add_column("uid", list(range(16))).to_iterable_dataset(num_shards=2)
    model = TinyMLP()
    settings = {**COMMON, "mimic_id_column": "uid"}
    trainer = MimicTrainer(
        model=model,
        args=MimicConfig(output_dir=str(tmp_path / "run"), max_steps=2, mimic_layers=["head"], **settings),
        train_dataset=stream,
        reference=reference(model),
    )

    def provenance(processes, dispatch):
        trainer.args.accelerator_config.dispatch_batches = dispatch
        return run_provenance(trainer.args, trainer.scorer, trainer.mode, model, stream, processes)

    write_run_record(tmp_path / "checkpoint-2", provenance(2, False))
    with pytest.raises(ValueError, match=r"processes reading the stream: was 2, now 1"):
        check_resume(tmp_path / "checkpoint-2", provenance(1, False))
    write_run_record(tmp_path / "checkpoint-4", provenance(2, None))
    check_resume(tmp_path / "checkpoint-4", provenance(1, None))


def test_a_checkpoint_the_score_log_does_not_reach_is_refused(tmp_path):
    """A fresh run in an output_dir moves the old log aside but keeps its checkpoints; stopped before reaching them,
    `resume_from_checkpoint=True` took the old run's newest one: the log held steps 1-2 and 5-6 of two runs, 3-4
    missing. A checkpoint flushes the log up to its step, so a log ending before it is another run's: refused."""
    data, ref = first_run(tmp_path, max_steps=4)  # checkpoint-2, checkpoint-4
    with pytest.warns(UserWarning, match="held a score log from an earlier run"):
        first_run(tmp_path, data, max_steps=1, save_strategy="no")  # a fresh run: its log ends at step 1
    with pytest.raises(ValueError, match=r"ends at step 1, before checkpoint-4 \(step 4\): that checkpoint is of"):
        resume(tmp_path, data, ref, max_steps=6)
