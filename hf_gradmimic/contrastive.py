"""Batch-coupled per-sample losses of contrastive models: CLIP, SigLIP, dual encoders, in-batch negatives.

Grad-Mimic (Huang et al., arXiv 2501.06708) weighs per-sample losses ``ℓ_i``. In a contrastive loss every
sample is a negative of every other, so ``ℓ_i`` is sample ``i``'s own term of a loss over the whole
batch, and it depends on the other samples. The terms defined here average to the model's own loss:

- **CLIP** (Radford et al. 2021; `transformers.CLIPModel`, `VisionTextDualEncoderModel`): with
  ``s_ij = exp(t) · ⟨text_i, image_j⟩``,
  ``ℓ_i = ½ (CE of text i over the batch's images + CE of image i over the batch's texts)``;
- **SigLIP** (Zhai et al. 2023; `transformers.SiglipModel`): with ``z_ij = exp(t) · ⟨text_i, image_j⟩ + b``,
  ``y_ij = +1`` on the diagonal and ``−1`` elsewhere, and the pair term ``p_ij = −log σ(y_ij z_ij)``,
  ``ℓ_i = ½ (Σ_j p_ij + Σ_j p_ji)``: the pair's own term counts fully, and each negative pair is shared
  half and half between the sample whose text and the sample whose image it holds. The model's loss,
  ``(1/N) Σ_ij p_ij``, is the mean of ``ℓ_i``;
- **in-batch negatives** (sentence-transformers' MultipleNegativesRankingLoss): `in_batch_negatives_loss`.

Under several processes the negatives are every process's samples, as open_clip's ``gather_with_grad``:
`gather_rows` concatenates the embeddings of every rank with a gradient that flows back to the rank that
made them (and is itself differentiable, which the directional-derivative scores of
`hf_gradmimic.training.coupled` need). Each process returns its own samples' terms over the global batch,
so ``N`` processes with ``b`` samples each give the terms of one process with ``N·b``.

A loss marked with `batch_coupled` tells `MimicTrainer` that samples interact: it then scores by
directional derivatives instead of the ghost maths, which assume they do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH_COUPLED = "batch_coupled"
"""The attribute that marks a per-sample loss function as batch-coupled (`batch_coupled`)."""

CONTRASTIVE_KINDS: tuple[str, ...] = ("clip", "siglip")


def batch_coupled(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark ``loss_fn(outputs, inputs) -> Tensor[B]`` as batch-coupled: sample ``i``'s term depends on the other
    samples of the batch (in-batch negatives, a contrastive loss). Returns ``loss_fn`` itself, marked, for
    ``MimicTrainer(per_sample_loss_fn=batch_coupled(my_loss))``; usable as a decorator."""
    try:
        setattr(loss_fn, BATCH_COUPLED, True)
    except AttributeError:  # a built-in or a callable with __slots__: wrap it

        def wrapped(outputs: Any, inputs: Any) -> torch.Tensor:
            return loss_fn(outputs, inputs)

        setattr(wrapped, BATCH_COUPLED, True)
        return wrapped
    return loss_fn


def is_batch_coupled(loss_fn: Any) -> bool:
    """Whether a per-sample loss function is marked batch-coupled (`batch_coupled`, or a `ContrastiveLoss`)."""
    return bool(getattr(loss_fn, BATCH_COUPLED, False))


# ---------------------------------------------------------------- negatives from every process


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    """``Σ_ranks x`` on every rank; its adjoint is the same sum, so it is differentiable any number of times."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.contiguous().clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, rank after rank; the gradient of this rank's rows is the sum over ranks of the gradient
    at their place (a reduce-scatter, written as an all-reduce so that it is differentiable again)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        longest = max(sizes)
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[: len(tensor)] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded.contiguous())
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _AllReduceSum.apply(grad)[ctx.start : ctx.start + ctx.size], None, None


def gather_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Each tensor ``[b_rank, ...]`` concatenated over every process (rank order), differentiable, and the index of
    this process's first row in the result. One process: the tensors themselves and 0. Processes may hold
    different numbers of rows (a stream's last batch)."""
    rank, world = _world()
    if world == 1:
        return list(tensors), 0
    count = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    return [_GatherRows.apply(t, sizes, rank) for t in tensors], sum(sizes[:rank])


