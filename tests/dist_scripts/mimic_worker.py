"""Runs MimicTrainer on a tiny model for tests/test_distributed.py: launched, or imported.

``torchrun --nproc_per_node 2 mimic_worker.py runs.json`` (or ``accelerate launch ...``), where
runs.json holds a list of run specs (see `run`). Every process runs every spec in order, so that
one launch covers several configurations. The single-process runs they are compared with call
`run` in the test process. After each run, rank 0 saves the full parameters to
``<output_dir>/params.pt`` and facts about the run to ``<output_dir>/run_info.json``; the score
log is in ``<output_dir>/mimic_scores/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models and test_trainer

from test_trainer import COMMON as TRAINER_TEST_SETTINGS  # noqa: E402

from tiny_models import TinyMLP, mlp_dataset  # noqa: E402

# The single-process trainer tests' settings (SGD, constant lr, no clipping: runs compare exactly).
COMMON = {**TRAINER_TEST_SETTINGS, "mimic_alignment_check": False}


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def bert_dataset(n: int = 32, length: int = 10, seed: int = 0):
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(n, length))
    lengths = rng.integers(3, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return datasets.Dataset.from_dict(
        {"input_ids": ids * mask, "attention_mask": mask, "labels": rng.integers(0, 3, size=n)}
    ).with_format("torch")


def build(spec: dict[str, Any]):
    """The model, dataset and reference of a run spec (deterministic: same on every rank and run)."""
    n = spec.get("n", 64)
    model, data = (tiny_bert(), bert_dataset(n=n)) if spec.get("model") == "bert" else (TinyMLP(), mlp_dataset(n=n))
    if spec.get("model") in ("clip", "siglip"):  # image–text pairs, a batch-coupled loss
        import tiny_dual_encoders

        model, data = getattr(tiny_dual_encoders, f"tiny_{spec['model']}")(), tiny_dual_encoders.pair_dataset(n=n)
    if spec.get("stream"):  # the same rows as a datasets.IterableDataset of `stream` shards, with string ids
        from stream_data import as_stream

        data = as_stream(data, shards=spec["stream"])
    if spec.get("args", {}).get("mimic_zero_shot_column"):  # Bayesian selection: zero-shot logits per sample
        import numpy as np

        logits = np.random.default_rng(7).normal(size=(n, 4)).astype(np.float32)
        data = data.add_column(spec["args"]["mimic_zero_shot_column"], logits.tolist())
    for name in spec.get("frozen", ()):
        model.get_submodule(name).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    names = [
        f"{layer}.{part}"
        for layer in spec["mimic_layers"]
        for part in ("weight", "bias")
        if f"{layer}.{part}" in params
    ]
    reference = {n: params[n].detach() + 0.5 * torch.randn(params[n].shape, generator=generator) for n in names}
    return model, data, reference


@contextlib.contextmanager
def forced_fsdp():
    """Makes the Trainers built inside run FSDP on CPU.

    accelerate 1.15 enables FSDP only for accelerator devices (`AcceleratorState` takes the FSDP branch
    for MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU) and otherwise drops the plugin silently, so a
    CPU run with `fsdp=True` trains plain DDP. torch's FSDP2 itself works on CPU with gloo: this sets
    the state that accelerate would have set on GPUs, right after the Trainer builds its Accelerator,
    so that `MimicTrainer.__init__` and the whole run see FSDP2 (fully_shard, no_sync, state dicts).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        original(self)
        # AcceleratorState() re-copies PartialState's attributes whenever it is built: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    try:
        yield
    finally:
        Trainer.create_accelerator_and_postprocess = original


def stall_checkpoint(trainer, step: int) -> None:
    """Hangs the save of ``checkpoint-<step>`` after its model and optimizer files, before its RNG
    states and trainer_state.json, so that the test can kill the run with a half-written checkpoint
    (and score shards already flushed past the last complete one)."""
    save_rng_state = trainer._save_rng_state

    def stalled(output_dir):
        if trainer.state.global_step == step:
            time.sleep(600)
        save_rng_state(output_dir)

    trainer._save_rng_state = stalled


def run(spec: dict[str, Any], before_train: Callable[[Any], None] | None = None) -> Any:
    """Trains one spec and returns the trainer. Keys: ``output_dir``, ``mimic_layers``; optional
    ``model`` ("mlp", default, or "bert"), ``frozen`` (modules left untrained), ``n`` (dataset size), ``args`` (`MimicConfig` fields over
    `COMMON`), ``force_fsdp``, ``stall_checkpoint_at`` (a step), ``resume`` (as `train` takes it) and ``record_graph_at`` (a
    module whose outputs' rows and ``requires_grad`` run_info.json lists, one pair per forward).
    ``before_train(trainer)`` lets an in-process caller instrument the trainer."""
    from hf_gradmimic import MimicConfig, MimicTrainer

    model, data, reference = build(spec)
    args = MimicConfig(
        output_dir=spec["output_dir"], mimic_layers=spec["mimic_layers"], **{**COMMON, **spec.get("args", {})}
    )
    with forced_fsdp() if spec.get("force_fsdp") else contextlib.nullcontext():
        trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    if spec.get("stall_checkpoint_at"):
        stall_checkpoint(trainer, spec["stall_checkpoint_at"])
    if before_train is not None:
        before_train(trainer)
    graph_at = []  # per forward of the module ``record_graph_at`` names: its output's rows and ``requires_grad``

    def record_graph(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        graph_at.append([len(output), output.requires_grad])

    if spec.get("record_graph_at"):
        trainer.model.get_submodule(spec["record_graph_at"]).register_forward_hook(record_graph)
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    layer = next(iter(trainer.mimic_layers.layers.values()))
    info = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "mimic_weight_type": type(layer.weight).__name__,  # DTensor when FSDP2 shards it
        "metrics": [entry for entry in trainer.state.log_history if "mimic/score_mean" in entry],
        "graph_at": graph_at,
    }
    # Under FSDP2 the parameters are DTensor shards: full_tensor() all-gathers them, on every rank.
    params = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().float()
        for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
    }
    # Every rank's scorer state: a stateful scorer (Bayesian) must hold the same on every rank.
    torch.save(
        trainer.scorer.state_dict(), Path(spec["output_dir"]) / f"scorer_rank{trainer.accelerator.process_index}.pt"
    )
    if trainer.accelerator.is_main_process:
        torch.save(params, Path(spec["output_dir"]) / "params.pt")
        (Path(spec["output_dir"]) / "run_info.json").write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()
    return trainer


def main() -> None:
    specs = json.loads(Path(sys.argv[1]).read_text())
    for spec in specs:
        run(spec)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Every result is on disk. Leave without the interpreter's teardown: under two concurrent pytest workers, a
    # rank once aborted there ("terminate called without an active exception", a C++ thread still joinable after
    # training and destroy_process_group), failing a run whose results were complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
