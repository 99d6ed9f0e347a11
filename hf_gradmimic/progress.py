"""Progress bars for long work (the Stage-2 filter, CLIP scores, the reference's feature pass, streamed pushes),
shown and silenced like those of `datasets`.

A bar is a `tqdm` bar (``tqdm.auto``, as `datasets` uses: a widget in a notebook, text on stderr elsewhere). It is
hidden when any switch that hides the Hugging Face libraries' bars is set:

- `datasets`: ``datasets.disable_progress_bars()`` (``datasets.utils.logging.disable_progress_bar()``), or the
  environment variable ``HF_DATASETS_DISABLE_PROGRESS_BARS``;
- `transformers`: ``transformers.utils.logging.disable_progress_bar()``;
- `huggingface_hub`: ``huggingface_hub.utils.disable_progress_bars()``, or ``HF_HUB_DISABLE_PROGRESS_BARS``.

The switches are read when a bar is made, so flipping one between two calls takes effect. A library that is not
imported cannot have been switched off, so none is imported here (the filter does not need them); the environment
variables are read directly, so setting one after the library's import counts too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

__all__ = ["ENVIRONMENT_SWITCHES", "progress_bar", "progress_bars_disabled"]

ENVIRONMENT_SWITCHES: tuple[str, ...] = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")
"""The environment variables that hide the bars (any of ``1``, ``true``, ``yes``, ``on``)."""

_TRUE = {"1", "TRUE", "YES", "ON"}


def progress_bars_disabled() -> bool:
    """Whether a switch of `datasets`, `transformers` or `huggingface_hub` hides progress bars now."""
    if any(os.environ.get(name, "").strip().upper() in _TRUE for name in ENVIRONMENT_SWITCHES):
        return True
    checks = (
        ("datasets", "are_progress_bars_disabled", True),
        ("transformers.utils.logging", "is_progress_bar_enabled", False),
        ("huggingface_hub.utils", "are_progress_bars_disabled", True),
    )
    for module_name, function, disabled_when in checks:
        module = sys.modules.get(module_name)
        check = getattr(module, function, None) if module is not None else None
        if check is not None and bool(check()) is disabled_when:
            return True
    return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A `tqdm` bar over ``iterable`` (or to ``update`` by hand), disabled when `progress_bars_disabled`.

    ``desc``, ``total`` and ``unit`` as in `tqdm`; ``file`` is where it draws (default stderr); other keyword
    arguments go to `tqdm` (e.g. ``unit_scale=True`` for counts of records).
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=file, disable=progress_bars_disabled(), **kwargs)
