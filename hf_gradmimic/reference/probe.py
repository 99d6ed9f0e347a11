"""The linear-probe reference recipe: a head trained on the student's own frozen features.

Why (measured, see the README): for a head, Grad-Mimic's score is

    m_i ∝ (e_y − p_i)ᵀ (W_ref − W_t) h_i = [reference margin on the student's features] − [the student's own margin],

so the reference helps only when ``W_ref`` reads the same features ``h`` as the student. A head
linear-probed on the frozen features of the student's own pretrained checkpoint does (F1 0.90 on a
held-out text task); a model fully fine-tuned elsewhere does not (its head reads drifted features;
F1 0.07, the ranking inverted).

`train_probe_reference` (what `build_reference` runs by default) reads only the mimic layer's inputs from the
frozen student (computed once, cached on disk), trains only that layer on trusted data, and saves a small
safetensors file holding only those tensors, with metadata and a card naming the base checkpoint, the layers,
the data and the accuracy reached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cards import render_reference_card
from ..fileio import atomic_write
from ..layer_lookup import resolve_mimic_layers
from ..losses import logits_of
from ..progress import progress_bar
from .config import ReferenceRecipeConfig, ReferenceResult
from .loading import REFERENCE_WEIGHTS_NAME, checkpoint_name


def _labels_of(dataset: Any) -> torch.Tensor:
    column = "labels" if "labels" in dataset.column_names else "label"
    if column not in dataset.column_names:
        raise ValueError(f"The reference data needs a `label` or `labels` column; columns: {dataset.column_names}.")
    return torch.as_tensor(np.asarray(dataset[column])).long()


def _fingerprint(model: nn.Module, dataset: Any, layer: str) -> str:
    """The feature cache's key: the layer, the dataset, and the bytes of every weight and buffer of the model (two
    checkpoints of one name, or with equal first tensors, are told apart; hashing costs far less than the forward)."""
    digest = hashlib.sha256()
    for part in (type(model).__name__, layer, getattr(dataset, "_fingerprint", str(len(dataset)))):
        digest.update(f"{part}|".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def layer_inputs(
    model: nn.Module,
    dataset: Any,
    layer_name: str,
    *,
    batch_size: int = 64,
    data_collator: Any = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The inputs of ``layer_name`` for every row of ``dataset``, from the frozen model in eval mode.

    Only the layer's inputs are kept (a forward hook); the model's parameters are not touched.
    With ``cache_dir`` the features are stored once per (model, dataset, layer) and reused.
    """
    from safetensors.torch import load_file, save_file
    from transformers import default_data_collator

    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"features-{_fingerprint(model, dataset, layer_name)}.safetensors"
        if cache_path.is_file():
            return load_file(str(cache_path))["features"]
    layer = resolve_mimic_layers(model, [layer_name])[layer_name]
    collate = data_collator or default_data_collator
    label_columns = {"label", "labels", "label_ids"}
    columns = [c for c in dataset.column_names if c not in label_columns]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = progress_bar(desc=f"Reference features ({layer_name})", total=len(dataset), unit=" examples")
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collate([{c: row[c] for c in columns} for row in rows])
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            bar.update(len(rows))
    finally:
        bar.close()
        handle.remove()
        model.train(was_training)
    features = torch.cat(captured)
    if cache_path is not None:
        atomic_write(cache_path, lambda tmp: save_file({"features": features.contiguous()}, tmp))
    return features


