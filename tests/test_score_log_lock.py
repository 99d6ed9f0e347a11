"""One writer per score log (`hf_gradmimic.training.log_lock`): a second run in the same output_dir is refused with
the first run's pid and host, a killed run's lock does not block, and records held twice inside one shard are
counted once (`hf_gradmimic.filter.shards`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_gradmimic import MimicConfig, MimicTrainer, build_filter, load_scores
from hf_gradmimic.training.log_lock import LOCK_NAME, ScoreLogLockedError

from tiny_models import TinyMLP, mlp_dataset

TESTS = Path(__file__).parent
COMMON = dict(
    learning_rate=0.1,
    optim="sgd",
    lr_scheduler_type="constant",
    weight_decay=0.0,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    mimic_alignment_check=False,
    per_device_train_batch_size=8,
    mimic_layers=["head"],
)

SLOW_RUN = textwrap.dedent(f"""
    import sys, time
    import torch
    from transformers import TrainerCallback
    from hf_gradmimic import MimicConfig, MimicTrainer
    from tiny_models import TinyMLP, mlp_dataset

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.2)

    model = TinyMLP()
    reference = {{n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}}
    args = MimicConfig(output_dir=sys.argv[1], max_steps=2000, **{COMMON!r})
    MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=32), reference=reference,
                 callbacks=[Slow()]).train()
""")


def head_reference(model):
    return {n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}


def run(output_dir, max_steps=4):
    model = TinyMLP()
    args = MimicConfig(output_dir=str(output_dir), max_steps=max_steps, **COMMON)
    return MimicTrainer(
        model=model, args=args, train_dataset=mlp_dataset(n=32), reference=head_reference(model)
    ).train()


def test_a_second_run_in_the_same_output_dir_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    }
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        lock = tmp_path / "mimic_scores" / LOCK_NAME
        deadline = time.monotonic() + 90
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.exists(), (
            f"the first run never took the lock: {first.stderr.read().decode()[-2000:] if first.poll() is not None else 'timeout'}"
        )
        with pytest.raises(
            ScoreLogLockedError,
            match=rf"Another run \(pid {first.pid} on host {socket.gethostname()}"
            r".*is writing the score log.*Use another output_dir",
        ):
            run(tmp_path)
        assert first.poll() is None  # the first run goes on, its log neither moved aside nor truncated
        assert not list(tmp_path.glob("mimic_scores.previous-*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stderr.close()
    assert lock.exists()  # the killed run could not remove its lock: it is stale now
    with pytest.warns(UserWarning, match=rf"held by pid {first.pid} .* no longer runs"):
        run(tmp_path, max_steps=4)
    assert not lock.exists()  # released at the end of training
    assert len(load_scores(tmp_path)) == 4 * 8


def test_records_held_twice_inside_one_shard_are_counted_once(tmp_path):
    run(tmp_path, max_steps=8)  # 2 epochs of 32 samples
    clean = build_filter(tmp_path, method="threshold", aggregate="majority")
    (shard,) = (tmp_path / "mimic_scores").glob("rank*.parquet")
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, table]), shard)  # what two writers appending to one file leave
    with pytest.warns(UserWarning, match=r"64 record\(s\) in .* repeat a \(step, sample_id\) the same shard"):
        doubled = build_filter(tmp_path, method="threshold", aggregate="majority")
    np.testing.assert_array_equal(doubled.sample_ids, clean.sample_ids)
    np.testing.assert_array_equal(doubled.keep, clean.keep)
    assert doubled.summary["n_records"] == clean.summary["n_records"] == len(table)


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    import json

    from hf_gradmimic.training.log_lock import ScoreLogLock

    folder = tmp_path / "mimic_scores"
    folder.mkdir()
    live = os.getppid()  # a live process that is not this one, started at another time than the lock says
    (folder / LOCK_NAME).write_text(json.dumps({"pid": live, "host": socket.gethostname(), "pid_start": "0"}))
    lock = ScoreLogLock(folder)
    with pytest.warns(UserWarning, match=rf"held by pid {live} .* no longer runs"):
        lock.acquire()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": live, "host": socket.gethostname()}))  # no start time: live
    with pytest.raises(ScoreLogLockedError, match=rf"pid {live} on host"):
        ScoreLogLock(folder).acquire()