# ---------------------------------------------------------------- per-sample terms


def _finite_pairs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, gather: bool):
    """Float32 embeddings of every process (``gather``) with the rows of broken samples zeroed, which samples are
    whole, and this process's offset. A sample with a non-finite image or text embedding must not make every other
    sample's loss NaN through their softmax: it is left out of the negatives, and its own term is NaN."""
    ok = torch.isfinite(image_embeds).all(dim=-1) & torch.isfinite(text_embeds).all(dim=-1)
    images, texts = (
        torch.where(ok.unsqueeze(-1), e.float(), torch.zeros_like(e, dtype=torch.float32))
        for e in (image_embeds, text_embeds)
    )
    flags = ok.float()  # collectives of gloo take no booleans
    (all_images, all_texts, all_flags), offset = (
        gather_rows(images, texts, flags) if gather else ((images, texts, flags), 0)
    )
    return images, texts, ok, all_images, all_texts, all_flags > 0, offset


def _pair_logits(
    own: torch.Tensor, others: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float
) -> torch.Tensor:
    """``scale · ⟨own_i, others_j⟩ + bias`` ``[b, N]`` in float32."""
    return scale * own @ others.t() + bias


def clip_per_sample_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
) -> torch.Tensor:
    r"""CLIP's per-sample terms (Radford et al. 2021) for this process's samples ``[b]``, float32.

    .. math:: \ell_i = \tfrac12\Big(-\log\frac{e^{s_{ii}}}{\sum_j e^{s_{ij}}} - \log\frac{e^{s_{ii}}}{\sum_j e^{s_{ji}}}\Big),
              \qquad s_{ij} = e^{t}\,\langle \mathrm{text}_i, \mathrm{image}_j\rangle

    ``image_embeds`` / ``text_embeds`` are the model's normalised embeddings ``[b, D]``, ``logit_scale`` is ``t``.
    With ``gather`` the ``j`` run over every process's samples (`gather_rows`). Their mean over the global batch
    is `transformers.CLIPModel`'s loss. A sample with a non-finite embedding gets NaN and is no one's negative.
    """
    images, texts, ok, all_images, all_texts, all_ok, offset = _finite_pairs(image_embeds, text_embeds, gather)
    scale = logit_scale.float().exp()
    targets = torch.arange(len(texts), device=texts.device) + offset
    text_logits = _pair_logits(texts, all_images, scale, 0.0).masked_fill(~all_ok, -torch.inf)
    image_logits = _pair_logits(images, all_texts, scale, 0.0).masked_fill(~all_ok, -torch.inf)
    losses = (
        F.cross_entropy(text_logits, targets, reduction="none")
        + F.cross_entropy(image_logits, targets, reduction="none")
    ) / 2
    return torch.where(ok, losses, torch.full_like(losses, float("nan")))


def siglip_per_sample_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    r"""SigLIP's per-sample terms (Zhai et al. 2023) for this process's samples ``[b]``, float32.

    .. math:: \ell_i = \tfrac12\Big(\sum_j p_{ij} + \sum_j p_{ji}\Big),\qquad
              p_{ij} = -\log\sigma\big(y_{ij}\,(e^{t}\langle \mathrm{text}_i, \mathrm{image}_j\rangle + b)\big),
              \quad y_{ij} = 2[i = j] - 1

    Their mean over the global batch is `transformers.SiglipModel`'s loss ``(1/N) Σ_ij p_ij``: the pair's own
    term counts fully, each negative pair half for its text's sample and half for its image's.
    """
    images, texts, ok, all_images, all_texts, all_ok, offset = _finite_pairs(image_embeds, text_embeds, gather)
    scale, bias = logit_scale.float().exp(), logit_bias.float()
    signs = -torch.ones(len(texts), len(all_images), device=texts.device)
    signs[torch.arange(len(texts)), torch.arange(len(texts)) + offset] = 1.0
    # Pair terms of this process's texts (rows of the model's logits) and of its images (columns).
    text_terms = -F.logsigmoid(signs * _pair_logits(texts, all_images, scale, bias)) * all_ok
    image_terms = -F.logsigmoid(signs * _pair_logits(images, all_texts, scale, bias)) * all_ok
    losses = (text_terms.sum(dim=1) + image_terms.sum(dim=1)) / 2
    return torch.where(ok, losses, torch.full_like(losses, float("nan")))


