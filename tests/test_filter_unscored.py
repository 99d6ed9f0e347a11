"""Rows the trainer never trained on (`hf_gradmimic.filter.result.MimicFilter.apply`): the refusal says why and how
to proceed, and ``unscored="keep"`` / ``"drop"`` keep or drop them."""

from __future__ import annotations

import pytest

from hf_gradmimic import MimicConfig, MimicTrainer, build_filter

from tiny_models import TinyMLP, mlp_dataset


@pytest.mark.parametrize("id_column", [None, "uid"])
def test_unscored_rows_are_explained_and_kept_or_dropped_on_request(tmp_path, id_column):
    data = mlp_dataset(n=32).add_column("uid", [f"u{i:02d}" for i in range(32)])
    model = TinyMLP()
    reference = {n: p.detach() + 0.5 for n, p in model.named_parameters() if n.startswith("head.")}
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        max_steps=3,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        mimic_alignment_check=False,
        mimic_id_column=id_column,
        seed=0,
    )
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()  # 24 of 32 rows trained on
    mimic_filter = build_filter(tmp_path, method="threshold", aggregate="majority")
    ids = list(data["uid"]) if id_column else list(range(32))  # sample_id -> row
    scored = {ids.index(v) for v in mimic_filter.sample_ids.tolist()}
    kept = {ids.index(v) for v in mimic_filter.sample_ids[mimic_filter.keep].tolist()}
    assert len(scored) == 24
    with pytest.raises(
        ValueError,
        match=r"8 row\(s\) of the dataset have no score .*the trainer never trained on them.*"
        r"MimicSFTTrainer.*unscored='keep'.*unscored='drop'",
    ):
        mimic_filter.apply(data, id_column=id_column)
    unscored = set(range(32)) - scored
    for policy, expected in (("keep", kept | unscored), ("drop", kept)):
        out = mimic_filter.apply(data, id_column=id_column, unscored=policy)
        assert sorted(int(uid[1:]) for uid in out["uid"]) == sorted(expected)  # uid u<row>
    with pytest.raises(ValueError, match=r"unscored must be one of \('error', 'keep', 'drop'\)"):
        mimic_filter.apply(data, id_column=id_column, unscored="ignore")


def test_a_row_that_mimic_sft_trainer_dropped_is_explained_and_kept_on_request(tmp_path):
    """As reported: trl drops a row whose prompt fills max_length; apply() on the training set then names why."""
    pytest.importorskip("trl")
    import datasets
    from test_sft import TRAIN, pairs, student, word_tokenizer
    from test_trainer import perturbed_reference

    from hf_gradmimic.sft import MimicSFTConfig, MimicSFTTrainer

    from tiny_models import lora_names

    tokenizer, model = word_tokenizer(), student()
    rows = pairs(8)
    rows.insert(3, {"prompt": " ".join(["w1"] * 20), "completion": " w2"})  # longer than max_length: dropped
    data = datasets.Dataset.from_list(rows)
    args = MimicSFTConfig(
        output_dir=str(tmp_path),
        max_length=12,
        per_device_train_batch_size=8,
        max_steps=1,
        mimic_layers=["lora"],
        **TRAIN,
    )
    MimicSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        reference=perturbed_reference(model, lora_names(model), scale=0.1),
    ).train()
    mimic_filter = build_filter(tmp_path, method="threshold", aggregate="majority")
    assert 3 not in mimic_filter.sample_ids.tolist()
    with pytest.raises(
        ValueError, match=r"1 row\(s\) of the dataset have no score \(e.g. rows \[3\]\).*MimicSFTTrainer"
    ):
        mimic_filter.apply(data)
    kept = mimic_filter.apply(data, unscored="keep")
    expected = sorted([*mimic_filter.sample_ids[mimic_filter.keep].tolist(), 3])
    assert list(kept["prompt"]) == [rows[i]["prompt"] for i in expected]
