"""The training dataset as the trainer sees it: sample ids and clean flags read first, then a row index or stream keys.

Everything a set-up needs from the user's dataset is read here, before `Trainer.__init__` wraps it:
the ``mimic_id_column`` (checked: one hashable, unique id per row), the ``mimic_clean_column`` for the
running audit (then removed, so ground truth never reaches the model), and the wrapping that lets each
sample be named in the score log (`batch.with_row_index` for a map-style dataset, `stream_ids.keyed_stream`
for a stream, whose ids arrive with its examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..metrics import clean_flags_array
from .batch import check_sample_ids, read_column, with_row_index
from .stream_ids import is_stream, keyed_stream


@dataclass
class TrainingData:
    """``dataset``: what `Trainer` gets; ``given``: the user's dataset without the clean column (for provenance);
    ``sample_ids`` and ``clean_flags``: read from a map-style dataset's columns, or None."""

    dataset: Any
    given: Any
    sample_ids: Any
    clean_flags: Any
    streaming: bool


def prepare_training_data(train_dataset: Any, config: Any, trainer_name: str) -> TrainingData:
    """Read the id and clean columns, drop the clean one, and wrap the dataset so that every sample is named."""
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError(f"{trainer_name}: train_dataset is empty (0 rows): there is nothing to train on or score.")
    streaming = is_stream(train_dataset)
    if streaming and config.mimic_clean_column:
        raise ValueError(
            "`mimic_clean_column` is read from train_dataset before training, which a stream (iterable dataset) "
            "cannot do; audit a map-style dataset, or build the filter after training and compare it yourself."
        )
    sample_ids = None
    if config.mimic_id_column and not streaming:  # a stream's ids arrive with its examples (training.stream_ids)
        sample_ids = check_sample_ids(
            read_column(train_dataset, config.mimic_id_column), config.mimic_id_column, train_dataset
        )
    clean_flags = None
    if config.mimic_clean_column:
        clean_flags = clean_flags_array(
            read_column(train_dataset, config.mimic_clean_column), f"`mimic_clean_column={config.mimic_clean_column!r}`"
        )
    if clean_flags is not None and hasattr(train_dataset, "remove_columns"):  # ground truth never reaches the model
        train_dataset = train_dataset.remove_columns([config.mimic_clean_column])
    wrapped = keyed_stream(train_dataset, config.mimic_id_column) if streaming else with_row_index(train_dataset)
    return TrainingData(wrapped, train_dataset, sample_ids, clean_flags, streaming)
