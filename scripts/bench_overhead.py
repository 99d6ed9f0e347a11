#!/usr/bin/env python
"""Step-time and memory overhead of `MimicTrainer` against plain `transformers.Trainer` (issues #7, #26).

Candidates, all on the same model (same config and seed, random init, nothing downloaded), the
same synthetic data, batch, optimizer (the Trainer's default AdamW) and seed:

- ``plain``              `transformers.Trainer`;
- ``mimic-head``         `MimicTrainer` with the head as mimic layer (``classifier`` / ``lm_head``);
- ``mimic-head-norec``   the same with ``mimic_record_scores=False`` (the score-recording cost);
- ``mimic-head-monitor`` the same with the running alignment monitor at every step (its cost per call);
- ``mimic-inner``        `MimicTrainer` on the last block's MLP up-projection (BERT's
                         ``intermediate.dense``, an ``nn.Linear``; GPT-2's ``mlp.c_fc``, a ``Conv1D``; for CLIP
                         ``fc1`` of both towers' last layers);
- ``mimic-head-tied``    GPT-2 only: the head with ``tie_word_embeddings=True``, so the mimic tensor is also
                         the token embedding and its score sums both uses (a gradient back to the embedding);
- ``mimic-head-nonfinite`` the head, with one sample in 32 made non-finite inside the model (an overflow
                         on its token ids): the cost of leaving such samples out (a second forward);
- ``mimic-head-verdict`` GPT-2 only: the head with ``mimic_log_reference_loss="always"``, the cost of recording
                         the reference's per-sample loss (an ``lm_head``-sized matmul; BERT's ``mimic-head`` already
                         records it, its default ``"auto"`` covers a classification head);
- ``mimic-head-refmodel`` BERT only: the head with ``mimic_log_reference_loss="reference_model"``, the cost of
                         recording the reference model's own verdict for full fine-tuning (a no-grad forward of the
                         starting weights with the reference's head, once per row: the benchmark's data are one
                         epoch, every row new, the option's worst case; opt-in, so no target: reported against
                         ``mimic-head``, whose default records the head's verdict on the current features);
- ``mimic-select``       a select-mode scorer: GraNd (``mimic_scorer="grand"``, ghost gradient norms at the head),
                         keeping ``mimic_select_ratio`` = 0.5 of each batch (a candidate forward with the ghost
                         backward, then a forward and backward of the selected half);
- ``mimic-agra``         opt-in (named in ``--candidates``): AGRA at the head (``mimic_scorer="agra"``), whose
                         comparison batch is forwarded at every step while the scored batch's graph is alive;
- ``vmap``               a per-sample-gradient baseline written the way the authors' code works:
                         ``torch.func.vmap(grad(...))`` over every trainable parameter, m_i from
                         those per-sample gradients, the same softmax(m/τ) weights, and the weighted
                         gradient Σ_i w_i g_i contracted from them (a `Trainer` subclass overriding
                         ``training_step``);
- ``vmap-layer``         the like-for-like per-sample-gradient baseline: ``torch.func.vmap(grad(...))``
                         with respect to the mimic layer's tensors only, m_i and the weights from them,
                         then one normal weighted backward of Σ_i w_i ℓ_i (what MimicTrainer computes,
                         with materialised per-sample gradients instead of ghost inner products);
- ``vmap-inner``         the same baseline for the ``mimic-inner`` layer.

Isolation and noise (the machine is shared). The parent imports torch/transformers once, without
computing anything, and forks one child per candidate of a model. The children build their
trainers and run the warm-up steps concurrently, then run their timed steps in lockstep: a baton
(one semaphore per child) passes round-robin, so exactly one child computes at a time and each
round holds one step of every candidate, back to back. A step is timed from ``on_step_begin``
(after the baton arrived) to ``on_step_end`` by a callback registered last, so MimicTrainer's own
``on_step_end`` work (score recording) is inside. A child hands the baton on only when it is about
to wait for its next turn, so its work between steps never overlaps another child's timed step.
This repeats ``--repeats`` times with the candidate order shuffled. Ratios to plain are formed per
round and pooled; the figure judged against the targets uses the rounds in which every step got
≥ 1.5 CPU-seconds per second (no other process took a core), see `quiet_rounds`.

Memory. After a child has built its model, data and trainer it resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``) and reads VmRSS; after training it reads VmHWM. "Peak RSS
growth" is VmHWM − that baseline: what training adds (gradients, optimizer state, activations,
autograd buffers, per-sample gradients). Where ``clear_refs`` is not writable it falls back to
``ru_maxrss``. Each child is its own process, so the candidates' peaks do not mix.

Usage:
    python scripts/bench_overhead.py --profile             # full sizes, writes docs/performance.md
    python scripts/bench_overhead.py --quick               # tiny sizes, smoke run (seconds), writes no file
    python scripts/bench_overhead.py --models gpt2 --steps 30 --repeats 5 --output /tmp/perf.md
    python scripts/bench_overhead.py --from-json run.json  # re-render a run saved with --json

A hand-written section after ANALYSIS_MARKER in the output file is kept when the file is rewritten.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_gradmimic.config import MimicConfig  # noqa: E402
from hf_gradmimic.losses import per_sample_loss  # noqa: E402
from hf_gradmimic.trainer import MimicTrainer  # noqa: E402

SEED = 1234
THREADS = 2
TEMPERATURE = 0.5
REFERENCE_NOISE = 0.02

MODELS: dict[str, dict[str, Any]] = {
    "bert": {
        "full": dict(hidden=256, layers=4, heads=4, intermediate=1024, seq=128, batch=32, vocab=30522, labels=4),
        "quick": dict(hidden=32, layers=2, heads=2, intermediate=64, seq=16, batch=8, vocab=512, labels=4),
        "head": "classifier",
        "inner": "bert.encoder.layer.{last}.intermediate.dense",
    },
    "gpt2": {
        "full": dict(hidden=256, layers=4, heads=4, intermediate=1024, seq=128, batch=8, vocab=30522),
        "quick": dict(hidden=32, layers=2, heads=2, intermediate=128, seq=16, batch=4, vocab=512),
        "head": "lm_head",
        "inner": "transformer.h.{last}.mlp.c_fc",  # a transformers Conv1D
    },
    # LLM fine-tuning: a Llama with LoRA (r=16) on q/k/v/o, trl's SFTTrainer against MimicSFTTrainer with
    # mimic_layers=["lora"] (every LoRA matrix); prompt-completion rows, the loss on the completion half.
    "llama-lora": {
        "full": dict(hidden=256, layers=4, heads=4, intermediate=688, seq=128, batch=8, vocab=32000, rank=16),
        "quick": dict(hidden=32, layers=2, heads=2, intermediate=64, seq=16, batch=4, vocab=512, rank=4),
        "head": None,
        "inner": None,
        "candidates": ("plain", "mimic-lora"),
    },
    # A batch-coupled (contrastive) loss: scores are directional derivatives by a double backward
    # (hf_gradmimic.training.coupled), the cost measured here.
    "clip": {
        "full": dict(
            hidden=256, layers=4, heads=4, intermediate=1024, seq=77, image=64, patch=8, batch=32, vocab=49408
        ),
        "quick": dict(hidden=32, layers=2, heads=2, intermediate=64, seq=8, image=16, patch=8, batch=8, vocab=512),
        "head": "visual_projection",
        # Grad-Mimic's DataComp runs: fc1 of the last layer of both towers.
        "inner": ("vision_model.encoder.layers.{last}.mlp.fc1", "text_model.encoder.layers.{last}.mlp.fc1"),
        # No per-sample-gradient baseline (a coupled loss has no per-sample gradient without a backward per
        # sample), no token-overflow hook, and no select-mode case: GraNd refuses a batch-coupled loss.
        "candidates": ("plain", "mimic-head", "mimic-head-norec", "mimic-head-monitor", "mimic-inner"),
    },
}

CANDIDATES = (
    "plain",
    "mimic-head",
    "mimic-head-norec",
    "mimic-head-monitor",
    "mimic-inner",
    "mimic-head-tied",
    "mimic-head-nonfinite",
    "vmap",
    "vmap-layer",
    "vmap-inner",
    "mimic-lora",
    "mimic-head-verdict",
    "mimic-head-refmodel",
    "mimic-select",
    "mimic-agra",
)
# Measured only when named in --candidates: `make bench` stays within issue #26's 40 minutes.
OPT_IN = ("mimic-agra",)
# candidates that exist for some models only
ONLY_FOR = {
    "mimic-head-tied": ("gpt2",),
    "mimic-lora": ("llama-lora",),
    "mimic-head-verdict": ("gpt2",),
    "mimic-head-refmodel": ("bert",),
}  # candidates that exist for some models only
DESCRIPTIONS = {
    "plain": "transformers.Trainer",
    "mimic-head": "MimicTrainer, head layer",
    "mimic-head-norec": "MimicTrainer, head layer, mimic_record_scores=False",
    "mimic-head-monitor": "MimicTrainer, head layer, alignment monitor at every step (mimic_monitor_steps=1)",
    "mimic-inner": "MimicTrainer, inner layer (the last block's MLP up-projection)",
    "mimic-head-tied": "MimicTrainer, head layer tied to the token embedding (both uses scored)",
    "mimic-head-nonfinite": "MimicTrainer, head layer, 1 sample in 32 non-finite (left out: a second forward)",
    "vmap": "per-sample grads of all parameters (torch.func.vmap), authors' way",
    "vmap-layer": "per-sample grads of the mimic layer only (torch.func.vmap) + one weighted backward, like-for-like",
    "vmap-inner": "per-sample grads of the inner layer only (torch.func.vmap) + one weighted backward, like-for-like",
    "mimic-head-verdict": "MimicTrainer, head layer, mimic_log_reference_loss='always' (the reference's verdict)",
    "mimic-head-refmodel": "MimicTrainer, head layer, mimic_log_reference_loss='reference_model' (the reference "
    "model's own verdict: a forward of the starting weights)",
    "mimic-select": "MimicTrainer, select mode: GraNd at the head, half of each batch kept",
    "mimic-agra": "MimicTrainer, AGRA at the head (a filter: a comparison batch forwarded at every step)",
    "mimic-lora": "MimicSFTTrainer, every LoRA matrix (mimic_layers=['lora']); its plain is trl's SFTTrainer",
}
# Step-time target (ratio to plain Trainer, issue #26) for every case of the issue; the memory target applies to
# every MimicTrainer run.
TARGET_CASES = (
    "mimic-head",
    "mimic-inner",
    "mimic-head-tied",
    "mimic-head-nonfinite",
    "mimic-head-verdict",
    "mimic-select",
    "mimic-lora",
)
TIME_TARGET = 1.05
MEMORY_TARGET = 1.05
SELECT_RATIO = 0.5
VMAP_TARGET = 10.0  # vmap step time / mimic-head step time, at least
RECORD_TARGET = 0.02  # recording cost, fraction of the step time, below
ANALYSIS_MARKER = (
    "<!-- Hand-written analysis below this line: kept when scripts/bench_overhead.py rewrites the file. -->"
)
QUIET_CPU = 0.75 * THREADS  # a round is quiet when every step in it got this many CPU seconds per wall second
LIVE_MEMORY_STEPS = 4  # timed-loop steps of a --live-memory run (after the warm-up); the peak recurs every step
LIVE_MEMORY_WARMUP = 1  # its warm-up: the sampling covers the warm-up too, so one step (AdamW's state) suffices
LIVE_MEMORY_REPEAT = -2  # the repeat label of those runs: kept out of the step-time ratios, like the profile's (−1)
MIN_QUIET_ROUNDS = 10  # fewer quiet rounds than this: the targets are judged on all rounds


# ---------------------------------------------------------------------------------------------- model, data


def build_model(model_name: str, size: dict[str, int], tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(SEED)
    if model_name == "llama-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=size["vocab"],
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            num_key_value_heads=size["heads"],
            intermediate_size=size["intermediate"],
            max_position_embeddings=size["seq"],
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        lora = LoraConfig(
            r=size["rank"],
            lora_alpha=2 * size["rank"],
            lora_dropout=0.05,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        return get_peft_model(LlamaForCausalLM(config), lora)
    if model_name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=size["vocab"],
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            intermediate_size=size["intermediate"],
            max_position_embeddings=max(512, size["seq"]),
            num_labels=size["labels"],
        )
        return BertForSequenceClassification(config)
    if model_name == "clip":
        from transformers import CLIPConfig, CLIPModel

        tower = dict(
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            intermediate_size=size["intermediate"],
        )
        config = CLIPConfig(
            text_config={
                **tower,
                "vocab_size": size["vocab"],
                "max_position_embeddings": size["seq"],
                "eos_token_id": size["vocab"] - 1,
                "bos_token_id": size["vocab"] - 2,
                "pad_token_id": 1,
            },
            vision_config={**tower, "image_size": size["image"], "patch_size": size["patch"]},
            projection_dim=size["hidden"],
        )
        return CLIPModel(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=size["vocab"],
        n_embd=size["hidden"],
        n_layer=size["layers"],
        n_head=size["heads"],
        n_inner=size["intermediate"],
        n_positions=size["seq"],
        bos_token_id=0,
        eos_token_id=0,
        # Untied unless asked: the tied case is a candidate of its own (mimic-head-tied), whose score must
        # also reach the embedding use of the shared matrix.
        tie_word_embeddings=tied,
    )
    return GPT2LMHeadModel(config)


def build_dataset(model_name: str, size: dict[str, int], rows: int):
    import datasets

    rng = np.random.default_rng(SEED)
    input_ids = rng.integers(1, size["vocab"], size=(rows, size["seq"]), dtype=np.int64)
    if model_name == "llama-lora":  # prompt-completion rows, as SFT prepares them: the prompt half unsupervised
        labels = input_ids.copy()
        labels[:, : size["seq"] // 2] = -100
        return datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    if model_name == "clip":  # image–caption pairs; every caption ends with the end-of-text token
        input_ids = rng.integers(2, size["vocab"] - 2, size=(rows, size["seq"]), dtype=np.int64)
        input_ids[:, -1] = size["vocab"] - 1
        images = rng.normal(size=(rows, 3, size["image"], size["image"])).astype(np.float32)
        return datasets.Dataset.from_dict({"pixel_values": images, "input_ids": input_ids}).with_format("torch")
    if model_name == "bert":
        labels = rng.integers(0, size["labels"], size=rows, dtype=np.int64)
    else:
        labels = input_ids.copy()
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels}).with_format("torch")


def layer_names(model_name: str, candidate: str, size: dict[str, int]) -> list[str] | None:
    """The candidate's mimic layers (None for plain)."""
    spec = MODELS[model_name]
    if candidate in (
        "mimic-head",
        "mimic-head-norec",
        "mimic-head-monitor",
        "mimic-head-tied",
        "mimic-head-nonfinite",
        "mimic-head-verdict",
        "mimic-head-refmodel",
        "mimic-select",
        "mimic-agra",
        "vmap",
        "vmap-layer",
    ):
        return [spec["head"]]
    if candidate in ("mimic-inner", "vmap-inner") and spec["inner"]:
        inner = spec["inner"] if isinstance(spec["inner"], tuple) else (spec["inner"],)
        return [name.format(last=size["layers"] - 1) for name in inner]
    if candidate == "mimic-lora":
        return ["lora"]
    return None


