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
from importlib import resources
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np

from .digits import DigitsClassifier, DigitsConfig, flip_labels

__all__ = ["PENGUIN_SPECIES", "load_noisy_penguins", "penguins_model"]

PENGUIN_SPECIES: tuple[str, ...] = ("Adelie", "Chinstrap", "Gentoo")
_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")


def _penguins_csv() -> str:
    try:
        distribution("palmerpenguins")
    except PackageNotFoundError as error:
        raise ImportError(
            "The penguins task reads the data file of the PyPI package `palmerpenguins` (`make install` installs "
            "it: pip install --no-deps palmerpenguins==0.1.6)."
        ) from error
    return resources.files("palmerpenguins").joinpath("data", "penguins.csv").read_text()


def penguin_measurements() -> tuple[np.ndarray, np.ndarray]:
    """``(features, species index)`` of the penguins with every body measurement (``n x 4`` float64, ``n`` int64)."""
    rows = list(csv.DictReader(_penguins_csv().splitlines()))
    complete = [row for row in rows if all(row[name] not in ("", "NA") for name in _FEATURES)]
    features = np.array([[float(row[name]) for name in _FEATURES] for row in complete])
    species = np.array([PENGUIN_SPECIES.index(row["species"]) for row in complete], dtype=np.int64)
    return features, species


def load_noisy_penguins(noise_rate: float = 0.2, seed: int = 0, test_size: float = 0.3):
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, standardised
    ``pixel_values`` so that the digits model reads it) and ``test``; symmetric noise over the three species."""
    import datasets
    from sklearn.model_selection import train_test_split

    features, species = penguin_measurements()
    x_train, x_test, y_train, y_test = train_test_split(
        features, species, test_size=test_size, random_state=seed, stratify=species
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    noisy = flip_labels(y_train, noise_rate, len(PENGUIN_SPECIES), seed)
    train = datasets.Dataset.from_dict(
        {
            "pixel_values": x_train.astype(np.float32),
            "label": noisy,
            "clean_label": y_train,
            "is_clean": noisy == y_train,
        }
    )
    test = datasets.Dataset.from_dict({"pixel_values": x_test.astype(np.float32), "label": y_test})
    return datasets.DatasetDict({"train": train.with_format("torch"), "test": test.with_format("torch")})


def penguins_model(seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128) -> DigitsClassifier:
    import torch

    torch.manual_seed(seed)
    model = DigitsClassifier(DigitsConfig(input_dim=len(_FEATURES), hidden_dim=hidden_dim, num_labels=3))
    return model.freeze_backbone() if freeze_backbone else model
