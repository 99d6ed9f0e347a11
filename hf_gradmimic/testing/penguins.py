"""The Stage-2 suite's held-out task: the Palmer penguins (3 species), from the PyPI package ``palmerpenguins``.

Chosen on 2026-12-06, before any Stage-2 setting of that session was tuned, to replace breast cancer as the
held-out task: breast cancer was looked at when the previous default lost there, so it is a tuning task now.
Horst, Hill and Gorman's Palmer Archipelago data (344 penguins; the 342 with every body measurement; Adelie,
Chinstrap, Gentoo) ships inside ``palmerpenguins`` as a CSV file, read here without importing the package, so it
loads offline. The four body measurements are standardised; the model is the digits task's
(`hf_gradmimic.testing.digits.DigitsClassifier`): a frozen seeded random-ReLU backbone standing in for a
pretrained encoder, and a linear ``classifier`` head, the mimic layer.
"""

from __future__ import annotations

import csv

import numpy as np

from .digits import DigitsClassifier
from .tabular import noisy_tabular_split, package_data_file, tabular_model

__all__ = ["PENGUIN_SPECIES", "load_noisy_penguins", "penguins_model"]

PENGUIN_SPECIES: tuple[str, ...] = ("Adelie", "Chinstrap", "Gentoo")
PIN = "palmerpenguins==0.1.6"
_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")


def penguin_measurements() -> tuple[np.ndarray, np.ndarray]:
    """``(features, species index)`` of the penguins with every body measurement (``n x 4`` float64, ``n`` int64)."""
    rows = list(
        csv.DictReader(package_data_file("palmerpenguins", "palmerpenguins/data/penguins.csv", PIN).splitlines())
    )
    complete = [row for row in rows if all(row[name] not in ("", "NA") for name in _FEATURES)]
    features = np.array([[float(row[name]) for name in _FEATURES] for row in complete])
    species = np.array([PENGUIN_SPECIES.index(row["species"]) for row in complete], dtype=np.int64)
    return features, species


def load_noisy_penguins(noise_rate: float = 0.2, seed: int = 0, test_size: float = 0.3):
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, standardised
    ``pixel_values`` so that the digits model reads it) and ``test``; symmetric noise over the three species."""
    features, species = penguin_measurements()
    return noisy_tabular_split(features, species, len(PENGUIN_SPECIES), noise_rate, seed, test_size)


def penguins_model(seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128) -> DigitsClassifier:
    return tabular_model(
        len(_FEATURES), len(PENGUIN_SPECIES), seed=seed, freeze_backbone=freeze_backbone, hidden_dim=hidden_dim
    )
