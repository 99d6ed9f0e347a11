"""Bad input, provenance (`hf_gradmimic.training.score_log.run_provenance`, `hf_gradmimic.filter`, `hf_gradmimic.cards`):
the score log records its run, the filter and the dataset card carry it, and a filter refuses a reordered dataset."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradmimic import MimicTrainer, load_scores

from bad_input import config, head_reference
from tiny_models import (
    TinyMLP,
    mlp_dataset,
)


def _scored_run(tmp_path, **overrides):
    """A 2-epoch run on a 32-row dataset with a clean-flag column the trainer keeps from the model."""
    from hf_gradmimic import build_filter

    data = mlp_dataset(n=32).add_column("is_clean", [i % 3 != 0 for i in range(32)])
    model = TinyMLP()
    reference = head_reference(model)
    args = config(tmp_path, mimic_layers=["head"], per_device_train_batch_size=8, max_steps=8, **overrides)
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    return data, reference, build_filter(tmp_path, method="threshold", aggregate="majority")


def test_the_score_log_records_its_provenance_and_the_filter_carries_it(tmp_path):
    import hashlib
    import json

    import hf_gradmimic

    _, reference, mimic_filter = _scored_run(tmp_path, mimic_temperature=0.25)
    recorded = json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    digest = hashlib.sha256()
    for name in sorted(reference):  # the hash of the reference tensors, computed here
        digest.update(name.encode())
        digest.update(reference[name].float().contiguous().numpy().tobytes())
    assert recorded["scorer"] == {
        "name": "mimic",
        "mode": "reweight",
        "score_terms": "full",
        "reference": {"source": "dict", "revision": None, "tensors_sha256": digest.hexdigest()},
    }
    assert recorded["mimic_layers"] == {"head": "head"} and recorded["temperature"] == 0.25
    assert recorded["hf_gradmimic_version"] == hf_gradmimic.__version__
    assert recorded["student"]["class"] == "TinyMLP"
    assert recorded["sample_ids"]["column"] is None and recorded["sample_ids"]["train_rows"] == 32
    assert mimic_filter.summary["provenance"] == recorded
    assert mimic_filter.rebuild(method="kmeans").summary["provenance"] == recorded


def test_provenance_travels_with_load_scores_to_the_filter_and_its_card(tmp_path):
    import json

    import datasets

    from hf_gradmimic import build_filter
    from hf_gradmimic.cards import dataset_card_data, render_dataset_card

    _, _, from_folder = _scored_run(tmp_path)
    recorded = json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    scores = load_scores(tmp_path)
    routes = {
        "load_scores": scores,
        "shuffled": scores.shuffle(seed=1),
        "selected": scores.select(range(len(scores) - 4)),
        "saved and reloaded": (
            scores.save_to_disk(str(tmp_path / "saved")),
            datasets.load_from_disk(str(tmp_path / "saved")),
        )[1],
    }
    for route, log in routes.items():
        built = build_filter(log, method="threshold", aggregate="majority")
        assert built.summary["provenance"] == recorded == from_folder.summary["provenance"], route
    # Arrow and pandas carry no dataset info: no provenance rather than a wrong one.
    assert build_filter(scores.to_pandas(), method="threshold", aggregate="majority").summary["provenance"] is None
    # Two runs' logs concatenated hold two provenances: none is picked, and the warning says why.
    other = datasets.Dataset(
        scores.data.table,
        info=datasets.DatasetInfo(
            description=json.dumps({"hf_gradmimic.provenance": {**recorded, "temperature": 9.0}})
        ),
    )
    with pytest.warns(UserWarning, match=r"provenance of several runs"):
        mixed = build_filter(datasets.concatenate_datasets([scores, other]), method="threshold", aggregate="majority")
    assert mixed.summary["provenance"] is None
    # The card of a filter built from load_scores names the reference by the hash the trainer recorded.
    loaded = build_filter(scores, method="threshold", aggregate="majority")
    card = render_dataset_card(
        dataset_card_data(None, "me/scored"),
        repo_id="me/scored",
        split="train",
        mimic_filter=loaded,
        num_rows=32,
        num_kept=int(loaded.keep.sum()),
        has_filtered=True,
    )
    assert f"sha256 `{recorded['scorer']['reference']['tensors_sha256'][:16]}…`" in card.text


def test_apply_refuses_a_reordered_dataset_and_accepts_the_same_rows_in_another_format(tmp_path):
    data, _, mimic_filter = _scored_run(tmp_path)
    kept = mimic_filter.apply(data)
    np.testing.assert_array_equal(
        np.asarray(kept["x"]), np.asarray(data["x"])[np.sort(mimic_filter.sample_ids[mimic_filter.keep])]
    )
    # The same rows in another format, without a column, or as pandas: accepted, and the same rows kept.
    for same in (data.with_format(None), data.remove_columns(["is_clean"]), data.with_format(None).to_pandas()):
        assert len(mimic_filter.apply(same)) == len(kept)
    for reordered in (data.shuffle(seed=1), data.with_format(None).to_pandas().sample(frac=1.0, random_state=1)):
        with pytest.raises(
            ValueError, match=r"row indices of the training set \(32 rows\).*rows differ.*check_dataset=False"
        ):
            mimic_filter.apply(reordered)
    assert len(mimic_filter.apply(data.shuffle(seed=1), check_dataset=False)) == len(kept)  # the user's call


def test_the_dataset_card_names_the_reference_without_the_caller_repeating_it(tmp_path):
    from hf_gradmimic.cards import dataset_card_data, render_dataset_card

    _, _, mimic_filter = _scored_run(tmp_path)
    card = render_dataset_card(
        dataset_card_data(None, "me/scored"),
        repo_id="me/scored",
        split="train",
        mimic_filter=mimic_filter,
        num_rows=32,
        num_kept=int(mimic_filter.keep.sum()),
        has_filtered=True,
    )
    sha = mimic_filter.summary["provenance"]["scorer"]["reference"]["tensors_sha256"]
    assert f"sha256 `{sha[:16]}…`" in card.text
    assert "| temperature τ | 0.5 |" in card.text and "| mimic layers | `head` |" in card.text
    assert "| scorer | `mimic` (reweight, score terms: full) |" in card.text


def test_card_prose_written_by_hand_is_kept_and_our_section_updated_in_place():
    from hf_gradmimic.cards import CARD_SECTION_END, CARD_SECTION_START, merge_card_text

    hand = "# My dataset\n\nCollected by hand in 2026; see the paper.\n"
    first = merge_card_text(hand, "## Grad-Mimic\nfirst push")
    assert first.startswith(hand.rstrip()) and "first push" in first and first.count(CARD_SECTION_START) == 1
    edited = first + "\nA note the owner added later.\n"
    second = merge_card_text(edited, "## Grad-Mimic\nsecond push")
    assert "Collected by hand in 2026" in second and "A note the owner added later." in second
    assert "second push" in second and "first push" not in second
    assert second.count(CARD_SECTION_START) == 1 and second.count(CARD_SECTION_END) == 1
    assert merge_card_text(None, "only ours").strip() == f"{CARD_SECTION_START}\nonly ours\n{CARD_SECTION_END}"
