"""The score-log callback: writes each optimizer step's records, flags repeated rows, and truncates on resume.

It owns the rank's `hf_gradmimic.score_log_io.ScoreWriter` and the record of which rows were seen in the current
epoch. A sample already seen in the epoch (or earlier in the same step) is one that accelerate's
``even_batches`` repeated to fill the last batches: its records are flagged ``repeated``, so that
`hf_gradmimic.load_scores` can drop them and no sample counts twice. A stream has no rows: its samples
are told apart by their keys (`SeenKeys`, `hf_gradmimic.training.stream_ids.sample_key`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback
from transformers.utils import logging

from ..score_log_io import ScoreWriter, read_score_table, score_shard_paths, write_provenance
from ..tables import dataset_signature, id_kind
from ..version import __version__
from .batch import ROW_INDEX_KEY
from .log_lock import LOCK_NAME, ScoreLogLock, ScoreLogLockedError
from .step_softmax import StepRecords
from .stream_ids import is_stream

logger = logging.get_logger(__name__)


class SeenRows:
    """Which rows of the training set were seen in the current epoch, on any rank."""

    def __init__(self, dataset_size: int) -> None:
        self.dataset_size = dataset_size
        self.seen: np.ndarray | None = None

    def reset(self) -> None:
        self.seen = None

    def mark(self, rows: np.ndarray) -> np.ndarray:
        """Marks ``rows`` as seen; returns which of them already were."""
        size = max(self.dataset_size, int(rows.max(initial=-1)) + 1)
        if self.seen is None or len(self.seen) < size:
            seen = np.zeros(size, dtype=bool)
            if self.seen is not None:
                seen[: len(self.seen)] = self.seen
            self.seen = seen
        already = self.seen[rows]
        self.seen[rows] = True
        return already

    def repeated_flags(self, records: StepRecords, rank: int, world: int) -> np.ndarray:
        """This rank's samples of the step that count as repeats: already seen in this epoch on any rank, or
        earlier in this step (an earlier micro-batch, or a lower rank)."""
        every_row = np.concatenate(records.all_rows)  # micro-batch after micro-batch, rank after rank
        real = np.isfinite(every_row)
        rows = every_row[real].astype(np.int64)
        repeated = np.ones(len(rows), dtype=bool)
        repeated[np.unique(rows, return_index=True)[1]] = False
        repeated |= self.mark(rows)
        flags = np.zeros(len(every_row), dtype=bool)
        flags[real] = repeated
        # This rank's samples are its slice of each micro-batch's gather.
        mine, offset = [], 0
        for gathered, own in zip(records.all_rows, records.micro_batch_rows):
            start = offset + rank * (len(gathered) // world)
            mine.append(flags[start : start + len(own)])
            offset += len(gathered)
        return np.concatenate(mine)


class SeenKeys(SeenRows):
    """Which samples of a stream were seen in the current epoch, by key (53-bit integers, not row indices).

    Kept as a sorted array plus a small set of recent keys merged in now and then: about 8 bytes per sample of
    the epoch, and one binary search per sample and step."""

    def __init__(self) -> None:
        super().__init__(0)
        self.reset()

    def reset(self) -> None:
        self.sorted = np.empty(0, dtype=np.int64)
        self.recent: set[int] = set()

    def mark(self, rows: np.ndarray) -> np.ndarray:
        keys = np.asarray(rows, dtype=np.int64)
        already = np.zeros(len(keys), dtype=bool)
        if len(self.sorted):
            found = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
            already = self.sorted[found] == keys
        already |= np.fromiter((key in self.recent for key in keys.tolist()), dtype=bool, count=len(keys))
        self.recent.update(keys.tolist())
        if len(self.recent) > max(65536, len(self.sorted) // 4):
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.int64))
            self.recent = set()
        return already


def run_provenance(
    args: Any, scorer: Any, mode: str, model: Any, train_dataset: Any, num_processes: int = 1
) -> dict[str, Any]:
    """What the score log records about its run: the scorer and its settings (for Grad-Mimic, the reference, by
    source, revision and a hash of the tensors used), the mimic layers, the student's base checkpoint, the library
    version, and what ``sample_id`` indexes: a column (and its values' type), or the rows of the training set; with
    the training set's length and `dataset_signature` of every row (so that a filter can refuse a reordered dataset,
    and a resume another dataset: `hf_gradmimic.training.resume_guard`)."""
    config = getattr(model, "config", None)
    column = args.mimic_id_column or (ROW_INDEX_KEY if is_stream(train_dataset) else None)
    return {
        "hf_gradmimic_version": __version__,
        "scorer": {"name": scorer.name, "mode": mode, **scorer.describe()},
        "mimic_layers": dict(args.mimic_layer_map),
        "temperature": args.mimic_temperature,
        "normalize": args.mimic_normalize,
        "reweight_scope": args.mimic_reweight_scope,
        "warmup_steps": args.mimic_warmup_steps,
        # what the reference_loss / reference_margin columns mean (None: a scorer without a reference records neither)
        "reference_verdict": args.mimic_log_reference_loss if getattr(scorer, "monitors_reference", False) else None,
        "student": {
            "class": type(model).__name__,
            "base_model": getattr(config, "_name_or_path", None) or None,
            "revision": getattr(config, "_commit_hash", None),
        },
        "sample_ids": {
            # A stream without mimic_id_column is recorded by the mimic_row_index its examples carry.
            "column": column,
            "id_type": sample_id_type(train_dataset, column),
            "train_rows": len(train_dataset) if hasattr(train_dataset, "__len__") else None,
            "train_fingerprint": getattr(train_dataset, "_fingerprint", None),
            "train_content": None if is_stream(train_dataset) else dataset_signature(train_dataset),
            "stream_readers": stream_readers(args, train_dataset, num_processes),
        },
    }


def stream_readers(args: Any, train_dataset: Any, num_processes: int) -> int | None:
    """How many processes read a stream, each its own part (None for a map-style dataset): one when the main process
    reads it and dispatches the batches (accelerate's default for a stream), else every process. A resume counts the
    batches to skip in each reader's part, so it must read the stream with as many."""
    if not is_stream(train_dataset):
        return None
    dispatch = getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None)
    return num_processes if dispatch is False else 1


