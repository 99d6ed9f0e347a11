"""The running filter audit: at each evaluation, the filter built from the scores so far, scored against known clean flags.

With `MimicConfig.mimic_clean_column` (ground truth, for simulations and audits) the trainer logs
``eval_mimic_filter_*``: the Stage-2 filter of Grad-Mimic (Huang et al., arXiv 2501.06708) built with
`hf_gradmimic.build_filter` from the score log written so far, audited with `MimicFilter.evaluate`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class FilterAudit:
    """Detection quality of the running filter against clean flags (1 clean, 0 noisy) given per training row.

    Args:
        clean_flags: one flag per row of the training set.
        sample_ids: the ``mimic_id_column`` values by row, or None for row indices.
        method: the identification method (`MimicConfig.mimic_filter_method`).
        seed: the LabelModel's seed.
    """

    def __init__(self, clean_flags: np.ndarray, sample_ids: np.ndarray | None, method: str, seed: int) -> None:
        self.clean_flags = clean_flags.astype(bool)
        self.sample_ids = sample_ids
        self.method = method
        self.seed = seed

    def metrics(self, scores_folder: Path, prefix: str) -> dict[str, float]:
        """``{prefix}_mimic_filter_<metric>`` for the filter built from the shards under ``scores_folder``."""
        from ..filter import build_filter

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few windows early on: the LabelModel falls back to majority
                mimic_filter = build_filter(scores_folder.parent, method=self.method, seed=self.seed)
        except (FileNotFoundError, ValueError):  # nothing recorded yet
            return {}
        ids = mimic_filter.sample_ids
        if self.sample_ids is None:
            clean = self.clean_flags[ids.astype(np.int64)]
        else:
            position = {sample_id: row for row, sample_id in enumerate(self.sample_ids.tolist())}
            clean = self.clean_flags[[position[sample_id] for sample_id in ids.tolist()]]
        audit = mimic_filter.evaluate(clean)
        return {f"{prefix}_mimic_filter_{key}": float(value) for key, value in audit.items()}
