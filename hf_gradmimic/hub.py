"""Sharing Grad-Mimic results on the Hugging Face Hub: scored datasets, saved locally and pushed.

`save_scored_dataset` adds a filter's per-sample results to a dataset as ``mimic_*`` columns and
saves it with ``save_to_disk`` (atomically). `push_scored_dataset` does that first (so a failed
push loses nothing), pushes the scored rows as the ``default`` config and the kept rows as a
``filtered`` config, then pushes a dataset card (`hf_gradmimic.cards.render_dataset_card`) whose
YAML merges what `datasets` wrote (``configs``, ``dataset_info``), so that
``load_dataset(repo_id, "filtered")`` keeps working.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from transformers.utils import logging

from .cards import dataset_card_data, merge_card_text, render_dataset_card
from .fileio import atomic_write_dir
from .progress import progress_bar

logger = logging.get_logger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from huggingface_hub import CommitInfo, DatasetCard, DatasetCardData
    from transformers import Trainer

    from .config import MimicConfig
    from .filter import MimicFilter

__all__ = [
    "MIMIC_COLUMNS",
    "HubAuthenticationError",
    "ScoredPushError",
    "ScoredPushResult",
    "default_scored_dir",
    "push_scored_dataset",
    "save_scored_dataset",
]

FILTERED_CONFIG = "filtered"

# Column added to the rows -> (column of MimicFilter.table it comes from, pyarrow type).
MIMIC_COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "mimic_score": ("mean_mimic_score", pa.float32()),
    "mimic_weight": ("mean_weight", pa.float32()),
    "mimic_keep_prob": ("keep_prob", pa.float32()),
    "mimic_keep_log_odds": ("keep_log_odds", pa.float32()),
    "mimic_keep": ("keep", pa.bool_()),
    "mimic_votes": ("votes", pa.list_(pa.int8())),
}


class ScoredPushError(RuntimeError):
    """Pushing a scored dataset failed; the scored dataset is safe at ``local_path``."""

    def __init__(self, message: str, local_path: Path, stage: str) -> None:
        super().__init__(message)
        self.local_path = local_path
        self.stage = stage


class HubAuthenticationError(ScoredPushError):
    """The Hub refused the token (HTTP 401 or 403) while pushing a scored dataset."""


@dataclass
class ScoredPushResult:
    """What `push_scored_dataset` did.

    Attributes:
        local_path: the scored dataset saved with ``save_to_disk`` (reload with ``datasets.load_from_disk``).
        repo_id: the dataset repo, with its namespace.
        commit_shas / commit_urls: per step (``"default"``, ``"filtered"``, ``"card"``), the commit it
            made; a step whose content was already on the Hub gives the head it found (the client makes
            no empty commit).
        card: the `DatasetCard` pushed.
        num_rows / num_kept: rows of the ``default`` / ``filtered`` config.
    """

    local_path: Path
    repo_id: str
    commit_shas: dict[str, str] = field(default_factory=dict)
    commit_urls: dict[str, str] = field(default_factory=dict)
    card: DatasetCard | None = None
    num_rows: int = 0
    num_kept: int = 0

    @property
    def commit_sha(self) -> str:
        """The head of the pushed revision after the last step."""
        return list(self.commit_shas.values())[-1]

    @property
    def commit_url(self) -> str:
        return list(self.commit_urls.values())[-1]


# ----------------------------------------------------------------------------------------------
# Joining the filter's records with the rows
# ----------------------------------------------------------------------------------------------


def _filter_rows(
    dataset: datasets.Dataset, mimic_filter: MimicFilter, id_column: str | None, check_dataset: bool = True
) -> np.ndarray:
    """For every row of ``dataset``, the row of ``mimic_filter.table`` holding its sample's record.

    `MimicFilter.positions` already refuses a dataset row without a record and a record without a row,
    so the ``filtered`` config is exactly ``mimic_filter.apply(dataset)``; this is its inverse permutation.
    """
    positions = mimic_filter.positions(dataset, id_column, check_dataset=check_dataset)
    rows = np.empty(len(positions), dtype=np.int64)
    rows[positions] = np.arange(len(positions))
    return rows


def _add_mimic_columns(
    dataset: datasets.Dataset, mimic_filter: MimicFilter, id_column: str | None, check_dataset: bool = True
) -> datasets.Dataset:
    """``dataset`` with the `MIMIC_COLUMNS` appended (its own columns and format are kept)."""
    import datasets

    clashing = [name for name in MIMIC_COLUMNS if name in dataset.column_names]
    if clashing:
        raise ValueError(
            f"The dataset already has the column(s) {clashing}; drop them (dataset.remove_columns({clashing})) "
            "before scoring it again."
        )
    take = pa.array(_filter_rows(dataset, mimic_filter, id_column, check_dataset))
    scored = dataset
    for name, (source, arrow_type) in MIMIC_COLUMNS.items():
        values = mimic_filter.table.column(source).take(take).combine_chunks().cast(arrow_type)
        feature = datasets.Features.from_arrow_schema(pa.schema([(name, arrow_type)]))[name]
        scored = scored.add_column(name, values, feature=feature)
    return scored


def _require_split(dataset: Any, caller: str) -> None:
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{caller} takes one split as a datasets.Dataset, got {type(dataset).__name__}; "
            "pass e.g. dataset_dict['train'] with split='train'."
        )


def is_scored_copy(folder: Path) -> bool:
    """Whether ``folder`` is a local copy that `save_scored_dataset` or a streamed push wrote, which a new copy may
    replace: a ``save_to_disk`` folder, or config folders of Parquet shards (``default/<split>/NNNNN.parquet``)."""
    names = {entry.name for entry in folder.iterdir()}
    if {"dataset_info.json", "state.json"} <= names:
        return all(name in ("dataset_info.json", "state.json") or name.endswith(".arrow") for name in names)
    return names <= {"default", FILTERED_CONFIG} and all(
        path.is_dir() or path.suffix == ".parquet" for config in names for path in (folder / config).rglob("*")
    )


def save_scored_dataset(
    dataset: datasets.Dataset,
    mimic_filter: MimicFilter,
    local_dir: str | os.PathLike,
    *,
    id_column: str | None = None,
    check_dataset: bool = True,
) -> Path:
    """Add a filter's per-sample results to ``dataset`` and save it with ``save_to_disk`` at ``local_dir``.

    The local half of `push_scored_dataset`: the rows get the `MIMIC_COLUMNS`, joined by sample
    id (the row index, or ``id_column``), and the folder is written atomically (a temporary sibling
    renamed into place), so an older copy there is replaced only once the new one is complete.
    Reload it with ``datasets.load_from_disk(local_dir)``.

    Args:
        dataset: the `datasets.Dataset` the scores were recorded on (the trainer's ``train_dataset``).
        mimic_filter: a `MimicFilter` from `hf_gradmimic.build_filter`.
        local_dir: the folder to write.
        id_column: the column holding the ids the trainer recorded (``MimicConfig.mimic_id_column``);
            None when they are row indices.
        check_dataset: with row-index ids, refuse a dataset whose rows differ from the training set's, as
            `MimicFilter.apply` does; pass False only for a copy you know has the same rows in the same order.

    Returns:
        The absolute path of the saved folder.

    Raises:
        TypeError: ``dataset`` is not a `datasets.Dataset` (e.g. a whole ``DatasetDict``).
        ValueError: a row has no record in the filter, the filter has samples that are not rows, or
            the dataset already has ``mimic_*`` columns. Raised before anything is written.
    """
    _require_split(dataset, "save_scored_dataset")
    scored = _add_mimic_columns(dataset, mimic_filter, id_column, check_dataset)
    return atomic_write_dir(local_dir, scored.save_to_disk, replaces=is_scored_copy)


# ----------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of the first Hub HTTP error in ``error``'s chain (the clients wrap and re-raise)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError) and getattr(current, "response", None) is not None:
            return current.response.status_code
        current = current.__cause__ or current.__context__
    return None


def _push_failed(
    error: Exception, stage: str, repo_id: str, local_path: Path, split: str | None = None
) -> ScoredPushError:
    """A clear error for a failed push step, naming the local copy (chained to the client's error) and how to read it
    back: ``split`` for a streamed push's Parquet shards, None for a ``save_to_disk`` folder."""
    status = _http_status(error)
    reload = (
        f"datasets.load_from_disk({str(local_path)!r})"
        if split is None
        else f"datasets.load_dataset('parquet', data_files={str(local_path / 'default' / split / '*.parquet')!r})"
    )
    if status in (401, 403):
        problem = (
            "refused the token (HTTP 401: invalid or expired)"
            if status == 401
            else ("refused the push (HTTP 403: the token has no write access to this repo)")
        )
        return HubAuthenticationError(
            f"The Hub {problem} while pushing {repo_id!r} ({stage}). Pass a valid write token with "
            f"token=..., set HF_TOKEN, or run `hf auth login`. Nothing is lost: the scored dataset is saved at "
            f"{local_path} ({reload}). Hub answer: {error}",
            local_path,
            stage,
        )
    return ScoredPushError(
        f"Pushing {repo_id!r} to the Hub failed at {stage} ({type(error).__name__}: {error}). Nothing is lost: "
        f"the scored dataset is saved at {local_path}; reload it with {reload} and push again, or call "
        "push_scored_dataset again.",
        local_path,
        stage,
    )


def _read_readme(repo_id: str, revision: str, token: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision, token=token)
    except EntryNotFoundError:
        return None
    return Path(path).read_text(encoding="utf-8")


def default_scored_dir(repo_id: str) -> Path:
    """Where `push_scored_dataset` keeps its local copy when no ``local_dir`` is given: under the Hugging Face cache
    (``$HF_HOME/hf_gradmimic/scored_datasets/<namespace>--<name>``), not the working directory."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_gradmimic" / "scored_datasets" / str(repo_id).strip("/").replace("/", "--")


def push_scored_dataset(
    dataset: datasets.Dataset,
    mimic_filter: MimicFilter,
    repo_id: str,
    *,
    split: str = "train",
    private: bool = False,
    push_filtered: bool = True,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    id_column: str | None = None,
    local_dir: str | os.PathLike | None = None,
    reference: str | None = None,
    training_config: MimicConfig | Mapping[str, Any] | Trainer | None = None,
    check_dataset: bool = True,
) -> ScoredPushResult:
    """Add a filter's per-sample results to ``dataset`` and push it, with a card, to a Hub dataset repo.

    The rows get six columns, joined by sample id (the row index, or ``id_column``): ``mimic_score``
    (float32, the sample's mean mimic score), ``mimic_weight`` (float32, its mean ``b·w``; 1 means a
    uniform weight), ``mimic_keep_prob`` (float32), ``mimic_keep_log_odds`` (float32, the ranking, which does not
    round to 1 where ``mimic_keep_prob`` does), ``mimic_keep`` (bool) and ``mimic_votes`` (list of int8, one per
    window: 1 keep, 0 discard, -1 abstain). The original columns are left as they are.

    Steps, in this order:

    1. the scored dataset is saved to ``local_dir`` by `save_scored_dataset`, so a failed push loses
       nothing, and what is pushed is what was saved;
    2. it is pushed as the ``default`` config (``split``);
    3. with ``push_filtered``, the kept rows are pushed as the ``filtered`` config;
    4. the dataset card is pushed: ``templates/dataset_card.md`` rendered with the Stage-1 and
       Stage-2 settings, its YAML being the README's YAML that `datasets` wrote (``configs``,
       ``dataset_info``) plus the tags ``grad-mimic`` and ``data-filtering``.

    Pushing again to the same repo adds commits on top (configs are replaced, the card re-rendered);
    content identical to what is on the Hub makes no empty commit. With ``push_filtered=False`` a
    ``filtered`` config from an earlier push stays in the repo (a warning says so).

    Args:
        dataset: the `datasets.Dataset` the scores were recorded on (the trainer's ``train_dataset``),
            or a `datasets.IterableDataset` of it (e.g. ``load_dataset(..., streaming=True)`` over
            sharded Parquet): it is then streamed, never materialised (`_push_scored_stream`).
        mimic_filter: a `MimicFilter` from `hf_gradmimic.build_filter`.
        repo_id: the dataset repo (``name`` alone uses the token's namespace); created if missing.
        split: the split name in both configs.
        private: make the repo private if it is created.
        push_filtered: also push the ``filtered`` config.
        token: a Hub token with write access (default: the logged-in one / ``HF_TOKEN``).
        revision: the branch to push to (created from ``main`` if missing).
        commit_message: the base of the commit messages (each step appends what it pushes).
        id_column: the column holding the ids the trainer recorded (``MimicConfig.mimic_id_column``);
            None when they are row indices.
        local_dir: where the local copy goes (default: `default_scored_dir`, a folder of the Hugging Face
            cache, never the working directory; its path is logged and returned); an older copy there is
            replaced.
        reference: the reference model's id, for the card (default: ``training_config.mimic_reference``).
        training_config: the trainer's `MimicConfig` (or a dict of its ``mimic_*`` fields, or the
            `MimicTrainer`), for the card's Stage-1 settings.
        check_dataset: as in `save_scored_dataset` (a stream is not checked: it has no random access).

    Returns:
        A `ScoredPushResult`.

    Raises:
        ValueError: a row has no record in the filter (the message says how many), the filter has
            samples that are not rows, the dataset already has ``mimic_*`` columns, or (with
            ``push_filtered``) the filter keeps no row. Raised before anything is saved or pushed.
        HubAuthenticationError: the Hub refused the token; the message names the local copy.
        ScoredPushError: any other failed push step; the message names the local copy.
    """
    import datasets
    from huggingface_hub import HfApi

    if isinstance(dataset, datasets.IterableDataset):
        return _push_scored_stream(
            dataset,
            mimic_filter,
            repo_id,
            split=split,
            private=private,
            push_filtered=push_filtered,
            token=token,
            revision=revision,
            commit_message=commit_message,
            id_column=id_column,
            local_dir=local_dir,
            reference=reference,
            training_config=training_config,
        )
    _require_split(dataset, "push_scored_dataset")
    if not repo_id or not str(repo_id).strip("/"):
        raise ValueError("repo_id is empty: give the dataset repo as 'namespace/name' or 'name'.")
    if push_filtered and not mimic_filter.keep.any():
        # datasets pushes a zero-row config that load_dataset then refuses ("corresponds to no data").
        raise ValueError(
            f"The filter keeps none of the {len(dataset)} rows, so there is no 'filtered' config to push; pass "
            "push_filtered=False to push the scored rows alone, or rebuild the filter with other settings."
        )
    local_path = save_scored_dataset(
        dataset,
        mimic_filter,
        local_dir or default_scored_dir(repo_id),
        id_column=id_column,
        check_dataset=check_dataset,
    )
    logger.info("The scored dataset pushed to %s is saved at %s.", repo_id, local_path)
    scored = datasets.load_from_disk(str(local_path))
    keep = np.asarray(scored.with_format("arrow")["mimic_keep"].to_numpy(zero_copy_only=False), dtype=bool)

    base_message = commit_message or "Grad-Mimic scored dataset"
    result = ScoredPushResult(local_path=local_path, repo_id=repo_id, num_rows=len(scored), num_kept=int(keep.sum()))

    def record(stage: str, info: CommitInfo) -> None:
        result.commit_shas[stage] = info.oid
        result.commit_urls[stage] = info.commit_url

    stage = "the 'default' config"
    try:
        if "/" not in repo_id:
            # A bare name goes to the token's namespace. Resolved here rather than left to
            # `datasets`, whose lookup of a bare name fails once the repo exists (its repo_info
            # call does not resolve namespaces and create_repo answers 409).
            stage = "the 'default' config (looking up the token's namespace)"
            repo_id = f"{HfApi(token=token).whoami()['name']}/{repo_id}"
            result.repo_id = repo_id
            stage = "the 'default' config"
        info = scored.push_to_hub(
            repo_id,
            config_name="default",
            split=split,
            private=private,
            token=token,
            revision=revision,
            commit_message=f"{base_message} (default config: all rows with their scores)",
        )
        record("default", info)
        if push_filtered:
            stage = f"the {FILTERED_CONFIG!r} config"
            # `select` keeps the original order, so `filtered` equals mimic_filter.apply(dataset).
            info = scored.select(np.flatnonzero(keep)).push_to_hub(
                repo_id,
                config_name=FILTERED_CONFIG,
                split=split,
                token=token,
                revision=revision,
                commit_message=f"{base_message} ({FILTERED_CONFIG} config: the {int(keep.sum())} kept rows)",
            )
            record(FILTERED_CONFIG, info)
        stage = "the dataset card"
        data_head = result.commit_sha
        card = _card_over(
            repo_id,
            data_head,
            token,
            has_filtered=push_filtered,
            split=split,
            mimic_filter=mimic_filter,
            num_rows=result.num_rows,
            num_kept=result.num_kept,
            reference=reference,
            training_config=training_config,
            source_name=dataset.info.dataset_name,
        )
        # parent_commit: the card merges the YAML of exactly this head; a concurrent commit that
        # changed it makes the Hub refuse (412) instead of silently dropping its configs.
        info = card.push_to_hub(
            repo_id,
            token=token,
            repo_type="dataset",
            revision=revision,
            parent_commit=data_head,
            commit_message=f"{base_message} (dataset card)",
        )
        record("card", info)
    except Exception as error:
        raise _push_failed(error, stage, repo_id, local_path) from error
    result.card = card
    return result


def _card_over(repo_id: str, data_head: str, token: str | None, *, has_filtered: bool, **settings: Any) -> DatasetCard:
    """The dataset card for the repo at ``data_head``, its YAML merged with the README `datasets` wrote there."""
    from huggingface_hub import DatasetCard

    readme = _read_readme(repo_id, data_head, token)
    if not has_filtered and _has_config(readme, FILTERED_CONFIG):
        warnings.warn(
            f"{repo_id} keeps a {FILTERED_CONFIG!r} config from an earlier push, which this filter did not "
            "decide (push_filtered=False); the card describes only the default config.",
            stacklevel=3,  # push_scored_dataset's caller
        )
    card = render_dataset_card(
        dataset_card_data(readme, repo_id),
        repo_id=repo_id,
        has_filtered=has_filtered,
        filtered_config=FILTERED_CONFIG,
        **settings,
    )
    # The README's own prose (a card written by hand) stays; our section is added or updated in place.
    card.text = merge_card_text(DatasetCard(readme).text if readme else None, card.text)
    return card


def _has_config(readme: str | None, config_name: str) -> bool:
    from huggingface_hub import DatasetCard

    if not readme:
        return False
    configs = getattr(DatasetCard(readme).data, "configs", None) or []
    return any(isinstance(c, Mapping) and c.get("config_name") == config_name for c in configs)


# ----------------------------------------------------------------------------------------------
# Pushing a streamed dataset: Parquet shards written and uploaded one at a time
# ----------------------------------------------------------------------------------------------

STREAM_SHARD_ROWS = 100_000


def _push_scored_stream(
    dataset: datasets.IterableDataset,
    mimic_filter: MimicFilter,
    repo_id: str,
    *,
    split: str,
    private: bool,
    push_filtered: bool,
    token: str | None,
    revision: str | None,
    commit_message: str | None,
    id_column: str | None,
    local_dir: str | os.PathLike | None,
    reference: str | None,
    training_config: Any,
) -> ScoredPushResult:
    """`push_scored_dataset` for a `datasets.IterableDataset`: memory stays at one shard of rows.

    The rows are read in batches of `STREAM_SHARD_ROWS`, get the `MIMIC_COLUMNS`, and are written as
    Parquet shards ``default/<split>/NNNNN.parquet`` (and the kept rows as ``filtered/<split>/...``) into
    the local copy; each shard is uploaded (``preupload_lfs_files``) as soon as it is written. One commit
    then adds every shard, deletes older shards of those configs, and writes the dataset card, whose
    ``configs`` YAML points `load_dataset` at the shards. A failed upload stops uploading, the local copy
    is still completed, and the `ScoredPushError` names it.
    """
    import pyarrow.parquet as pq
    from datasets.table import embed_table_storage
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi

    from .filter.stream import scored_batches

    api = HfApi(token=token)
    local_path = Path(local_dir or default_scored_dir(repo_id)).absolute()
    logger.info("The scored dataset pushed to %s is written to %s.", repo_id, local_path)
    configs = ["default", FILTERED_CONFIG] if push_filtered else ["default"]
    result = ScoredPushResult(local_path=local_path, repo_id=repo_id)
    additions: list[CommitOperationAdd] = []
    upload_error: list[tuple[str, Exception]] = []
    stage = "creating the repo"
    try:
        if "/" not in repo_id:
            repo_id = result.repo_id = f"{api.whoami()['name']}/{repo_id}"
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    except Exception as error:
        upload_error.append((stage, error))

    def upload(path: Path, in_repo: str) -> None:
        operation = CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=str(path))  # hashes the file
        additions.append(operation)
        if upload_error:
            return
        try:
            api.preupload_lfs_files(repo_id, additions=[operation], repo_type="dataset", revision=revision)
        except Exception as error:
            upload_error.append((f"the shard {in_repo}", error))

    def write(tmp: str) -> None:
        batches = scored_batches(mimic_filter.table, dataset, MIMIC_COLUMNS, id_column, STREAM_SHARD_ROWS)
        # The stream's length is unknown: the bar counts the rows written and uploaded.
        with progress_bar(desc=f"Pushing the scored stream to {repo_id}", unit=" rows", unit_scale=True) as bar:
            for index, table in enumerate(batches):
                # Images and audio given as local paths travel as their bytes, as `datasets` pushes them.
                table = embed_table_storage(table, token_per_repo_id={repo_id: token})
                keep = table.column("mimic_keep").to_numpy(zero_copy_only=False)
                parts = {"default": table, FILTERED_CONFIG: table.filter(pa.array(keep))}
                result.num_rows += table.num_rows
                result.num_kept += int(keep.sum())
                for config in configs:
                    in_repo = f"{config}/{split}/{index:05d}.parquet"
                    path = Path(tmp) / in_repo
                    path.parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(parts[config], path)
                    upload(path, in_repo)
                bar.update(table.num_rows)

    # An uploaded LFS file is committed by its hash and size alone, so the shards may move from the
    # temporary folder to local_path (atomic_write_dir) between their upload and the commit.
    atomic_write_dir(local_path, write, replaces=is_scored_copy)
    if push_filtered and result.num_kept == 0:
        raise ValueError(
            f"The filter keeps none of the {result.num_rows} streamed rows, so there is no 'filtered' config to push; "
            f"pass push_filtered=False. The scored rows are saved at {local_path}."
        )
    if upload_error:
        stage, error = upload_error[0]
        raise _push_failed(error, stage, repo_id, local_path, split) from error
    stage = "the shards and the dataset card"
    try:
        existing = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
        written = {operation.path_in_repo for operation in additions}
        stale = [
            CommitOperationDelete(path_in_repo=path)
            for path in existing
            if any(path.startswith(f"{config}/{split}/") for config in configs) and path not in written
        ]
        # The card over the README at the head the commit is made on (parent_commit): its other configs and splits,
        # and any prose written by hand, stay.
        head = api.repo_info(repo_id, repo_type="dataset", revision=revision).sha
        existing_readme = _read_readme(repo_id, head, token)
        card = render_dataset_card(
            _stream_card_data(existing_readme, configs, split, repo_id),
            repo_id=repo_id,
            has_filtered=push_filtered,
            filtered_config=FILTERED_CONFIG,
            split=split,
            mimic_filter=mimic_filter,
            num_rows=result.num_rows,
            num_kept=result.num_kept,
            reference=reference,
            training_config=training_config,
            source_name=getattr(dataset.info, "dataset_name", None),
        )
        card.text = merge_card_text(DatasetCard(existing_readme).text if existing_readme else None, card.text)
        card_add = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8"))
        base_message = commit_message or "Grad-Mimic scored dataset"
        info = api.create_commit(
            repo_id,
            operations=[*additions, *stale, card_add],
            repo_type="dataset",
            revision=revision,
            parent_commit=head,
            commit_message=f"{base_message} (streamed: {len(additions)} shard(s) and the dataset card)",
        )
    except Exception as error:
        raise _push_failed(error, stage, repo_id, local_path, split) from error
    result.commit_shas["stream"] = info.oid
    result.commit_urls["stream"] = info.commit_url
    result.card = card
    return result


def _stream_card_data(readme: str | None, configs: list[str], split: str, repo_id: str) -> DatasetCardData:
    """The YAML of the repo's README with each of ``configs``' ``split`` pointed at its streamed shards
    (``<config>/<split>/*.parquet``), their other splits and the other configs as they were. Those configs'
    ``dataset_info`` goes: it lists split sizes `datasets` would check, and the stream's are not known until read."""
    data = dataset_card_data(readme, repo_id)
    entries = [dict(entry) for entry in (getattr(data, "configs", None) or []) if isinstance(entry, Mapping)]
    for config in configs:
        entry = next((entry for entry in entries if entry.get("config_name") == config), None)
        if entry is None:
            entry = {"config_name": config}
            entries.append(entry)
        files = entry.get("data_files") or []
        if isinstance(files, (str, Mapping)):  # a bare path (the train split) or one mapping
            files = [files if isinstance(files, Mapping) else {"split": "train", "path": files}]
        kept = [item for item in files if not (isinstance(item, Mapping) and item.get("split") == split)]
        entry["data_files"] = [*kept, {"split": split, "path": f"{config}/{split}/*.parquet"}]
    data.configs = entries
    info = getattr(data, "dataset_info", None)
    if isinstance(info, list):
        data.dataset_info = [
            item for item in info if not (isinstance(item, Mapping) and item.get("config_name") in configs)
        ] or None
    elif isinstance(info, Mapping) and info.get("config_name", "default") in configs:
        data.dataset_info = None
    return data
