"""The resume guard: a checkpoint records what its score log means, and a resume that would change it is refused.

A score log's windows average one quantity per sample over many steps; that quantity is fixed by the reference
(the hash of its tensors), the mimic layers, the scorer with its settings and mode, what ``sample_id`` holds (the id
column and its type) and which rows the training set has, in which order (`hf_gradmimic.filter.dataset_signature`).
Each checkpoint keeps these (``mimic_run.json``, `write_run_record`); resuming from it with any of them changed would
mix two runs in one log, so `check_resume` refuses it, naming what changed and what to do. The temperature τ only
changes the weights of later steps, not what is recorded: a change is allowed, warned about, and recorded in the
provenance (``temperature_changes``).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..fileio import read_json_object, write_json
from ..score_log_io import PROVENANCE_NAME, SCORES_DIRNAME, last_logged_step

__all__ = ["RUN_RECORD_NAME", "check_log_reaches", "check_resume", "log_identity", "write_run_record"]

RUN_RECORD_NAME = "mimic_run.json"
"""In each checkpoint folder: the provenance of the run the checkpoint belongs to (`write_run_record`)."""


def log_identity(provenance: dict[str, Any]) -> dict[str, Any]:
    """What the meaning of the score log depends on, read from its provenance (`training.score_log.run_provenance`).
    A value of None is unknown (an older record, or a stream's id type) and is not compared."""
    scorer = dict(provenance.get("scorer") or {})
    reference = scorer.pop("reference", None) or {}
    sample_ids = provenance.get("sample_ids") or {}
    return {
        "reference (hash of its tensors)": reference.get("tensors_sha256"),
        "scorer and mode": scorer or None,  # the reference's source and revision may change; its tensors may not
        "mimic layers": provenance.get("mimic_layers"),
        "reference's verdict (mimic_log_reference_loss)": provenance.get("reference_verdict"),
        "id column": sample_ids.get("column") or "(row index)",
        "id column type": sample_ids.get("id_type"),
        "training set rows": sample_ids.get("train_rows"),
        "training set content": sample_ids.get("train_content"),
        # a stream read shard by shard: the batches to skip are counted in each reader's part
        "processes reading the stream": sample_ids.get("stream_readers"),
    }


def write_run_record(checkpoint_folder: str | os.PathLike, provenance: dict[str, Any]) -> Path:
    """Keep the run's provenance in the checkpoint folder (atomically), for `check_resume`."""
    return write_json(Path(checkpoint_folder) / RUN_RECORD_NAME, provenance)


def _recorded(checkpoint_folder: Path) -> tuple[dict[str, Any] | None, Path]:
    """The checkpoint's run record; for a checkpoint written before there were any, the score log's provenance."""
    for file in (checkpoint_folder / RUN_RECORD_NAME, checkpoint_folder.parent / SCORES_DIRNAME / PROVENANCE_NAME):
        if file.is_file():
            return read_json_object(file, "The run record", "restore it, or start a fresh run."), file
    return None, checkpoint_folder / RUN_RECORD_NAME


def _differs(name: str, was: Any, now: Any) -> bool:
    if was is None or now is None:
        return False
    if name == "training set content":  # per-column hashes: the columns both runs have must agree
        shared = [column for column in was if column in now]
        return not shared or any(was[column] != now[column] for column in shared)
    return was != now


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def check_resume(checkpoint_folder: str | os.PathLike, provenance: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume from ``checkpoint_folder`` when what its score log means would change; return the provenance
    the resumed run writes (``provenance`` with the temperature changes so far, and this one's, if any).

    Raises:
        ValueError: naming each changed item with its recorded and current value, and what to do.
    """
    folder = Path(checkpoint_folder)
    recorded, file = _recorded(folder)
    if recorded is None or provenance is None:
        return provenance
    was, now = log_identity(recorded), log_identity(provenance)
    changed = [name for name in now if _differs(name, was[name], now[name])]
    if changed:
        listed = "; ".join(f"{name}: was {_shown(was[name])}, now {_shown(now[name])}" for name in changed)
        raise ValueError(
            f"Resuming from {folder} would continue its score log with a different {', '.join(changed)} ({listed}; "
            f"recorded in {file}). One log would then hold two runs' scores, averaged together in the same windows. "
            "Resume with the settings and the training set of that run, or start a fresh run (without "
            "resume_from_checkpoint, which moves the old log aside, or in another output_dir)."
        )
    resumed = copy.deepcopy(provenance)
    changes = list(recorded.get("temperature_changes") or [])
    old, new = recorded.get("temperature"), provenance.get("temperature")
    if old is not None and new is not None and old != new:
        step = _checkpoint_step(folder)
        changes.append({"after_step": step, "from": old, "to": new})
        warnings.warn(
            f"Resuming from {folder} with the temperature τ changed from {old} to {new}: the steps after {step} are "
            "weighted with the new τ. The score log's records keep their meaning; the change is recorded in its "
            "provenance (temperature_changes).",
            UserWarning,
            stacklevel=3,
        )
    if changes:
        resumed["temperature_changes"] = changes
    return resumed


def _checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def check_log_reaches(checkpoint_folder: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Refuse to resume from a checkpoint that the score log in ``output_dir`` does not reach: a checkpoint flushes
    the log up to its step first, so a log ending before it belongs to another run (a fresh run in the same
    output_dir moved the old log aside but kept its checkpoints). Resuming would leave the steps between missing
    and mix two runs in one log."""
    step = _checkpoint_step(Path(checkpoint_folder))
    folder = Path(output_dir) / SCORES_DIRNAME
    # (a checkpoint from elsewhere starts this output_dir's log at its step, which says nothing of its run)
    if not step or not folder.is_dir() or Path(checkpoint_folder).resolve().parent != Path(output_dir).resolve():
        return
    last = last_logged_step(folder)
    if last < step:
        aside = sorted(entry.name for entry in Path(output_dir).glob(f"{SCORES_DIRNAME}.previous-*"))
        raise ValueError(
            f"The score log in {folder} ends at step {last}, before {Path(checkpoint_folder).name} (step {step}): that "
            f"checkpoint is of another run{f' (logs moved aside: {aside})' if aside else ''}. Resuming from it would "
            "leave the steps between out of the log. Resume from a checkpoint of this run (resume_from_checkpoint="
            "<its path>), or start fresh in another output_dir."
        )