def lora_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ_ref = θ_0 + noise on every LoRA matrix (the trainable tensors of the PEFT model)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return {
        name: param.detach().float() + torch.randn(param.shape, generator=generator) * REFERENCE_NOISE
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def word_tokenizer(vocab: int):
    """SFTTrainer needs a tokenizer even for tokenized rows: one word per id (``t<i>``), id 0 padding, id 1 EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>"] + [f"t{i}" for i in range(2, vocab)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


def build_sft_trainer(
    candidate: str, model: torch.nn.Module, dataset: Any, size: dict[str, int], common: dict
) -> Trainer:
    """trl's SFTTrainer (``plain``) or MimicSFTTrainer (``mimic-lora``), fp32 and without activation checkpointing
    (trl's defaults turn both on), the same LoRA model and rows."""
    from trl import SFTConfig, SFTTrainer

    from hf_gradmimic.sft import MimicSFTConfig, MimicSFTTrainer

    settings = dict(common, bf16=False, gradient_checkpointing=False, max_length=size["seq"], dataset_num_proc=None)
    tokenizer = word_tokenizer(size["vocab"])
    if candidate == "plain":
        return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=dataset, processing_class=tokenizer)
    args = MimicSFTConfig(
        **settings,
        mimic_layers=["lora"],
        mimic_temperature=TEMPERATURE,
        mimic_alignment_check=False,
        **_monitor_setting(candidate),
    )
    return MimicSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, reference=lora_reference(model)
    )


