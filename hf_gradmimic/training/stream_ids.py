"""Streams as training sets: every example of an iterable dataset carries its sample id through batching, workers and processes.

A stream (`datasets.IterableDataset`, or a torch ``IterableDataset`` yielding dicts) has no row index, so
the score log records each sample by its id: the ``mimic_id_column`` value, or a ``mimic_row_index`` the
examples already carry. Ids must survive what happens between the stream and the trainer: a collator
(which drops strings), dataloader workers, and accelerate's dispatching of batches from process 0 to the
others (which sends tensors only). So `keyed_stream` adds to each example the id as a tensor-able value
under `STREAM_ID_KEY`: an integer id as itself, a string id as its UTF-8 bytes padded to
`MAX_ID_BYTES`. `StreamIds` decodes them on every process.

Inside the trainer a sample is named by an integer *key* (`sample_key`): an integer id in
``[0, 2**53)`` is its own key (the step softmax gathers keys as float64, exact up to 2**53); any other id
is hashed to 53 bits. The keys name samples in the repeat flags (`hf_gradmimic.training.score_log.SeenKeys`)
and for scorers whose randomness is keyed by sample; the score log itself records the ids.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .batch import ROW_INDEX_KEY, STREAM_ID_KEY

MAX_ID_BYTES = 128
"""The longest string id a stream may carry, in UTF-8 bytes (ids travel in the batch as a fixed-width array)."""

KEY_LIMIT = 2**53


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is an iterable dataset (`datasets.IterableDataset` or a torch ``IterableDataset``)."""
    return isinstance(dataset, torch.utils.data.IterableDataset)


