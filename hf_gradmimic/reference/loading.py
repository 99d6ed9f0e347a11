"""Reading the reference's mimic-layer tensors: only those tensors, from a file, a folder, the Hub, a model or a dict.

Only the tensors of the mimic layers are read, never the whole reference model: from a
safetensors checkpoint (one file, or sharded with ``model.safetensors.index.json``) the index says
which shards hold them, only those shards are fetched, and `safetensors.safe_open` reads only
those tensors. Sources: a Hub repo id (with revision), a local directory saved with
``save_pretrained``, a PEFT adapter (folder or repo: `hf_gradmimic.reference.adapters`), a
``.safetensors`` file, an ``nn.Module``, or a ``{name: tensor}`` dict.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import read_json_object
from .adapters import adapter_metadata, hub_adapter, local_adapter, without_adapter_name

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
REFERENCE_WEIGHTS_NAME = "reference.safetensors"  # what `build_reference` writes

ReferenceSource = str | os.PathLike | nn.Module | Mapping[str, torch.Tensor]


class ReferenceLoadError(ValueError):
    """The reference does not provide what the mimic layers need: a tensor missing, unreadable or unusable."""


def _match_key(wanted: str, available: list[str]) -> str | None:
    """Exact name, else the unique key that ends with ``.wanted`` (a checkpoint saved with a wrapper prefix)."""
    if wanted in available:
        return wanted
    suffix_matches = [key for key in available if key.endswith("." + wanted)]
    if len(suffix_matches) == 1:
        return suffix_matches[0]
    # The student may carry a prefix the reference lacks (e.g. `model.` of a wrapper).
    parts = wanted.split(".")
    for start in range(1, len(parts) - 1):
        if ".".join(parts[start:]) in available:
            return ".".join(parts[start:])
    # A PEFT adapter is saved without its name: `lora_A.weight` for the student's `lora_A.default.weight`.
    if without_adapter_name(wanted) != wanted:
        return _match_key(without_adapter_name(wanted), available)
    return None


class MissingReferenceTensor(ReferenceLoadError):
    """A tensor the reference does not hold under that name (``name``)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def _missing_error(wanted: str, available: list[str], where: str) -> ReferenceLoadError:
    close = difflib.get_close_matches(wanted, available, n=5, cutoff=0.3)
    return MissingReferenceTensor(
        f"Reference tensor {wanted!r} is missing from {where} ({len(available)} tensors). Close names: {close}. "
        "Name the reference layer with `mimic_layers=['student=reference']` if the head was renamed.",
        wanted,
    )


def _match_all(wanted: list[str], available: list[str], where: str) -> dict[str, str]:
    """``{wanted_name: checkpoint_key}``, or an error naming the first tensor that is missing."""
    matched = {}
    for name in wanted:
        key = _match_key(name, available)
        if key is None:
            raise _missing_error(name, available, where)
        matched[name] = key
    return matched


def _as_tensor(value: Any, key: str, where: str) -> torch.Tensor:
    """A tensor (or a NumPy array, converted) of the reference, as a float32 copy."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ReferenceLoadError(
            f"Reference entry {key!r} of {where} is a {type(value).__name__}; expected a torch.Tensor or a NumPy array "
            "({name: tensor} with the student's parameter names)."
        )
    _check_reference_tensor(value, key, where)
    return value.detach().to(dtype=torch.float32, copy=True)


def _check_reference_tensor(tensor: torch.Tensor, key: str, where: str) -> None:
    """Refuse what cannot be a reference's weights: a tensor without data (meta device) or one that is not floating
    point (a quantised tensor whose scale lives elsewhere: converted as is, its values are not the weights)."""
    if tensor.device.type == "meta":
        raise ReferenceLoadError(
            f"Reference tensor {key!r} of {where} is on the meta device: it has a shape but no values (a model built "
            "with `init_empty_weights`, or `device_map` offloading). Load the reference with its weights, e.g. "
            "`from_pretrained(...)` without `device_map`, or pass its checkpoint's path."
        )
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ReferenceLoadError(
            f"Reference tensor {key!r} of {where} is {str(tensor.dtype).replace('torch.', '')}, not floating point: a "
            "quantised tensor without its scale would be read as the weights themselves. Save a dequantised "
            "(float32, bfloat16 or float16) reference, e.g. with `model.dequantize()` before `save_pretrained`."
        )


def _select(available: Mapping[str, Any], wanted: list[str], where: str) -> dict[str, torch.Tensor]:
    matched = _match_all(wanted, list(available), where)
    return {name: _as_tensor(available[key], key, where) for name, key in matched.items()}


@contextmanager
def _safetensors_file(path: Path) -> Iterator[Any]:
    """`safe_open` on ``path``, with an error naming the file when it is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError, without the path
        raise ReferenceLoadError(
            f"Reference file {path} is not a readable safetensors file ({type(error).__name__}: {error}); it may be "
            "truncated or corrupt: save or download it again."
        ) from error
    with handle:
        yield handle