def _is_head(model: nn.Module, dataset: Any, layer_name: str, data_collator: Any) -> bool:
    """True when the layer's output is the model's logits (so a probe on its inputs is exact)."""
    from transformers import default_data_collator

    layer = resolve_mimic_layers(model, [layer_name])[layer_name]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    label_columns = {"label", "labels", "label_ids"}
    row = dataset[0]
    batch = (data_collator or default_data_collator)(
        [{c: row[c] for c in dataset.column_names if c not in label_columns}]
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = logits_of(
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            )
    finally:
        handle.remove()
        model.train(was_training)
    return len(seen) == 1 and seen[0].shape == logits.shape and torch.equal(seen[0], logits)


def linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    init_weight: torch.Tensor,
    init_bias: torch.Tensor | None,
    *,
    epochs: int = 100,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """Train ``logits = features @ Wᵀ + b`` with cross entropy (AdamW, mini-batches). Returns W, b, epoch losses."""
    generator = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(init_weight.detach().float().clone())
    bias = None if init_bias is None else nn.Parameter(init_bias.detach().float().clone())
    params = [weight] + ([bias] if bias is not None else [])
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(features), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(F.linear(features[index], weight, bias), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(features))
    return weight.detach(), None if bias is None else bias.detach(), history


def _accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    with torch.no_grad():
        return float((F.linear(features, weight, bias).argmax(-1) == labels).float().mean())


def train_probe_reference(model: nn.Module, train_dataset: Any, config: ReferenceRecipeConfig) -> ReferenceResult:
    """The linear-probe recipe: the head (the one mimic layer of ``config.layers``, default ``classifier``) trained on
    the frozen inputs it receives in ``model``, saved as ``reference.safetensors`` with its card; the model is left
    unchanged."""
    from safetensors.torch import save_file

    layers = list(config.layers) if config.layers is not None else ["classifier"]
    if not layers:
        raise ValueError("`layers` is empty: name the mimic layer(s), e.g. ('classifier',).")
    if len(layers) > 1:
        raise ValueError(
            f"A linear probe trains one head; got layers {layers}. Build the reference for the head only, or "
            "fine-tune the other layers yourself from the same checkpoint."
        )
    layer_name = layers[0]
    data_collator = config.data_collator
    layer = resolve_mimic_layers(model, layers)[layer_name]
    if not _is_head(model, train_dataset, layer_name, data_collator):
        raise ValueError(
            f"Layer {layer_name!r} is not the model's head (its output is not the logits): a linear probe on its "
            "inputs would not reproduce the model's predictions. Use the classifier / lm_head as mimic layer."
        )
    output_dir = Path(config.output_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir is not None else output_dir / "feature_cache"
    train_features = layer_inputs(model, train_dataset, layer_name, data_collator=data_collator, cache_dir=cache_dir)
    if train_features.dim() != 2:
        raise ValueError(
            f"The inputs of {layer_name!r} have shape {tuple(train_features.shape)}; the linear-probe recipe needs one "
            "feature vector per sample (a sequence-classification or image-classification head)."
        )
    train_labels = _labels_of(train_dataset)
    weight, bias, history = linear_probe(
        train_features,
        train_labels,
        layer.weight,
        layer.bias,
        seed=config.seed,
        **config.optimizer_settings(),
    )
    model_config = getattr(model, "config", None)
    metadata = {
        "base_model": checkpoint_name(
            config.base_model or str(getattr(model_config, "_name_or_path", "") or type(model).__name__)
        ),
        "base_revision": config.base_revision or "",
        "layers": json.dumps(layers),
        "method": config.method,
        "train_rows": str(len(train_dataset)),
        "train_accuracy": f"{_accuracy(train_features, train_labels, weight, bias):.4f}",
        "eval_accuracy": "",
        "data": config.data_description or "",
        "format": "pt",
    }
    if config.eval_dataset is not None:
        eval_features = layer_inputs(
            model, config.eval_dataset, layer_name, data_collator=data_collator, cache_dir=cache_dir
        )
        eval_labels = _labels_of(config.eval_dataset)
        metadata["eval_accuracy"] = f"{_accuracy(eval_features, eval_labels, weight, bias):.4f}"
    tensors = {f"{layer_name}.weight": weight.contiguous()}
    if bias is not None:
        tensors[f"{layer_name}.bias"] = bias.contiguous()

    path = atomic_write(output_dir / REFERENCE_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(output_dir / "README.md", render_reference_card(metadata).save)
    return ReferenceResult(path=path, tensors=tensors, metadata=metadata, history=history)
