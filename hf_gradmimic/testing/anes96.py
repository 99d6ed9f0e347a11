"""The Stage-2 suite's second held-out task: the 1996 American National Election Study, from ``statsmodels``.

Chosen on 2026-12-07, after the Stage-2 default was fixed (t classes, `DEFAULT_DEGREES_OF_FREEDOM`, at e40f6cf) and
never tuned on: the penguins had been looked at since they were held out, so a task no setting has seen joins them.
The ANES 1996 subset (944 respondents, public domain) ships inside the PyPI package ``statsmodels`` as a CSV file,
read here without importing the package, so it loads offline. The label is the expected vote (Clinton or Dole); the
nine features (party identification, the respondent's and the two candidates' left-right placements, the log of the
town's population, TV news per week, age, education and income) are standardised. The split and the model are the
tabular tasks' (`hf_gradmimic.testing.tabular`).
"""

from __future__ import annotations

import csv

import numpy as np

from .digits import DigitsClassifier
from .tabular import noisy_tabular_split, package_data_file, tabular_model

__all__ = ["ANES96_VOTES", "anes96_model", "anes96_survey", "load_noisy_anes96"]

ANES96_VOTES: tuple[str, ...] = ("Clinton", "Dole")
PIN = "statsmodels==0.15.0"
_FEATURES = ("PID", "selfLR", "ClinLR", "DoleLR", "popul", "TVnews", "age", "educ", "income")


def anes96_survey() -> tuple[np.ndarray, np.ndarray]:
    """``(features, vote)``: the 944 respondents' nine answers (``n x 9`` float64, the population as ``log1p``) and
    their expected vote (0 Clinton, 1 Dole)."""
    text = package_data_file("statsmodels", "statsmodels/datasets/anes96/anes96.csv", PIN)
    rows = [
        {key.strip("'"): value for key, value in row.items()}
        for row in csv.DictReader(text.splitlines(), delimiter="\t")
    ]
    features = np.array([[float(row[name]) for name in _FEATURES] for row in rows])
    features[:, _FEATURES.index("popul")] = np.log1p(features[:, _FEATURES.index("popul")])  # thousands, skewed
    vote = np.array([int(float(row["vote"])) for row in rows], dtype=np.int64)
    return features, vote


def load_noisy_anes96(noise_rate: float = 0.2, seed: int = 0, test_size: float = 0.3):
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, standardised
    ``pixel_values`` so that the digits model reads it) and ``test``. Two classes: symmetric noise swaps a
    ``noise_rate`` fraction of the votes; at 0.5 or more the labels carry no (or inverted) information."""
    features, vote = anes96_survey()
    return noisy_tabular_split(features, vote, len(ANES96_VOTES), noise_rate, seed, test_size)


def anes96_model(seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128) -> DigitsClassifier:
    return tabular_model(
        len(_FEATURES), len(ANES96_VOTES), seed=seed, freeze_backbone=freeze_backbone, hidden_dim=hidden_dim
    )
