"""Applying a filter to a streamed dataset and pushing it (issue 19, item 3): `MimicFilter.apply` on a
`datasets.IterableDataset` and `push_scored_dataset` over sharded Parquet, against the in-memory path on the
same rows; the Hub is the loopback server with the real clients."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_filter import make_log

import hf_gradmimic.hub as hub
from hf_gradmimic.filter import FilterWarning, build_filter
from hf_gradmimic.hub import push_scored_dataset


@pytest.fixture(scope="module")
def scored():
    """A filter over 1200 samples and their dataset (text, label, uid), in memory."""
    import datasets

    table, _ = make_log(n=1200, epochs=3, batch=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        mimic_filter = build_filter(table, method="threshold")
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict(
        {
            "text": [f"row {i}" for i in range(1200)],
            "label": rng.integers(0, 3, 1200).tolist(),
            "uid": [int(i) for i in range(1200)],
        }
    )
    return mimic_filter, data


def parquet_shards(data, folder: Path, rows: int = 250) -> list[str]:
    folder.mkdir(parents=True)
    files = []
    for start in range(0, len(data), rows):
        path = folder / f"part-{start // rows:05d}.parquet"
        pq.write_table(data.select(range(start, min(len(data), start + rows))).with_format("arrow")[:], path)
        files.append(str(path))
    return files


def streamed(files: list[str]):
    import datasets

    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)


def test_apply_on_an_iterable_dataset_keeps_the_same_rows_lazily(scored, tmp_path):
    import datasets

    mimic_filter, data = scored
    stream = streamed(parquet_shards(data, tmp_path / "shards"))
    kept = mimic_filter.apply(stream)
    assert isinstance(kept, datasets.IterableDataset)
    expected = mimic_filter.apply(data)
    assert [row["text"] for row in kept] == expected["text"]
    # By an id column too (here in a shuffled order of the shards: ids, not positions, decide).
    reordered = streamed(parquet_shards(data.shuffle(seed=1), tmp_path / "shuffled"))
    kept_by_id = mimic_filter.apply(reordered, id_column="uid")
    keep_of = dict(zip(mimic_filter.sample_ids.tolist(), mimic_filter.keep.tolist()))
    expected_ids = [uid for uid in data.shuffle(seed=1)["uid"] if keep_of[uid]]
    assert [row["uid"] for row in kept_by_id] == expected_ids


def test_apply_on_a_stream_names_an_unscored_row(scored, tmp_path):
    import datasets

    mimic_filter, data = scored
    extra = datasets.concatenate_datasets(
        [data, datasets.Dataset.from_dict({"text": ["new"], "label": [0], "uid": [99999]})]
    )
    stream = streamed(parquet_shards(extra, tmp_path / "shards"))
    with pytest.raises(ValueError, match=r"1 streamed row\(s\) have no score \(e.g. uid= \[99999\]\)"):
        list(mimic_filter.apply(stream, id_column="uid"))
    with pytest.raises(ValueError, match=r"have no score \(e.g. rows \[1200\]\)"):
        list(mimic_filter.apply(streamed(parquet_shards(extra, tmp_path / "by_index"))))


def test_a_stream_read_in_parts_is_matched_by_id_column_or_refused(scored, tmp_path):
    """Each DataLoader worker of several, and each node of `split_dataset_by_node`, counts its own shards' rows from 0:
    matched by row index they would get other rows' decisions (a 4-shard stream read by 2 workers kept 1200 rows,
    hundreds of them the wrong ones). By index they are refused; by ``id_column`` they keep the filter's rows."""
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader

    mimic_filter, data = scored
    stream = streamed(parquet_shards(data, tmp_path / "shards"))  # 5 shards of 250 rows
    expected = sorted(mimic_filter.kept_ids.tolist())
    with pytest.raises(ValueError, match="several DataLoader workers.*Pass id_column="):
        list(DataLoader(mimic_filter.apply(stream), batch_size=None, num_workers=2))
    with pytest.raises(ValueError, match=r"split by node \(split_dataset_by_node\).*Pass id_column="):
        mimic_filter.apply(split_dataset_by_node(stream, rank=0, world_size=2))
    by_workers = DataLoader(mimic_filter.apply(stream, id_column="uid"), batch_size=None, num_workers=2)
    assert sorted(int(row["uid"]) for row in by_workers) == expected
    by_nodes = [split_dataset_by_node(stream, rank=rank, world_size=5) for rank in range(5)]
    assert sorted(row["uid"] for node in by_nodes for row in mimic_filter.apply(node, id_column="uid")) == expected


