r"""CLIP-score filtering over a whole dataset: the baseline beside the Grad-Mimic filter, and a labeling function for Stage 2.

DataComp's CLIP-score filtering (Gadre et al. 2023) keeps the image–caption pairs that a reference CLIP
(Radford et al. 2021) scores highest, ``c_i = cos(f_img(x_i), f_txt(t_i))``
(`hf_gradmimic.scorers.clip_score.clip_score_of`), either the top ``k`` percent or those above a threshold.
Grad-Mimic (Huang et al., arXiv 2501.06708) is compared with it. Here:

- `clip_scores` scores every sample of a dataset (map-style or a stream), by the ids the trainer records
  (row indices, or ``id_column``); `save_clip_scores` writes them next to a score log
  (``<output_dir>/clip_scores.parquet``) and `load_clip_scores` reads them back;
- `clip_score_filter` cuts them into a `ClipScoreFilter`, which applies to a dataset as `MimicFilter` does,
  audits against clean flags, and gives its keep/discard `votes` by sample id: the form of a labeling
  function for Stage 2's weak supervision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from .fileio import atomic_write
from .filter.matching import row_positions
from .progress import progress_bar
from .scorers.clip_score import MODEL_INPUTS, clip_score_of
from .tables import as_rows

CLIP_SCORES_FILENAME = "clip_scores.parquet"
"""Where `save_clip_scores` puts the scores in an ``output_dir``, next to the ``mimic_scores/`` log."""


def _batches(dataset: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """Dict batches of a `datasets.Dataset` / `datasets.IterableDataset` (``.iter``), or of any dataset of dicts
    through a torch DataLoader. Model inputs read in another format than torch's (lists, NumPy arrays: a stream from
    `load_dataset(..., streaming=True)`) become tensors, as `Trainer`'s default collator makes them."""
    if hasattr(dataset, "iter") and hasattr(dataset, "column_names"):
        batches = dataset.iter(batch_size=batch_size)
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for batch in batches:
        yield {
            key: torch.as_tensor(np.asarray(value))
            if key in MODEL_INPUTS and not isinstance(value, torch.Tensor)
            else value
            for key, value in batch.items()
        }


def clip_scores(model: nn.Module, dataset: Any, *, id_column: str | None = None, batch_size: int = 64) -> pa.Table:
    """Every sample's CLIP score under ``model`` (the reference dual encoder), as a table sorted by ``sample_id``.

    Args:
        model: a CLIP, SigLIP or `VisionTextDualEncoderModel` (run in eval mode, without gradients).
        dataset: a `datasets.Dataset` or `datasets.IterableDataset` (any format), or a torch dataset of dicts, with
            ``pixel_values`` and ``input_ids`` (and ``attention_mask``) as the model reads them.
        id_column: the column of sample ids, as ``mimic_id_column``; None: row indices (map-style datasets only).
        batch_size: samples per forward.

    Returns:
        A `pyarrow.Table` with ``sample_id`` and ``clip_score`` (float32).
    """
    was_training = model.training
    model.eval()
    ids: list[Any] = []
    scores: list[np.ndarray] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None  # a stream's length is not known
    bar = progress_bar(desc="CLIP scores", total=total, unit=" examples")
    try:
        for batch in _batches(dataset, batch_size):
            count = len(batch["input_ids"]) if "input_ids" in batch else 0
            if id_column is not None:
                if id_column not in batch:
                    raise ValueError(
                        f"The dataset has no column {id_column!r} (`id_column`); its keys: {sorted(batch)}."
                    )
                values = batch[id_column]
                ids.extend(values.tolist() if hasattr(values, "tolist") else list(values))
            elif hasattr(dataset, "__len__"):
                ids.extend(range(len(ids), len(ids) + count))
            else:
                raise ValueError(
                    "A stream has no row indices: pass `id_column`, the column the trainer recorded ids by."
                )
            scores.append(clip_score_of(model, batch).cpu().numpy())
            bar.update(len(scores[-1]))
    finally:
        bar.close()
        model.train(was_training)
    table = pa.table({"sample_id": pa.array(ids), "clip_score": pa.array(np.concatenate(scores), pa.float32())})
    return table.sort_by("sample_id")


def save_clip_scores(table: pa.Table, output_dir: str | os.PathLike) -> Path:
    """Write `clip_scores`' table to ``<output_dir>/clip_scores.parquet`` (atomically); returns the path."""
    return atomic_write(Path(output_dir) / CLIP_SCORES_FILENAME, lambda tmp: pq.write_table(table, tmp))


