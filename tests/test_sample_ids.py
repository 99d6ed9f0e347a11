"""Bad input, the sample ids (`hf_gradmimic.training.dataset`): duplicated, missing or non-scalar ids are refused at
construction naming the column and the rows; an id column never reaches the model; an empty training set is refused."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradmimic import MimicTrainer, load_scores

from bad_input import config, head_reference
from tiny_models import (
    TinyMLP,
    mlp_dataset,
)


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (["a", "b", "a", "c"] * 4, ValueError, r"'uid'.*duplicated id\(s\), e.g. \['a'"),
        ([[i, i] for i in range(16)], TypeError, r"'uid'.*non-scalar values \(List"),
        ([f"s{i}" for i in range(15)] + [None], ValueError, r"'uid'.*1 missing id\(s\).*rows \[15\]"),
        ([float(i) for i in range(15)] + [float("nan")], ValueError, r"'uid'.*1 missing id\(s\).*rows \[15\]"),
    ],
)
def test_bad_sample_ids_are_refused_at_construction(tmp_path, ids, error, message):
    data = mlp_dataset(n=16).add_column("uid", ids)
    model = TinyMLP()
    with pytest.raises(error, match=message):
        MimicTrainer(
            model=model,
            args=config(tmp_path, mimic_layers=["head"], mimic_id_column="uid"),
            train_dataset=data,
            reference=head_reference(model),
        )


class KwargsRecorder(TinyMLP):
    seen: set = set()

    def forward(self, x, labels=None, **kwargs):
        KwargsRecorder.seen.update(kwargs)
        return super().forward(x, labels)


def test_a_numeric_id_column_never_reaches_the_model(tmp_path):
    data = mlp_dataset(n=16).add_column("uid", list(range(100, 116)))
    model = KwargsRecorder()
    args = config(tmp_path, mimic_layers=["head"], mimic_id_column="uid", remove_unused_columns=False)
    MimicTrainer(model=model, args=args, train_dataset=data, reference=head_reference(model)).train()
    assert "uid" not in KwargsRecorder.seen
    assert sorted(load_scores(tmp_path)["sample_id"]) == list(range(100, 116))


def test_an_empty_train_dataset_is_refused_in_our_words(tmp_path):
    model = TinyMLP()
    with pytest.raises(ValueError, match="train_dataset is empty"):
        MimicTrainer(
            model=model,
            args=config(tmp_path, mimic_layers=["head"]),
            train_dataset=mlp_dataset(n=16).select([]),
            reference=head_reference(model),
        )


def test_an_earlier_trainers_row_index_column_is_kept_only_while_it_holds_the_row_positions(tmp_path):
    """An earlier MimicTrainer's ``train_dataset`` (with its ``mimic_row_index`` column) trains as it is, recorded by
    row; shuffled, its column no longer names rows, and it is refused at construction naming the column."""
    model = TinyMLP()
    first = MimicTrainer(
        model=model,
        args=config(tmp_path / "a", mimic_layers=["head"]),
        train_dataset=mlp_dataset(n=16),
        reference=head_reference(model),
    )
    wrapped = first.train_dataset
    assert "mimic_row_index" in wrapped.column_names
    MimicTrainer(
        model=model,
        args=config(tmp_path / "b", mimic_layers=["head"]),
        train_dataset=wrapped,
        reference=head_reference(model),
    ).train()
    assert sorted(load_scores(tmp_path / "b").to_pandas().sample_id) == list(range(16))
    with pytest.raises(ValueError, match=r"'mimic_row_index' column whose values are not its row positions 0\.\.15"):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "c", mimic_layers=["head"]),
            train_dataset=wrapped.shuffle(seed=0),
            reference=head_reference(model),
        )


def test_examples_from_a_transform_or_as_batch_encodings_keep_their_row_and_tuples_are_refused_early(tmp_path):
    """A `with_transform` dataset (only what the transform returns reaches the batch) and a torch dataset of
    `BatchEncoding` examples (a mapping, not a dict) train like the plain dataset of the same rows: same records by
    row, same parameters. Examples that are not mappings are refused at construction."""
    import torch
    from transformers import BatchEncoding

    plain = mlp_dataset(n=16)
    raw = plain.with_format(None).rename_columns({"x": "raw_x", "labels": "raw_labels"})
    transformed = raw.with_transform(
        lambda batch: {"x": torch.tensor(batch["raw_x"]), "labels": torch.tensor(batch["raw_labels"])}
    )

    class Encodings(torch.utils.data.Dataset):
        def __len__(self):
            return len(plain)

        def __getitem__(self, index):
            return BatchEncoding(dict(plain[index]))

    def train(name, data, **settings):
        model = TinyMLP()
        args = config(tmp_path / name, mimic_layers=["head"], per_device_train_batch_size=8, max_steps=2, **settings)
        MimicTrainer(model=model, args=args, train_dataset=data, reference=head_reference(model)).train()
        return load_scores(tmp_path / name).to_pandas().sort_values(["global_step", "sample_id"]), model

    expected, expected_model = train("plain", plain)
    for name, data, settings in (
        ("transform", transformed, {"remove_unused_columns": False}),
        ("encodings", Encodings(), {}),
    ):
        got, model = train(name, data, **settings)
        np.testing.assert_array_equal(got.sample_id, expected.sample_id)
        np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-6)
        for param, other in zip(model.parameters(), expected_model.parameters()):
            torch.testing.assert_close(param, other)

    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return plain[index]["x"], plain[index]["labels"]

    model = TinyMLP()
    with pytest.raises(TypeError, match="examples that are mappings.*got tuple at row 0"):
        MimicTrainer(
            model=model,
            args=config(tmp_path / "t", mimic_layers=["head"]),
            train_dataset=Tuples(),
            reference=head_reference(model),
        )
