"""A streaming run that can SIGKILL itself at the end of a step, for the stream-resume test.

``python killed_stream.py OUTPUT_DIR N KILL_AT_STEP`` trains on a stream of N string-id samples (batches of 8,
7 steps, a checkpoint every 2 steps) and kills its own process at the end of step KILL_AT_STEP (0: never).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from killed_run import KillAt  # noqa: E402
from test_trainer import COMMON, perturbed_reference  # noqa: E402

from hf_gradmimic import MimicConfig, MimicTrainer  # noqa: E402

from stream_data import mlp_stream  # noqa: E402
from tiny_models import TinyMLP  # noqa: E402


def stream_trainer(output_dir: str, n: int, kill_at: int = 0) -> MimicTrainer:
    model = TinyMLP()
    reference = perturbed_reference(model, ["hidden.weight", "hidden.bias", "head.weight", "head.bias"])
    args = MimicConfig(
        output_dir=output_dir,
        mimic_layers=["hidden", "head"],
        mimic_id_column="id",
        mimic_alignment_check=False,
        per_device_train_batch_size=8,
        max_steps=7,
        save_steps=2,
        **{**COMMON, "save_strategy": "steps"},
    )
    callbacks = [KillAt(kill_at)] if kill_at else None
    return MimicTrainer(
        model=model, args=args, train_dataset=mlp_stream(n, "str", shards=2), reference=reference, callbacks=callbacks
    )


if __name__ == "__main__":
    stream_trainer(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])).train()