def load_clip_scores(path: str | os.PathLike) -> pa.Table:
    """The scores `save_clip_scores` wrote: ``path`` is the file or the ``output_dir`` holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / CLIP_SCORES_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No CLIP scores at {path}: write them with hf_gradmimic.clip_filter.save_clip_scores.")
    table = pq.read_table(path)
    missing = {"sample_id", "clip_score"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a CLIP-score table: it has no column(s) {sorted(missing)}.")
    return table


def _as_table(scores: Any) -> pa.Table:
    if isinstance(scores, (str, os.PathLike)):
        return load_clip_scores(scores)
    if isinstance(scores, pa.Table):
        return scores
    if hasattr(scores, "data") and hasattr(scores.data, "table"):  # a datasets.Dataset
        return scores.data.table
    raise TypeError(f"CLIP scores must be a path, a pyarrow.Table or a datasets.Dataset; got {type(scores).__name__}.")


@dataclass
class ClipScoreFilter:
    """A CLIP-score cut: ``table`` (``sample_id``, ``clip_score``, ``keep``, sorted by id) and ``summary``."""

    table: pa.Table
    summary: dict[str, Any]

    @property
    def keep(self) -> np.ndarray:
        return self.table.column("keep").to_numpy(zero_copy_only=False)

    @property
    def kept_ids(self) -> np.ndarray:
        return self.table.column("sample_id").to_numpy(zero_copy_only=False)[self.keep]

    def votes(self) -> pa.Table:
        """The cut as a labeling function: ``sample_id`` and ``vote`` (int8: 1 keep, 0 discard), one row per sample."""
        return pa.table(
            {"sample_id": self.table.column("sample_id"), "vote": pa.array(self.keep.astype(np.int8), pa.int8())}
        )

    def apply(self, dataset: Any, id_column: str | None = None) -> Any:
        """The rows of ``dataset`` (a `datasets.Dataset`, pandas or Arrow table of exactly the scored samples) that the
        cut keeps, in their order; ``id_column`` as in `MimicFilter.apply`."""
        rows = as_rows(dataset)
        positions = row_positions(self.table.column("sample_id").combine_chunks(), rows, id_column)
        return rows.take(np.sort(positions[self.keep]))

    def evaluate(self, clean_flags: Any) -> dict[str, float]:
        """`compute_filter_metrics` against clean flags aligned with ``table`` (sorted ids): discard P/R/F1 and the
        AUROC / average precision of the score itself for the clean flag."""
        from .metrics import compute_filter_metrics

        scores = self.table.column("clip_score").to_numpy()
        return compute_filter_metrics(self.keep, np.asarray(clean_flags), keep_prob=(np.clip(scores, -1, 1) + 1) / 2)


def clip_score_filter(scores: Any, *, topk: float | None = None, threshold: float | None = None) -> ClipScoreFilter:
    """Cut CLIP scores: keep the top ``topk`` percent (ties kept together at the cut), or the scores above
    ``threshold``; exactly one of the two.

    Args:
        scores: `clip_scores`' table, a `datasets.Dataset` of it, or the path `save_clip_scores` wrote (or its folder).
        topk: the percentage kept, in (0, 100] (DataComp keeps the top 30%).
        threshold: the cosine a kept pair must exceed.
    """
    if (topk is None) == (threshold is None):
        raise ValueError("Give exactly one of `topk` (percent kept) and `threshold` (cosine).")
    table = _as_table(scores)
    values = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} CLIP score(s) are not finite; score the dataset again.")
    if topk is not None:
        if not 0 < topk <= 100:
            raise ValueError(f"`topk` is a percentage in (0, 100]; got {topk}.")
        count = max(1, int(round(len(values) * topk / 100)))
        cut = float(np.sort(values)[::-1][count - 1])
        keep = values >= cut
    else:
        cut = float(threshold)
        keep = values > cut
    table = table.select(["sample_id", "clip_score"]).append_column("keep", pa.array(keep))
    summary = {
        "method": "topk" if topk is not None else "threshold",
        "topk": topk,
        "threshold": threshold,
        "cut": cut,
        "retained_fraction": float(keep.mean()),
        "n_samples": int(len(values)),
        "mean_clip_score": float(pc.mean(table.column("clip_score")).as_py()),
    }
    return ClipScoreFilter(table.sort_by("sample_id"), summary)