def _read_safetensors(files_to_names: Mapping[Path, list[str]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, names in files_to_names.items():
        with _safetensors_file(path) as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                _check_reference_tensor(tensor, name, str(path))
                tensors[name] = tensor.to(torch.float32)
    return tensors


def _from_single_file(path: Path, wanted: list[str]) -> dict[str, torch.Tensor]:
    with _safetensors_file(path) as handle:
        keys = list(handle.keys())
    matched = _match_all(wanted, keys, str(path))
    by_key = _read_safetensors({path: list(matched.values())})
    return {name: by_key[key] for name, key in matched.items()}


def _weight_map(index: Path, name: str | None = None) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked: a ReferenceLoadError names the file otherwise."""
    fix = "save the reference again with `save_pretrained`, or download it again."
    try:
        content = read_json_object(index, "The checkpoint index", fix)
    except ValueError as error:
        raise ReferenceLoadError(str(error).replace(str(index), name or str(index), 1)) from error
    weight_map = content.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ReferenceLoadError(
            f"The checkpoint index {name or index} has no `weight_map` ({{tensor name: shard file}}; found the keys "
            f"{sorted(content)[:10]}): {fix}"
        )
    return weight_map


def _from_directory(directory: Path, wanted: list[str]) -> dict[str, torch.Tensor]:
    adapter = local_adapter(directory)
    if adapter is not None:
        return _from_single_file(adapter[1], wanted)
    if (directory / REFERENCE_WEIGHTS_NAME).is_file():
        # What `build_reference` wrote, whose metadata `read_reference_metadata` reports: first, also beside a
        # checkpoint's own model.safetensors (the student's weights, which would make θ_ref − θ zero).
        return _from_single_file(directory / REFERENCE_WEIGHTS_NAME, wanted)
    index_path = directory / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_map = _weight_map(index_path)
        matched = _match_all(wanted, list(weight_map), str(index_path))
        files: dict[Path, list[str]] = {}
        for key in matched.values():
            files.setdefault(directory / weight_map[key], []).append(key)
        by_key = _read_safetensors(files)
        return {name: by_key[key] for name, key in matched.items()}
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return _from_single_file(directory / SAFE_WEIGHTS_NAME, wanted)
    candidates = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(candidates) == 1:
        return _from_single_file(directory / candidates[0], wanted)
    raise ReferenceLoadError(
        f"No safetensors weights in {directory}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} "
        f"(found {sorted(p.name for p in directory.iterdir())[:10]}). Save the reference with `save_pretrained`."
    )


def _from_hub(
    repo_id: str, wanted: list[str], revision: str | None, token: str | bool | None
) -> dict[str, torch.Tensor]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    adapter = hub_adapter(repo_id, revision, token)  # a PEFT adapter: its two files, nothing else
    if adapter is not None:
        return _from_single_file(adapter[1], wanted)

    def download(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, token=token))
        except EntryNotFoundError:
            return None

    # `build_reference`'s file first, as in a local folder (a model repo may hold both it and the student's weights).
    single = download(REFERENCE_WEIGHTS_NAME)
    index_file = None if single is not None else download(SAFE_WEIGHTS_INDEX_NAME)
    if single is None and index_file is None:
        single = download(SAFE_WEIGHTS_NAME)
        if single is None:
            at = "" if revision is None else f" at revision {revision!r}"
            raise ReferenceLoadError(
                f"No safetensors weights in the Hub repo {repo_id!r}{at}: expected {REFERENCE_WEIGHTS_NAME}, "
                f"{SAFE_WEIGHTS_INDEX_NAME} or {SAFE_WEIGHTS_NAME} (a pytorch_model.bin is not read: save the "
                "reference with `save_pretrained`, whose default is safetensors)."
            )
    if single is not None:
        return _from_single_file(single, wanted)
    weight_map = _weight_map(index_file, f"{repo_id}/{SAFE_WEIGHTS_INDEX_NAME}")
    matched = _match_all(wanted, list(weight_map), f"{repo_id}/{SAFE_WEIGHTS_INDEX_NAME}")
    files: dict[Path, list[str]] = {}
    for key in matched.values():
        # Only the shards that hold a mimic-layer tensor are downloaded.
        shard = Path(hf_hub_download(repo_id, weight_map[key], revision=revision, token=token))
        files.setdefault(shard, []).append(key)
    by_key = _read_safetensors(files)
    return {name: by_key[key] for name, key in matched.items()}


def load_reference_tensors(
    source: ReferenceSource,
    tensor_names: list[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read only ``tensor_names`` from a reference, as float32 CPU tensors keyed by those names.

    A name that is not in the checkpoint as is may match a unique key ending with ``.name`` (a
    checkpoint saved from a wrapper with a prefix), or the name less a leading prefix.

    Args:
        source: a Hub repo id, a local folder saved with ``save_pretrained`` (or by `build_reference`, which
            writes ``reference.safetensors``), a PEFT adapter folder or repo, a ``.safetensors`` file, an
            ``nn.Module``, or a ``{name: tensor}`` dict (numpy arrays are accepted).
        tensor_names: the parameter names of the mimic layers as the student's ``named_parameters()`` spells
            them, e.g. ``["classifier.weight", "classifier.bias"]`` for ``mimic_layers=["classifier"]``.
        revision: the Hub revision of ``source``.
        token: the Hub token (default: the logged-in one).
        aliases: other names of a tensor, tried in turn when the reference lacks it under its own: a tied
            tensor (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is saved under one of its names.

    Returns:
        ``{name: tensor}`` for every name in ``tensor_names``.

    Raises:
        ReferenceLoadError: a name is not in the reference (the error lists the closest names it holds), or a
            tensor holds NaN or inf.
    """
    tensors = _load_with_aliases(source, list(tensor_names), revision, token, aliases or {})
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ReferenceLoadError(
                f"Reference tensor {name!r} of {_describe(source)} holds {bad} non-finite value(s) (NaN or inf) out of "
                f"{tensor.numel()}: every mimic score would be non-finite. Rebuild the reference."
            )
    return tensors


def _describe(source: ReferenceSource) -> str:
    if isinstance(source, nn.Module):
        return f"reference model {type(source).__name__}"
    return "the reference tensor dict" if isinstance(source, Mapping) else str(source)


def looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a Hub repo id (``name`` or ``namespace/name``): it
    starts like a path, has more than two parts, names a weights file, or its first part is a local folder."""
    text = str(source)
    parts = text.rstrip("/").split("/")
    return (
        text.startswith((".", "/", "~"))
        or os.sep != "/"
        and os.sep in text
        or len(parts) > 2
        or Path(text).suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json"}
        or len(parts) == 2
        and Path(parts[0]).is_dir()
    )


def checkpoint_name(name: str) -> str:
    """A checkpoint's name as the base-checkpoint check compares it: a local folder or file that exists as its absolute,
    resolved path (``./ckpt``, ``ckpt/`` and ``/work/ckpt`` are one checkpoint); a Hub id (or a path that is not
    there) as given."""
    text = str(name or "")
    if not text:
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def _load_with_aliases(
    source: ReferenceSource,
    tensor_names: list[str],
    revision: str | None,
    token: str | bool | None,
    aliases: Mapping[str, Sequence[str]],
) -> dict[str, torch.Tensor]:
    """`_load`, a missing name tried again under each of its ``aliases`` (a tied tensor is saved under one name)."""
    asked = list(tensor_names)  # what is asked for now, in the order of tensor_names
    left = {name: list(aliases.get(name, ())) for name in tensor_names}
    while True:
        try:
            found = _load(source, asked, revision, token)
        except MissingReferenceTensor as error:
            position = asked.index(error.name) if error.name in asked else None
            if position is None or not left[tensor_names[position]]:
                raise
            asked[position] = left[tensor_names[position]].pop(0)
            continue
        return {name: found[alias] for name, alias in zip(tensor_names, asked)}


def _load(
    source: ReferenceSource, tensor_names: list[str], revision: str | None, token: str | bool | None
) -> dict[str, torch.Tensor]:
    if isinstance(source, (nn.Module, Mapping)):
        available = source
        if isinstance(source, nn.Module):  # every name of a tied tensor, as the student's own are
            available = {
                **dict(source.named_parameters(remove_duplicate=False)),
                **dict(source.named_buffers(remove_duplicate=False)),
            }
        return _select(available, tensor_names, _describe(source))
    if not isinstance(source, (str, os.PathLike)):
        raise ReferenceLoadError(
            f"A reference is a Hub repo id, a local folder or .safetensors file, an nn.Module or a {{name: tensor}} "
            f"dict; got a {type(source).__name__}."
        )
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ReferenceLoadError(f"Reference file {path} is not a .safetensors file.")
        return _from_single_file(path, tensor_names)
    if path.is_dir():
        return _from_directory(path, tensor_names)
    if looks_local(str(source)):
        raise ReferenceLoadError(
            f"Reference path {source} does not exist (looked for {path.absolute()}); it looks like a local path, so it "
            "was not looked up on the Hub."
        )
    try:
        return _from_hub(str(source), tensor_names, revision, token)
    except Exception as error:
        _explain_hub_failure(error, str(source), path)
        raise


def _explain_hub_failure(error: Exception, repo_id: str, path: Path) -> None:
    """Adds to a Hub client's error what was tried: the local path first, then the Hub (and whether offline mode is
    on). The error keeps its type, so callers can still catch the client's own not-found errors."""
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    note = (
        f"hf-gradmimic looked for the reference {repo_id!r} as a local path ({path.absolute()}: not found) and then as "
        f"a Hub repo at {constants.ENDPOINT}"
        + (" with HF_HUB_OFFLINE=1, which allows only files already in the local cache." if offline else ".")
    )
    if hasattr(error, "add_note"):
        error.add_note(note)
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])


def read_reference_metadata(
    source: ReferenceSource, *, revision: str | None = None, token: str | bool | None = None
) -> dict[str, str]:
    """The safetensors header metadata of a reference file (``base_model``, ``layers``… as written by
    `hf_gradmimic.build_reference`); for a PEFT adapter, ``base_model`` comes from its config's
    ``base_model_name_or_path``. Empty for in-memory references and checkpoints without any."""
    from safetensors import safe_open

    if isinstance(source, (nn.Module, Mapping)):
        return {}
    path = Path(source)
    adapter = local_adapter(path) if path.is_dir() else None
    if adapter is None and not path.exists() and not looks_local(str(source)):
        adapter = hub_adapter(str(source), revision, token)
    if adapter is not None:
        return adapter_metadata(*adapter)
    if path.is_dir():
        candidates = [path / name for name in (REFERENCE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME) if (path / name).is_file()]
        if not candidates:
            return {}
        path = candidates[0]
    elif not path.is_file():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(str(source), REFERENCE_WEIGHTS_NAME, revision=revision, token=token))
        except EntryNotFoundError:
            return {}
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
