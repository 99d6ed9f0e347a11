"""The filter's warnings: `FilterWarning`, raised and also kept for the filter's summary."""

from __future__ import annotations

import warnings


class FilterWarning(UserWarning):
    """Warnings about the filter's input or a fallback it took (degenerate window, 2 windows...)."""


def warn(message: str, collected: list[str] | None = None) -> None:
    """Raise ``message`` as a `FilterWarning` and append it to ``collected`` (the summary's ``warnings``).

    ``stacklevel=3`` points the warning at the caller of the function that warns.
    """
    if collected is not None:
        collected.append(message)
    warnings.warn(message, FilterWarning, stacklevel=3)
