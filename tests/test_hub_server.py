"""Contract tests of the loopback Hub (hf_gradmimic.testing.hub_server) through the real clients.

Every call below goes through unmodified huggingface_hub / datasets / transformers code and real
HTTP to the server started by the ``hub_server`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch
from huggingface_hub import DatasetCard, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_gradmimic.testing.hub_server import DEFAULT_USER, HubServer


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    return BertModel(config).eval()


def _resolve_gets(server: HubServer) -> list[str]:
    return [path for method, path in server.requests if method == "GET" and "/resolve/" in path]


@pytest.mark.timeout(120)
def test_whoami_and_bad_token(hub_server: HubServer) -> None:
    assert HfApi().whoami()["name"] == DEFAULT_USER

    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="hf_wrong").whoami()
    assert excinfo.value.response.status_code == 401


@pytest.mark.timeout(120)
def test_model_round_trip_and_pinned_revision(hub_server: HubServer, tmp_path: Path) -> None:
    from transformers import AutoModel

    model = _tiny_bert()
    model.save_pretrained(tmp_path / "model")
    api = HfApi()
    repo_id = api.create_repo("tiny-bert").repo_id
    assert repo_id == f"{DEFAULT_USER}/tiny-bert"
    first = api.upload_folder(folder_path=tmp_path / "model", repo_id=repo_id)

    # Weights go through the LFS batch API and are listed as LFS files; config.json is inline.
    (weights,) = api.get_paths_info(repo_id, ["model.safetensors"])
    assert weights.lfs is not None and weights.lfs.sha256
    assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in hub_server.requests)
    assert api.get_paths_info(repo_id, ["config.json"])[0].lfs is None

    snapshot = Path(snapshot_download(repo_id))
    assert (snapshot / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()
    loaded = AutoModel.from_pretrained(repo_id)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    original_config = json.loads((tmp_path / "model" / "config.json").read_text())
    second = api.upload_file(path_or_fileobj=b'{"changed": true}', path_in_repo="config.json", repo_id=repo_id)
    assert second.oid != first.oid and len(second.oid) == 40
    assert json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text()) == {"changed": True}
    pinned = hf_hub_download(repo_id, "config.json", revision=first.oid)
    assert json.loads(Path(pinned).read_text()) == original_config
    assert api.model_info(repo_id, revision=first.oid).sha == first.oid
    assert [b.target_commit for b in api.list_repo_refs(repo_id).branches] == [second.oid]


@pytest.mark.timeout(120)
def test_sharded_checkpoint_downloads_only_requested_files(hub_server: HubServer, tmp_path: Path) -> None:
    model = _tiny_bert()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 2
    api = HfApi()
    repo_id = api.create_repo("tiny-bert-sharded").repo_id
    api.upload_folder(folder_path=tmp_path / "sharded", repo_id=repo_id)
    tree = {f.path for f in api.list_repo_tree(repo_id, recursive=True)}
    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= tree

    hub_server.requests.clear()
    index = json.loads(Path(hf_hub_download(repo_id, "model.safetensors.index.json")).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    hf_hub_download(repo_id, shards[0])
    fetched = sorted(path.rsplit("/", 1)[-1] for path in _resolve_gets(hub_server))
    assert fetched == sorted(["model.safetensors.index.json", shards[0]])

    local = (tmp_path / "sharded" / shards[0]).read_bytes()
    response = requests.get(f"{hub_server.url}/{repo_id}/resolve/main/{shards[0]}", headers={"Range": "bytes=8-23"})
    assert response.status_code == 206
    assert response.content == local[8:24]
    assert response.headers["Content-Range"] == f"bytes 8-23/{len(local)}"
    assert response.headers["X-Linked-Size"] == str(len(local))


@pytest.mark.timeout(120)
def test_dataset_push_and_load(hub_server: HubServer) -> None:
    from datasets import Dataset, load_dataset

    repo_id = f"{DEFAULT_USER}/tiny-dataset"
    rows = {"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}
    Dataset.from_dict(rows).push_to_hub(repo_id)
    assert load_dataset(repo_id, split="train").to_dict() == rows
    parquet = [
        f for f in HfApi().list_repo_tree(repo_id, repo_type="dataset", recursive=True) if f.path.endswith(".parquet")
    ]
    assert parquet and all(f.lfs is not None for f in parquet)

    Dataset.from_dict(rows).filter(lambda row: row["label"] == 0).push_to_hub(repo_id, config_name="filtered")
    assert load_dataset(repo_id, "filtered", split="train").to_dict() == {"text": ["a", "c"], "label": [0, 0]}

    before = HfApi().dataset_info(repo_id).sha
    more = {"text": rows["text"] + ["e"], "label": rows["label"] + [0]}
    Dataset.from_dict(more).push_to_hub(repo_id)
    assert HfApi().dataset_info(repo_id).sha != before
    assert load_dataset(repo_id, split="train").to_dict() == more
    assert load_dataset(repo_id, "filtered", split="train").num_rows == 2


@pytest.mark.timeout(120)
def test_dataset_card_round_trip(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("carded", repo_type="dataset").repo_id
    card = DatasetCard("---\nlicense: mit\npretty_name: Carded\n---\n\n# Carded\n\nA tiny card.\n")
    card.push_to_hub(repo_id)
    loaded = DatasetCard.load(repo_id)
    assert loaded.data.license == "mit" and loaded.data.pretty_name == "Carded"
    assert "A tiny card." in loaded.text

    # The server validates README metadata like the Hub does: a YAML list is refused.
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\n- not a mapping\n---\n",
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type="dataset",
        )


@pytest.mark.timeout(120)
def test_not_found_errors(hub_server: HubServer) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(f"{DEFAULT_USER}/missing")

    repo_id = api.create_repo("present").repo_id
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=repo_id)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "absent.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "hello.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)

    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)


@pytest.mark.timeout(120)
def test_injected_commit_failure(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("flaky").repo_id
    hub_server.fail_next(r"/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"one", path_in_repo="one.txt", repo_id=repo_id)
    assert excinfo.value.response.status_code == 500
    assert [f.path for f in api.list_repo_tree(repo_id)] == [".gitattributes"]

    # The fault is used up: the same upload now goes through.
    api.upload_file(path_or_fileobj=b"one", path_in_repo="one.txt", repo_id=repo_id)
    assert Path(hf_hub_download(repo_id, "one.txt")).read_bytes() == b"one"


@pytest.mark.timeout(60)
def test_create_repo_exist_ok_returns_the_existing_repo(hub_server):
    from huggingface_hub import HfApi

    api = HfApi()
    first = api.create_repo("again", repo_type="dataset")
    second = api.create_repo("again", repo_type="dataset", exist_ok=True)
    assert second.repo_id == first.repo_id
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="409|already"):
        api.create_repo("again", repo_type="dataset")
