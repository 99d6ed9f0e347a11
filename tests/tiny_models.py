"""Tiny models and a per-sample-gradient oracle (torch.func) for the trainer tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class TinyMLP(nn.Module):
    """2-D inputs: ``head(dropout(tanh(hidden(x))))``, dropout 0 unless given."""

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 16,
        classes: int = 4,
        bias: bool = True,
        seed: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(in_dim, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes, bias=bias)
        self.dropout = dropout

    def forward(self, x, labels=None):
        logits = self.head(F.dropout(torch.tanh(self.hidden(x)), self.dropout, self.training))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TinySeq(nn.Module):
    """3-D inputs with padding: token embeddings → ``proj`` per token → masked mean pool → ``head``."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 12, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = torch.tanh(self.proj(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        logits = self.head(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mlp_dataset(n: int = 32, in_dim: int = 8, classes: int = 4, seed: int = 0):
    import datasets

    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {"x": rng.normal(size=(n, in_dim)).astype(np.float32), "labels": rng.integers(0, classes, size=n)}
    ).with_format("torch")


def seq_dataset(n: int = 16, length: int = 7, vocab: int = 20, classes: int = 3, seed: int = 0):
    import datasets

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, length))
    lengths = rng.integers(2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # pad id 0 past each sample's length
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, classes, size=n)}
    ).with_format("torch")


def tiny_gpt2(dropout: float = 0.1, tied: bool = False):
    """A causal LM from a config (random init), with an untied ``lm_head`` unless ``tied``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=40,
        n_positions=12,
        tie_word_embeddings=tied,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0):
    """A Llama causal LM from a config (random init): RMSNorm, rotary attention, gated MLP, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lora_student(dropout: float = 0.0, random_b: bool = False, task_type: str | None = "CAUSAL_LM"):
    """`tiny_llama` with LoRA (r=4, alpha=8) on q_proj and v_proj. PEFT starts B at zero (``random_b=False``): then
    A's per-sample gradients, Bᵀδaᵀ, are zero too, so a test with B = 0 alone would not see A's terms."""
    import peft

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=dropout,
        init_lora_weights=not random_b,
        **({"task_type": task_type} if task_type else {}),
    )
    model = tiny_llama()
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def lora_names(model: nn.Module) -> list[str]:
    """The trainable tensors of a LoRA model: its A and B matrices."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def lm_dataset(n=16, length=9, vocab=40, seed=0):
    import datasets

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, length))
    labels = ids.copy()
    labels[::3, 6:] = -100  # some samples with fewer label tokens
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).with_format("torch")


def per_sample_grads(model: nn.Module, dataset, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the cross entropy for ``param_names``, by vmap of grad (the oracle)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    columns = [c for c in dataset.column_names if c != "labels"]
    batch = {c: torch.as_tensor(np.asarray(dataset[c])) for c in columns}
    labels = torch.as_tensor(np.asarray(dataset["labels"]))

    def loss_of(chosen, example, label):
        merged = {**params, **chosen}
        inputs = {c: example[c].unsqueeze(0) for c in columns}
        logits = torch.func.functional_call(model, merged, args=(), kwargs=inputs).logits
        return F.cross_entropy(logits, label.unsqueeze(0))

    chosen = {name: params[name] for name in param_names}
    return torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(chosen, batch, labels)


def oracle_mimic_scores(model: nn.Module, dataset, reference: dict[str, torch.Tensor]) -> np.ndarray:
    """m_i = ⟨−g_i, θ_ref − θ⟩ / ‖θ_ref − θ‖ from materialised per-sample gradients (classification)."""
    return oracle_scores_from_grads(per_sample_grads(model, dataset, list(reference)), model, reference)


def per_sample_lm_grads(model: nn.Module, dataset, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a causal LM's mean token loss (labels shifted, -100 ignored), by vmap of grad.

    A tied tensor is passed once, under one of its names: ``functional_call`` ties its other uses to it."""
    params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    ids = torch.as_tensor(np.asarray(dataset["input_ids"]))
    labels = torch.as_tensor(np.asarray(dataset["labels"]))

    def loss_of(chosen, sample_ids, sample_labels):
        # Only the chosen tensors are replaced; the others stay the module's own (detached by grad's closure).
        logits = torch.func.functional_call(model, chosen, args=(), kwargs={"input_ids": sample_ids[None]}).logits
        return F.cross_entropy(logits[0, :-1], sample_labels[1:], ignore_index=-100)

    was_training = model.training
    model.eval()  # no dropout: the oracle and the trainer must see the same function
    try:
        return torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(
            {n: params[n] for n in param_names}, ids, labels
        )
    finally:
        model.train(was_training)


def oracle_scores_from_grads(
    grads: dict[str, torch.Tensor], model: nn.Module, reference: dict[str, torch.Tensor]
) -> np.ndarray:
    """m_i = ⟨−g_i, θ_ref − θ⟩ / ‖θ_ref − θ‖ from materialised per-sample gradients ``grads``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    direction = {n: reference[n] - params[n].detach() for n in reference}
    norm = torch.sqrt(sum(v.square().sum() for v in direction.values()))
    inner = sum((grads[n] * direction[n]).flatten(1).sum(1) for n in reference)
    return (-inner / norm).detach().double().numpy()