def test_a_stream_matched_by_id_column_refuses_ids_of_another_kind_and_reads_tensor_ids(scored, tmp_path):
    """As on a `datasets.Dataset`: the text id '00040' never matches the score log's integer 40; ids formatted as
    tensors (``with_format("torch")``) are read as their values."""
    mimic_filter, data = scored
    as_text = data.remove_columns("uid").add_column("uid", [f"{uid:05d}" for uid in data["uid"]])
    with pytest.raises(ValueError, match="'uid' holds string ids, the score log's sample_id int64"):
        list(mimic_filter.apply(as_text.to_iterable_dataset(), id_column="uid"))
    as_tensors = data.with_format("torch").to_iterable_dataset(num_shards=3)
    kept = [int(row["uid"]) for row in mimic_filter.apply(as_tensors, id_column="uid")]
    assert kept == sorted(mimic_filter.kept_ids.tolist())


def test_push_streams_sharded_parquet_and_uploads_shard_by_shard(hub_server, scored, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import HfApi

    mimic_filter, data = scored
    stream = streamed(parquet_shards(data, tmp_path / "shards"))
    monkeypatch.setattr(hub, "STREAM_SHARD_ROWS", 300)  # 4 shards of scored rows
    uploads: list[int] = []
    real_preupload = HfApi.preupload_lfs_files

    def counting_preupload(self, *args, **kwargs):  # a spy: the real client call still runs
        uploads.append(len(list((tmp_path / "local").parent.glob(".local.*.tmp/default/train/*.parquet"))))
        return real_preupload(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "preupload_lfs_files", counting_preupload)
    result = push_scored_dataset(stream, mimic_filter, "user/streamed", local_dir=tmp_path / "local")
    # Uploaded as written: each shard (default, then filtered) while only the shards before it existed
    # locally; create_commit's own call comes last.
    assert uploads[:8] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert result.num_rows == 1200 and result.num_kept == int(mimic_filter.keep.sum())
    files = HfApi().list_repo_files("user/streamed", repo_type="dataset")
    assert sorted(f for f in files if f.startswith("default/")) == [f"default/train/{i:05d}.parquet" for i in range(4)]
    # The real datasets client reads both configs back; they equal the in-memory push's rows.
    default = datasets.load_dataset("user/streamed", "default", split="train")
    filtered = datasets.load_dataset("user/streamed", "filtered", split="train")
    assert default["text"] == data["text"]
    np.testing.assert_array_equal(np.asarray(default["mimic_keep"]), mimic_filter.keep)
    assert filtered["text"] == mimic_filter.apply(data)["text"]
    readme = Path(HfApi().hf_hub_download("user/streamed", "README.md", repo_type="dataset")).read_text()
    assert "grad-mimic" in readme and "filtered/train/*.parquet" in readme
    # The local copy holds the same shards.
    local = pq.read_table(tmp_path / "local" / "default" / "train")
    assert local.num_rows == 1200


def test_a_streamed_split_joins_the_repos_other_splits_and_card_and_embeds_its_images(hub_server, scored, tmp_path):
    """A repo holding a ``train`` split (pushed in memory) and prose written by hand gets a ``validation`` split by
    streaming: `load_dataset` reads both splits of both configs and the prose stays (before, the card named the
    streamed split alone, and the prose was gone). Images given as local files travel as their bytes, as `datasets`
    pushes them: they read back after the files are removed (before, their paths were pushed)."""
    import shutil

    import datasets
    from huggingface_hub import HfApi
    from PIL import Image

    mimic_filter, data = scored
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for row in range(len(data)):
        paths.append(str(folder / f"{row}.png"))
        Image.fromarray(np.full((2, 2, 3), row % 250, np.uint8)).save(paths[-1])
    data = data.add_column("image", paths).cast_column("image", datasets.Image())
    push_scored_dataset(data, mimic_filter, "user/splits", id_column="uid", local_dir=tmp_path / "train")
    api = HfApi()
    readme = Path(api.hf_hub_download("user/splits", "README.md", repo_type="dataset")).read_text()
    api.upload_file(
        path_or_fileobj=(readme + "\nHand-written notes that must stay.\n").encode(),
        path_in_repo="README.md",
        repo_id="user/splits",
        repo_type="dataset",
    )
    stream = data.to_iterable_dataset(num_shards=3)
    push_scored_dataset(
        stream, mimic_filter, "user/splits", id_column="uid", split="validation", local_dir=tmp_path / "validation"
    )
    shutil.rmtree(folder)
    for config, rows in (("default", len(data)), ("filtered", int(mimic_filter.keep.sum()))):
        loaded = datasets.load_dataset("user/splits", config)
        assert {name: split.num_rows for name, split in loaded.items()} == {"train": rows, "validation": rows}
        validation = loaded["validation"]
        assert validation["uid"] == loaded["train"]["uid"]
        pixels = [int(np.asarray(image)[0, 0, 0]) for image in validation["image"][:5]]
        assert pixels == [uid % 250 for uid in validation["uid"][:5]]
    readme = Path(api.hf_hub_download("user/splits", "README.md", repo_type="dataset")).read_text()
    assert "Hand-written notes that must stay." in readme
