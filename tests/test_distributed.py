"""MimicTrainer under real multi-process training (gloo on CPU), mixed precision, activation
checkpointing, crash and resume, each against an independent single-process run.

The multi-process runs launch tests/dist_scripts/mimic_worker.py with `accelerate launch` or
torchrun on a free port of 127.0.0.1; one launch runs several configurations in a row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from accelerate.utils import DistributedType
from dist_scripts.mimic_worker import build, run

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.training.checks import check_supported_setup, last_complete_checkpoint
from hf_gradmimic.training.log_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_scripts" / "mimic_worker.py"
ACCELERATE_CONFIG = ROOT / "examples" / "accelerate_2proc.yaml"
LAUNCH_TIMEOUT = 150

MLP_LAYERS = ["hidden", "head"]
BERT_LAYERS = ["bert.encoder.layer.1.intermediate.dense", "classifier"]
FSDP2 = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
# 44 samples, 2 ranks × 8: three steps per epoch, the last one topped up with 4 repeats.
UNEVEN = {
    "mimic_layers": MLP_LAYERS,
    "n": 44,
    "args": {"per_device_train_batch_size": 8, "max_steps": 9, "save_strategy": "steps", "save_steps": 2},
}


# ---------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(launcher: str, port: int) -> list[str]:
    if launcher == "accelerate":
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ACCELERATE_CONFIG),
            "--main_process_port",
            str(port),
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]


def start(specs: list[dict], folder: Path, launcher: str = "torchrun") -> tuple[subprocess.Popen, Path]:
    """Start two worker processes on ``specs``; their output goes to ``folder/launch.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.json").write_text(json.dumps(specs))
    log = folder / "launch.log"
    inherited = ("ACCELERATE_", "MASTER_", "TORCHELASTIC_", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*launcher_command(launcher, free_port()), str(WORKER), str(folder / "runs.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
            start_new_session=True,
        )
    return process, log


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its descendants. torchrun starts each worker in a session of its
    own, outside the launcher's process group: collect the tree before any of it dies."""
    try:
        launcher = psutil.Process(process.pid)
        tree = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def launch(specs: list[dict], folder: Path, launcher: str = "torchrun") -> None:
    process, log = start(specs, folder, launcher)
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = "timeout"
    finally:
        if process.poll() is None:
            kill(process)
    if code != 0:
        raise AssertionError(f"2-process run failed ({code}); end of {log}:\n{log.read_text()[-6000:]}")


def spec(output_dir: Path, **fields) -> dict:
    return {"output_dir": str(output_dir), **fields}


def bert_spec(output_dir: Path, **args) -> dict:
    """The tiny BERT, mimicking an inner layer and the classifier; 4 steps of 32 unless ``args`` say otherwise."""
    return spec(
        output_dir,
        model="bert",
        mimic_layers=BERT_LAYERS,
        args={"per_device_train_batch_size": 32, "max_steps": 4, **args},
    )


def records(output_dir: Path, drop_repeated: bool = True):
    return load_scores(output_dir, drop_repeated=drop_repeated).to_pandas().sort_values(["global_step", "sample_id"])


def assert_same_run(got_dir: Path, expected_dir: Path, atol: float = 1e-5) -> None:
    """Same samples in every step, same scores and weights, same final parameters."""
    got, expected = records(got_dir), records(expected_dir)
    key = ["global_step", "sample_id"]
    np.testing.assert_array_equal(got[key].values, expected[key].values)
    np.testing.assert_allclose(got.mimic_score.values, expected.mimic_score.values, rtol=0, atol=atol)
    np.testing.assert_allclose(got.weight.values, expected.weight.values, rtol=1e-4, atol=1e-7)
    params, expected_params = torch.load(got_dir / "params.pt"), torch.load(expected_dir / "params.pt")
    assert params.keys() == expected_params.keys()
    for name in params:
        torch.testing.assert_close(params[name], expected_params[name], atol=atol, rtol=0, msg=name)


def assert_two_ranks(output_dir: Path, per_rank: int) -> None:
    table = records(output_dir, drop_repeated=False)
    assert sorted(table["rank"].unique()) == [0, 1]
    assert (table.groupby(["global_step", "rank"]).size() == per_rank).all()


# ---------------------------------------------------------------- DDP


REFERENCE_MODEL_VERDICT = {
    "per_device_train_batch_size": 16,
    "max_steps": 5,
    "mimic_log_reference_loss": "reference_model",
}


# Select mode with a ghost score at the head: the candidates' graph starts there, the hidden layer runs without one.
GRAND_SELECT = {"mimic_scorer": "grand", "mimic_mode": "select", "mimic_select_ratio": 0.25, "max_steps": 5}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One `accelerate launch` with the example config: the 2-process runs the DDP tests compare."""
    folder = tmp_path_factory.mktemp("ddp")
    launch(
        [
            spec(folder / "2x16", mimic_layers=MLP_LAYERS, args={"per_device_train_batch_size": 16, "max_steps": 5}),
            spec(
                folder / "2x2x8",
                mimic_layers=MLP_LAYERS,
                args={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 5},
            ),
            spec(folder / "uneven", **UNEVEN),
            spec(
                folder / "2x2x8-layer",
                mimic_layers=MLP_LAYERS,
                args={
                    "per_device_train_batch_size": 8,
                    "gradient_accumulation_steps": 2,
                    "max_steps": 5,
                    "mimic_reweight_scope": "layer",
                },
            ),
            spec(
                folder / "2x2x8-frozen",
                mimic_layers=["head"],
                frozen=["hidden"],
                args={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 5},
            ),
            spec(folder / "bayes-2x16", mimic_layers=["head"], args={**BAYESIAN, "per_device_train_batch_size": 16}),
            spec(
                folder / "grand-2x16", mimic_layers=["head"], args={**GRAND_SELECT, "per_device_train_batch_size": 16}
            ),
            spec(
                folder / "grand-2x2x4",
                mimic_layers=["head"],
                args={**GRAND_SELECT, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
            ),
            spec(folder / "refmodel-2x16", mimic_layers=["head"], args=REFERENCE_MODEL_VERDICT),
            spec(
                folder / "bayes-2x2x8",
                mimic_layers=["head"],
                args={**BAYESIAN, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
            ),
        ],
        folder,
        launcher="accelerate",
    )
    return folder


@pytest.fixture(scope="module")
def single_process_mlp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    run(spec(folder / "1x32", mimic_layers=MLP_LAYERS, args={"per_device_train_batch_size": 32, "max_steps": 5}))
    return folder


@pytest.mark.timeout(300)
def test_two_processes_match_one_process_batch(ddp_runs, single_process_mlp, tmp_path):
    """2 ranks × 16 and 2 ranks × 2 accumulation × 8 (DDP, no_sync, online-softmax rescale) against one
    process with a batch of 32 and with 2 × 16 accumulation: the seeded sampler gives rank r the
    r-th 16 of each 32, so every step covers the same samples."""
    run(
        spec(
            tmp_path / "1x2x16",
            mimic_layers=MLP_LAYERS,
            args={"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "max_steps": 5},
        )
    )
    assert_two_ranks(ddp_runs / "2x16", per_rank=16)
    assert_two_ranks(ddp_runs / "2x2x8", per_rank=16)
    for name in ("2x16", "2x2x8"):
        assert_same_run(ddp_runs / name, single_process_mlp / "1x32")
        assert json.loads((ddp_runs / name / "run_info.json").read_text())["num_processes"] == 2
    assert_same_run(tmp_path / "1x2x16", single_process_mlp / "1x32")
    assert (records(ddp_runs / "2x2x8").batch_size == 32).all()


def test_reference_model_verdict_two_processes_match_one_process(ddp_runs, tmp_path):
    """Each rank keeps its own copy of the starting weights and judges its own rows: the reference model's verdict
    in the 2-rank log equals a single process's, record for record."""
    run(
        spec(
            tmp_path / "1x32",
            mimic_layers=["head"],
            args={**REFERENCE_MODEL_VERDICT, "per_device_train_batch_size": 32},
        )
    )
    got, expected = records(ddp_runs / "refmodel-2x16"), records(tmp_path / "1x32")
    np.testing.assert_array_equal(
        got[["global_step", "sample_id"]].values, expected[["global_step", "sample_id"]].values
    )
    assert np.isfinite(expected.reference_margin.values).all()
    for column in ("reference_loss", "reference_margin"):
        np.testing.assert_allclose(got[column].values, expected[column].values, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected.reference_margin.values, expected.margin.values)  # not the student's own


STEP_METRICS = ("score_mean", "score_std", "frac_positive", "weighted_loss", "ess_fraction")


def logged_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    entries = json.loads((output_dir / "run_info.json").read_text())["metrics"]
    return {entry["step"]: {key: entry[f"mimic/{key}"] for key in STEP_METRICS} for entry in entries}


def assert_same_metrics(got_dir: Path, expected_dir: Path, atol: float = 1e-7) -> None:
    """The logged `mimic/*` step metrics agree step by step; the score mean is the mean of all ranks' records."""
    got, expected = logged_metrics(got_dir), logged_metrics(expected_dir)
    assert sorted(got) == sorted(expected) and got
    table = records(got_dir)
    for step, metrics in got.items():
        for key in STEP_METRICS:
            assert metrics[key] == pytest.approx(expected[step][key], rel=1e-4, abs=atol), (got_dir.name, step, key)
        scores = table[table.global_step == step].mimic_score.to_numpy()
        assert metrics["score_mean"] == pytest.approx(float(scores.mean()), rel=1e-5, abs=1e-8)


def test_logged_metrics_cover_every_rank(ddp_runs, single_process_mlp):
    """The main process logs `mimic/*` of the whole step, both ranks' samples, as one process with the
    whole batch logs them."""
    assert sorted(logged_metrics(single_process_mlp / "1x32")) == [1, 2, 3, 4, 5]
    for name in ("2x16", "2x2x8"):
        assert len(records(ddp_runs / name)) == 5 * 32
        assert_same_metrics(ddp_runs / name, single_process_mlp / "1x32")


BAYESIAN = {
    "mimic_scorer": "bayesian",
    "mimic_zero_shot_column": "zero_shot",
    "mimic_select_ratio": 0.25,
    "mimic_bayesian_num_samples": 32,
    "max_steps": 5,
}


@pytest.mark.timeout(300)
def test_ghost_selection_under_ddp_equals_one_process(ddp_runs, tmp_path):
    """GraNd select at the head on 2 ranks × 16 against one process with a batch of 32: the candidates are scored from
    a graph that starts at the head under DDP too, and scores, selections and parameters equal the single process's."""
    run(spec(tmp_path / "1x32", mimic_layers=["head"], args={**GRAND_SELECT, "per_device_train_batch_size": 32}))
    single = records(tmp_path / "1x32")
    assert (single.groupby("global_step").weight.apply(lambda w: int((w > 0).sum())) == 8).all()
    assert_same_run(ddp_runs / "grand-2x16", tmp_path / "1x32")


@pytest.mark.timeout(300)
def test_ghost_selection_with_accumulation_under_ddp_equals_one_process(ddp_runs, tmp_path):
    """GraNd select on 2 ranks × 2 accumulation × 4 (DDP finding unused parameters, `Trainer`'s default for a model
    that is not a `PreTrainedModel`) against one process with a batch of 16. The candidates' forwards went through
    the DDP wrapper, which then found a parameter ready twice in the step's backward, and training failed."""
    run(spec(tmp_path / "1x16", mimic_layers=["head"], args={**GRAND_SELECT, "per_device_train_batch_size": 16}))
    assert_same_run(ddp_runs / "grand-2x2x4", tmp_path / "1x16")
    # The logged loss is the selected samples' mean: each process's share of it, whatever micro-batch holds them.
    logged = [
        [entry["loss"] for entry in json.loads((folder / "run_info.json").read_text())["metrics"]]
        for folder in (ddp_runs / "grand-2x2x4", tmp_path / "1x16")
    ]
    np.testing.assert_allclose(logged[0], logged[1], rtol=1e-5)


@pytest.mark.timeout(300)
def test_bayesian_selection_spans_the_step_and_its_factors_agree_on_every_rank(ddp_runs, tmp_path):
    """Bayesian selection (select mode) on 2 ranks × 16 and 2 × 2 accumulation × 8 against one process with a batch
    of 32, and with 2 × 16 accumulation: the candidate batch is the whole step (8 of 32 selected per step, not 2 of 8
    per micro-batch and rank), the Laplace factors are updated once per step from every rank's selected samples and
    are identical on both ranks, and scores, selections and parameters equal the single process's."""
    run(spec(tmp_path / "1x32", mimic_layers=["head"], args={**BAYESIAN, "per_device_train_batch_size": 32}))
    run(
        spec(
            tmp_path / "1x2x16",
            mimic_layers=["head"],
            args={**BAYESIAN, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
        )
    )
    single = records(tmp_path / "1x32")
    assert (single.groupby("global_step").weight.apply(lambda w: int((w > 0).sum())) == 8).all()
    expected_state = torch.load(tmp_path / "1x32" / "scorer_rank0.pt")
    assert expected_state["num_updates"] == 5  # once per step
    for folder in (ddp_runs / "bayes-2x16", ddp_runs / "bayes-2x2x8", tmp_path / "1x2x16"):
        assert_same_run(folder, tmp_path / "1x32")
        got = records(folder)
        np.testing.assert_array_equal(got.weight.values > 0, single.weight.values > 0)
        states = [torch.load(path) for path in sorted(folder.glob("scorer_rank*.pt"))]
        for state in states:  # float32 features from batches of another size: rounding, not a different update
            assert state["num_updates"] == 5
            torch.testing.assert_close(state["feature_factor"], expected_state["feature_factor"], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(state["grad_factor"], expected_state["grad_factor"], rtol=1e-6, atol=1e-9)
        for key in ("feature_factor", "grad_factor"):  # and exactly the same on every rank
            assert all(torch.equal(state[key], states[0][key]) for state in states), key


def test_layer_scope_two_processes_match_one_process(ddp_runs, tmp_path):
    """`mimic_reweight_scope="layer"`: the mimic layers get the step-wide softmax weights, the rest the
    plain mean gradient, which DDP's average over ranks turns into the mean over all 32 samples."""
    run(
        spec(
            tmp_path / "1x32",
            mimic_layers=MLP_LAYERS,
            args={"per_device_train_batch_size": 32, "max_steps": 5, "mimic_reweight_scope": "layer"},
        )
    )
    assert_two_ranks(ddp_runs / "2x2x8-layer", per_rank=16)
    assert_same_run(ddp_runs / "2x2x8-layer", tmp_path / "1x32")


def test_update_from_the_recorded_uses_two_processes_match_one_process(ddp_runs, tmp_path):
    """Only the head trains (as with LoRA, only the mimic tensors): its update comes from the recorded uses, one
    backward through the model (`hf_gradmimic.training.use_backward`); DDP reduces those gradients like any other."""
    run(
        spec(
            tmp_path / "1x32",
            mimic_layers=["head"],
            frozen=["hidden"],
            args={"per_device_train_batch_size": 32, "max_steps": 5},
        )
    )
    assert_two_ranks(ddp_runs / "2x2x8-frozen", per_rank=16)
    assert_same_run(ddp_runs / "2x2x8-frozen", tmp_path / "1x32")


@pytest.mark.timeout(300)
def test_samples_repeated_to_even_out_batches_are_flagged_once(ddp_runs):
    """44 samples on 2 ranks × 8: accelerate tops the last batch of each epoch up with the epoch's
    first 4 samples. Each sample counts once per epoch; the 4 extras are flagged and dropped."""
    table = records(ddp_runs / "uneven", drop_repeated=False)
    table["epoch_index"] = np.ceil(table.epoch).astype(int)  # a record's epoch is in (e, e + 1]
    assert len(table) == 9 * 16
    for epoch, rows in table.groupby("epoch_index"):
        kept, repeated = rows[~rows.repeated], rows[rows.repeated]
        assert sorted(kept.sample_id) == list(range(44)), epoch
        assert len(repeated) == 4, epoch
        # Every flagged record repeats a sample trained earlier in the same epoch (earlier step, or lower rank).
        first = kept.set_index("sample_id").loc[repeated.sample_id]
        earlier = (first.global_step.values < repeated.global_step.values) | (
            (first.global_step.values == repeated.global_step.values) & (first["rank"].values < repeated["rank"].values)
        )
        assert earlier.all(), epoch
    assert not table.duplicated(["global_step", "sample_id"]).any()
    assert len(load_scores(ddp_runs / "uneven")) == 3 * 44


# ---------------------------------------------------------------- crash and resume


@pytest.mark.timeout(300)
def test_resume_after_sigkill_matches_uninterrupted_run(ddp_runs, tmp_path):
    """SIGKILL both ranks while checkpoint-6 is half written (its score shards already flushed), then
    `resume_from_checkpoint=True`: it resumes from checkpoint-4, mid-epoch, drops the records of steps
    5-6, still flags the epoch's repeats, and ends exactly as the uninterrupted run."""
    output_dir = tmp_path / "run"
    process, log = start([spec(output_dir, stall_checkpoint_at=6, **UNEVEN)], tmp_path / "killed")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (output_dir / "checkpoint-6").is_dir():
            assert process.poll() is None, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "checkpoint-6 never appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # the model and optimizer files of checkpoint-6 get written, then the save stalls
    finally:
        kill(process)
    assert not (output_dir / "checkpoint-6" / "trainer_state.json").exists()
    shards = load_scores(output_dir, drop_repeated=False).to_pandas()
    assert shards.global_step.max() == 6  # records past the last complete checkpoint, to be dropped
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-4")

    launch([spec(output_dir, resume=True, **UNEVEN)], tmp_path / "resumed")
    resumed, uninterrupted = records(output_dir, drop_repeated=False), records(ddp_runs / "uneven", drop_repeated=False)
    assert not resumed.duplicated(["global_step", "sample_id"]).any()
    key = ["global_step", "sample_id", "rank", "repeated"]
    np.testing.assert_array_equal(resumed[key].values, uninterrupted[key].values)
    np.testing.assert_allclose(resumed.mimic_score.values, uninterrupted.mimic_score.values, rtol=0, atol=1e-6)
    expected = torch.load(ddp_runs / "uneven" / "params.pt")
    for name, value in torch.load(output_dir / "params.pt").items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.timeout(300)
def test_a_resume_into_a_log_that_a_live_run_writes_is_refused_before_any_rank_truncates_it(ddp_runs, tmp_path):
    """A 2-process run resumed from checkpoint-4 of a log whose lock a live run holds (this test's process): both
    ranks are refused before either truncates its shards, so the records after step 4 (the live run's) stay. Only
    rank 0 takes the lock; rank 1 used to truncate its shards before rank 0 was refused."""
    output_dir = tmp_path / "run"
    shutil.copytree(ddp_runs / "uneven", output_dir)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-08T00:00:00+0000"}
    (output_dir / "mimic_scores" / LOCK_NAME).write_text(json.dumps(holder))
    before = records(output_dir, drop_repeated=False)
    assert before.global_step.max() > 4 and set(before["rank"]) == {0, 1}

    process, log = start([spec(output_dir, resume=str(output_dir / "checkpoint-4"), **UNEVEN)], tmp_path / "second")
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        if process.poll() is None:
            kill(process)
    output = log.read_text()
    assert code != 0 and "ScoreLogLockedError" in output and f"pid {os.getpid()}" in output, output[-4000:]
    assert "Removed" not in output, output[-4000:]
    after = records(output_dir, drop_repeated=False)
    np.testing.assert_array_equal(
        after[["global_step", "sample_id", "rank"]].values, before[["global_step", "sample_id", "rank"]].values
    )


def test_a_two_process_log_resumed_on_one_process_holds_each_later_step_once(ddp_runs, tmp_path):
    """The 2 × 8 run's log resumed from checkpoint-4 on one process × 16: no rank of the resumed run owns rank 1's
    shards, so rank 0 clears their steps after 4 too; every (step, sample) is recorded once, rank 1's only up to 4."""
    output_dir = tmp_path / "run"
    shutil.copytree(ddp_runs / "uneven", output_dir)
    assert (records(output_dir, drop_repeated=False).query("global_step > 4")["rank"] == 1).any()
    one_process = {**UNEVEN, "args": {**UNEVEN["args"], "per_device_train_batch_size": 16}}
    run(spec(output_dir, resume=str(output_dir / "checkpoint-4"), **one_process))
    table = records(output_dir, drop_repeated=False)
    assert not table.duplicated(["global_step", "sample_id"]).any()
    assert table.global_step.max() == UNEVEN["args"]["max_steps"]
    assert table.query("global_step > 4")["rank"].eq(0).all()


def test_resume_refuses_a_half_written_checkpoint(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    model, data, reference = build({"mimic_layers": ["head"], "n": 16})
    args = MimicConfig(output_dir=str(tmp_path), mimic_layers=["head"], use_cpu=True, report_to=[], max_steps=1)
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    with pytest.raises(ValueError, match="not completely written"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---------------------------------------------------------------- FSDP2


# Each FSDP2 run (2 ranks) and the single-process run it equals: BERT's inner layer is first among the mimic layers,
# so BertLayer 0 runs below it. AGRA's comparison batch is per_device_train_batch_size rows drawn by the step's seed,
# the same on both ranks, so its single process accumulates 2 × 16.
BERT_SELECT = {"mimic_scorer": "grand", "mimic_mode": "select", "mimic_select_ratio": 0.25}
FSDP2_RUNS = {
    "2x16": ({"per_device_train_batch_size": 16}, {}),
    "2x4x4": ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}, {}),
    "select-2x16": ({"per_device_train_batch_size": 16, **BERT_SELECT}, BERT_SELECT),
    "agra-2x16": (
        {"per_device_train_batch_size": 16, "mimic_scorer": "agra"},
        {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "mimic_scorer": "agra"},
    ),
}


@pytest.mark.timeout(300)
def test_fsdp2_matches_one_process(tmp_path):
    """FSDP2 (fully_shard per BertLayer, gloo) on 2 ranks × 16 and 2 × 4 accumulation × 4, GraNd select and AGRA on 2
    × 16, each against one process (`FSDP2_RUNS`). accelerate 1.15 drops the FSDP plugin on CPU, so the worker sets
    the state accelerate sets on GPUs (see `forced_fsdp`); the run info proves the weights were sharded. Select mode's
    candidates and AGRA's comparison batch are forwarded with a graph from the first mimic layer up under FSDP2 too."""
    launch(
        [
            {
                **bert_spec(tmp_path / name, **fsdp_args, **FSDP2),
                "force_fsdp": True,
                "record_graph_at": "bert.encoder.layer.0",
            }
            for name, (fsdp_args, _) in FSDP2_RUNS.items()
        ],
        tmp_path,
    )
    singles: dict[str, Path] = {}  # one single-process run per distinct set of arguments
    for name, (_, single_args) in FSDP2_RUNS.items():
        single = singles.setdefault(json.dumps(single_args, sort_keys=True), tmp_path / f"{name}-single")
        if not single.exists():
            run(bert_spec(single, **single_args))
        info = json.loads((tmp_path / name / "run_info.json").read_text())
        assert {key: info[key] for key in ("distributed_type", "num_processes", "mimic_weight_type")} == {
            "distributed_type": str(DistributedType.FSDP),
            "num_processes": 2,
            "mimic_weight_type": "DTensor",
        }
        assert_two_ranks(tmp_path / name, per_rank=16)
        assert_same_run(tmp_path / name, single)
        assert_same_metrics(tmp_path / name, single, atol=1e-5)
    # Per rank and step, (rows, graph) of BertLayer 0's output; the first step also checks the model's own loss (16
    # rows, no graph). Select mode forwards the 16 candidates without a graph there, then trains the rank's share of
    # the step's 8 selected (fewer than 16 rows) with one; AGRA forwards the scored 16 with one, then its 16
    # comparison rows without.
    select = json.loads((tmp_path / "select-2x16" / "run_info.json").read_text())["graph_at"]
    assert [graph for rows, graph in select if rows == 16] == [False] * 5
    assert [graph for rows, graph in select if rows < 16] == [True] * 4
    agra = json.loads((tmp_path / "agra-2x16" / "run_info.json").read_text())["graph_at"]
    assert agra == [[16, False]] + [[16, True], [16, False]] * 4


def deepspeed(stage: int) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
    )


def fsdp(version: int) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
    )


@pytest.mark.parametrize(
    "accelerator, refused, message, accepted",
    [
        (deepspeed(3), {}, "ZeRO stage 3.*empty", None),
        (
            deepspeed(2),
            {"gradient_accumulation_steps": 2},
            "DeepSpeed keeps the accumulated",
            {"mimic_normalize": "micro", "gradient_accumulation_steps": 2},
        ),
        (fsdp(1), {}, "needs FSDP2", None),
        (fsdp(2), {"mimic_reweight_scope": "layer"}, "not supported under FSDP", {"gradient_accumulation_steps": 4}),
        (
            fsdp(2),
            {"mimic_log_reference_loss": "reference_model"},
            "reference_model.*not supported under FSDP",
            {"mimic_log_reference_loss": "always"},
        ),
        (SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), {"torch_compile": True}, "torch.compile", {}),
    ],
)
def test_unsupported_setups_are_refused(tmp_path, accelerator, refused, message, accepted):
    """DeepSpeed cannot run here: the checks are tested on the accelerator attributes they read."""
    model, _, _ = build({"mimic_layers": ["head"]})

    def config(**fields):
        return MimicConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)

    with pytest.raises(ValueError, match=message):
        check_supported_setup(accelerator, config(**refused), model)
    if accepted is not None:
        check_supported_setup(accelerator, config(**accepted), model)


