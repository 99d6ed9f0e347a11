"""A Bayesian-selection run that can SIGKILL itself at the end of a step, for the scorer-resume test.

``python killed_run.py OUTPUT_DIR KILL_AT_STEP`` trains until the end of step KILL_AT_STEP and kills its own
process there (after checkpoint-4 of save_steps=2, before the step's records are flushed).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_gradmimic import MimicConfig, MimicTrainer  # noqa: E402

from tiny_models import TinyMLP, mlp_dataset  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def bayesian_trainer(output_dir: str, kill_at: int | None = None) -> MimicTrainer:
    rng = np.random.default_rng(0)
    data = mlp_dataset(n=64).add_column("zero_shot", rng.normal(size=(64, 4)).astype(np.float32).tolist())
    args = MimicConfig(
        output_dir=output_dir,
        mimic_layers=["head"],
        mimic_scorer="bayesian",
        mimic_zero_shot_column="zero_shot",
        mimic_select_ratio=0.25,
        mimic_bayesian_num_samples=64,
        per_device_train_batch_size=16,
        max_steps=7,
        save_strategy="steps",
        save_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=1,
    )
    callbacks = [KillAt(kill_at)] if kill_at else None
    return MimicTrainer(model=TinyMLP(), args=args, train_dataset=data, callbacks=callbacks)


if __name__ == "__main__":
    bayesian_trainer(sys.argv[1], kill_at=int(sys.argv[2])).train()
