"""Image–caption pairs that work offline: scikit-learn's digits with captions written from their labels, some swapped.

No captioned image set installs from a package registry, so this stands in for web image–text data
(DataComp's, in Grad-Mimic's experiments, Huang et al., arXiv 2501.06708): the images are real (1,797
handwritten 8×8 digits, upsampled), the captions are templated from the labels in several phrasings
(`TEMPLATES`), and a fraction of the pool's captions is swapped with another class's caption, which makes
mismatched pairs to detect. A word-level tokenizer (`caption_tokenizer`) covers every caption, and
`tiny_clip` builds a small `transformers.CLIPModel` from a config (random init: no checkpoint is
downloaded) that reads these images and captions.
"""

from __future__ import annotations

import numpy as np
import torch

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {name}",
    "a handwritten {digit}",
    "the number {name} written by hand",
    "a scan of a {name}",
    "an image showing the numeral {digit}",
    "{name}",
)
"""Caption phrasings; ``{name}`` is the digit's word, ``{digit}`` its numeral."""

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
# CLIP's text tower pools at the first end-of-text token; an eos id of 2 selects its legacy argmax pooling.
SPECIAL_IDS = {PAD: 0, EOS: 1, UNK: 3}
MAX_LENGTH = 10


def caption(label: int, template: int) -> str:
    """The caption of digit ``label`` in phrasing ``template``."""
    return TEMPLATES[template].format(name=DIGIT_NAMES[label], digit=str(label))


def caption_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over every caption's words, ending each caption with ``[EOS]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for label in range(10) for t in range(len(TEMPLATES)) for word in caption(label, t).split()})
    vocab = {**SPECIAL_IDS, "[BOS]": 2, **{word: 4 + i for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, SPECIAL_IDS[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=MAX_LENGTH
    )


def tiny_clip(vocab_size: int, image_size: int = 16, seed: int = 0, width: int = 64, layers: int = 2):
    """A small `CLIPModel` (both towers ``layers`` deep, ``width`` wide, 4×4 patches) from a config, seeded."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": vocab_size,
            "max_position_embeddings": MAX_LENGTH,
            "eos_token_id": SPECIAL_IDS[EOS],
            "pad_token_id": SPECIAL_IDS[PAD],
            "bos_token_id": 2,
        },
        vision_config={**common, "image_size": image_size, "patch_size": 4, "num_channels": 3},
        projection_dim=width,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def digit_images(image_size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 1,797 digits as ``[N, 3, S, S]`` float images (bilinear upsampling, grey on 3 channels, scaled to
    mean 0 and unit variance) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = (images - images.mean()) / images.std()
    return images.expand(-1, 3, -1, -1).contiguous(), digits.target.astype(np.int64)


def captioned_digits(
    seed: int = 0, mismatch_fraction: float = 0.3, image_size: int = 16, trusted: int = 300, test: int = 400
) -> dict:
    """The digits split into ``trusted`` clean pairs (for a reference), ``test`` images (for zero-shot accuracy) and the
    rest as the pool, in which ``mismatch_fraction`` of the captions describe another digit.

    Returns ``{"trusted", "pool", "test": datasets.Dataset, "tokenizer": ...}``. Every split has ``pixel_values``,
    ``input_ids``, ``attention_mask`` (torch format), ``label`` (the image's digit), ``caption``; the pool also
    ``uid`` (a string id), ``caption_label`` and ``matched`` (1 when the caption describes the image).
    """
    import datasets

    if not 0.0 <= mismatch_fraction < 1.0:
        raise ValueError(f"`mismatch_fraction` must be in [0, 1); got {mismatch_fraction}.")
    images, labels = digit_images(image_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    parts = {"trusted": order[:trusted], "test": order[trusted : trusted + test], "pool": order[trusted + test :]}
    tokenizer = caption_tokenizer()
    splits = {}
    for name, rows in parts.items():
        image_labels = labels[rows]
        caption_labels = image_labels.copy()
        if name == "pool":
            swapped = rng.random(len(rows)) < mismatch_fraction
            caption_labels[swapped] = (image_labels[swapped] + rng.integers(1, 10, swapped.sum())) % 10
        texts = [caption(int(c), int(t)) for c, t in zip(caption_labels, rng.integers(0, len(TEMPLATES), len(rows)))]
        tokens = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        columns = {
            "pixel_values": images[rows].numpy(),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "label": image_labels,
            "caption": texts,
        }
        if name == "pool":
            columns.update(
                uid=[f"digit-{int(r):04d}" for r in rows],
                caption_label=caption_labels,
                matched=(caption_labels == image_labels).astype(np.int64),
            )
        splits[name] = datasets.Dataset.from_dict(columns).with_format(
            "torch", columns=["pixel_values", "input_ids", "attention_mask", "label"], output_all_columns=True
        )
    return {**splits, "tokenizer": tokenizer}