def test_torch_compile_is_refused_by_the_trainer(tmp_path):
    model, data, reference = build({"mimic_layers": ["head"]})
    args = MimicConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], torch_compile=True, torch_compile_backend="aot_eager"
    )
    with pytest.raises(ValueError, match="torch.compile"):
        MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    args = MimicConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="torch.compile"):
        MimicTrainer(model=torch.compile(model), args=args, train_dataset=data, reference=reference)


# ---------------------------------------------------------------- precision and checkpointing


@pytest.mark.timeout(300)
def test_bf16_scores_are_fp32_and_close_to_an_fp32_run(tmp_path):
    dtypes = {"fp32": set(), "bf16": set()}

    def spy_on_scores(name):
        def install(trainer):
            score = trainer.scorer.score

            def spy(ctx):
                scores = score(ctx)
                dtypes[name].add((ctx.ghost.uses[0].output_grads.dtype, scores.dtype))
                return scores

            trainer.scorer.score = spy

        return install

    run(bert_spec(tmp_path / "fp32"), before_train=spy_on_scores("fp32"))
    run(bert_spec(tmp_path / "bf16", bf16=True), before_train=spy_on_scores("bf16"))
    assert dtypes == {
        "fp32": {(torch.float32, torch.float32)},
        "bf16": {(torch.bfloat16, torch.float32)},
    }  # autocast ran the layers in bf16; scores in fp32
    fp32, bf16 = records(tmp_path / "fp32"), records(tmp_path / "bf16")
    np.testing.assert_array_equal(bf16[["global_step", "sample_id"]].values, fp32[["global_step", "sample_id"]].values)
    assert not np.array_equal(bf16.mimic_score.values, fp32.mimic_score.values)
    # rtol 1e-2, plus 1e-2 of the score scale as atol: scores near zero have no meaningful relative error.
    scale = np.abs(fp32.mimic_score.values).max()
    np.testing.assert_allclose(bf16.mimic_score.values, fp32.mimic_score.values, rtol=1e-2, atol=1e-2 * scale)
    for step in range(1, 5):
        a = fp32[fp32.global_step == step].mimic_score.values
        b = bf16[bf16.global_step == step].mimic_score.values
        assert np.mean((a > np.median(a)) == (b > np.median(b))) >= 0.95, step


