"""A second real, offline tabular task: scikit-learn's bundled breast-cancer data, with symmetric label noise.

The Wisconsin diagnostic breast-cancer data (569 samples, 30 features, malignant / benign; Street, Wolberg and
Mangasarian, 1993) ships inside scikit-learn, so it loads offline. It was the held-out set of the Stage-2 suite
(`scripts/realistic_refs.py`) until 2026-12-06, and a tuning task since (the default was studied where it lost
there). The split and the model are the tabular tasks' (`hf_gradmimic.testing.tabular`).
"""

from __future__ import annotations

from .digits import DigitsClassifier
from .tabular import noisy_tabular_split, tabular_model

__all__ = ["breast_cancer_model", "load_noisy_breast_cancer"]


def load_noisy_breast_cancer(noise_rate: float = 0.2, seed: int = 0, test_size: float = 0.3):
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, standardised
    ``pixel_values`` so that the digits model reads it) and ``test``. With two classes, symmetric noise swaps a
    ``noise_rate`` fraction of the labels; at 0.5 or more the labels carry no (or inverted) information."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return noisy_tabular_split(data.data, data.target, 2, noise_rate, seed, test_size)


def breast_cancer_model(seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128) -> DigitsClassifier:
    return tabular_model(30, 2, seed=seed, freeze_backbone=freeze_backbone, hidden_dim=hidden_dim)
