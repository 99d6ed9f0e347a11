"""The score log on disk: per-sample records of every optimizer step, as Parquet shards, written and read back.

(The callback that fills it during training is `hf_gradmimic.training.score_log`; the scorers that compute the
scores are `hf_gradmimic.scorers`.)

`MimicTrainer` appends one record per (optimizer step, sample) to
``<output_dir>/mimic_scores/``. Each rank writes its own shards, named
``rank{rank:05d}-steps{first:09d}-{last:09d}.parquet`` after the steps they hold, so that
resuming from ``checkpoint-N`` can drop exactly the records of steps after ``N``.

Columns (`SCORE_SCHEMA`):

- ``global_step``: the optimizer step the record belongs to (1-based, as in the Trainer's logs);
- ``epoch``: the fractional epoch at that step;
- ``sample_id``: the row index of ``train_dataset``, or the value of ``mimic_id_column``;
- ``mimic_score``: m_i = <-g_i, v> / ||v|| (NaN when the score was not finite);
- ``weight``: the normalised weight w_i the sample got in the update (sums to 1 over the batch
  the softmax ran over);
- ``loss``: the sample's own loss;
- ``batch_size``: the size b of that softmax batch, so that ``b * weight == 1`` means uniform;
- ``rank``: the process that computed the record;
- ``repeated``: True for samples a distributed sampler repeated to even out the last batches;
  `load_scores` drops them by default so that no sample counts twice;
- ``status``: `STATUS_SCORED` (0), `STATUS_NONFINITE` (1: the sample's loss or score was not finite; it
  got weight 0 and no gradient, and the filter discards it) or `STATUS_UNLABELED` (2: no supervised
  label, e.g. a prompt-only language-model sample; weight 0, and it abstains in the filter).

Optional columns (`OPTIONAL_SCORE_COLUMNS`), present in a shard when the run recorded them:

- ``reference_loss``: the reference's loss on the sample, read on the student's current features
  (`hf_gradmimic.training.reference_verdict`; ``MimicConfig.mimic_log_reference_loss``);
- ``reference_margin``: beside it where the reference is a head making single-label classification logits, the
  reference's margin on the sample (its given label's logit minus the largest other: negative where "reference
  argmax ≠ label");
- ``margin``: the student's margin on the sample at that step, its given label's logit minus the largest other
  (classification logits only; Pleiss et al., NeurIPS 2020, average it over training: the area under the margin).

Writes are atomic (`hf_gradmimic.fileio.atomic_write`) and run on a background thread so that
the step's critical path only hands over arrays.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .fileio import atomic_write, read_json_object, write_json

SCORES_DIRNAME = "mimic_scores"
PROVENANCE_NAME = "provenance.json"
"""Next to the shards: what produced the log (reference, mimic layers, τ, scorer and mode, the student's base
checkpoint, the library version) and what its ``sample_id`` values index (`write_provenance`)."""
PROVENANCE_DESCRIPTION_KEY = "hf_gradmimic.provenance"
"""The one key of the JSON object that `load_scores` writes into the dataset's ``info.description``."""
_SHARD_PATTERN = re.compile(r"^rank(?P<rank>\d+)-steps(?P<first>\d+)-(?P<last>\d+)\.parquet$")

SCORE_COLUMNS: tuple[str, ...] = (
    "global_step",
    "epoch",
    "sample_id",
    "mimic_score",
    "weight",
    "loss",
    "batch_size",
    "rank",
    "repeated",
    "status",
)

OPTIONAL_SCORE_COLUMNS: tuple[str, ...] = ("reference_loss", "reference_margin", "margin")

STATUS_SCORED, STATUS_NONFINITE, STATUS_UNLABELED = 0, 1, 2
"""Values of the ``status`` column: a scored sample; a non-finite loss or score; no supervised label."""

SCORE_TYPES = {
    # sample_id takes the type of the ids (int64 row indices, or the mimic_id_column values).
    "global_step": pa.int64(),
    "epoch": pa.float64(),
    "mimic_score": pa.float32(),
    "weight": pa.float32(),
    "loss": pa.float32(),
    "batch_size": pa.int32(),
    "rank": pa.int32(),
    "repeated": pa.bool_(),
    "status": pa.int8(),
    "reference_loss": pa.float32(),
    "reference_margin": pa.float32(),
    "margin": pa.float32(),
}


