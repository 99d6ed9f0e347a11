"""Streams for the tests: the MLP data as a `datasets.IterableDataset` or a torch IterableDataset of dicts, with ids."""

from __future__ import annotations

import torch

from tiny_models import mlp_dataset


def string_id(row: int) -> str:
    return f"sample-{row * 7919 % 1000:03d}-é"  # not in row order, and not ASCII


def int_id(row: int) -> int:
    return 10_000 + row * 7919 % 1000


def mlp_rows(n: int, ids: str = "int") -> list[dict]:
    """``n`` examples of `tiny_models.mlp_dataset` as dicts of tensors, each with an ``id`` (``ids``: "int" or "str")."""
    data = mlp_dataset(n=n)
    make_id = string_id if ids == "str" else int_id
    return [{"x": data[i]["x"], "labels": data[i]["labels"], "id": make_id(i)} for i in range(n)]


def as_stream(data, ids: str = "str", shards: int = 1):
    """A map-style `datasets.Dataset` as a `datasets.IterableDataset` in row order (``shards`` shards, torch-formatted)
    with an ``id`` column (``ids``: "int" or "str")."""
    make_id = string_id if ids == "str" else int_id
    data = data.with_format(None).add_column("id", [make_id(i) for i in range(len(data))])
    return data.to_iterable_dataset(num_shards=shards).with_format("torch")


def mlp_stream(n: int = 64, ids: str = "int", shards: int = 1):
    """The MLP data as a stream (`as_stream`)."""
    return as_stream(mlp_dataset(n=n), ids, shards)


class TorchStream(torch.utils.data.IterableDataset):
    """A torch IterableDataset of dicts that splits itself between dataloader workers (every k-th example)."""

    def __init__(self, n: int = 64, ids: str = "int") -> None:
        self.rows = mlp_rows(n, ids)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for row in self.rows[start::step]:
            yield dict(row)


def offline_losses(model, rows: list[dict]) -> dict:
    """Each example's cross entropy under ``model`` as it is, by id."""
    with torch.no_grad():
        logits = model(torch.stack([row["x"] for row in rows])).logits
        losses = torch.nn.functional.cross_entropy(
            logits, torch.stack([row["labels"] for row in rows]), reduction="none"
        )
    return {row["id"]: float(loss) for row, loss in zip(rows, losses)}
