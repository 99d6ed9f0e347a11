"""The filter's result: `MimicFilter`, a per-sample table and a summary, and what can be done with it
(re-decide with other settings, save / load, apply to a dataset, audit against clean flags)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..fileio import atomic_write, write_json
from ..tables import as_rows
from .decide import check_settings, decide, log_odds
from .labeling import LabelingVotes
from .matching import check_row_index_dataset, row_positions
from .matrices import matrix
from .reduction import WindowedScores
from .signals import VALUE_DTYPE, LabelingScores
from .stream import filter_iterable

__all__ = ["SUMMARY_FILENAME", "TABLE_FILENAME", "MimicFilter"]

TABLE_FILENAME = "filter.parquet"
SUMMARY_FILENAME = "summary.json"


UNSCORED_POLICIES: tuple[str, ...] = ("error", "keep", "drop")
"""What `MimicFilter.apply` does with dataset rows that have no score."""


@dataclass
class MimicFilter:
    """The result of `build_filter`: a per-sample table and a summary.

    Attributes:
        table: a `pyarrow.Table`, one row per sample sorted by ``sample_id``, with columns
            ``sample_id``, ``mean_mimic_score`` (NaN scores left out), ``mean_weight`` (mean ``b * w``),
            ``n_records``, ``votes`` (list<int8>, one entry per window: -1 abstain, 0 discard, 1 keep),
            ``window_values`` / ``window_scores`` (list<float32>: the sample's mean ``b * w`` / mimic
            score in each window, NaN where it abstains), ``keep_prob``, ``keep_log_odds`` (its log-odds: the
            ranking, which does not round to 1.0 where ``keep_prob`` does) and ``keep``.
        summary: a JSON-able dict (see `build_filter`).
    """

    table: pa.Table
    summary: dict[str, Any]

    # -- accessors ---------------------------------------------------------------------------

    @property
    def sample_ids(self) -> np.ndarray:
        return self.table.column("sample_id").to_numpy()

    @property
    def keep(self) -> np.ndarray:
        return self.table.column("keep").to_numpy()

    @property
    def keep_prob(self) -> np.ndarray:
        return self.table.column("keep_prob").to_numpy()

    @property
    def keep_log_odds(self) -> np.ndarray:
        """``log P(keep) - log P(discard)`` per sample: the filter's ranking (sort by it to keep the best ``k``).
        A filter saved before the column existed gets the log-odds of its ``keep_prob`` at `load`."""
        return self.table.column("keep_log_odds").to_numpy()

    @property
    def kept_ids(self) -> np.ndarray:
        """The ids of the samples the filter keeps."""
        return self.sample_ids[self.keep]

    @property
    def n_windows(self) -> int:
        return int(self.summary["n_windows"])

    def votes(self) -> np.ndarray:
        """The ``n x m`` vote matrix (int8; -1 abstain, 0 discard, 1 keep)."""
        return matrix(self.table.column("votes"), self.n_windows, np.int8)

    def window_values(self) -> np.ndarray:
        """The ``n x m`` matrix of mean ``b * w`` per window (NaN where the sample abstains)."""
        return matrix(self.table.column("window_values"), self.n_windows, np.float32)

    def window_scores(self) -> np.ndarray:
        """The ``n x m`` matrix of mean mimic scores per window (NaN where the sample abstains)."""
        return matrix(self.table.column("window_scores"), self.n_windows, np.float32)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"MimicFilter(n_samples={s['n_samples']}, n_windows={s['n_windows']}, "
            f"retained_fraction={s['retained_fraction']:.4f}, method={s['settings']['method']!r}, "
            f"aggregate={s['aggregate_used']!r})"
        )

    # -- re-deciding without re-reading the log ---------------------------------------------------

    def rebuild(
        self,
        method: str | None = None,
        aggregate: str | None = None,
        *,
        threshold: float | None = None,
        topk: float | None = None,
        seed: int | None = None,
        discard_requires_disagreement: bool | None = None,
        mixture_degrees_of_freedom: float | None = None,
    ) -> MimicFilter:
        """A new filter from the same per-window values with other settings (the log is not re-read).

        Gives the same result as `build_filter` on the original scores with those settings,
        because identification only uses the per-window means stored in ``table``. The other labeling
        functions' votes (``lf_votes``) are reused as they were: a new ``method`` re-splits the mimic
        windows only. ``mixture_degrees_of_freedom`` defaults to the filter's own (Gaussian classes, ``math.inf``,
        for a filter saved before the mixture's classes were Student t's).
        """
        settings = self.summary["settings"]
        method = settings["method"] if method is None else method
        aggregate = settings["aggregate"] if aggregate is None else aggregate
        topk = settings["topk"] if topk is None else topk
        seed = settings["seed"] if seed is None else seed
        if threshold is None and method == settings["method"]:
            threshold = settings["threshold"]
        if mixture_degrees_of_freedom is None:
            mixture_degrees_of_freedom = self._mixture_degrees_of_freedom()
        check_settings(method, aggregate, threshold, topk, mixture_degrees_of_freedom)
        table, summary = decide(
            self._windowed(),
            method=method,
            aggregate=aggregate,
            windows=settings["windows"],
            threshold=threshold,
            topk=topk,
            seed=seed,
            extra_votes=self._labeling_votes(),
            mimic_votes="mimic" in settings.get("labeling_functions", ["mimic"]),
            extra_scores=self._labeling_scores(),
            discard_requires_disagreement=settings.get("discard_requires_disagreement", False)
            if discard_requires_disagreement is None
            else discard_requires_disagreement,
            mixture_degrees_of_freedom=mixture_degrees_of_freedom,
        )
        summary["provenance"] = self.summary.get("provenance")  # the same log, the same run
        return MimicFilter(table, summary)

    def _mixture_degrees_of_freedom(self) -> float:
        """The degrees of freedom this filter's mixture was built with: its settings' (None, as JSON writes
        infinity, is Gaussian); before they recorded it, its mixture summary's; before that, Gaussian."""
        recorded = (
            (self.summary["settings"], "mixture_degrees_of_freedom"),
            (self.summary.get("mixture") or {}, "degrees_of_freedom"),
        )
        for where, key in recorded:
            if key in where:
                return math.inf if where[key] is None else float(where[key])
        return math.inf

    def _labeling_votes(self) -> list[LabelingVotes]:
        """The other labeling functions' votes stored in ``lf_votes``, grouped as they were given."""
        entries = [e for e in self.summary.get("labeling_functions") or [] if e.get("kind") != "score"]
        if not entries or "lf_votes" not in self.table.column_names:
            return []
        stacked = matrix(self.table.column("lf_votes"), len(entries), np.int8)
        return [
            LabelingVotes(
                name,
                [entries[j]["name"] for j in cols],
                stacked[:, cols],
                [float("nan") if entries[j]["boundary"] is None else entries[j]["boundary"] for j in cols],
            )
            for name, cols in _columns_by_function(entries).items()
        ]

    def _labeling_scores(self) -> list[LabelingScores]:
        """The continuous labeling functions' values stored in ``lf_scores``, grouped as they were given."""
        entries = [e for e in self.summary.get("labeling_functions") or [] if e.get("kind") == "score"]
        if not entries or "lf_scores" not in self.table.column_names:
            return []
        stacked = matrix(self.table.column("lf_scores"), len(entries), VALUE_DTYPE)
        return [
            LabelingScores(
                name,
                [entries[j]["name"] for j in cols],
                stacked[:, cols],
                # a filter saved before the gate read references' margins was built without: so it rebuilds
                reference_margin=bool(entries[cols[0]].get("reference_margin", False)),
            )
            for name, cols in _columns_by_function(entries).items()
        ]

    def _windowed(self) -> WindowedScores:
        """The per-window values stored in the table, as `collect_windows` returned them."""
        return WindowedScores(
            sample_ids=self.table.column("sample_id").combine_chunks(),
            values=self.window_values(),
            scores=self.window_scores(),
            mean_weight=self.table.column("mean_weight").to_numpy(),
            mean_score=self.table.column("mean_mimic_score").to_numpy(),
            n_records=self.table.column("n_records").to_numpy(),
            window_names=list(self.summary["window_names"]),
            window_steps=[(w["first_step"], w["last_step"]) for w in self.summary["windows"]],
            total_records=self.summary["n_records"],
            n_nan_scores=self.summary["n_nan_scores"],
            n_nonfinite=(
                self.table.column("n_nonfinite").to_numpy() if "n_nonfinite" in self.table.column_names else None
            ),
            n_unlabeled_records=self.summary.get("n_unlabeled_records", 0),
            # The student's mean margin, as one window: all that the agreement gate reads of the signals.
            signals=(
                {"margin": self.table.column("student_margin").to_numpy(zero_copy_only=False)[:, None]}
                if "student_margin" in self.table.column_names
                else {}
            ),
        )

    # -- persistence -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``filter.parquet`` and ``summary.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / TABLE_FILENAME, lambda tmp: pq.write_table(self.table, tmp))
        write_json(directory / SUMMARY_FILENAME, self.summary)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MimicFilter:
        """Read a filter written by `save`."""
        directory = Path(directory)
        table_path, summary_path = directory / TABLE_FILENAME, directory / SUMMARY_FILENAME
        for path in (table_path, summary_path):
            if not path.is_file():
                raise FileNotFoundError(f"No saved MimicFilter at {directory}: {path.name} is missing.")
        try:
            with open(summary_path, encoding="utf-8") as handle:
                summary = json.load(handle)
        except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(
                f"The filter summary {summary_path} is not valid JSON ({error}); it is corrupt or was cut short. "
                "Rebuild the filter with build_filter, or restore that file."
            ) from error
        if not isinstance(summary, dict) or "settings" not in summary or "n_windows" not in summary:
            raise ValueError(
                f"The filter summary {summary_path} is not a MimicFilter summary (no 'settings' / 'n_windows')."
            )
        try:
            table = pq.read_table(table_path)
        except (OSError, pa.ArrowException) as error:
            raise ValueError(
                f"The filter table {table_path} cannot be read ({error}); it is corrupt or was cut short."
            ) from error
        if "keep_log_odds" not in table.column_names and "keep_prob" in table.column_names:
            # Saved before the column existed: the log-odds of its keep_prob (rounded where keep_prob is 0 or 1).
            position = table.column_names.index("keep_prob") + 1
            table = table.add_column(
                position, "keep_log_odds", pa.array(log_odds(table.column("keep_prob").to_numpy()))
            )
        return cls(table=table, summary=summary)

    def to_dataset(self) -> datasets.Dataset:  # noqa: F821
        """The per-sample table as a `datasets.Dataset`."""
        import datasets

        return datasets.Dataset(self.table)

    # -- using the filter ------------------------------------------------------------------------

    def positions(
        self, dataset: Any, id_column: str | None = None, *, check_dataset: bool = True, allow_unscored: bool = False
    ) -> np.ndarray:
        """Row position in ``dataset`` of every sample of the filter (in table order).

        Raises ValueError when a scored sample is not in the dataset or (unless ``allow_unscored``) a dataset row was
        never scored, and, when the sample ids are row indices of the training set, when ``dataset`` is not that
        training set as the score log recorded it (`check_row_index_dataset`; ``check_dataset=False`` skips that
        check).
        """
        if id_column is None and check_dataset:
            check_row_index_dataset((self.summary.get("provenance") or {}).get("sample_ids"), dataset)
        return row_positions(
            self.table.column("sample_id").combine_chunks(), as_rows(dataset), id_column, allow_unscored=allow_unscored
        )

    def apply(
        self, dataset: Any, id_column: str | None = None, *, check_dataset: bool = True, unscored: str = "error"
    ) -> Any:
        """Return the rows of ``dataset`` that the filter keeps (the dataset itself is not modified).

        Args:
            dataset: a `datasets.Dataset`, `pandas.DataFrame` or `pyarrow.Table` holding exactly the
                scored samples, or a `datasets.IterableDataset` of them.
            id_column: the column holding the sample ids the trainer recorded (``mimic_id_column``);
                None when the ids are row indices.
            check_dataset: with row-index ids, refuse a `datasets.Dataset` whose fingerprint differs from the
                training set's that the score log recorded (a shuffled, filtered or other dataset would get the
                wrong rows kept). Pass False only for a copy you know has the same rows in the same order.
                A `datasets.IterableDataset` is filtered lazily, batch by batch, without materialising it
                (`hf_gradmimic.filter.stream.filter_iterable`); it cannot be checked this way (no random access).

            unscored: what to do with the rows of ``dataset`` that have no score (the trainer never trained on
                them, e.g. rows trl's SFTTrainer dropped): ``"error"`` (the default: a ValueError says how many and
                why), ``"keep"`` or ``"drop"``. Map-style datasets only.

        Returns:
            The same type as ``dataset``, with the kept rows in their original order.
        """
        if unscored not in UNSCORED_POLICIES:
            raise ValueError(f"unscored must be one of {UNSCORED_POLICIES}, got {unscored!r}.")
        if type(dataset).__name__ == "IterableDataset" and type(dataset).__module__.startswith("datasets"):
            return filter_iterable(self.table, dataset, id_column)
        positions = self.positions(dataset, id_column, check_dataset=check_dataset, allow_unscored=unscored != "error")
        kept = positions[self.keep]
        if unscored == "keep":
            scored = np.zeros(as_rows(dataset).num_rows, dtype=bool)
            scored[positions] = True
            kept = np.concatenate([kept, np.flatnonzero(~scored)])
        return as_rows(dataset).take(np.sort(kept))

    def evaluate(
        self,
        clean_flags: Any,
        id_column: str | None = None,
        *,
        dataset: Any = None,
    ) -> dict[str, float]:
        """Audit the filter against ground-truth clean flags with `compute_filter_metrics`.

        Args:
            clean_flags: either an array of clean flags (1 = clean, 0 = noisy) aligned with the
                filter's samples (``table["sample_id"]`` order, i.e. sorted ids), or the name of a
                column of ``dataset``.
            id_column: with a ``dataset``: the column holding the sample ids (None: row indices).
            dataset: the dataset holding the ``clean_flags`` column.

        Returns:
            ``discard_precision``, ``discard_recall``, ``discard_f1``, ``retained_fraction``,
            ``keep_roc_auc`` and ``keep_average_precision`` (of the ranking, `keep_log_odds`).
        """
        from ..metrics import compute_filter_metrics

        clean = self._clean_flags(clean_flags, id_column, dataset)
        return compute_filter_metrics(self.keep, clean, keep_score=self.keep_log_odds)

    def _clean_flags(self, clean_flags: Any, id_column: str | None, dataset: Any) -> np.ndarray:
        """The clean flag of every sample of the filter, in table order (see `evaluate`)."""
        if dataset is None:
            if isinstance(clean_flags, str):
                raise ValueError(f"clean_flags={clean_flags!r} names a column: pass dataset= too.")
            clean = np.asarray(clean_flags)
            if clean.shape != (self.table.num_rows,):
                raise ValueError(
                    f"clean_flags has shape {clean.shape}, expected ({self.table.num_rows},): one flag per "
                    "sample of the filter, in table['sample_id'] order (or pass a column name with dataset=)."
                )
            return clean
        rows = as_rows(dataset)
        positions = self.positions(dataset, id_column)
        if isinstance(clean_flags, str):
            return rows.column(clean_flags).to_numpy(zero_copy_only=False)[positions]
        clean = np.asarray(clean_flags)
        if clean.shape[0] != rows.num_rows:
            raise ValueError("clean_flags must have one entry per dataset row when dataset= is given.")
        return clean[positions]


def _columns_by_function(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The summary's labeling-function entries grouped by function: name -> its column indices, in order."""
    groups: dict[str, list[int]] = {}
    for j, entry in enumerate(entries):
        groups.setdefault(entry["labeling_function"], []).append(j)
    return groups
