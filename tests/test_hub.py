"""hf_gradmimic.hub through the real clients, against the loopback Hub (tests/conftest.py `hub_server`).

Every Hub call goes through unmodified huggingface_hub / datasets / transformers code and real
HTTP. The filter comes from a real (tiny, ~3 s) MimicTrainer run on noisy digits; the id-column
and fault tests use a small synthetic score log to stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from huggingface_hub import DatasetCard, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

import hf_gradmimic
from hf_gradmimic import MimicConfig, MimicFilter, MimicTrainer, build_filter, estimate_quality, load_scores
from hf_gradmimic.cards import render_model_card
from hf_gradmimic.hub import (
    MIMIC_COLUMNS,
    HubAuthenticationError,
    ScoredPushError,
    push_scored_dataset,
)
from hf_gradmimic.reference import load_reference_tensors
from hf_gradmimic.testing.hub_server import DEFAULT_USER, HubServer

TRAIN_ARGS = dict(
    optim="sgd",
    lr_scheduler_type="constant",
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    mimic_layers=["classifier"],
)


def _resolve_gets(server: HubServer) -> list[str]:
    return [path for method, path in server.requests if method == "GET" and "/resolve/" in path]


def _plain(dataset):
    return dataset.with_format(None)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real Stage 1 + Stage 2 run: MimicTrainer on 40 %-noisy digits (3 epochs), then build_filter."""
    from hf_gradmimic.reference import build_reference
    from hf_gradmimic.testing.digits import digits_model, load_noisy_digits

    root = tmp_path_factory.mktemp("digits")
    train = load_noisy_digits(noise_rate=0.4, seed=0)["train"]
    clean = train.select(np.flatnonzero(np.asarray(train.with_format(None)["is_clean"]))[:300])
    build_reference(digits_model(), clean, layers=["classifier"], output_dir=root / "reference", epochs=30)
    args = MimicConfig(
        output_dir=str(root / "run"),
        per_device_train_batch_size=128,
        num_train_epochs=3,
        learning_rate=0.5,
        logging_steps=100,
        mimic_reference=str(root / "reference"),
        mimic_alignment_check=False,
        hub_model_id="digits-mimic",
        **TRAIN_ARGS,
    )
    trainer = MimicTrainer(model=digits_model(), args=args, train_dataset=train)
    trainer.train()
    mimic_filter = build_filter(
        args.output_dir, method="gmm", aggregate="snorkel", windows="epoch", labeling_functions=["mimic"]
    )  # the card's settings table: the paper's filter
    return _plain(train), mimic_filter, trainer


def synthetic_run(ids, epochs: int = 3, batch: int = 10, seed: int = 0):
    """A score log with the trainer's columns (hf_gradmimic.score_log_io): clean samples (even position)
    get higher mimic scores; weights are the softmax over each batch at τ = 0.5."""
    import datasets

    rng = np.random.default_rng(seed)
    n = len(ids)
    quality = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    steps_per_epoch = n // batch
    columns = {
        name: []
        for name in (
            "global_step",
            "epoch",
            "sample_id",
            "mimic_score",
            "weight",
            "loss",
            "batch_size",
            "rank",
            "repeated",
        )
    }
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            step += 1
            members = order[b * batch : (b + 1) * batch]
            scores = quality[members] + rng.normal(scale=0.3, size=batch)
            weights = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum()
            columns["global_step"] += [step] * batch
            columns["epoch"] += [step / steps_per_epoch] * batch
            columns["sample_id"] += [ids[i] for i in members]
            columns["mimic_score"] += scores.tolist()
            columns["weight"] += weights.tolist()
            columns["loss"] += rng.uniform(size=batch).tolist()
            columns["batch_size"] += [batch] * batch
            columns["rank"] += [0] * batch
            columns["repeated"] += [False] * batch
    scores = pa.table(columns)
    dataset = datasets.Dataset.from_dict(
        {"uid": list(ids), "text": [f"sample {i}" for i in ids], "label": (np.arange(n) % 3).tolist()}
    )
    return dataset, build_filter(scores, method="kmeans", aggregate="majority", windows="epoch")