def perturbed_reference(model: torch.nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """θ_ref = θ_0 + noise on the mimic layers' tensors, as a ``{name: tensor}`` dict."""
    generator = torch.Generator().manual_seed(SEED + 1)
    modules = dict(model.named_modules())
    reference = {}
    for layer in layers:
        for suffix in ("weight", "bias"):
            tensor = getattr(modules[layer], suffix, None)
            if tensor is not None:
                noise = torch.randn(tensor.shape, generator=generator) * REFERENCE_NOISE
                reference[f"{layer}.{suffix}"] = tensor.detach().float() + noise
    return reference


# ---------------------------------------------------------------------------------------------- per-sample-gradient baseline


class PerSampleGradTrainer(Trainer):
    """Grad-Mimic the way the authors' code computes it: materialised per-sample gradients.

    ``vmap(grad_and_value(ℓ_i))`` over all trainable parameters gives ``g_i`` for every sample;
    ``m_i = ⟨−g_i, v⟩/‖v‖`` on the mimic layer's tensors; ``w = softmax(m/τ)``; the update is
    ``Σ_i w_i g_i`` contracted from the per-sample gradients and written into ``p.grad``.
    """

    def __init__(self, *args: Any, reference: dict[str, torch.Tensor], temperature: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.temperature = temperature

    def training_step(self, model, inputs, num_items_in_batch=None):
        from torch.func import functional_call, grad_and_value, vmap

        model.train()
        inputs = self._prepare_inputs(inputs)
        params = {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
        buffers = dict(model.named_buffers())

        def sample_loss(params, buffers, sample):
            batch = {key: value.unsqueeze(0) for key, value in sample.items()}
            labels = batch.pop("labels")
            outputs = functional_call(model, (params, buffers), args=(), kwargs=batch)
            return per_sample_loss(model, outputs, labels)[0]

        per_sample_grads, losses = vmap(grad_and_value(sample_loss), in_dims=(None, None, 0), randomness="different")(
            params, buffers, inputs
        )
        inner = 0.0
        sq_norm = 0.0
        for name, reference in self.reference.items():
            direction = reference - params[name].float()
            inner = inner + per_sample_grads[name].flatten(1).float() @ direction.flatten()
            sq_norm = sq_norm + direction.square().sum()
        scores = -inner / torch.sqrt(sq_norm)
        weights = torch.softmax(scores / self.temperature, dim=0)
        for name, param in model.named_parameters():
            if name in per_sample_grads:
                weighted = torch.tensordot(weights.to(per_sample_grads[name].dtype), per_sample_grads[name], dims=1)
                param.grad = weighted if param.grad is None else param.grad + weighted
        del per_sample_grads
        self.last_scores = scores.detach()
        return losses.detach().mean()


class LayerPerSampleGradTrainer(Trainer):
    """The like-for-like per-sample-gradient baseline: what MimicTrainer computes, with materialised per-sample gradients.

    ``vmap(grad(ℓ_i))`` with respect to the mimic layer's tensors only gives ``g_i`` on those tensors; ``m_i =
    ⟨−g_i, v⟩/‖v‖``; ``w = softmax(m/τ)``; then one normal forward and backward of ``Σ_i w_i ℓ_i``.
    """

    def __init__(self, *args: Any, reference: dict[str, torch.Tensor], temperature: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from torch.func import functional_call, grad, vmap

        named = dict(model.named_parameters())
        chosen = {name: named[name].detach() for name in self.reference}

        def sample_loss(chosen, sample):
            batch = {key: value.unsqueeze(0) for key, value in sample.items()}
            labels = batch.pop("labels")
            return per_sample_loss(model, functional_call(model, chosen, args=(), kwargs=batch), labels)[0]

        per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different")(chosen, inputs)
        direction = {name: self.reference[name] - chosen[name].float() for name in chosen}
        norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
        scores = -sum(per_sample_grads[name].flatten(1).float() @ direction[name].flatten() for name in chosen) / norm
        del per_sample_grads
        weights = torch.softmax(scores / self.temperature, dim=0).detach()
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = (weights * per_sample_loss(model, outputs, inputs["labels"])).sum()
        return (loss, outputs) if return_outputs else loss


def overflow_on_token(model: torch.nn.Module, token_period: int = 32) -> None:
    """Makes every sample whose first token id is a multiple of ``token_period`` non-finite inside the model (its token
    embeddings overflow to inf), as a numerical blow-up on some content would: about one sample in 32."""
    embeddings = model.get_input_embeddings()

    def hook(module, args, output):
        bad = (args[0][:, 0] % token_period == 0)[:, None, None]
        return torch.where(bad, torch.full_like(output, float("inf")), output)

    embeddings.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------- measurement in a child


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class LiveHeapSampler(TrainerCallback):
    """Peak of the bytes glibc's malloc has handed out and not got back (``mallinfo2``: in use in the main arena
    plus every mmapped chunk), sampled every ~0.2 ms on a thread from ``on_train_begin`` to ``on_train_end``.

    Peak RSS also counts pages the allocator keeps after a free, so it moves by tens of MiB from run to run
    with heap fragmentation; this counts what tensors and Python objects hold. Used only in the separate
    ``--live-memory`` pass: the sampling thread takes GIL time, so those runs are not timed.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._mallinfo2 = getattr(libc, "mallinfo2", None)
        if self._mallinfo2 is not None:
            self._mallinfo2.restype = _MallInfo2
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._mallinfo2 is not None

    def _live_bytes(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._live_bytes())
            time.sleep(0.0002)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.available:
            gc.collect()
            self.baseline = self.peak = self._live_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def on_train_end(self, args, state, control, **kwargs):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20 if self.available else float("nan")


class Baton:
    """One token passed round-robin between the children of a group, so that exactly one computes a step.

    Child ``k`` waits for its token at ``on_step_begin`` and hands it to the next child still running at
    ``on_step_end``; a child that finishes or fails retires and passes on any token it holds.
    """

    def __init__(self, context: Any, size: int) -> None:
        self.size = size
        self.turns = [context.Semaphore(0) for _ in range(size)]
        self.done = context.Array("b", size)
        self.lock = context.Lock()

    def wait(self, index: int, timeout: float) -> bool:
        return self.turns[index].acquire(timeout=timeout)

    def pass_on(self, index: int) -> None:
        with self.lock:
            for offset in range(1, self.size + 1):
                other = (index + offset) % self.size
                if not self.done[other]:
                    self.turns[other].release()
                    return

    def retire(self, index: int, holding: bool) -> None:
        with self.lock:
            self.done[index] = 1
            if not holding:
                holding = self.turns[index].acquire(block=False)
        if holding:
            self.pass_on(index)


class LockstepTimer(TrainerCallback):
    """Times each optimizer step from ``on_step_begin`` (once this child holds the baton) to ``on_step_end``.

    Warm-up steps run without the baton, concurrently in all children of the group; at the first timed step
    the child tells the parent it is ready and waits for its turn. The baton is handed on at the start of the
    child's next step (after its between-step work), and after the last step when the child retires. Registered last, so the window holds the
    forward, backward, clipping, the optimizer step and every other callback's ``on_step_end`` (MimicTrainer's
    score recording). Data loading happens before ``on_step_begin`` and is not timed (it is the same for every
    candidate).
    """

    def __init__(
        self, baton: Baton | None, ready: Any, index: int, warmup: int, max_steps: int, wait_timeout: float
    ) -> None:
        self.baton, self.ready, self.index = baton, ready, index
        self.warmup, self.max_steps, self.wait_timeout = warmup, max_steps, wait_timeout
        self.holding = False
        self.unsynchronised = 0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    @staticmethod
    def _now() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.ready is not None:
            self.ready.release()  # warmed up: the parent starts the lockstep once every child is here
            self.ready = None
        if self.baton is not None and state.global_step >= self.warmup:
            if self.holding:
                # Hand the baton on only now, when this child's work between two steps (data loading, logging,
                # freeing the last step's tensors) is done: none of it can spill into the next child's timed step.
                self.holding = False
                self.baton.pass_on(self.index)
            self.holding = self.baton.wait(self.index, self.wait_timeout)
            self.unsynchronised += not self.holding
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.wall.append(now[0] - self._start[0])
        self.cpu.append(now[1] - self._start[1])


class PhaseProfiler(TrainerCallback):
    """torch.profiler over the timed steps (``--profile``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.profiler is None:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == state.max_steps:
            self.profiler.__exit__(None, None, None)


def _annotate(trainer: Trainer) -> None:
    """record_function ranges around the phases of a step, for the profile breakdown."""
    from torch.profiler import record_function

    def wrap(owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    wrap(trainer, "compute_loss", "phase: compute_loss")
    wrap(trainer.accelerator, "backward", "phase: backward")
    if isinstance(trainer, MimicTrainer):
        from hf_gradmimic.training.capture import Capture
        from hf_gradmimic.training.step import MimicStep

        # Class attributes (the step is built at the start of training): wrapped once per process.
        for owner, attribute, label in (
            (MimicStep, "forward", "mimic: forward, captured"),
            (MimicStep, "score", "mimic: forward and scores"),
            (Capture, "ghost_batch", "mimic: autograd.grad to layer outputs"),
        ):
            if not hasattr(getattr(owner, attribute), "__wrapped_for_bench__"):
                wrap(owner, attribute, label)
                getattr(owner, attribute).__wrapped_for_bench__ = True
        wrap(trainer.scorer, "score", "mimic: scores (ghost inner products)")
        wrap(trainer.step_softmax, "add", "mimic: step softmax (weights)")
        wrap(trainer.step_softmax, "finish", "mimic: end-of-step weights and metrics")
        wrap(trainer.score_log, "write", "mimic: end-of-step records")


def _monitor_setting(candidate: str) -> dict[str, int]:
    """The running alignment monitor (for a head: one matmul on the captured features) every step for
    ``mimic-head-monitor``; else every 10**9 steps, i.e. only at step 0 (a warm-up step), as the 50-step
    default also gives in a run this short."""
    if "mimic_monitor_steps" not in MimicConfig.__dataclass_fields__:
        return {}  # a MimicTrainer without the monitor
    return {"mimic_monitor_steps": 1 if candidate == "mimic-head-monitor" else 10**9}


def build_trainer(model_name: str, candidate: str, size: dict[str, int], total_steps: int) -> Trainer:
    model = build_model(model_name, size, tied=candidate == "mimic-head-tied")
    dataset = build_dataset(model_name, size, rows=size["batch"] * total_steps)
    layers = layer_names(model_name, candidate, size)
    output_dir = tempfile.mkdtemp(prefix=f"bench_overhead_{model_name}_{candidate}_")
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=size["batch"],
        max_steps=total_steps,
        learning_rate=1e-4,
        seed=SEED,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if model_name == "llama-lora":
        trainer = build_sft_trainer(candidate, model, dataset, size, common)
    elif candidate == "plain" and model_name == "clip":  # CLIPModel returns its loss only when asked
        from transformers import default_data_collator

        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=lambda features: {**default_data_collator(features), "return_loss": True},
        )
    elif candidate == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset)
    elif candidate.startswith("vmap"):
        trainer = (PerSampleGradTrainer if candidate == "vmap" else LayerPerSampleGradTrainer)(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            reference=perturbed_reference(model, layers),
            temperature=TEMPERATURE,
        )
    else:
        extra: dict[str, Any] = {}
        if candidate == "mimic-head-verdict":
            extra["mimic_log_reference_loss"] = "always"
        if candidate == "mimic-head-refmodel":
            extra["mimic_log_reference_loss"] = "reference_model"
        if candidate == "mimic-select":
            extra.update(mimic_scorer="grand", mimic_mode="select", mimic_select_ratio=SELECT_RATIO)
        if candidate == "mimic-agra":
            extra["mimic_scorer"] = "agra"
        args = MimicConfig(
            **common,
            mimic_layers=layers,
            mimic_temperature=TEMPERATURE,
            mimic_record_scores=candidate != "mimic-head-norec",
            mimic_alignment_check=False,
            **_monitor_setting(candidate),
            **extra,
        )
        if candidate == "mimic-head-nonfinite":
            overflow_on_token(model)
        trainer = MimicTrainer(
            model=model, args=args, train_dataset=dataset, reference=perturbed_reference(model, layers)
        )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no end-of-training log dict on stdout
    trainer.bench_layer = ", ".join(layers) if layers else None
    return trainer


def run_candidate(
    job: dict[str, Any], index: int = 0, baton: Baton | None = None, ready: Any = None, wait_timeout: float = 600
) -> dict[str, Any]:
    """Build, train ``warmup + steps`` steps in lockstep with the group, and measure (in a forked child)."""
    model_name, candidate, size = job["model_name"], job["candidate"], job["size"]
    steps, warmup = job["steps"], job["warmup"]
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    total_steps = warmup + steps
    trainer = build_trainer(model_name, candidate, size, total_steps)
    timer = LockstepTimer(baton, ready, index, warmup, total_steps, wait_timeout)
    profiler = None
    if job["profile"]:
        _annotate(trainer)
        profiler = PhaseProfiler(warmup)
        trainer.add_callback(profiler)
    live_heap = LiveHeapSampler() if job.get("live_memory") else None
    if live_heap is not None:
        trainer.add_callback(live_heap)
    trainer.add_callback(timer)  # last: its window covers the other callbacks' on_step_end work
    parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    gc.collect()
    exact_peak = _reset_peak_rss()
    rss_setup_kib = _proc_status()["VmRSS"]
    load_start = os.getloadavg()
    try:
        trainer.train()
    finally:
        if baton is not None:
            baton.retire(index, timer.holding)
            timer.holding = False
        # The run's scratch directory (its score log, nothing else): made by `build_trainer` for this run alone.
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    peak_kib = _proc_status()["VmHWM"] if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = timer.wall[warmup:], timer.cpu[warmup:]
    result = {
        "model": model_name,
        "candidate": candidate,
        "layer": trainer.bench_layer,
        "parameters": parameters,
        "step_times": wall,
        "step_cpu": cpu,
        "median_s": statistics.median(wall),
        "cpu_per_wall": sum(cpu) / max(sum(wall), 1e-12),
        "unsynchronised_steps": timer.unsynchronised,
        "peak_growth_mib": (peak_kib - rss_setup_kib) / 1024,
        "setup_rss_mib": rss_setup_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "peak_method": "VmHWM after clear_refs" if exact_peak else "ru_maxrss",
        "load_start": load_start,
        "load_end": os.getloadavg(),
    }
    if profiler is not None and profiler.profiler is not None:
        result["profile"] = _profile_summary(profiler.profiler, steps)
    if live_heap is not None:
        result["live_growth_mib"] = live_heap.growth_mib
    return result


def _profile_summary(prof: Any, steps: int) -> dict[str, Any]:
    """ms per step of the annotated phases (inclusive) and of every op (self time)."""
    averages = prof.key_averages()
    phase_prefixes = ("phase:", "mimic:", "Optimizer.step")
    phases = {e.key: e.cpu_time_total / 1000 / steps for e in averages if e.key.startswith(phase_prefixes)}
    ops = sorted(
        (
            (e.key, e.self_cpu_time_total / 1000 / steps, e.count / steps)
            for e in averages
            if not e.key.startswith(phase_prefixes + ("ProfilerStep", "Optimizer.zero_grad"))
        ),
        key=lambda item: -item[1],
    )
    return {"phases": phases, "ops": ops}


def _child(queue: Any, job: dict[str, Any], index: int, baton: Baton, ready: Any, wait_timeout: float) -> None:
    try:
        queue.put(run_candidate(job, index, baton, ready, wait_timeout))
    except BaseException as error:  # report any failure to the parent, and never hold up the group
        ready.release()
        baton.retire(index, holding=False)
        queue.put({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(), **job})


def run_group(jobs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Fork one child per job; they set up and warm up concurrently, then run their timed steps in lockstep."""
    context = mp.get_context("fork")
    baton = Baton(context, len(jobs))
    ready = context.Semaphore(0)
    queue = context.SimpleQueue()
    processes = [
        context.Process(target=_child, args=(queue, job, index, baton, ready, timeout), daemon=True)
        for index, job in enumerate(jobs)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout * 2
    for _ in jobs:  # every child has built its trainer and run its warm-up steps: start the lockstep
        while not ready.acquire(timeout=1.0):
            if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                break
    baton.turns[0].release()
    results: list[dict[str, Any]] = []
    while len(results) < len(jobs) and time.monotonic() < deadline:
        if not queue.empty():
            results.append(queue.get())
        elif not any(p.is_alive() for p in processes) and queue.empty():
            break
        else:
            time.sleep(0.05)
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    seen = {(r["model"] if "model" in r else r["model_name"], r["candidate"]) for r in results}
    for job in jobs:
        if (job["model_name"], job["candidate"]) not in seen:
            results.append({"error": "child died or timed out without a result", **job})
    return results


# ---------------------------------------------------------------------------------------------- parent: schedule and report


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th percentile), NaN for an empty list."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (float("nan"),) * 3
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q25), float(q50), float(q75)


def _paired(this: dict[str, Any], other: dict[str, Any], rounds: list[bool] | None = None) -> list[float]:
    """Per-round step-time ratios of two runs of one lockstep group (round j of both ran back to back),
    over the rounds flagged True in ``rounds`` (all when None)."""
    pairs = zip(this["step_times"], other["step_times"], rounds or [True] * len(this["step_times"]))
    return [a / b for a, b, keep in pairs if keep and b > 0]


def quiet_rounds(group: dict[str, dict[str, Any]]) -> list[bool]:
    """Rounds of a lockstep group in which every candidate's step got at least QUIET_CPU CPU-seconds per second."""
    runs = list(group.values())
    count = min(len(r["step_times"]) for r in runs)
    return [
        all(r.get("step_cpu", [0.0] * count)[j] >= QUIET_CPU * r["step_times"][j] for r in runs) for j in range(count)
    ]


def summarise(results: list[dict[str, Any]], models: list[str], candidates: dict[str, list[str]]) -> dict[str, Any]:
    """Step-time ratios from the rounds of each lockstep group (pooled over repeats); memory medians over repeats."""
    summary: dict[str, Any] = {}
    for model_name in models:
        runs = [r for r in results if r["model"] == model_name and "error" not in r]
        by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            by_repeat.setdefault(r["repeat"], {})[r["candidate"]] = r
        rows = {}
        for candidate in candidates[model_name]:
            mine = [r for r in runs if r["candidate"] == candidate]
            if not mine:
                continue
            time_all, time_quiet, vs_head, repeat_ratios = [], [], [], []
            mem_ratios, total_ratios = [], []
            quiet_count = total_count = 0
            for group in by_repeat.values():
                if candidate not in group:
                    continue
                this = group[candidate]
                quiet = quiet_rounds(group)
                quiet_count += sum(quiet)
                total_count += len(quiet)
                if "plain" in group:
                    plain = group["plain"]
                    time_all += _paired(this, plain)
                    time_quiet += _paired(this, plain, quiet)
                    repeat_ratios.append(this["median_s"] / plain["median_s"])
                    mem_ratios.append(this["peak_growth_mib"] / max(plain["peak_growth_mib"], 1e-9))
                    total_ratios.append(this["peak_rss_mib"] / plain["peak_rss_mib"])
                if "mimic-head" in group:
                    vs_head.append((_paired(this, group["mimic-head"]), _paired(this, group["mimic-head"], quiet)))
            use_quiet = quiet_count >= MIN_QUIET_ROUNDS

            def pick(pairs: list[tuple[list[float], list[float]]], use_quiet: bool = use_quiet) -> list[float]:
                return [x for all_rounds, quiet_only in pairs for x in (quiet_only if use_quiet else all_rounds)]

            q25, q50, q75 = _quantiles(time_quiet if use_quiet else time_all)
            rows[candidate] = {
                "layer": mine[0]["layer"],
                "runs": len(mine),
                "rounds": total_count,
                "quiet_rounds": quiet_count,
                "judged_on": "quiet rounds" if use_quiet else "all rounds",
                "median_ms": 1000 * _median([t for r in mine for t in r["step_times"]]),
                "min_ms": 1000 * min(r["median_s"] for r in mine),
                "max_ms": 1000 * max(r["median_s"] for r in mine),
                "time_ratio": q50,
                "time_ratio_q25": q25,
                "time_ratio_q75": q75,
                "time_ratio_all": _quantiles(time_all)[1],
                "time_ratio_of_medians": _median(repeat_ratios),
                "peak_growth_mib": _median([r["peak_growth_mib"] for r in mine]),
                "peak_rss_mib": _median([r["peak_rss_mib"] for r in mine]),
                "mem_ratio": _median(mem_ratios),
                "total_mem_ratio": _median(total_ratios),
                "vs_mimic_head": _quantiles(pick(vs_head))[1],
                "cpu_per_wall": _median([r["cpu_per_wall"] for r in mine]),
                "parameters": mine[0]["parameters"],
                "profile": next((r["profile"] for r in mine if "profile" in r), None),
            }
        summary[model_name] = rows
    return summary


def verdicts(summary: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, target, measured, met) for every target of issue #26."""
    checks = []
    for model_name, rows in summary.items():
        for candidate in TARGET_CASES:
            row = rows.get(candidate)
            if row:
                checks.append(
                    (
                        f"{model_name} {candidate} ({row['layer']}) step time",
                        f"≤ {TIME_TARGET:.2f}× plain",
                        f"{row['time_ratio']:.3f}×",
                        row["time_ratio"] <= TIME_TARGET,
                    )
                )
    for model_name, rows in summary.items():
        for candidate, row in rows.items():
            if candidate.startswith("mimic"):
                checks.append(
                    (
                        f"{model_name} {candidate} peak RSS growth",
                        f"≤ {MEMORY_TARGET:.2f}× plain",
                        f"{row['mem_ratio']:.3f}× (total RSS {row['total_mem_ratio']:.3f}×)",
                        row["mem_ratio"] <= MEMORY_TARGET,
                    )
                )
                if "live_ratio" in row:
                    checks.append(
                        (
                            f"{model_name} {candidate} peak live heap growth",
                            f"≤ {MEMORY_TARGET:.2f}× plain",
                            f"{row['live_ratio']:.3f}× ({row['live_growth_mib']:.0f} MiB)",
                            row["live_ratio"] <= MEMORY_TARGET,
                        )
                    )
        if "vmap" in rows and "mimic-head" in rows:
            ratio = rows["vmap"]["vs_mimic_head"]
            checks.append(
                (
                    f"{model_name} vmap baseline vs mimic-head",
                    f"≥ {VMAP_TARGET:.0f}× slower",
                    f"{ratio:.1f}×",
                    ratio >= VMAP_TARGET,
                )
            )
        verdict = rows.get("mimic-head-verdict")
        if verdict and "mimic-head" in rows:
            cost = verdict["vs_mimic_head"] - 1.0  # paired: the verdict's step over mimic-head's, minus 1
            checks.append(
                (
                    f"{model_name} the reference's verdict (mimic_log_reference_loss='always' − default)",
                    f"< {RECORD_TARGET:.0%} of step",
                    f"{cost:+.1%}",
                    cost < RECORD_TARGET,
                )
            )
        norec = rows.get("mimic-head-norec")
        if norec and "mimic-head" in rows:
            cost = 1.0 / norec["vs_mimic_head"] - 1.0  # paired: mimic-head step over mimic-head-norec step, minus 1
            checks.append(
                (
                    f"{model_name} score recording (record on − off)",
                    f"< {RECORD_TARGET:.0%} of step",
                    f"{cost:+.1%}",
                    cost < RECORD_TARGET,
                )
            )
    return checks


def source_line() -> str:
    """Which hf_gradmimic was measured: its path and git commit, flagged when hf_gradmimic/ has uncommitted changes."""
    import subprocess

    import hf_gradmimic

    package = Path(hf_gradmimic.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"hf_gradmimic {hf_gradmimic.__version__} from {package} (not a git checkout)"
    state = "with uncommitted changes in hf_gradmimic/" if dirty else "clean"
    return f"hf_gradmimic {hf_gradmimic.__version__} at commit {commit} ({state})"


def machine_line(loads: list[tuple[float, float, float]]) -> str:
    ones = [load[0] for load in loads]
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__} "
        f"({THREADS} threads per run), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; 1-min load average during the run: min {min(ones):.2f}, "
        f"median {statistics.median(ones):.2f}, max {max(ones):.2f} (the benchmark itself accounts for ~{THREADS})"
    )


def render(
    summary: dict[str, Any],
    args: argparse.Namespace,
    loads: list,
    sizes: dict[str, dict[str, int]],
    elapsed: float,
    errors: list[dict[str, Any]],
) -> str:
    lines = []
    add = lines.append
    add("# Performance: MimicTrainer overhead against plain `transformers.Trainer`")
    add("")
    add(
        f"Generated by `scripts/bench_overhead.py` ({'quick smoke sizes' if args.quick else 'full sizes'}) in {elapsed / 60:.1f} min."
    )
    add("")
    add(f"Reproduce: `{args.command}`")
    add("")
    add(f"Machine: {machine_line(loads)}.")
    add("")
    add(f"Library: {args.source}.")
    add("")
    add("## Set-up")
    add("")
    for model_name, size in sizes.items():
        if model_name == "bert":
            add(
                f"- **bert**: `BertForSequenceClassification` from a config (random init): hidden {size['hidden']}, "
                f"{size['layers']} layers, {size['heads']} heads, intermediate {size['intermediate']}, vocabulary "
                f"{size['vocab']}, {size['labels']} labels; sequence {size['seq']}, batch {size['batch']}. Head = `classifier`, "
                f"inner layer = `bert.encoder.layer.{size['layers'] - 1}.intermediate.dense`."
            )
        elif model_name == "clip":
            add(
                f"- **clip**: `CLIPModel` from a config (random init), both towers hidden {size['hidden']}, "
                f"{size['layers']} layers, {size['heads']} heads, intermediate {size['intermediate']}; images "
                f"{size['image']}×{size['image']} in {size['patch']}×{size['patch']} patches, captions of {size['seq']} "
                f"tokens (vocabulary {size['vocab']}), batch {size['batch']}. A batch-coupled loss: `plain` trains on "
                "CLIP's own loss (`return_loss=True`), MimicTrainer on its per-sample terms "
                "(`hf_gradmimic.contrastive`) and scores by directional derivatives, a double backward from the "
                f"mimic layer (`hf_gradmimic.training.coupled`). Head = `visual_projection`, inner layer = "
                f"`vision_model.encoder.layers.{size['layers'] - 1}.mlp.fc1` (Grad-Mimic's DataComp choice). No "
                "per-sample-gradient baseline: per-sample gradients of a coupled loss need one backward per sample."
            )
        elif model_name == "gpt2":
            add(
                f"- **gpt2**: `GPT2LMHeadModel` from a config (random init): n_embd {size['hidden']}, {size['layers']} layers, "
                f"{size['heads']} heads, vocabulary {size['vocab']}, `tie_word_embeddings=False`; sequence {size['seq']}, "
                f"batch {size['batch']}. Head = `lm_head` (untied, see below), inner layer = "
                f"`transformer.h.{size['layers'] - 1}.mlp.c_fc`, a transformers `Conv1D` (its own gradient rule, "
                "`hf_gradmimic.ghost`)."
            )
        else:
            add(
                f"- **llama-lora**: `LlamaForCausalLM` from a config (random init): hidden {size['hidden']}, "
                f"{size['layers']} layers, {size['heads']} heads, intermediate {size['intermediate']}, vocabulary "
                f"{size['vocab']}; LoRA rank {size['rank']} on the attention projections; sequence {size['seq']}, batch "
                f"{size['batch']}, prompt-completion rows (the loss on the completion). `plain` is trl's `SFTTrainer`, "
                "`mimic-lora` is `MimicSFTTrainer` with `mimic_layers=['lora']` (every LoRA matrix)."
            )
    add(
        f"- Full fine-tuning (every parameter trainable), the Trainer's default optimizer (AdamW, fused), lr 1e-4, "
        f"max_grad_norm 1.0, seed {SEED}, `use_cpu=True`, `torch.set_num_threads({THREADS})`, no logging, no saving, "
        "`dataloader_num_workers=0`. Synthetic random token ids, every position real (no padding, no attention mask)."
    )
    add(
        f"- MimicTrainer: `mimic_record_scores=True` (recording is part of the cost) except in `mimic-head-norec`, "
        f"τ = {TEMPERATURE}, `mimic_alignment_check=False` (it runs once, at step 1, one extra forward pair, and would "
        f"only pollute the warm-up), reference = the student's mimic-layer tensors + N(0, {REFERENCE_NOISE}²) noise as a "
        "`{name: tensor}` dict. The running alignment monitor (for a head mimic layer: the reference head applied to the "
        "captured features, one matmul and a loss; for other layers two extra no-grad forwards of the whole model) runs "
        "at step 0 only (a warm-up step), except in `mimic-head-monitor`, where it runs at every step "
        "(`mimic_monitor_steps=1`): that candidate's ratio to `mimic-head` is the cost of one monitor call."
    )
    add(
        "- `vmap`: per-sample gradients of **all** trainable parameters with `torch.func.vmap(grad_and_value(ℓ_i))` "
        '(dropout `randomness="different"`), m_i on the head\'s tensors, the same softmax(m/τ), and Σ_i w_i g_i '
        "contracted from the per-sample gradients, in a `Trainer` subclass overriding `training_step`. This is how "
        "the authors' code works, and it computes more than MimicTrainer does (per-sample gradients of every "
        "parameter); `vmap-layer` is the like-for-like baseline: per-sample gradients of the mimic layer's tensors "
        "only (`torch.func.vmap(grad(ℓ_i))` with respect to them), m_i and the weights from them, then one normal "
        "weighted forward and backward of Σ_i w_i ℓ_i."
    )
    add(
        "- `mimic-head-tied` (GPT-2): `tie_word_embeddings=True`, so the head's weight is also the token embedding and "
        "its per-sample gradient sums both uses: the score needs the gradient at the embedding's output too, a "
        "vector-Jacobian product back through the whole network. `mimic-head-nonfinite`: a hook on the token "
        "embeddings makes every sample whose first token id is a multiple of 32 overflow to inf (about one in 32); "
        "MimicTrainer leaves those samples out by running the micro-batch's forward again without them."
    )
    add(
        f"- Timing: {args.warmup} warm-up + {args.steps} timed optimizer steps per run; step time = from `on_step_begin` "
        "to `on_step_end` (forward, backward, clipping, optimizer step; the timing callback is registered last, so "
        "MimicTrainer's end-of-step records are included; data loading, identical for all, is not). Each (model, "
        "candidate) runs "
        f"{args.repeats}× (repeats). In a repeat every candidate of the model gets its own forked child; the children "
        "build their trainers and run the warm-up concurrently, then run their timed steps in lockstep: a baton "
        "passes round-robin so that exactly one child computes at a time, one step per turn, the candidate order "
        "shuffled every repeat. A child hands the baton on only when it is about to wait for its next turn, so its "
        "work between steps never overlaps another child's timed step. Load changes on the machine are thereby "
        "shared by all candidates of a round."
    )
    add(
        "- Memory: in each child, after the model, data and trainer are built, the peak-RSS mark is reset "
        "(`/proc/self/clear_refs` = 5) and VmRSS read; after training, VmHWM. **Peak RSS growth** = VmHWM − that "
        "baseline = what training adds (gradients, AdamW state, activations, autograd buffers, per-sample gradients). "
        "The memory ratio target is judged on this growth; the ratio of total process peak RSS (which includes "
        "~the interpreter, torch and the model) is shown in brackets."
    )
    if getattr(args, "live_memory", False):
        add(
            f"- Live heap: peak RSS also counts pages that malloc keeps after a free, so it moves by tens of MiB with "
            f"heap fragmentation. One more run per candidate ({min(args.warmup, LIVE_MEMORY_WARMUP)} warm-up + {LIVE_MEMORY_STEPS} steps, not "
            "timed) samples glibc's `mallinfo2()` (bytes in use in the main arena + every mmapped chunk) every ~0.2 ms "
            "on a thread; **peak live heap growth** = its maximum during training − its value at `on_train_begin`."
        )
    add("")
    add("## Results")
    add("")
    shown_candidates = [c for c in CANDIDATES if any(c in rows for rows in summary.values())]
    add("Candidates: " + "; ".join(f"`{c}` = {DESCRIPTIONS[c]}" for c in shown_candidates) + ".")
    add("")
    judged = {row["judged_on"] for rows in summary.values() for row in rows.values()}
    quiet = {m: next(iter(rows.values()))["quiet_rounds"] for m, rows in summary.items() if rows}
    total = {m: next(iter(rows.values()))["rounds"] for m, rows in summary.items() if rows}
    add(
        "| model | candidate | mimic layer | step ms: median (run medians min–max) | × plain: paired, median [IQR] "
        "| × plain: paired, all rounds | × plain: ratio of run medians | peak RSS growth MiB | × plain (total RSS ×) | CPU/wall |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model_name, rows in summary.items():
        for candidate, row in rows.items():
            ratio = f"**{row['time_ratio']:.2f}×** [{row['time_ratio_q25']:.2f}–{row['time_ratio_q75']:.2f}]"
            if candidate not in ("plain", "mimic-head") and math.isfinite(row["vs_mimic_head"]):
                ratio += f"; {row['vs_mimic_head']:.2f}× mimic-head"
            add(
                f"| {model_name} | {candidate} | {('`' + row['layer'] + '`') if row['layer'] else '—'} | "
                f"{row['median_ms']:.0f} ({row['min_ms']:.0f}–{row['max_ms']:.0f}) | {ratio} | {row['time_ratio_all']:.2f}× | "
                f"{row['time_ratio_of_medians']:.2f}× | {row['peak_growth_mib']:.0f} | "
                f"{row['mem_ratio']:.2f}× ({row['total_mem_ratio']:.2f}×) | {row['cpu_per_wall']:.2f} |"
            )
    live = {m: {c: row for c, row in rows.items() if "live_growth_mib" in row} for m, rows in summary.items()}
    if any(live.values()):
        add("")
        add("| model | candidate | peak live heap growth MiB | × plain |")
        add("| --- | --- | --- | --- |")
        for model_name, rows in live.items():
            for candidate, row in rows.items():
                add(
                    f"| {model_name} | {candidate} | {row['live_growth_mib']:.0f} | {row.get('live_ratio', float('nan')):.2f}× |"
                )
    add("")
    add(
        "How the ratios are formed. In every lockstep round each candidate ran one step, back to back, so a "
        "candidate's step and plain's step of the same round saw the same machine. *Paired* ratios are those "
        "per-round ratios pooled over the repeats (median and interquartile range). The bold figure, on which the "
        f"targets are judged, uses only the **quiet rounds**: rounds in which every step got at least {QUIET_CPU:.1f} "
        f"CPU-seconds per wall-second (of {THREADS} threads), i.e. no other process took a core from the benchmark "
        f"during that round; when a model has fewer than {MIN_QUIET_ROUNDS} of them it falls back to all rounds. "
        "Quiet rounds here: "
        + ", ".join(f"{m} {quiet[m]} of {total[m]}" for m in quiet)
        + f" (judged on: {', '.join(sorted(judged))}). "
        "The step-time column mixes quiet and loaded steps and is only indicative; *ratio of run medians* is, per "
        "repeat, the median step over plain's median step, then the median over repeats."
    )
    add("")
    add(
        "CPU/wall: process CPU seconds per wall second during the timed steps (median over runs); about "
        f"{THREADS} when the run had both cores to itself, lower when it was competing for them."
    )
    add("")
    add("## Targets (issue #26)")
    add("")
    add("| what | target | measured | met |")
    add("| --- | --- | --- | --- |")
    for what, target, measured, met in verdicts(summary):
        add(f"| {what} | {target} | {measured} | {'yes' if met else '**no**'} |")
    add("")
    for model_name, rows in summary.items():
        monitor = rows.get("mimic-head-monitor")
        if monitor and math.isfinite(monitor["vs_mimic_head"]):
            cost = monitor["vs_mimic_head"] - 1.0
            add(
                f"- {model_name}: one call of the running alignment monitor costs {cost:+.0%} of a mimic-head step; "
                f"amortised over its default interval (`logging_steps`, or 50 steps when logging is not by steps) "
                f"that is {cost / 50:+.1%} at 50 steps, {cost / 10:+.1%} at `logging_steps=10`."
            )
    add("")
    profiled = {m: {c: row["profile"] for c, row in rows.items() if row.get("profile")} for m, rows in summary.items()}
    if any(profiled.values()):
        add("## Profile (torch.profiler, CPU, ms per step)")
        add("")
        add(
            "One extra lockstep run per model with the profiler on over the timed steps (slower than the timed runs, "
            "and not used for the ratios). Phases are inclusive CPU times of `record_function` ranges the benchmark "
            "wraps around `compute_loss` (forward, per-sample losses and the mimic extras), `accelerator.backward` "
            "and MimicTrainer's internal steps; ops are self CPU times."
        )
        add("")
        for model_name, profiles in profiled.items():
            if not profiles:
                continue
            names = list(profiles)
            phase_keys = sorted(
                {k for prof in profiles.values() for k in prof["phases"]},
                key=lambda k: (not k.startswith("phase"), not k.startswith("Optimizer"), k),
            )
            add(f"**{model_name}** — phases, ms/step")
            add("")
            add("| phase | " + " | ".join(names) + " |")
            add("| --- |" + " --- |" * len(names))
            for key in phase_keys:
                add(f"| {key} | " + " | ".join(f"{profiles[n]['phases'].get(key, 0.0):.1f}" for n in names) + " |")
            add("")
            plain_ops = {name: ms for name, ms, _ in profiles.get("plain", {"ops": []})["ops"]}
            for candidate in names:
                if candidate == "plain" or "plain" not in profiles:
                    continue
                ops = profiles[candidate]["ops"]
                extra = sorted(
                    ((name, ms - plain_ops.get(name, 0.0), ms, calls) for name, ms, calls in ops),
                    key=lambda item: -item[1],
                )
                add(f"**{model_name} / {candidate}** — ops with the most extra self time against plain, ms/step")
                add("")
                add("| op | extra | total | calls/step |")
                add("| --- | --- | --- | --- |")
                for name, delta, ms, calls in extra[:8]:
                    add(f"| `{name}` | {delta:+.1f} | {ms:.1f} | {calls:.0f} |")
                add("")
    add("## Notes")
    add("")
    add(
        "- GPT-2 ties `lm_head.weight` to `transformer.wte.weight` by default. MimicTrainer scores a shared tensor "
        "over every use (the `lm_head` product and the embedding lookup); the tied case is the `mimic-head-tied` "
        "candidate. The other candidates untie the head (`tie_word_embeddings=False`), so that the vmap baseline "
        "computes the same per-parameter score."
    )
    add(
        "- The Parquet shards of the score log are written on a background thread and, at these sizes, only at "
        "`on_train_end` (the buffer holds 262,144 rows): the recording cost on the step path is MimicTrainer's "
        "end of step (`StepSoftmax.finish` and `ScoreLog.write`: device-to-host copies, weights, metrics, handing arrays to the writer)."
    )
    if errors:
        add("")
        add("## Failed runs")
        add("")
        for error in errors:
            add(f"- {error['model_name']} / {error['candidate']}: {error['error']}")
    add("")
    return "\n".join(lines)


def print_table(summary: dict[str, Any]) -> None:
    header = (
        f"{'model':5} {'candidate':17} {'step ms':>9} {'×plain':>7} {'IQR':>11} {'×(medians)':>10} "
        f"{'peakΔ MiB':>10} {'mem×':>6} {'tot×':>6} {'cpu/wall':>8}"
    )
    print(header)
    print("-" * len(header))
    for model_name, rows in summary.items():
        for candidate, row in rows.items():
            print(
                f"{model_name:5} {candidate:17} {row['median_ms']:9.1f} {row['time_ratio']:7.2f} "
                f"{row['time_ratio_q25']:5.2f}–{row['time_ratio_q75']:<5.2f} {row['time_ratio_of_medians']:10.2f} {row['peak_growth_mib']:10.1f} "
                f"{row['mem_ratio']:6.2f} {row['total_mem_ratio']:6.2f} {row['cpu_per_wall']:8.2f}"
            )
    print()
    for what, target, measured, met in verdicts(summary):
        print(f"{'OK  ' if met else 'MISS'} {what}: {measured} (target {target})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 16; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per run (default 3; quick 1)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="round-robin repeats per candidate (default 3; quick 1)"
    )
    parser.add_argument(
        "--models", default="bert,gpt2,llama-lora,clip", help="comma-separated subset of: " + ",".join(MODELS)
    )
    parser.add_argument(
        "--candidates",
        default=",".join(c for c in CANDIDATES if c not in OPT_IN),
        help="comma-separated subset of: " + ",".join(CANDIDATES) + f" (default: all but {', '.join(OPT_IN)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and few steps: a smoke run in seconds; writes no file unless --output is given",
    )
    parser.add_argument(
        "--output", default=None, help="Markdown report (default docs/performance.md; none with --quick)"
    )
    parser.add_argument("--json", default=None, help="also write the raw per-run results as JSON here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run plain and the MimicTrainer candidates once more under torch.profiler and add a per-phase/op breakdown",
    )
    parser.add_argument(
        "--live-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one more untimed run per candidate that samples malloc's live bytes (mallinfo2) for a peak free of allocator noise (default: on, off with --quick)",
    )
    parser.add_argument(
        "--from-json", default=None, help="do not run: re-render the report from a file written by --json"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a size of every model, e.g. --set batch=4 --set seq=64 (a smaller run on a busy machine)",
    )
    args = parser.parse_args(argv)
    args.size_overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"--set takes KEY=INTEGER (a size such as batch=4); got {item!r}")
        args.size_overrides[key] = int(value)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 16)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.live_memory = (not args.quick) if args.live_memory is None else args.live_memory
    if args.output is None and not args.quick:
        args.output = str(REPO / "docs" / "performance.md")
    args.models_list = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.models_list:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    args.candidates_list = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for name in args.candidates_list:
        if name not in CANDIDATES:
            parser.error(f"unknown candidate {name!r}; choose from {CANDIDATES}")
    if "plain" not in args.candidates_list:
        parser.error("the `plain` candidate is the baseline of every ratio and cannot be left out")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    given = list(argv if argv is not None else sys.argv[1:])
    shown = ["python", "scripts/bench_overhead.py"]
    skip = False
    for part in given:  # where the files go is not part of how to reproduce the figures
        if skip:
            skip = False
        elif part in ("--json", "--output", "--from-json"):
            skip = True
        elif not part.startswith(("--json=", "--output=", "--from-json=")):
            shown.append(part)
    args.command = " ".join(shlex.quote(part) for part in shown)
    return args


def run_all(
    args: argparse.Namespace, sizes: dict[str, dict[str, int]], candidates: dict[str, list[str]], loads: list
) -> tuple[list, list]:
    """Every (model, repeat) group in lockstep, then the profile groups; returns (results, errors)."""
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    def run(jobs: list[dict[str, Any]], repeat: int, label: str) -> None:
        for result in run_group(jobs, args.timeout):
            loads.append(os.getloadavg())
            if "error" in result:
                errors.append(result)
                print(
                    f"[{label} {result['candidate']}] FAILED: {result['error']}\n{result.get('traceback', '')}",
                    flush=True,
                )
                continue
            result["repeat"] = repeat
            results.append(result)
            line = (
                f"[{label} {result['candidate']:16}] median {1000 * result['median_s']:8.1f} ms/step  "
                f"peakΔ {result['peak_growth_mib']:7.1f} MiB  cpu/wall {result['cpu_per_wall']:.2f}  "
                f"load {result['load_start'][0]:.2f}→{result['load_end'][0]:.2f}"
            )
            if result["unsynchronised_steps"]:
                line += f"  ({result['unsynchronised_steps']} steps ran without the baton)"
            print(line, flush=True)
            if "live_growth_mib" in result:
                print(f"    peak live heap growth {result['live_growth_mib']:.1f} MiB", flush=True)
            if "profile" in result:
                phases = sorted(result["profile"]["phases"].items(), key=lambda kv: -kv[1])
                print("    profile: " + ", ".join(f"{k} {v:.1f} ms" for k, v in phases), flush=True)

    for model_name in args.models_list:
        order = candidates[model_name]
        for repeat in range(args.repeats):
            # A new order every repeat, so that no candidate always follows the same one (a rotation would keep
            # every candidate's predecessor).
            rotated = list(order)
            if repeat:
                random.Random(SEED + repeat).shuffle(rotated)
            jobs = [
                dict(
                    model_name=model_name,
                    candidate=c,
                    size=sizes[model_name],
                    steps=args.steps,
                    warmup=args.warmup,
                    profile=False,
                )
                for c in rotated
            ]
            run(jobs, repeat, f"{model_name} r{repeat}")
        if args.profile:
            # Kept out of the ratios (repeat −1): the profiler slows every step down.
            jobs = [
                dict(
                    model_name=model_name,
                    candidate=c,
                    size=sizes[model_name],
                    steps=args.steps,
                    warmup=args.warmup,
                    profile=True,
                )
                for c in order
                if not c.startswith("vmap")
            ]
            run(jobs, -1, f"{model_name} profile")
        if args.live_memory:
            jobs = [
                dict(
                    model_name=model_name,
                    candidate=c,
                    size=sizes[model_name],
                    steps=LIVE_MEMORY_STEPS,
                    warmup=min(args.warmup, LIVE_MEMORY_WARMUP),
                    profile=False,
                    live_memory=True,
                )
                for c in order
            ]
            run(jobs, LIVE_MEMORY_REPEAT, f"{model_name} live heap")
    return results, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    loads = [os.getloadavg()]
    saved = json.loads(Path(args.from_json).read_text()) if args.from_json else None
    if saved is not None:
        for key in ("command", "steps", "warmup", "repeats", "quick", "models_list", "candidates_list"):
            setattr(args, key, saved["args"][key])
        args.source = saved["args"].get("source", "unknown")
        args.size_overrides = saved["args"].get("size_overrides", {})
    else:
        args.source = source_line()
    size_key = "quick" if args.quick else "full"
    sizes = {m: {**MODELS[m][size_key], **getattr(args, "size_overrides", {})} for m in args.models_list}
    candidates = {
        m: [c for c in args.candidates_list if m in ONLY_FOR.get(c, (m,)) and c in MODELS[m].get("candidates", (c,))]
        for m in args.models_list
    }
    print(f"# bench_overhead: {args.command}")
    print(
        f"# {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, load {os.getloadavg()}",
        flush=True,
    )
    if saved is not None:
        results, errors, loads, elapsed = saved["results"], saved["errors"], saved["loads"], saved["elapsed"]
    else:
        results, errors = run_all(args, sizes, candidates, loads)
        loads.append(os.getloadavg())
        elapsed = time.perf_counter() - started
    timed = [r for r in results if r["repeat"] >= 0]
    summary = summarise(timed, args.models_list, candidates)
    for r in results:
        row = summary.get(r["model"], {}).get(r["candidate"])
        if row is not None and "profile" in r:
            row["profile"] = r["profile"]
        if row is not None and "live_growth_mib" in r:
            row["live_growth_mib"] = r["live_growth_mib"]
    for rows in summary.values():
        plain_live = rows.get("plain", {}).get("live_growth_mib")
        for row in rows.values():
            if plain_live and "live_growth_mib" in row:
                row["live_ratio"] = row["live_growth_mib"] / plain_live
    print()
    print_table(summary)
    print(f"\n# load average samples (1 min): {[round(load[0], 2) for load in loads]}; elapsed {elapsed:.1f} s")
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = render(summary, args, loads, sizes, elapsed, errors)
        old = path.read_text() if path.exists() else ""
        if ANALYSIS_MARKER in old:  # keep the hand-written analysis that follows the marker
            text += "\n" + old[old.index(ANALYSIS_MARKER) :]
        path.write_text(text)
        print(f"# wrote {path}")
    if args.json and saved is None:
        saved = {"args": vars(args), "results": results, "errors": errors, "loads": loads, "elapsed": elapsed}
        Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