def scores_dir(path: str | os.PathLike) -> Path:
    """The ``mimic_scores/`` folder for ``path``, which is an ``output_dir`` or that folder itself."""
    path = Path(path)
    if path.name == SCORES_DIRNAME or (path.is_dir() and any(_SHARD_PATTERN.match(p.name) for p in path.iterdir())):
        return path
    return path / SCORES_DIRNAME


def score_shard_paths(path: str | os.PathLike) -> list[Path]:
    """All score shards under ``path`` (an ``output_dir`` or its ``mimic_scores/``), in step order."""
    folder = scores_dir(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No score log at {folder}: expected the `{SCORES_DIRNAME}/` folder that MimicTrainer writes "
            "into its output_dir (is `mimic_record_scores` off, or has training not run yet?)."
        )
    shards = []
    for entry in folder.iterdir():
        match = _SHARD_PATTERN.match(entry.name)
        if match:
            shards.append((int(match["first"]), int(match["rank"]), entry))
    return [entry for _, _, entry in sorted(shards)]


def write_shard(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a score-log shard with page checksums (CRC-32 per data page), which `read_shard_table` verifies: a shard
    whose bytes changed on disk then fails to read, instead of giving other numbers (Parquet has no check by
    default, and a flipped page reads as valid values)."""
    pq.write_table(table, path, write_page_checksum=True)


def read_shard_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a score-log shard, verifying its page checksums when it has them (shards written before they existed
    have none, and read as before)."""
    return pq.read_table(path, columns=None if columns is None else list(columns), page_checksum_verification=True)


def last_logged_step(path: str | os.PathLike) -> int:
    """The last optimizer step any shard under ``path`` holds, from the shards' names (0 when there is none)."""
    folder = scores_dir(path)
    if not folder.is_dir():
        return 0
    return max(
        (int(match["last"]) for entry in folder.iterdir() if (match := _SHARD_PATTERN.match(entry.name))), default=0
    )


def read_score_table(
    path: str | os.PathLike, *, drop_repeated: bool = True, columns: Sequence[str] | None = None
) -> pa.Table:
    """Read the score log under ``path`` as one Arrow table (ranks merged, repeats dropped)."""
    shards = score_shard_paths(path)
    if not shards:
        raise ValueError(f"The score log at {scores_dir(path)} is empty: no shard has been written.")
    read_columns = (
        None if columns is None else list(dict.fromkeys([*columns, *(["repeated"] if drop_repeated else [])]))
    )
    table = pa.concat_tables([read_shard_table(shard, read_columns) for shard in shards], promote_options="default")
    if drop_repeated:
        table = table.filter(pa.compute.invert(table["repeated"]))
        if columns is not None and "repeated" not in columns:
            table = table.drop(["repeated"])
    return table


def load_scores(path: str | os.PathLike, *, drop_repeated: bool = True) -> datasets.Dataset:  # noqa: F821
    """Load the score log that `MimicTrainer` wrote as a `datasets.Dataset`.

    The run's provenance (``provenance.json``: the reference, the scorer and its settings, the student, what the
    sample ids index) travels in the dataset's ``info.description``, where `datasets` keeps a dataset's own
    description through ``select``, ``filter``, ``map``, ``shuffle`` and ``save_to_disk``; `scores_provenance`
    reads it back, and `build_filter` does, so ``build_filter(load_scores(out))`` carries the same provenance
    as ``build_filter(out)``. ``to_pandas()`` and ``data`` (Arrow) drop it, as they drop any ``info``.

    Args:
        path: an ``output_dir`` or its ``mimic_scores/`` folder.
        drop_repeated: drop the records of samples that a distributed sampler repeated to even
            out the last batches (they were trained on, but counting them would count a sample twice).

    Returns:
        One row per (optimizer step, sample) with the columns in `SCORE_COLUMNS`.

    Examples:
        >>> scores = load_scores("outputs/run1")
        >>> scores_provenance(scores)["scorer"]["name"]
        'mimic'
    """
    import datasets

    table = read_score_table(path, drop_repeated=drop_repeated)
    provenance = read_provenance(path)
    info = datasets.DatasetInfo(description=provenance_description(provenance)) if provenance is not None else None
    return datasets.Dataset(table, info=info)


class ScoreWriter:
    """Buffers one rank's records in memory and writes them as Parquet shards.

    Memory stays bounded: the buffer is written out once it holds ``max_buffered_rows`` rows.
    `flush(wait=True)` is called before each checkpoint so that the shards on disk hold exactly
    the steps the checkpoint has taken.
    """

    def __init__(self, output_dir: str | os.PathLike, rank: int = 0, max_buffered_rows: int = 262_144) -> None:
        self.folder = Path(output_dir) / SCORES_DIRNAME
        self.rank = rank
        self.max_buffered_rows = max_buffered_rows
        self._chunks: list[dict[str, np.ndarray]] = []
        self._buffered_rows = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mimic-score-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.unsaved: list[pa.Table] = []  # records whose shard could not be written anywhere (see `_kept_elsewhere`)

    def add_step(
        self,
        *,
        global_step: int,
        epoch: float,
        sample_ids: np.ndarray,
        mimic_scores: np.ndarray,
        weights: np.ndarray,
        losses: np.ndarray,
        batch_size: int | np.ndarray,
        repeated: np.ndarray | None = None,
        status: np.ndarray | None = None,
        recorded: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append the records of one optimizer step (arrays of this rank's samples)."""
        count = len(sample_ids)
        unknown = set(recorded or {}) - set(OPTIONAL_SCORE_COLUMNS)
        if unknown:
            raise ValueError(
                f"Unknown optional score-log column(s) {sorted(unknown)}; expected {OPTIONAL_SCORE_COLUMNS}."
            )
        optional = {name: np.asarray(values, dtype=np.float32) for name, values in (recorded or {}).items()}
        self._chunks.append(
            {
                "global_step": np.full(count, global_step, dtype=np.int64),
                "epoch": np.full(count, epoch, dtype=np.float64),
                "sample_id": np.asarray(sample_ids),
                "mimic_score": np.asarray(mimic_scores, dtype=np.float32),
                "weight": np.asarray(weights, dtype=np.float32),
                "loss": np.asarray(losses, dtype=np.float32),
                "batch_size": np.broadcast_to(np.asarray(batch_size, dtype=np.int32), (count,)).copy(),
                "rank": np.full(count, self.rank, dtype=np.int32),
                "repeated": np.zeros(count, dtype=bool) if repeated is None else np.asarray(repeated, dtype=bool),
                "status": np.zeros(count, dtype=np.int8) if status is None else np.asarray(status, dtype=np.int8),
                **optional,
            }
        )
        self._buffered_rows += count
        if self._buffered_rows >= self.max_buffered_rows:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Write the buffered records as one shard (in the background unless ``wait``)."""
        if self._chunks:
            chunks, self._chunks, self._buffered_rows = self._chunks, [], 0
            self._pending.append(self._executor.submit(self._write, chunks))
        if wait:
            pending, self._pending = self._pending, []
            for future in pending:
                future.result()  # re-raises a failed write here, not silently

    def _write(self, chunks: list[dict[str, np.ndarray]]) -> None:
        columns = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in SCORE_COLUMNS}
        for name in OPTIONAL_SCORE_COLUMNS:  # a step that did not record it reads NaN there
            if any(name in chunk for chunk in chunks):
                columns[name] = np.concatenate(
                    [chunk.get(name, np.full(len(chunk["sample_id"]), np.nan, np.float32)) for chunk in chunks]
                )
        arrays = {name: pa.array(values, type=SCORE_TYPES.get(name)) for name, values in columns.items()}
        table = pa.table(arrays)
        first, last = int(columns["global_step"].min()), int(columns["global_step"].max())
        name = f"rank{self.rank:05d}-steps{first:09d}-{last:09d}.parquet"
        with self._lock:
            destination = self.folder / name
            if destination.exists():
                # Two flushes inside one step (a full buffer, then a checkpoint): keep both.
                existing = read_shard_table(destination)
                table = pa.concat_tables([existing, table], promote_options="default")
            try:
                atomic_write(destination, lambda tmp: write_shard(table, tmp))
            except OSError as error:
                raise OSError(error.errno, self._kept_elsewhere(table, destination, error)) from error

    def _kept_elsewhere(self, table: pa.Table, destination: Path, error: OSError) -> str:
        """The message of a failed shard write (a full disk...), after saving its records where they may still fit:
        the system's temporary folder, else kept in memory (``unsaved``). Nothing buffered is dropped silently."""
        import tempfile

        steps = f"steps {pa.compute.min(table['global_step']).as_py()}..{pa.compute.max(table['global_step']).as_py()}"
        spare = Path(tempfile.gettempdir()) / f"hf_gradmimic-unsaved-{os.getpid()}-{destination.name}"
        try:
            atomic_write(spare, lambda tmp: write_shard(table, tmp))
            kept = (
                f"Its {table.num_rows} records ({steps}) were saved to {spare} instead: free space, then move that "
                f"file into {self.folder} under the name {destination.name}"
            )
        except OSError as spare_error:
            self.unsaved.append(table)
            kept = (
                f"Saving them to {spare} failed as well ({spare_error.strerror or spare_error}): its "
                f"{table.num_rows} records ({steps}) are kept in memory, in ScoreWriter.unsaved (e.g. "
                "trainer.score_log.writer.unsaved); write them with pyarrow.parquet.write_table before exiting"
            )
        return (
            f"Could not write the score-log shard {destination} of the score log in {self.folder} "
            f"({error.strerror or error}). {kept}."
        )

    def truncate_after(self, global_step: int, world: int | None = None) -> int:
        """Drop this rank's records of steps after ``global_step`` and, given ``world`` (the resumed run's number of
        processes), those of every rank at or beyond it; returns how many rows went.

        Called when training starts: from scratch (``global_step == 0``) it clears an old log in
        the same ``output_dir``; when resuming from ``checkpoint-N`` it removes what a crashed run
        wrote after step N, so that the resumed run neither loses nor duplicates a step. A run resumed on fewer
        processes has no rank to clear the shards of the ranks it lacks: rank 0 passes ``world`` for them.
        """
        self.flush(wait=True)
        if not self.folder.is_dir():
            return 0
        removed = 0
        for entry in list(self.folder.iterdir()):
            match = _SHARD_PATTERN.match(entry.name)
            if match is None or int(match["last"]) <= global_step:
                continue
            rank = int(match["rank"])
            if rank != self.rank and (world is None or rank < world):
                continue
            table = read_shard_table(entry)
            if int(match["first"]) > global_step:
                removed += table.num_rows
                entry.unlink()
                continue
            keep = pa.compute.less_equal(table["global_step"], pa.scalar(global_step, pa.int64()))
            kept = table.filter(keep)
            removed += table.num_rows - kept.num_rows
            last_kept = int(pa.compute.max(kept["global_step"]).as_py())
            rewritten = entry.with_name(f"rank{rank:05d}-steps{int(match['first']):09d}-{last_kept:09d}.parquet")
            atomic_write(rewritten, functools.partial(write_shard, kept))
            entry.unlink()
        return removed

    def close(self) -> None:
        self.flush(wait=True)
        self._executor.shutdown(wait=True)

    def __getstate__(self) -> dict[str, Any]:  # pragma: no cover - trainers are not pickled in practice
        raise TypeError("ScoreWriter holds a thread pool and cannot be pickled")


def write_provenance(path: str | os.PathLike, provenance: dict[str, Any]) -> Path:
    """Write ``provenance.json`` into the score log folder under ``path`` (atomically)."""
    return write_json(scores_dir(path) / PROVENANCE_NAME, provenance)


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance the trainer wrote next to the score log under ``path``, or None (an older log, or none)."""
    file = scores_dir(path) / PROVENANCE_NAME
    if not file.is_file():
        return None
    return read_json_object(
        file,
        "The score log's provenance file",
        "restore it, or delete it (the filter then cannot check the dataset it is applied to).",
    )


def provenance_description(provenance: dict[str, Any]) -> str:
    """The ``info.description`` of a loaded score log: ``{"hf_gradmimic.provenance": {...}}`` as JSON text."""
    return json.dumps({PROVENANCE_DESCRIPTION_KEY: provenance}, sort_keys=True)


def scores_provenance(scores: Any) -> dict[str, Any] | None:
    """The provenance of a score log in any form the filter accepts.

    A path (an ``output_dir`` or its ``mimic_scores/`` folder): its ``provenance.json``. A `datasets.Dataset`
    from `load_scores` (or any ``select``, ``filter``, ``shuffle`` of it): what its ``info.description`` holds.
    None for anything else (a `pyarrow.Table`, a `pandas.DataFrame`, a dataset built by hand) and for a log
    written before provenance was recorded. Logs of different runs concatenated with
    `datasets.concatenate_datasets` have no single provenance: None, with a warning that says so.
    """
    if isinstance(scores, (str, os.PathLike)):
        return read_provenance(scores)
    description = getattr(getattr(scores, "info", None), "description", None)
    if not isinstance(description, str) or PROVENANCE_DESCRIPTION_KEY not in description:
        return None
    try:
        return json.loads(description)[PROVENANCE_DESCRIPTION_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        # datasets joins the descriptions of concatenated datasets with blank lines when they differ.
        warnings.warn(
            "The score log's info.description holds the provenance of several runs (concatenated logs?), so the "
            "filter records none; build the filter from one run's log to keep it.",
            UserWarning,
            stacklevel=2,
        )
        return None