def in_batch_negatives_loss(
    queries: torch.Tensor, positives: torch.Tensor, scale: float = 20.0, gather: bool = True
) -> torch.Tensor:
    r"""In-batch negatives (sentence-transformers' MultipleNegativesRankingLoss): query ``i``'s cross entropy over
    every positive of the batch, with cosine similarities times ``scale`` (their default 20), ``[b]`` float32.

    .. math:: \ell_i = -\log\frac{e^{s\cos(q_i, p_i)}}{\sum_j e^{s\cos(q_i, p_j)}}
    """
    queries = F.normalize(queries.float(), dim=-1)
    candidates = F.normalize(positives.float(), dim=-1)
    (all_candidates,), offset = gather_rows(candidates) if gather else ((candidates,), 0)
    targets = torch.arange(len(queries), device=queries.device) + offset
    return F.cross_entropy(_pair_logits(queries, all_candidates, scale, 0.0), targets, reduction="none")


class ContrastiveLoss:
    """The per-sample loss of an image–text model: `clip_per_sample_loss` or `siglip_per_sample_loss` on its outputs'
    ``image_embeds`` / ``text_embeds``, with the model's own ``logit_scale`` (and ``logit_bias``).

    ``ContrastiveLoss(model)(outputs, inputs) -> Tensor[b]``. `MimicTrainer` builds one by itself for a model that
    has them (`contrastive_loss_for`); pass one as ``per_sample_loss_fn`` to choose ``gather=False`` (negatives
    from this process only, as a plain `Trainer` run of `CLIPModel` has) or another kind.

    Args:
        model: the unwrapped model holding ``logit_scale`` (and ``logit_bias`` for SigLIP).
        kind: ``"clip"`` or ``"siglip"``; default: ``"siglip"`` when the model has a ``logit_bias``.
        gather: negatives from every process (`gather_rows`), as open_clip trains.
    """

    batch_coupled = True

    def __init__(self, model: nn.Module, kind: str | None = None, gather: bool = True) -> None:
        kind = kind or ("siglip" if hasattr(model, "logit_bias") else "clip")
        if kind not in CONTRASTIVE_KINDS:
            raise ValueError(f"`kind` must be one of {CONTRASTIVE_KINDS}; got {kind!r}.")
        for name in ("logit_scale", *(("logit_bias",) if kind == "siglip" else ())):
            if not isinstance(getattr(model, name, None), torch.Tensor):
                raise ValueError(
                    f"A {kind} loss needs the model's `{name}` parameter; {type(model).__name__} has none."
                )
        self.model, self.kind, self.gather = model, kind, gather

    def __call__(self, outputs: Any, inputs: Any = None) -> torch.Tensor:
        embeds = []
        for name in ("image_embeds", "text_embeds"):
            value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
            if value is None:
                raise ValueError(
                    f"The model's outputs ({type(outputs).__name__}) have no `{name}`: a {self.kind} loss needs both "
                    "towers' embeddings, so every batch must hold the images (`pixel_values`) and the captions "
                    "(`input_ids`)."
                )
            embeds.append(value)
        if self.kind == "siglip":
            return siglip_per_sample_loss(*embeds, self.model.logit_scale, self.model.logit_bias, self.gather)
        return clip_per_sample_loss(*embeds, self.model.logit_scale, self.gather)

    def __repr__(self) -> str:
        return f"ContrastiveLoss(kind={self.kind!r}, gather={self.gather})"


def contrastive_loss_for(model: nn.Module) -> ContrastiveLoss | None:
    """The per-sample loss of an image–text dual encoder (a model with ``logit_scale``, ``get_image_features`` and
    ``get_text_features``: CLIP, SigLIP, `VisionTextDualEncoderModel` and their kin), or None for other models."""
    if all(hasattr(model, name) for name in ("logit_scale", "get_image_features", "get_text_features")):
        return ContrastiveLoss(model)
    return None
