"""The CLIP-score baseline: the scorer inside MimicTrainer, the scores over a dataset, the cut and its votes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from test_trainer import COMMON

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.clip_filter import clip_score_filter, clip_scores, load_clip_scores, save_clip_scores
from hf_gradmimic.scorers import clip_score_of

from stream_data import as_stream
from tiny_dual_encoders import CLIP_LAYERS, pair_batch, pair_dataset, tiny_clip, tiny_siglip


def test_the_score_is_the_cosine_of_the_image_and_caption_embeddings():
    model = tiny_siglip().eval()
    batch = pair_batch(5)
    with torch.no_grad():
        images = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        texts = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    expected = F.cosine_similarity(images, texts, dim=-1)
    torch.testing.assert_close(clip_score_of(model, {**batch, "uid": ["a"] * 5}), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs the images and the captions.*\['pixel_values'\]"):
        clip_score_of(model, {"input_ids": batch["input_ids"]})


def test_the_scorer_filters_each_batch_by_the_references_cosine(tmp_path):
    """mimic_scorer='clip_score' on a CLIP student (a batch-coupled loss): the logged score of each sample is its
    cosine under the reference, as `clip_scores` computes it over the dataset, and each step keeps the top quarter."""
    reference, student = tiny_clip(seed=1), tiny_clip(seed=0)
    data = pair_dataset(32)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=CLIP_LAYERS["vision"],
        mimic_scorer="clip_score",
        mimic_select_ratio=0.25,
        per_device_train_batch_size=16,
        max_steps=2,
        **COMMON,
    )
    trainer = MimicTrainer(model=student, args=args, train_dataset=data, reference=reference)
    assert trainer.mode == "select" and trainer.batch_coupled
    trainer.train()
    records = load_scores(tmp_path).to_pandas()
    expected = dict(zip(*clip_scores(reference, data).to_pydict().values()))
    np.testing.assert_allclose(records.mimic_score, [expected[i] for i in records.sample_id], rtol=1e-5, atol=1e-6)
    for _, step in records.groupby("global_step"):
        kept = step[step.weight > 0]
        assert len(kept) == 4 and kept.mimic_score.min() >= step[step.weight == 0].mimic_score.max()
    # The student as its own reference was frozen with it, and failed at the first backward: refused, unfrozen.
    with pytest.raises(ValueError, match="got the student itself as `reference=`"):
        MimicTrainer(model=student, args=args, train_dataset=data, reference=student)
    assert all(param.requires_grad for param in student.parameters())


def test_scores_of_a_stream_by_id_saved_next_to_the_score_log_and_cut(tmp_path):
    reference = tiny_clip(seed=1)
    data = pair_dataset(20)
    by_row = clip_scores(reference, data, batch_size=6)
    by_id = clip_scores(reference, as_stream(data, shards=2), id_column="id", batch_size=6)
    assert by_row.column("sample_id").to_pylist() == list(range(20))
    np.testing.assert_allclose(
        sorted(by_id.column("clip_score").to_numpy()), sorted(by_row.column("clip_score").to_numpy()), rtol=1e-6
    )
    save_clip_scores(by_id, tmp_path)
    loaded = load_clip_scores(tmp_path)
    assert loaded.equals(by_id)

    values = by_row.column("clip_score").to_numpy()
    top = clip_score_filter(by_row, topk=25)
    assert top.keep.sum() == 5 and set(top.kept_ids) == set(np.argsort(-values)[:5])
    cut = clip_score_filter(by_row, threshold=float(np.median(values)))
    np.testing.assert_array_equal(cut.keep, values > np.median(values))
    votes = cut.votes()
    assert votes.column_names == ["sample_id", "vote"] and votes.column("vote").type == pa.int8()
    np.testing.assert_array_equal(votes.column("vote").to_numpy(), cut.keep.astype(np.int8))
    kept_rows = top.apply(data)
    assert len(kept_rows) == 5
    torch.testing.assert_close(kept_rows["input_ids"], data.select(sorted(top.kept_ids))["input_ids"])
    metrics = top.evaluate(np.isin(np.arange(20), top.kept_ids))  # flags that agree with the cut
    assert metrics["discard_f1"] == 1.0 and metrics["keep_roc_auc"] == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of `topk`"),
        ({"topk": 10, "threshold": 0.1}, "exactly one of `topk`"),
        ({"topk": 0}, r"percentage in \(0, 100\]"),
    ],
)
def test_a_cut_without_one_clear_rule_is_refused(kwargs, message):
    table = pa.table({"sample_id": [0, 1], "clip_score": pa.array([0.1, 0.2], pa.float32())})
    with pytest.raises(ValueError, match=message):
        clip_score_filter(table, **kwargs)


def test_missing_scores_and_a_stream_without_ids_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No CLIP scores at"):
        load_clip_scores(tmp_path)
    with pytest.raises(ValueError, match="pass `id_column`"):
        clip_scores(tiny_clip(), as_stream(pair_dataset(4)))