def sample_key(sample_id: Any) -> int:
    """A sample's integer key: an integer id in ``[0, 2**53)`` itself, any other id a 53-bit BLAKE2b hash of it."""
    if isinstance(sample_id, (int, np.integer)) and not isinstance(sample_id, bool) and 0 <= sample_id < KEY_LIMIT:
        return int(sample_id)
    digest = hashlib.blake2b(repr(sample_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % KEY_LIMIT


def _encode(sample_id: Any, source: str) -> Any:
    """An id as it travels in the batch: an int64, or a string's UTF-8 bytes zero-padded to `MAX_ID_BYTES`."""
    if isinstance(sample_id, torch.Tensor) and sample_id.dim() == 0:
        sample_id = sample_id.item()
    if isinstance(sample_id, np.generic):
        sample_id = sample_id.item()
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        if not -(2**63) <= sample_id < 2**63:
            raise ValueError(f"Sample id {sample_id} (from {source}) does not fit in 64 bits.")
        return sample_id
    if isinstance(sample_id, str):
        data = sample_id.encode("utf-8")
        if not data or b"\0" in data or len(data) > MAX_ID_BYTES:
            raise ValueError(
                f"Sample id {sample_id!r} (from {source}) cannot travel in a batch: a string id must be 1 to "
                f"{MAX_ID_BYTES} UTF-8 bytes without NUL characters (it is {len(data)}). Shorten or hash the ids."
            )
        return list(data.ljust(MAX_ID_BYTES, b"\0"))
    raise TypeError(
        f"Sample id {sample_id!r} (from {source}) is a {type(sample_id).__name__}; stream sample ids must be one "
        "integer or string per example."
    )


class _IdAdder:
    """``example -> example`` with its id under `STREAM_ID_KEY` (and the id column itself removed: it never reaches
    the model, and a string column would not survive the collator)."""

    def __init__(self, id_column: str | None) -> None:
        self.id_column = id_column
        self.source = f"`mimic_id_column={id_column!r}`" if id_column else f"`{ROW_INDEX_KEY}`"

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(example, dict):
            raise TypeError(f"MimicTrainer needs stream examples that are dicts, got {type(example).__name__}.")
        column = self.id_column or ROW_INDEX_KEY
        if column not in example:
            raise ValueError(self._missing(sorted(example)))
        example = dict(example)
        sample_id = example.pop(column)
        example[STREAM_ID_KEY] = _encode(sample_id, self.source)
        return example

    def _missing(self, keys: list[str]) -> str:
        if self.id_column:
            return f"A stream example has no column {self.id_column!r} (`mimic_id_column`); its keys: {keys}."
        return (
            "A stream (iterable train_dataset) has no row index to record scores by. Set `mimic_id_column` to a column "
            f"holding one unique id per sample (an integer or a string), or give every example an integer "
            f"`{ROW_INDEX_KEY}`. Example keys: {keys}."
        )


class _KeyedTorchStream(torch.utils.data.IterableDataset):
    """A torch ``IterableDataset`` of dicts with `_IdAdder` applied to each example; ``set_epoch`` is passed on.
    Each dataloader worker iterates its own copy: a dataset that splits itself by worker (``get_worker_info``)
    keeps doing so."""

    def __init__(self, dataset: torch.utils.data.IterableDataset, add_id: _IdAdder) -> None:
        self.dataset = dataset
        self.add_id = add_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for example in self.dataset:
            yield self.add_id(example)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def keyed_stream(dataset: Any, id_column: str | None) -> Any:
    """The stream with each example's id under `STREAM_ID_KEY`. A `datasets.IterableDataset` stays one (``map``), so
    accelerate can still shard it by its shards across processes and workers can split it."""
    import datasets

    add_id = _IdAdder(id_column)
    if isinstance(dataset, datasets.IterableDataset):
        names = dataset.column_names
        if names is not None and (id_column or ROW_INDEX_KEY) not in names:
            raise ValueError(add_id._missing(names))
        return dataset.map(add_id)
    return _KeyedTorchStream(dataset, add_id)


class StreamIds:
    """Decodes the ids of a stream's batches, and remembers the current step's ids by key until the score log has them.

    ``stream_ids.pop(inputs)`` takes `STREAM_ID_KEY` off a batch and returns the samples' keys; ``stream_ids[keys]``
    is their ids (as `hf_gradmimic.training.score_log.ScoreLog` indexes ``sample_ids`` by row); `forget` drops a
    step's ids once written.
    """

    def __init__(self) -> None:
        self._ids: dict[int, Any] = {}

    @staticmethod
    def decode(encoded: Any) -> list[Any]:
        """The ids of one batch's `STREAM_ID_KEY` value: ``[B]`` integers or ``[B, MAX_ID_BYTES]`` string bytes."""
        values = torch.as_tensor(encoded).cpu()
        if values.dim() == 1:
            return [int(value) for value in values.tolist()]
        return [bytes(row).rstrip(b"\0").decode("utf-8") for row in values.to(torch.uint8).numpy()]

    def pop(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Removes the ids from ``inputs``; returns the samples' keys (int64), or None when the batch has none."""
        if STREAM_ID_KEY not in inputs:
            return None
        ids = self.decode(inputs.pop(STREAM_ID_KEY))
        keys = [sample_key(sample_id) for sample_id in ids]
        self._ids.update(zip(keys, ids))
        return torch.tensor(keys, dtype=torch.int64)

    def __getitem__(self, keys: Any) -> np.ndarray:
        ids = [self._ids[int(key)] for key in np.asarray(keys).reshape(-1)]
        return np.asarray(ids, dtype=object if ids and isinstance(ids[0], str) else np.int64)

    def forget(self, keys: np.ndarray) -> None:
        for key in np.asarray(keys).reshape(-1).tolist():
            self._ids.pop(int(key), None)

    @staticmethod
    def keys_of(ids: np.ndarray) -> np.ndarray:
        """The keys of recorded ids (to restore the repeat flags on resume)."""
        return np.asarray(
            [sample_key(value.item() if hasattr(value, "item") else value) for value in ids], dtype=np.int64
        )


def stream_position(epoch: float, batches_per_pass: int) -> tuple[int, int]:
    """Where a stream resumes: ``(pass over the stream, batches already read in it)`` from the checkpoint's
    ``state.epoch`` and the ``batches_per_pass`` of the run that wrote it.

    `Trainer` cannot measure a stream, so it counts ``S = max_steps × gradient_accumulation_steps`` batches per
    "epoch" and records ``state.epoch = e + b / S`` after ``b`` batches of pass ``e``; but on resume it skips
    ``global_step × accumulation`` batches of the *first* pass, which is wrong once the stream has been read
    through once. The pass and the batches read in it are recovered from ``state.epoch`` instead, with the ``S``
    of the run that recorded it (a resume may raise ``max_steps``). An exact integer ``e + 1`` is pass ``e`` read for
    ``S`` batches (that run's ``max_steps`` reached): a pass that ends after ``L`` batches records ``e + L / S``,
    below ``e + 1`` unless ``L = S``, where both positions are the same place in the stream."""
    passes = int(math.floor(epoch + 1e-9))
    batches = int(round((epoch - passes) * batches_per_pass))
    if passes and not batches:
        return passes - 1, batches_per_pass
    return passes, batches
