"""One behaviour run with both `transformers.Trainer` and `MimicTrainer` (τ = 1e6, a reference for the model's head),
for the drop-in tests: the models, data and arguments they share, and the comparisons of parameters and logs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_gradmimic import MimicConfig, MimicTrainer

from sgd_args import SGD_ARGS

PLAIN = {**SGD_ARGS, "learning_rate": 0.1}


def lm_reference(model, scale: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = model.lm_head.weight.detach()
    return {"lm_head.weight": weight + scale * torch.randn(weight.shape, generator=generator)}


def assert_same_parameters(expected, got, atol=1e-6):
    for (name, p_expected), (_, p_got) in zip(expected.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(p_got, p_expected, atol=atol, rtol=0, msg=name)


class RegressionModel(nn.Module):
    """transformers' tests/trainer RegressionModel (y = a·x + b, MSE) with its scalars held by an ``nn.Linear`` head,
    so that the head can be a mimic layer."""

    def __init__(self, a: float = 0.0, b: float = 0.0):
        super().__init__()
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.head.weight.fill_(a)
            self.head.bias.fill_(b)

    def forward(self, input_x, labels=None):
        y = self.head(input_x.unsqueeze(-1)).squeeze(-1)
        if labels is None:
            return (y,)
        return (nn.functional.mse_loss(y, labels), y)


def regression_dataset(n: int = 64, seed: int = 42, nan_rows: tuple[int, ...] = ()):
    """transformers' RegressionDataset: y = 2x + 3 + noise."""
    import datasets

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    y = (2.0 * x + 3.0 + rng.normal(scale=0.1, size=n)).astype(np.float32)
    x[list(nan_rows)] = np.nan
    return datasets.Dataset.from_dict({"input_x": x, "labels": y}).with_format("torch")


# The regression head's mimic scores are of order 10, so at τ = 1e6 the weights are uniform to about 1e-5 of
# themselves, and the parameters agree to a few 1e-6 after several steps of learning rate 0.1.
ADAPTER_ATOL = 2e-5


def head_reference(model) -> dict[str, torch.Tensor]:
    return {"head.weight": model.head.weight.detach() + 2.0, "head.bias": model.head.bias.detach() + 3.0}


def both_trainers(tmp_path, model_factory=RegressionModel, name: str = "", **kwargs) -> tuple[Trainer, MimicTrainer]:
    """A `Trainer` and a `MimicTrainer` (τ = 1e6, a reference for the head) built from the same arguments."""
    arguments = {**PLAIN, "per_device_train_batch_size": 8, "max_steps": 4, **kwargs.pop("args", {})}
    trainers = []
    for kind in ("plain", "mimic"):
        output_dir = str(tmp_path / f"{kind}{name}")
        model = model_factory() if "model_init" not in kwargs else None
        if kind == "plain":
            trainers.append(Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **arguments), **kwargs))
        else:
            config = MimicConfig(output_dir=output_dir, mimic_layers=["head"], mimic_temperature=1e6, **arguments)
            reference = head_reference(model if model is not None else model_factory())
            trainers.append(MimicTrainer(model=model, args=config, reference=reference, **kwargs))
    return trainers[0], trainers[1]


def trainer_logs(trainer) -> list[dict[str, float]]:
    """The log history without MimicTrainer's own ``mimic/*`` keys and without timings."""
    timing = ("runtime", "per_second", "total_flos")
    return [
        {k: v for k, v in entry.items() if not k.startswith("mimic/") and not any(t in k for t in timing)}
        for entry in trainer.state.log_history
    ]


def assert_same_logs(plain, mimic, atol=1e-5):
    expected, got = trainer_logs(plain), trainer_logs(mimic)
    assert [sorted(entry) for entry in got] == [sorted(entry) for entry in expected]
    for want, have in zip(expected, got):
        for key in want:
            np.testing.assert_allclose(have[key], want[key], atol=atol, rtol=1e-5, err_msg=key)
