"""Real data that works offline: scikit-learn's bundled digits, with symmetric label noise.

Used by the tests, `make demo` and `scripts/compare_methods.py`. The model is a small
`PreTrainedModel` (so it saves, loads and pushes like any transformers model): a frozen
``backbone`` shared by the student and the reference, and a linear ``classifier`` head, which is
the mimic layer. The backbone is a fixed random ReLU feature map (seeded), standing in for a
pretrained encoder: what matters for Grad-Mimic is that student and reference share it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class DigitsConfig(PretrainedConfig):
    model_type = "gradmimic-digits"

    def __init__(
        self, input_dim: int = 64, hidden_dim: int = 256, num_labels: int = 10, backbone_seed: int = 0, **kwargs
    ):
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.backbone_seed = backbone_seed
        super().__init__(num_labels=num_labels, **kwargs)


class DigitsClassifier(PreTrainedModel):
    """``logits = classifier(relu(backbone(pixel_values)))``."""

    config_class = DigitsConfig
    base_model_prefix = "digits"
    main_input_name = "pixel_values"

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.backbone = nn.Linear(config.input_dim, config.hidden_dim)
        self.classifier = nn.Linear(config.hidden_dim, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is self.backbone:
            # The same "pretrained" backbone for every model built from this config.
            generator = torch.Generator().manual_seed(self.config.backbone_seed)
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        elif module is self.classifier:
            module.weight.normal_(0.0, 0.01)
            module.bias.zero_()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.relu(self.backbone(pixel_values))

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> SequenceClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def freeze_backbone(self) -> DigitsClassifier:
        self.backbone.requires_grad_(False)
        return self


def flip_labels(labels: np.ndarray, noise_rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Symmetric noise: a ``noise_rate`` fraction of labels moved to a different class, uniformly."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    flipped = labels.copy()
    chosen = rng.choice(len(labels), size=int(round(noise_rate * len(labels))), replace=False)
    offsets = rng.integers(1, num_classes, size=len(chosen))
    flipped[chosen] = (labels[chosen] + offsets) % num_classes
    return flipped


def load_noisy_digits(noise_rate: float = 0.4, seed: int = 0, test_size: float = 0.3, imbalance: float | None = None):
    """Digits as a `datasets.DatasetDict` with ``train`` (noisy ``label``, ``clean_label``, ``is_clean``) and ``test``.

    Args:
        noise_rate: fraction of training labels flipped symmetrically.
        seed: fixes the split and the flips.
        imbalance: if set (e.g. 10), subsample training classes so the largest is this many times the smallest.
    """
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )
    if imbalance:
        rng = np.random.default_rng(seed)
        keep = []
        for cls in range(10):
            members = np.flatnonzero(y_train == cls)
            share = imbalance ** (-cls / 9.0)  # class 0 keeps all, class 9 keeps 1/imbalance
            keep.append(rng.choice(members, size=max(2, int(round(share * len(members)))), replace=False))
        keep = np.sort(np.concatenate(keep))
        x_train, y_train = x_train[keep], y_train[keep]
    noisy = flip_labels(y_train, noise_rate, 10, seed)
    train = datasets.Dataset.from_dict(
        {"pixel_values": x_train, "label": noisy, "clean_label": y_train, "is_clean": noisy == y_train}
    )
    test = datasets.Dataset.from_dict({"pixel_values": x_test, "label": y_test})
    return datasets.DatasetDict({"train": train.with_format("torch"), "test": test.with_format("torch")})


def digits_model(
    hidden_dim: int = 256, backbone_seed: int = 0, freeze_backbone: bool = True, seed: int = 0
) -> DigitsClassifier:
    torch.manual_seed(seed)
    model = DigitsClassifier(DigitsConfig(hidden_dim=hidden_dim, backbone_seed=backbone_seed))
    return model.freeze_backbone() if freeze_backbone else model


def accuracy(model: nn.Module, dataset) -> float:
    """Test accuracy of ``model`` on a digits split."""
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.as_tensor(np.asarray(dataset["pixel_values"]))).logits
    return float((logits.argmax(-1).numpy() == np.asarray(dataset["label"])).mean())
