"""Safe file writing for the whole package: atomic writes (a file or a folder) and JSON-safe values.

Every file hf-gradmimic writes (score shards, filters, reports, figures, cards, references,
scored datasets, the loopback Hub's state) goes through `atomic_write` or `atomic_write_dir`:
the content is written under a temporary name in the destination's own folder and renamed into
place with `os.replace`, which is atomic on POSIX and Windows within one file system. A reader
therefore sees the old content or the new one, never half a file, and a failed or interrupted
write leaves the old content untouched and no temporary file behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_dir", "json_safe", "read_json_object", "write_json"]


def _sibling(destination: Path, kind: str) -> Path:
    """A hidden, unique name next to ``destination`` (same folder, so same file system for os.replace).

    It ends in ``.tmp`` / ``.old`` so that ignore patterns such as ``*.tmp`` (uploads, .gitignore) skip
    what a killed process may leave behind.
    """
    return destination.parent / f".{destination.name}.{uuid.uuid4().hex[:12]}.{kind}"


def atomic_write(destination: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Write the file ``destination`` atomically: ``write(tmp)`` fills a temporary sibling, then it is renamed.

    Args:
        destination: the file to create or replace; its folder is created if missing.
        write: called with the temporary path (a ``str``), e.g. ``lambda tmp: pq.write_table(table, tmp)``
            or ``card.save``. It must create the file at that path.

    Returns:
        ``destination`` as a `Path`.

    The temporary file is not pre-created (as ``tempfile.mkstemp`` would, with mode 0600), so the
    written file gets the same permissions as any file the writer creates. On any exception,
    including KeyboardInterrupt, the temporary file is removed and the exception re-raised.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(destination, "tmp")
    try:
        write(str(tmp))
        if not tmp.is_file():
            raise FileNotFoundError(f"Writing {destination} produced no file at the temporary path {tmp}.")
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


def atomic_write_dir(
    destination: str | os.PathLike, write: Callable[[str], Any], replaces: Callable[[Path], bool] | None = None
) -> Path:
    """Write the folder ``destination`` atomically: ``write(tmp)`` fills a temporary sibling folder.

    Args:
        destination: the folder to create or replace, e.g. for ``datasets.Dataset.save_to_disk``.
        write: called with the temporary folder's path (a ``str``); it must create that folder.
        replaces: whether an existing folder at ``destination`` is one this write may replace (an earlier copy of
            the same kind); None: any folder. Anything else there is refused before writing: it is not deleted.

    Returns:
        ``destination`` as an absolute `Path`.

    An older folder at ``destination`` is moved aside and deleted only once the new one is in place,
    so a crash leaves either the old or the new folder at ``destination`` (and at most a hidden
    sibling), never a half-written one. (Two renames: POSIX cannot replace a non-empty folder in one.)
    """
    destination = Path(destination).absolute()
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination} is a file, not a folder: give another path (nothing was written).")
    if destination.is_dir() and any(destination.iterdir()) and replaces is not None and not replaces(destination):
        held = sorted(entry.name for entry in destination.iterdir())
        raise FileExistsError(
            f"{destination} holds files this would delete ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}) "
            "and is not an earlier copy of what is written there: give an empty or new folder (nothing was written)."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(destination, "tmp")
    try:
        write(str(tmp))
        if not tmp.is_dir():
            raise FileNotFoundError(f"Writing {destination} produced no folder at the temporary path {tmp}.")
        if destination.exists():
            old = _sibling(destination, "old")
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return destination


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: non-finite floats -> None, numpy scalars and arrays -> Python, tuples -> lists.

    Dict keys become strings (as ``json.dump`` would write them). Strict JSON has no NaN or
    Infinity, and ``json.dump`` refuses numpy scalars, hence this pass before writing.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(destination: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write `json_safe(value)` to ``destination`` atomically (strict JSON: no NaN, UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(json_safe(value), handle, indent=indent, allow_nan=False)

    return atomic_write(destination, write)


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ValueError names the file (``what`` it is) and ``fix`` when it is not valid JSON
    or holds something other than an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}); {fix}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value