def train_counting_calls(output_dir: Path, **args) -> int:
    """Trains the tiny BERT (3 steps of 16); returns how many times the inner mimic layer ran."""
    calls = []

    def count_calls(trainer):
        # Only forwards that build a graph: the alignment monitor's no-grad forwards are not training calls.
        hook = lambda *_: calls.append(1) if torch.is_grad_enabled() else None  # noqa: E731
        trainer.model.get_submodule(BERT_LAYERS[0]).register_forward_hook(hook)

    run(bert_spec(output_dir, per_device_train_batch_size=16, max_steps=3, **args), before_train=count_calls)
    return len(calls)


@pytest.mark.timeout(300)
def test_non_reentrant_gradient_checkpointing_gives_the_same_scores(tmp_path):
    plain_calls = train_counting_calls(tmp_path / "plain")
    checkpointed_calls = train_counting_calls(
        tmp_path / "checkpointed",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    # The layer re-ran during backward (recomputation); those calls were not captured as a second forward.
    assert plain_calls == 3 and checkpointed_calls > plain_calls
    assert_same_run(tmp_path / "checkpointed", tmp_path / "plain", atol=1e-6)


@pytest.mark.timeout(300)
def test_select_mode_under_non_reentrant_checkpointing_gives_the_same_scores(tmp_path):
    """GraNd select with BERT's inner layer first among the mimic layers: its candidates' graph starts inside a
    checkpointed block (the blocks below run without one) and the run equals the one without checkpointing."""
    select = {"mimic_scorer": "grand", "mimic_mode": "select", "mimic_select_ratio": 0.5}
    run(bert_spec(tmp_path / "plain", per_device_train_batch_size=16, max_steps=3, **select))
    run(
        bert_spec(
            tmp_path / "checkpointed",
            per_device_train_batch_size=16,
            max_steps=3,
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": False},
            **select,
        )
    )
    assert_same_run(tmp_path / "checkpointed", tmp_path / "plain", atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"preserve_rng_state": True}])
def test_reentrant_gradient_checkpointing_is_refused(tmp_path, kwargs):
    """Explicitly reentrant, or kwargs without `use_reentrant` (torch 2.13 then defaults to reentrant)."""
    with pytest.raises(ValueError, match=r"non-reentrant activation checkpointing.*use_reentrant': False"):
        run(bert_spec(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs=kwargs))
