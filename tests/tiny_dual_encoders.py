"""Tiny image–text dual encoders from configs (CLIP, SigLIP, VisionTextDualEncoder) and image–caption data for the tests."""

from __future__ import annotations

import numpy as np
import torch

VOCAB, LENGTH, IMAGE = 40, 7, 8
EOS = 2
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=12,
    hidden_act="gelu",
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)
VISION = dict(
    image_size=IMAGE,
    patch_size=4,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_channels=3,
    hidden_act="gelu",
)

# The last MLP layer of each tower (the paper's choice), and a projection.
CLIP_LAYERS = {
    "vision": ["vision_model.encoder.layers.1.mlp.fc1"],
    "text": ["text_model.encoder.layers.1.mlp.fc1"],
    "both": ["vision_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.1.mlp.fc1", "visual_projection"],
}


def tiny_clip(seed: int = 0, attn: str = "sdpa"):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={**TEXT, "projection_dim": 8}, vision_config={**VISION, "projection_dim": 8}, projection_dim=8
    )
    config._attn_implementation = attn
    return CLIPModel(config)


def tiny_siglip(seed: int = 0):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    text = {k: v for k, v in TEXT.items() if k != "bos_token_id"}
    return SiglipModel(SiglipConfig(text_config={**text, "projection_size": 16}, vision_config=VISION))


def tiny_dual_encoder(seed: int = 0):
    """`VisionTextDualEncoderModel`: a tiny CLIP vision tower and a tiny BERT, with fresh projections."""
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(seed)
    text = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(CLIPVisionConfig(**VISION), text, projection_dim=8)
    return VisionTextDualEncoderModel(config)


DUAL_ENCODER_LAYERS = ["vision_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layer.1.intermediate.dense"]


def pair_batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random images and captions (ids ending in the end-of-text token, some padded)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(n), lengths - 1] = EOS
    return {
        "pixel_values": torch.randn(n, 3, IMAGE, IMAGE, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
    }


def pair_dataset(n: int = 32, seed: int = 0, ids: bool = False):
    """A `datasets.Dataset` of ``n`` image–caption pairs (torch format); with ``ids`` a string ``uid`` column."""
    import datasets

    batch = pair_batch(n, seed)
    columns = {key: value.numpy() for key, value in batch.items()}
    if ids:
        columns["uid"] = [f"pair-{i:04d}" for i in np.random.default_rng(seed).permutation(n)]
    return datasets.Dataset.from_dict(columns).with_format("torch")
