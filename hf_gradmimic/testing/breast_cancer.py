"""A second real, offline tabular task: scikit-learn's bundled breast-cancer data, with symmetric label noise.

The Wisconsin diagnostic breast-cancer data (569 samples, 30 features, malignant / benign; Street, Wolberg and
Mangasarian, 1993) ships inside scikit-learn, so it loads offline. It is the held-out set of the Stage-2 suite
(`scripts/realistic_refs.py`): chosen before any Stage-2 setting was tuned, and never tuned on. The model is the
digits task's (`hf_gradmimic.testing.digits.DigitsClassifier`): a frozen seeded random-ReLU backbone standing in for
a pretrained encoder, and a linear ``classifier`` head, the mimic layer.
"""

from __future__ import annotations

import numpy as np

from .digits import DigitsClassifier, DigitsConfig, flip_labels

__all__ = ["breast_cancer_model", "load_noisy_breast_cancer"]


def load_noisy_breast_cancer(noise_rate: float = 0.2, seed: int = 0, test_size: float = 0.3):
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, standardised
    ``pixel_values`` so that the digits model reads it) and ``test``. With two classes, symmetric noise swaps a
    ``noise_rate`` fraction of the labels; at 0.5 or more the labels carry no (or inverted) information."""
    import datasets
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    if not 0 <= noise_rate < 0.5:
        raise ValueError(f"Two classes: noise_rate must be in [0, 0.5), got {noise_rate}.")
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_size, random_state=seed, stratify=data.target
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    noisy = flip_labels(y_train, noise_rate, 2, seed)
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


def breast_cancer_model(seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128) -> DigitsClassifier:
    import torch

    torch.manual_seed(seed)
    model = DigitsClassifier(DigitsConfig(input_dim=30, hidden_dim=hidden_dim, num_labels=2))
    return model.freeze_backbone() if freeze_backbone else model
