"""Where the card templates live: `model_cards/` at the top of the project (kept as files, as trl does)."""

from __future__ import annotations

from pathlib import Path

_CANDIDATES = (
    Path(__file__).resolve().parent / "model_cards",  # a wheel that packs them inside the package
    Path(__file__).resolve().parent.parent / "model_cards",  # the source tree / an editable install
)


def template_path(name: str) -> Path:
    """Path of the card template ``name`` (e.g. ``"model_card.md"``)."""
    for folder in _CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Card template {name!r} not found in {[str(c) for c in _CANDIDATES]}.")