def sample_id_type(train_dataset: Any, column: str | None) -> str | None:
    """The type of the ``sample_id`` values the log holds: ``int64`` for row indices, else the id column's type (None
    when unknown before training: a stream's ids arrive with its examples)."""
    if column is None:
        return "int64"
    if is_stream(train_dataset):
        return None
    feature = (getattr(train_dataset, "features", None) or {}).get(column)
    if feature is not None:
        return str(getattr(feature, "dtype", feature))
    frame_column = getattr(train_dataset, "get", lambda name: None)(column)  # a pandas frame
    return None if frame_column is None else str(frame_column.dtype)


class ScoreLog(TrainerCallback):
    """Writes the score log of one rank and keeps the repeat flags; `write` is called once per optimizer step.

    Args:
        output_dir: the trainer's output_dir (the log goes to ``<output_dir>/mimic_scores/``).
        rank / world: this process and the number of processes.
        dataset_size: rows of the training set; None for a stream, whose samples are named by keys.
        sample_ids: the ``mimic_id_column`` values by row, or None for row indices; for a stream, the ids by key
            (`hf_gradmimic.training.stream_ids.StreamIds`), dropped once a step is written.
        record: whether to write records at all (`MimicConfig.mimic_record_scores`).
        wait_for_everyone: a barrier across ranks.
        provenance: written next to the shards when training starts (`run_provenance`).
    """

    def __init__(
        self,
        output_dir: str,
        rank: int,
        world: int,
        dataset_size: int | None,
        sample_ids: Any,
        record: bool,
        wait_for_everyone: Callable[[], None],
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.rank, self.world = rank, world
        self.sample_ids = sample_ids
        self.record = record
        self.wait_for_everyone = wait_for_everyone
        self.streaming = dataset_size is None
        self.seen_rows = SeenKeys() if self.streaming else SeenRows(dataset_size)
        self.writer: ScoreWriter | None = None
        self.lock: ScoreLogLock | None = None
        self.provenance = provenance
        self.id_type_checked = False

    @property
    def folder(self):
        return None if self.writer is None else self.writer.folder

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen_rows.reset()
        if not self.record:
            return
        if self.writer is None:
            self.writer = ScoreWriter(self.output_dir, rank=self.rank)
        self._take_lock()
        if state.global_step == 0 and self.rank == 0:
            self._keep_earlier_log(self.writer.folder, self.lock)
        if self.rank == 0 and self.provenance is not None:
            write_provenance(self.writer.folder, self.provenance)
        if state.global_step == 0:
            self.wait_for_everyone()  # no rank writes before an earlier log is out of the way
        # Rank 0 also clears the shards of ranks a run resumed on fewer processes lacks (their steps would repeat).
        removed = self.writer.truncate_after(state.global_step, self.world if self.rank == 0 else None)
        if removed:
            logger.warning(
                f"Removed {removed} score records after step {state.global_step} from {self.writer.folder} "
                "(a previous run in this output_dir, or steps after the checkpoint being resumed)."
            )
        if state.global_step:
            self.wait_for_everyone()  # every rank's shards are truncated before any rank reads them
            self._restore_seen_rows(state)

    def _take_lock(self) -> None:
        """One run per log: rank 0 takes the log's lock, and every rank learns whether it could before any rank moves
        or truncates a shard. A run refused by the lock raises `ScoreLogLockedError` on every rank, and the live
        run's log is left as it is (on a resume, the other ranks would otherwise truncate their shards first)."""
        refusal: tuple[str, dict[str, Any]] | None = None
        if self.rank == 0:
            self.lock = ScoreLogLock(self.writer.folder)
            try:
                self.lock.acquire()
            except ScoreLogLockedError as error:
                if self.world == 1:
                    raise
                refusal = (str(error), error.holder)
        if self.world > 1:
            refusal = broadcast_object_list([refusal], from_process=0)[0]
        if refusal is not None:
            raise ScoreLogLockedError(*refusal)

    @staticmethod
    def _keep_earlier_log(folder: Path, lock: ScoreLogLock) -> Path | None:
        """A fresh run in an output_dir that already holds a score log: the earlier log is moved aside, not deleted
        (and this run's lock taken again in the new folder)."""
        if not folder.is_dir() or not any(entry.name != LOCK_NAME for entry in folder.iterdir()):
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = folder.with_name(f"{folder.name}.previous-{stamp}")
        suffix = 1
        while aside.exists():
            aside, suffix = folder.with_name(f"{folder.name}.previous-{stamp}-{suffix}"), suffix + 1
        os.replace(folder, aside)
        (aside / LOCK_NAME).unlink(missing_ok=True)
        lock.acquire()
        warnings.warn(
            f"{folder} held a score log from an earlier run; this fresh (not resumed) run moved it to {aside} and starts "
            "a new log. Resume with `resume_from_checkpoint` to continue a log instead.",
            UserWarning,
            stacklevel=2,
        )
        return aside

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seen_rows.reset()  # a sample counts as repeated when already seen in the same epoch

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()
        if self.lock is not None:
            self.lock.release()

    def flush(self) -> None:
        """Write out what is buffered and wait for it (before each checkpoint, so that the shards on disk hold
        exactly the steps it has taken)."""
        if self.writer is not None:
            self.writer.flush(wait=True)

    def write(self, records: StepRecords, global_step: int, epoch: float) -> None:
        """Append the records of the step that just ended (``global_step`` is the Trainer's, 1-based)."""
        repeated = self.seen_rows.repeated_flags(records, self.rank, self.world)
        sample_ids = records.rows if self.sample_ids is None else self.sample_ids[records.rows]
        if self.streaming:
            self.sample_ids.forget(records.rows)
        if self.writer is None:
            return
        if not self.id_type_checked:
            self._check_logged_id_type(sample_ids)
        self.writer.add_step(
            global_step=global_step,
            epoch=epoch,
            sample_ids=sample_ids,
            mimic_scores=records.scores,
            weights=records.weights,
            losses=records.losses,
            batch_size=records.batch_sizes,
            repeated=repeated,
            status=records.status,
            recorded=records.recorded,
        )

    def _check_logged_id_type(self, sample_ids: Any) -> None:
        """A resumed log must keep one kind of ``sample_id`` (a stream's ids are known only now): shards of integer and
        of string ids side by side could not be read together."""
        self.id_type_checked = True
        try:
            shards = score_shard_paths(self.writer.folder)
        except FileNotFoundError:
            return
        ids = np.asarray(sample_ids)
        if not shards or not len(ids):
            return
        logged = pq.read_schema(shards[0]).field("sample_id").type
        new = pa.array(ids[:1].tolist()).type
        if id_kind(logged) != id_kind(new):
            raise ValueError(
                f"The score log in {self.writer.folder} holds {logged} sample ids, and this run's are {new} (e.g. "
                f"{ids[:3].tolist()}): the resumed log would mix both and could not be read. Resume with the id column "
                "of that run, or start a fresh run (without resume_from_checkpoint, or in another output_dir)."
            )

    def _restore_seen_rows(self, state: Any) -> None:
        """On resume mid-epoch, mark the samples that the score log holds for the epoch being resumed.

        A record's ``epoch`` is e + k/steps_in_epoch at the k-th step of epoch e, in (e, e + 1]; the epoch
        being resumed is ⌊state.epoch⌋, unless the checkpoint ends an epoch (state.epoch integral)."""
        if float(state.epoch or 0.0).is_integer():
            return
        columns = ["global_step", "epoch", "sample_id"]
        try:
            table = read_score_table(self.writer.folder, drop_repeated=False, columns=columns)
        except (FileNotFoundError, ValueError):  # no score log: nothing recorded, nothing to flag
            return
        keep = pc.and_(
            pc.greater(table["epoch"], math.floor(state.epoch)), pc.less_equal(table["global_step"], state.global_step)
        )
        ids = table.filter(keep)["sample_id"].to_numpy(zero_copy_only=False)
        if self.streaming:
            rows = self.sample_ids.keys_of(ids)
        else:
            rows = ids.astype(np.int64) if self.sample_ids is None else np.flatnonzero(np.isin(self.sample_ids, ids))
        self.seen_rows.mark(rows)
