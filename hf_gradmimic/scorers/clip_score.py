r"""CLIP score: a reference image–text model's cosine between each sample's image and caption, the filtering baseline.

DataComp's CLIP-score filtering (Gadre et al. 2023, following Hessel et al.'s CLIPScore, 2021) keeps the pairs
whose image and caption a pretrained CLIP (Radford et al. 2021) embeds close together:

.. math:: c_i = \cos\big(f_{\mathrm{img}}(x_i),\ f_{\mathrm{txt}}(t_i)\big)

Grad-Mimic (Huang et al., arXiv 2501.06708) is compared with it on image–caption data. As a scorer it filters
each candidate batch online (``"select"``: the top ``ratio``) or weighs it (``"reweight"``: ``softmax(c/τ)``);
`hf_gradmimic.clip_filter` computes the same score over a whole dataset, cuts it (top-k or a threshold) and
offers it to Stage 2 as a labeling function. The score needs no gradient, so it works under a batch-coupled
loss, and the reference must read the student's inputs (the same image size and tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import SampleScorer, ScoreContext

MODEL_INPUTS: tuple[str, ...] = ("pixel_values", "input_ids", "attention_mask", "position_ids", "token_type_ids")
"""The batch keys a dual encoder reads; any other column stays out of the reference's forward."""


def clip_score_of(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``cos(image_i, caption_i)`` ``[B]`` float32 under ``model`` (a CLIP, SigLIP or `VisionTextDualEncoderModel`),
    without gradients, from its inputs (``pixel_values``, ``input_ids``, ``attention_mask``...)."""
    device = next(model.parameters()).device
    batch = {
        key: value.to(device)
        for key, value in inputs.items()
        if key in MODEL_INPUTS and isinstance(value, torch.Tensor)
    }
    missing = [key for key in ("pixel_values", "input_ids") if key not in batch]
    if missing:
        raise ValueError(
            f"A CLIP score needs the images and the captions; the batch has no {missing} (keys: {sorted(inputs)})."
        )
    with torch.no_grad():
        outputs = model(**batch)
        images = torch.nn.functional.normalize(outputs.image_embeds.float(), dim=-1)
        texts = torch.nn.functional.normalize(outputs.text_embeds.float(), dim=-1)
    return (images * texts).sum(dim=-1)


def load_dual_encoder(source: Any) -> nn.Module:
    """A reference dual encoder: a model as given, or a local folder / Hub repo read with ``AutoModel``."""
    if isinstance(source, nn.Module):
        return source
    if source is None:
        raise ValueError(
            "mimic_scorer='clip_score' needs the reference image–text model: pass `reference=` (a CLIPModel, "
            "SiglipModel or VisionTextDualEncoderModel) or set `mimic_reference` to its folder or Hub repo."
        )
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(source))


class ClipScoreScorer(SampleScorer):
    """CLIP-score filtering as a scorer: ``c_i`` = the reference's image–caption cosine (`clip_score_of`).

    Args:
        reference: the reference dual encoder (put in eval mode here, moved to the batch's device); it can be set
            later, before the first score.
        reference_name: its name, for messages and cards.

    ``"select"`` (the default) trains on the top ``mimic_select_ratio`` of each candidate batch: DataComp's
    CLIP-score filtering, online. ``"reweight"`` weighs by ``softmax(c/τ)``.
    """

    name = "clip_score"
    needs_output_grads = False
    requires = ("inputs",)
    default_mode = "select"
    supports_batch_coupled = True  # a property of each pair under the reference, not of the student's loss

    def __init__(self, reference: nn.Module | None = None, reference_name: str | None = None) -> None:
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.reference_name = reference_name or type(reference).__name__

    @classmethod
    def from_config(cls, args: Any, *, reference: Any = None, model: Any = None, **runtime: Any) -> ClipScoreScorer:
        source = reference if reference is not None else args.mimic_reference
        if model is not None and source is model:  # frozen here, the student would then train nothing
            raise ValueError(
                "mimic_scorer='clip_score' got the student itself as `reference=`: the reference is frozen, so the "
                "student could not train. Pass a separate model (e.g. a copy: copy.deepcopy(model))."
            )
        return cls(load_dual_encoder(source), None if isinstance(source, nn.Module) else str(source))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        inputs = ctx.require("inputs", self.name)
        reference = load_dual_encoder(self.reference)  # None: the error that says what to pass
        device = next((value.device for value in inputs.values() if isinstance(value, torch.Tensor)), None)
        if device is not None and next(reference.parameters()).device != device:
            reference.to(device)
        return clip_score_of(reference, inputs)

    def describe(self) -> dict[str, Any]:
        """The reference model, for the score log's provenance and the cards."""
        return {"reference": {"source": self.reference_name}}

    def __repr__(self) -> str:
        return f"ClipScoreScorer(reference={self.reference_name!r})"