# ----------------------------------------------------------------------------------------------
# push_scored_dataset
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_scored_dataset_round_trip_card_and_repush(hub_server: HubServer, digits_run, tmp_path: Path) -> None:
    from datasets import Value, load_dataset, load_from_disk

    train, mimic_filter, trainer = digits_run
    # `name` alone: the repo lands in the token's namespace.
    out = tmp_path / "out"
    result = push_scored_dataset(
        train, mimic_filter, "digits-scored", local_dir=out / "scored", training_config=trainer.args
    )
    repo_id = f"{DEFAULT_USER}/digits-scored"
    assert result.repo_id == repo_id
    assert result.local_path == (out / "scored").absolute()
    assert list(result.commit_shas) == ["default", "filtered", "card"]
    assert len(set(result.commit_shas.values())) == 3

    # The local copy: original columns untouched, the score columns joined by row index.
    local = _plain(load_from_disk(str(result.local_path)))
    assert local.column_names == train.column_names + list(MIMIC_COLUMNS)
    assert local.select_columns(train.column_names).to_dict() == train.to_dict()
    assert local.features["mimic_score"] == Value("float32") and local.features["mimic_keep"] == Value("bool")
    assert local.features["mimic_votes"].feature == Value("int8")
    table = mimic_filter.table
    np.testing.assert_array_equal(local["mimic_keep"], mimic_filter.keep)
    np.testing.assert_array_equal(local["mimic_score"], table["mean_mimic_score"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(local["mimic_weight"], table["mean_weight"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(local["mimic_keep_prob"], table["keep_prob"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(local["mimic_keep_log_odds"], table["keep_log_odds"].to_numpy().astype(np.float32))
    assert local["mimic_votes"] == table["votes"].to_pylist()
    assert result.num_rows == len(train) and result.num_kept == int(mimic_filter.keep.sum())

    # Through the real client: the default config is the local copy, `filtered` the kept rows.
    hub_default = load_dataset(repo_id, split="train")
    assert hub_default.features == local.features
    assert hub_default.to_dict() == local.to_dict()
    hub_filtered = load_dataset(repo_id, "filtered", split="train")
    kept = local.filter(lambda row: row["mimic_keep"])
    assert hub_filtered.to_dict() == kept.to_dict()
    assert hub_filtered["label"] == _plain(mimic_filter.apply(train))["label"]

    # The card: datasets' YAML kept (configs, dataset_info), our tags and settings added.
    card = DatasetCard.load(repo_id, repo_type="dataset")
    assert {"grad-mimic", "data-filtering"} <= set(card.data.tags)
    assert [c["config_name"] for c in card.data.configs] == ["default", "filtered"]
    assert card.data.dataset_info
    quality = estimate_quality(mimic_filter)
    accuracies = mimic_filter.summary["estimated_accuracies"]
    assert len(accuracies) == 3
    for needle in (
        "| temperature τ | 0.5 |",
        "`classifier`",
        str(trainer.args.mimic_reference),
        "| softmax normalisation | step |",
        "| identification method | gmm |",
        "| aggregation | snorkel |",
        "epoch (3 windows",
        f"| retained fraction | {quality['retained_fraction']:.4f} ({result.num_kept} of {len(train)} rows) |",
        f"{quality['mean_mimic_score']:.4f}",
        *(f"{a:.4f}" for a in accuracies),
        f'load_dataset("{repo_id}", "filtered", split="train")',
        f"hf-gradmimic {hf_gradmimic.__version__}",
    ):
        assert needle in card.text, needle
    assert result.card is not None and result.card.data.configs == card.data.configs

    # Re-deciding and pushing again adds commits on top; the configs are replaced, not appended to.
    strict = mimic_filter.rebuild(method="threshold", aggregate="all")
    again = push_scored_dataset(train, strict, repo_id, local_dir=out / "scored", training_config=trainer.args)
    assert again.commit_sha != result.commit_sha
    branches = HfApi().list_repo_refs(repo_id, repo_type="dataset").branches
    assert [b.target_commit for b in branches] == [again.commit_sha]
    assert load_dataset(repo_id, split="train").num_rows == len(train)
    assert load_dataset(repo_id, "filtered", split="train").num_rows == int(strict.keep.sum()) != result.num_kept
    card = DatasetCard.load(repo_id, repo_type="dataset")
    assert "| identification method | threshold (b·w > 1.000) |" in card.text
    assert [c["config_name"] for c in card.data.configs] == ["default", "filtered"]
    # The local copy was replaced in place, no temporary folder left behind.
    assert sorted(p.name for p in out.iterdir()) == ["scored"]
    assert _plain(load_from_disk(str(out / "scored")))["mimic_keep"] == strict.keep.tolist()


@pytest.mark.timeout(120)
def test_id_column_join_default_local_dir_and_missing_ids(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import load_dataset

    ids = [f"id-{i:03d}" for i in range(40)]
    dataset, mimic_filter = synthetic_run(ids)
    shuffled = dataset.shuffle(seed=1)  # rows in another order than the filter's sorted ids
    monkeypatch.chdir(tmp_path)
    result = push_scored_dataset(
        shuffled,
        mimic_filter,
        "by-uid",
        id_column="uid",
        split="validation",
        reference="org/reference-head",
        training_config={"mimic_temperature": 0.25, "mimic_layers": ["head=classifier"]},
    )
    # The local copy goes to the Hugging Face cache, not the working directory.
    assert result.local_path == Path(os.environ["HF_HOME"]) / "hf_gradmimic" / "scored_datasets" / "by-uid"
    assert not any(p.name.startswith("scored") for p in tmp_path.iterdir())
    hub = load_dataset(result.repo_id, split="validation")
    assert hub["uid"] == shuffled["uid"]
    expected = dict(zip(mimic_filter.table["sample_id"].to_pylist(), mimic_filter.keep.tolist()))
    assert hub["mimic_keep"] == [expected[uid] for uid in hub["uid"]]
    filtered = load_dataset(result.repo_id, "filtered", split="validation")
    assert filtered["uid"] == mimic_filter.apply(shuffled, id_column="uid")["uid"]
    text = DatasetCard.load(result.repo_id, repo_type="dataset").text
    assert "`org/reference-head`" in text and "| temperature τ | 0.25 |" in text
    assert "`head` → reference `classifier`" in text and "| aggregation | majority |" in text

    # A row the filter has no record for: a clear error naming how many, before anything is saved.
    import datasets

    extra = datasets.concatenate_datasets(
        [dataset, datasets.Dataset.from_dict({"uid": ["new-1", "new-2"], "text": ["a", "b"], "label": [0, 1]})]
    )
    with pytest.raises(ValueError, match=r"2 row\(s\) of the dataset have no score"):
        push_scored_dataset(extra, mimic_filter, "never", id_column="uid")
    with pytest.raises(ValueError, match=r"2 sample id\(s\) in the scores are not in the dataset's 'uid' column"):
        push_scored_dataset(dataset.select(range(38)), mimic_filter, "never", id_column="uid")
    with pytest.raises(ValueError, match="not row indices"):
        push_scored_dataset(dataset, mimic_filter, "never")
    with pytest.raises(ValueError, match=r"already has the column\(s\) \['mimic_score'\]"):
        push_scored_dataset(dataset.add_column("mimic_score", [0.0] * 40), mimic_filter, "never", id_column="uid")
    keep_index = mimic_filter.table.schema.get_field_index("keep")
    keeps_nothing = MimicFilter(
        table=mimic_filter.table.set_column(keep_index, "keep", pa.array([False] * 40)), summary=mimic_filter.summary
    )
    with pytest.raises(ValueError, match="keeps none of the 40 rows"):
        push_scored_dataset(dataset, keeps_nothing, "never", id_column="uid")
    assert not (tmp_path / "scored_never").exists()


def test_save_scored_dataset_writes_the_local_copy_alone(tmp_path: Path) -> None:
    """The local half of push_scored_dataset: the mimic_* columns joined by id, saved atomically, no Hub."""
    import datasets
    from datasets import load_from_disk

    from hf_gradmimic.hub import save_scored_dataset

    dataset, mimic_filter = synthetic_run([f"id-{i:03d}" for i in range(40)])
    shuffled = dataset.shuffle(seed=3)
    path = save_scored_dataset(shuffled, mimic_filter, tmp_path / "scored", id_column="uid")
    assert path == (tmp_path / "scored").absolute()
    saved = load_from_disk(str(path))
    assert saved.column_names == dataset.column_names + list(MIMIC_COLUMNS) and saved["uid"] == shuffled["uid"]
    expected = dict(zip(mimic_filter.table["sample_id"].to_pylist(), mimic_filter.keep.tolist()))
    assert saved["mimic_keep"] == [expected[uid] for uid in saved["uid"]]
    # Saving again replaces the copy; no temporary sibling is left next to it.
    save_scored_dataset(dataset, mimic_filter, tmp_path / "scored", id_column="uid")
    assert load_from_disk(str(path))["uid"] == dataset["uid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]
    with pytest.raises(TypeError, match="one split as a datasets.Dataset, got DatasetDict"):
        save_scored_dataset(datasets.DatasetDict({"train": dataset}), mimic_filter, tmp_path / "never")
    with pytest.raises(ValueError, match=r"2 row\(s\) of the dataset have no score"):
        extra = datasets.Dataset.from_dict({"uid": ["new-1", "new-2"], "text": ["a", "b"], "label": [0, 1]})
        save_scored_dataset(
            datasets.concatenate_datasets([dataset, extra]), mimic_filter, tmp_path / "never", id_column="uid"
        )
    assert not (tmp_path / "never").exists()
    # A folder of the user's own, or a file, is never replaced: it was deleted (the file left hidden beside a folder).
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files this would delete \(notes.txt\)"):
        save_scored_dataset(dataset, mimic_filter, project, id_column="uid")
    results = tmp_path / "results.csv"
    results.write_text("a,b\n")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        save_scored_dataset(dataset, mimic_filter, results, id_column="uid")
    assert (project / "notes.txt").read_text() == "keep me" and results.read_text() == "a,b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "results.csv", "scored"]


def test_card_templates_ship_as_package_data() -> None:
    """The templates live inside the package and pyproject's package-data puts them in the wheel."""
    import fnmatch

    import tomllib

    from hf_gradmimic import cards

    package_dir = Path(hf_gradmimic.__file__).parent
    templates = sorted(p.relative_to(package_dir).as_posix() for p in cards.TEMPLATES_DIR.glob("*.md"))
    # Every template the package names (the *_CARD_TEMPLATE constants) is a file there, and nothing else is.
    named = sorted(f"templates/{value}" for key, value in vars(cards).items() if key.endswith("_CARD_TEMPLATE"))
    assert len(named) >= 3 and templates == named
    pyproject = tomllib.loads((package_dir.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hf_gradmimic"]
    assert all(any(fnmatch.fnmatch(t, pattern) for pattern in patterns) for t in templates)
    with pytest.raises(FileNotFoundError, match="model_card.md"):
        cards.template_path("no_such_card.md")


@pytest.mark.timeout(120)
def test_failed_commit_names_the_local_copy(hub_server: HubServer, tmp_path: Path) -> None:
    from datasets import load_dataset, load_from_disk

    dataset, mimic_filter = synthetic_run([f"id-{i:03d}" for i in range(40)])
    hub_server.fail_next(r"/commit/", status=500)
    local_dir = tmp_path / "safe-copy"
    with pytest.raises(ScoredPushError) as excinfo:
        push_scored_dataset(dataset, mimic_filter, "flaky", id_column="uid", local_dir=local_dir)
    error = excinfo.value
    assert str(local_dir.absolute()) in str(error) and "'default' config" in str(error)
    assert isinstance(error.__cause__, HfHubHTTPError) and error.__cause__.response.status_code == 500
    saved = load_from_disk(str(error.local_path))
    assert saved.column_names == dataset.column_names + list(MIMIC_COLUMNS)
    assert saved.num_rows == 40

    # The fault is used up: the same call now goes through.
    result = push_scored_dataset(dataset, mimic_filter, "flaky", id_column="uid", local_dir=local_dir)
    assert load_dataset(result.repo_id, split="train")["uid"] == saved["uid"]

    # The same rows again make no data commit (the client skips unchanged files), so with a new
    # reference name the only commit is the card's: a failure there names that step.
    hub_server.fail_next(r"/commit/", status=500)
    with pytest.raises(ScoredPushError, match="dataset card") as excinfo:
        push_scored_dataset(
            dataset, mimic_filter, "flaky", id_column="uid", local_dir=local_dir, reference="org/another-reference"
        )
    assert excinfo.value.stage == "the dataset card"
    assert HfApi().dataset_info(result.repo_id).sha == result.commit_sha


@pytest.mark.timeout(120)
@pytest.mark.parametrize("repo_id", ["secret", f"{DEFAULT_USER}/secret"])  # namespace lookup / datasets' calls
def test_wrong_token_gives_an_auth_error(hub_server: HubServer, tmp_path: Path, repo_id: str) -> None:
    dataset, mimic_filter = synthetic_run([f"id-{i:03d}" for i in range(40)])
    with pytest.raises(HubAuthenticationError, match="token") as excinfo:
        push_scored_dataset(
            dataset, mimic_filter, repo_id, id_column="uid", token="hf_wrong", local_dir=tmp_path / "kept"
        )
    assert "401" in str(excinfo.value) and str((tmp_path / "kept").absolute()) in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, HfHubHTTPError)
    assert (tmp_path / "kept" / "state.json").is_file()


@pytest.mark.timeout(120)
def test_a_refused_push_is_one_line_from_the_cli_and_a_failed_stream_says_how_to_read_its_copy(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`gradmimic push` with a token the Hub refuses printed a 55-line traceback; it prints the error's one line. A
    failed streamed push named `load_from_disk` for a copy of Parquet shards, which it cannot read; the reading it
    names gives back every row."""
    import datasets

    from hf_gradmimic.cli import main

    dataset, mimic_filter = synthetic_run([f"id-{i:03d}" for i in range(40)])
    dataset.save_to_disk(str(tmp_path / "data"))
    mimic_filter.save(tmp_path / "filter")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    argv = ["push", "--dataset", str(tmp_path / "data"), "--filter", str(tmp_path / "filter"), "--repo-id", "u/x"]
    assert main([*argv, "--id-column", "uid"]) == 1
    printed = capsys.readouterr().err  # beside the progress bars of the local copy
    errors = [line for line in printed.splitlines() if line.startswith("gradmimic:")]
    assert "Traceback" not in printed and len(errors) == 1
    assert errors[0].startswith("gradmimic: error: The Hub refused the token (HTTP 401")
    with pytest.raises(HubAuthenticationError) as excinfo:
        push_scored_dataset(
            dataset.to_iterable_dataset(), mimic_filter, "u/x", id_column="uid", local_dir=tmp_path / "s"
        )
    data_files = str(tmp_path / "s" / "default" / "train" / "*.parquet")
    assert f"datasets.load_dataset('parquet', data_files={data_files!r})" in str(excinfo.value)
    assert datasets.load_dataset("parquet", data_files=data_files, split="train")["uid"] == dataset["uid"]


# ----------------------------------------------------------------------------------------------
# Reference tensors from the Hub
# ----------------------------------------------------------------------------------------------


def _tiny_bert_classifier(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


@pytest.mark.timeout(120)
def test_reference_tensors_from_a_sharded_hub_checkpoint(hub_server: HubServer, tmp_path: Path) -> None:
    import datasets

    names = ["classifier.weight", "classifier.bias"]
    api = HfApi()
    repo_id = api.create_repo("bert-reference").repo_id
    first_model = _tiny_bert_classifier(seed=1)
    first_model.save_pretrained(tmp_path / "first", max_shard_size="40KB")
    index = json.loads((tmp_path / "first" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    wanted_shards = {index["weight_map"][name] for name in names}
    assert len(shards) >= 3 and len(wanted_shards) < len(shards)
    first = api.upload_folder(folder_path=tmp_path / "first", repo_id=repo_id)
    second_model = _tiny_bert_classifier(seed=2)
    second_model.save_pretrained(tmp_path / "second", max_shard_size="40KB")
    second = api.upload_folder(folder_path=tmp_path / "second", repo_id=repo_id)
    assert second.oid != first.oid

    def fetched_shards() -> set[str]:
        return {path.rsplit("/", 1)[-1] for path in _resolve_gets(hub_server) if path.endswith(".safetensors")}

    hub_server.requests.clear()
    latest = load_reference_tensors(repo_id, names)
    assert fetched_shards() == wanted_shards
    hub_server.requests.clear()
    pinned = load_reference_tensors(repo_id, names, revision=first.oid)
    assert fetched_shards() == wanted_shards
    assert all(f"/resolve/{first.oid}/" in path for path in _resolve_gets(hub_server))
    for name in names:
        assert torch.equal(pinned[name], dict(first_model.named_parameters())[name].detach())
        assert torch.equal(latest[name], dict(second_model.named_parameters())[name].detach())

    # The client's own not-found errors come through, named.
    with pytest.raises(RepositoryNotFoundError):
        load_reference_tensors(f"{DEFAULT_USER}/no-such-reference", names)
    with pytest.raises(RevisionNotFoundError):
        load_reference_tensors(repo_id, names, revision="no-such-branch")

    # A trainer reads its reference from the Hub by repo id at a pinned commit, and scores.
    rng = np.random.default_rng(0)
    train = datasets.Dataset.from_dict(
        {
            "input_ids": rng.integers(1, 99, size=(8, 6)),
            "attention_mask": np.ones((8, 6), dtype=np.int64),
            "labels": rng.integers(0, 3, size=8),
        }
    ).with_format("torch")
    args = MimicConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.1,
        mimic_reference=repo_id,
        mimic_reference_revision=first.oid,
        mimic_alignment_check=False,
        **TRAIN_ARGS,
    )
    trainer = MimicTrainer(model=_tiny_bert_classifier(seed=0).train(), args=args, train_dataset=train)
    for name in names:
        assert torch.equal(trainer.scorer.reference[name], pinned[name])
    trainer.train()
    scores = load_scores(args.output_dir)
    assert sorted(scores["sample_id"]) == list(range(8))
    assert np.isfinite(np.asarray(scores["mimic_score"])).all()

    card = render_model_card(trainer, model_name="bert-mimic")
    assert f"`{repo_id}` @ `{first.oid}`" in card.text
    assert "from transformers import BertForSequenceClassification" in card.text


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def _check_mimic_settings(text: str, args: MimicConfig) -> None:
    for needle in (
        f"| reference model | `{args.mimic_reference}` |",
        "| mimic layers | `classifier` |",
        "| temperature τ | 0.5 |",
        "| softmax normalisation | step |",
        "| reweighting scope | all |",
        "| warm-up steps | 0 |",
        "| optimizer steps | 30 |",
        f"- hf-gradmimic: {hf_gradmimic.__version__}",
    ):
        assert needle in text, needle


def test_a_reference_file_beside_the_students_weights_is_the_one_read(hub_server: HubServer, tmp_path: Path) -> None:
    """A folder or Hub repo holding both a checkpoint's model.safetensors (the student's weights) and the
    reference.safetensors that `build_reference` writes gives the reference's tensors (read back here with
    safetensors itself); a repo with only a pytorch_model.bin is refused, naming the files looked for."""
    from safetensors.torch import load_file, save_file

    from hf_gradmimic.reference import ReferenceLoadError

    names = ["head.weight", "head.bias"]
    folder = tmp_path / "both"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    student = {
        name: torch.randn(4, 16 if name.endswith("weight") else 1, generator=generator).squeeze(-1) for name in names
    }
    reference = {name: tensor + 1.0 for name, tensor in student.items()}
    save_file(student, str(folder / "model.safetensors"))
    save_file(reference, str(folder / "reference.safetensors"))
    expected = load_file(str(folder / "reference.safetensors"))
    api = HfApi()
    repo_id = api.create_repo("student-and-reference").repo_id
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    for source in (str(folder), repo_id):
        loaded = load_reference_tensors(source, names)
        for name in names:
            assert torch.equal(loaded[name], expected[name]), (source, name)

    torch.save(student, tmp_path / "pytorch_model.bin")
    only_bin = api.create_repo("only-a-bin").repo_id
    api.upload_file(path_or_fileobj=tmp_path / "pytorch_model.bin", path_in_repo="pytorch_model.bin", repo_id=only_bin)
    with pytest.raises(
        ReferenceLoadError, match=r"No safetensors weights in the Hub repo .*only-a-bin.*reference.safetensors"
    ):
        load_reference_tensors(only_bin, names)


def test_render_model_card(digits_run) -> None:
    _, _, trainer = digits_run
    card = render_model_card(trainer, dataset_name="test-user/noisy-digits", tags=["digits"])
    assert card.data.model_name == "digits-mimic"
    assert card.data.tags[:3] == ["grad-mimic", "data-filtering", "hf-gradmimic"] and "digits" in card.data.tags
    assert card.data.datasets == ["test-user/noisy-digits"] and card.data.library_name == "transformers"
    assert card.data.base_model is None  # built from a config, not loaded from the Hub
    _check_mimic_settings(card.text, trainer.args)
    assert "from hf_gradmimic.testing.digits import DigitsClassifier" in card.text
    assert 'DigitsClassifier.from_pretrained("digits-mimic")' in card.text
    assert "build_filter(" in card.text


@pytest.mark.timeout(120)
def test_trainer_push_to_hub_shows_the_mimic_settings(
    hub_server: HubServer, digits_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer

    from hf_gradmimic.testing.digits import DigitsClassifier

    # transformers keeps one HfApi per process, built with the endpoint of its time: a fresh one
    # for this test's server (configuration, like the fixture's; no client method is replaced).
    monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    _, _, trainer = digits_run
    trainer.push_to_hub()
    repo_id = f"{DEFAULT_USER}/digits-mimic"
    files = {f.path for f in HfApi().list_repo_tree(repo_id, recursive=True)}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    loaded = DigitsClassifier.from_pretrained(repo_id)
    assert torch.equal(loaded.classifier.weight, trainer.model.classifier.weight.detach())

    if type(trainer).create_model_card is Trainer.create_model_card:
        # TODO(lead): once MimicTrainer.create_model_card calls render_model_card, the README that
        # push_to_hub uploads is ours; until then push the rendered card the same way trl does.
        render_model_card(trainer).push_to_hub(repo_id)
    card = ModelCard.load(repo_id)
    assert "grad-mimic" in card.data.tags
    _check_mimic_settings(card.text, trainer.args)


@pytest.mark.timeout(120)
def test_a_readme_written_by_hand_keeps_its_prose(hub_server: HubServer, tmp_path: Path) -> None:
    """A dataset repo whose README was written by hand: the push keeps that prose and adds our section; a second
    push updates our section in place, and the owner's later edit outside it stays."""
    ids = [f"id-{i:03d}" for i in range(40)]
    dataset, mimic_filter = synthetic_run(ids)
    repo_id = f"{DEFAULT_USER}/hand-written"
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    prose = "# Hand-written card\n\nThese samples were collected by hand; cite our paper.\n"
    api.upload_file(path_or_fileobj=prose.encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    push_scored_dataset(dataset, mimic_filter, repo_id, id_column="uid", local_dir=tmp_path / "a")
    text = DatasetCard.load(repo_id, repo_type="dataset").text
    assert "These samples were collected by hand; cite our paper." in text
    assert "| identification method |" in text  # our section is there too
    edited = DatasetCard.load(repo_id, repo_type="dataset")
    edited.text += "\nAdded by the owner after the first push.\n"
    edited.push_to_hub(repo_id, repo_type="dataset")
    push_scored_dataset(
        dataset, mimic_filter.rebuild(method="threshold"), repo_id, id_column="uid", local_dir=tmp_path / "b"
    )
    text = DatasetCard.load(repo_id, repo_type="dataset").text
    assert "cite our paper" in text and "Added by the owner after the first push." in text
    assert text.count("| identification method |") == 1 and "threshold (b·w > 1.000)" in text
