"""Figures and numbers for a Grad-Mimic Stage-2 filter.

`report` draws, with matplotlib's Agg canvas (no pyplot, so no global backend is touched):

- ``window_histograms.png``: per window (labeling function), the histogram of the samples' mean
  mimic scores ``m_i = <-g_i, v> / ||v||`` in that window, split by the window's keep / discard
  vote (the style of Figure 3 of Huang et al., arXiv 2501.06708, Section 4.2);
- ``keep_probability.png``: the distribution of the aggregated ``P(keep)`` with the 0.5 cut;
- ``method_comparison.png`` (when ground-truth ``clean`` flags are given): discard precision,
  recall and F1 of every identification method (threshold, kmeans, gmm, topk) with the filter's
  aggregation and windows, computed by `hf_gradmimic.metrics.compute_filter_metrics`.

``report.json`` with the filter's summary, the two quality estimators of Section 5.1
(retained fraction, mean mimic score) and, with ``clean``, the metrics of every method; and ``report.html``,
one self-contained page for a reviewer (`write_html_report`, from ``templates/report.html``): the summary,
the figures inlined, the windows, the provenance, and the samples with the lowest ``P(keep)`` with their
content (text, or an image thumbnail) when the dataset is given.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write, write_json
from .filter import METHODS, SIGNAL_NAMES, MimicFilter, build_filter, estimate_quality

__all__ = ["report", "write_html_report"]

HTML_TEMPLATE = "report.html"
LOWEST_SAMPLES = 50
"""How many samples, lowest ``P(keep)`` first, the HTML page shows."""
FIGURE_CAPTIONS = {
    "window_histograms": "Per window: the samples' mean mimic scores, split by the window's keep / discard vote.",
    "keep_probability": "The aggregated keep probability P(keep); a sample is kept at P(keep) ≥ 0.5.",
    "method_comparison": "Discard precision, recall and F1 of every identification method against the clean flags.",
}
THUMBNAIL_PIXELS = 128
TEXT_CHARACTERS = 600
"""Longer text values are cut to this many characters on the page (with an ellipsis)."""

# With windows="step" there can be thousands of windows; draw at most this many panels (evenly
# spaced over training) and say so in the figure title.
MAX_PANELS = 12
_KEEP_COLOUR, _DISCARD_COLOUR, _ABSTAIN_COLOUR = "#2a9d8f", "#e76f51", "#8d99ae"


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, destination: Path) -> Path:
    return atomic_write(destination, lambda tmp: figure.savefig(tmp, format="png"))


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def plot_window_histograms(mimic_filter: MimicFilter, destination: Path, *, bins: int = 50) -> Path:
    """Per-window histograms of mean mimic scores, coloured by the window's keep / discard vote."""
    scores = mimic_filter.window_scores()
    votes = mimic_filter.votes()
    summary = mimic_filter.summary
    m = scores.shape[1]
    panels = np.unique(np.linspace(0, m - 1, min(m, MAX_PANELS)).round().astype(int))
    cols = min(3, panels.size)
    rows = math.ceil(panels.size / cols)
    figure = _new_figure(4.2 * cols, 3.2 * rows + 0.6)
    finite_all = _finite(scores)
    edges = np.histogram_bin_edges(finite_all if finite_all.size else np.zeros(1), bins=bins)
    for slot, j in enumerate(panels):
        ax = figure.add_subplot(rows, cols, slot + 1)
        info = summary["windows"][j]
        kept = _finite(scores[votes[:, j] == 1, j])
        discarded = _finite(scores[votes[:, j] == 0, j])
        ax.hist(kept, bins=edges, color=_KEEP_COLOUR, alpha=0.75, label=f"keep ({kept.size:,})")
        ax.hist(discarded, bins=edges, color=_DISCARD_COLOUR, alpha=0.75, label=f"discard ({discarded.size:,})")
        boundary = info["threshold"]
        title = info["name"]
        if info["degenerate"]:
            title += " (degenerate: all kept)"
        elif boundary is not None:
            title += f"  b·w cut {boundary:.3g}"
        if info.get("estimated_accuracy") is not None:
            title += f"  acc {info['estimated_accuracy']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean mimic score in window", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    shown = "" if panels.size == m else f" ({panels.size} of {m} windows shown)"
    settings = summary["settings"]
    figure.suptitle(
        f"Mimic scores per window, coloured by the window's vote — method={settings['method']}{shown}", fontsize=11
    )
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return _save_figure(figure, destination)


def plot_keep_probability(mimic_filter: MimicFilter, destination: Path, *, bins: int = 50) -> Path:
    """Histogram of the aggregated keep probabilities, with the 0.5 decision line."""
    keep_prob = mimic_filter.keep_prob
    summary = mimic_filter.summary
    figure = _new_figure(6.4, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ax.hist(keep_prob[keep_prob >= 0.5], bins=edges, color=_KEEP_COLOUR, label="kept")
    ax.hist(keep_prob[keep_prob < 0.5], bins=edges, color=_DISCARD_COLOUR, label="discarded")
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("P(keep)")
    ax.set_ylabel("samples (log scale)")
    ax.set_title(
        f"Keep probability ({summary['aggregate_used']}): {summary['retained_fraction']:.1%} of "
        f"{summary['n_samples']:,} samples kept",
        fontsize=10,
    )
    ax.legend(frameon=False)
    figure.tight_layout()
    return _save_figure(figure, destination)


def plot_method_comparison(metrics: dict[str, dict[str, float]], destination: Path, *, title: str = "") -> Path:
    """Grouped bars of discard precision / recall / F1 per identification method."""
    names = list(metrics)
    keys = ("discard_precision", "discard_recall", "discard_f1")
    labels = ("precision", "recall", "F1")
    colours = ("#264653", "#e9c46a", "#e76f51")
    figure = _new_figure(7.0, 4.2)
    ax = figure.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    width = 0.26
    for offset, (key, label, colour) in enumerate(zip(keys, labels, colours)):
        heights = [metrics[name][key] for name in names]
        bars = ax.bar(x + (offset - 1) * width, heights, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("discard detection (noisy = positive)")
    ax.set_title(title or "Discard precision / recall / F1 per identification method", fontsize=10)
    ax.legend(frameon=False, ncol=3, loc="upper center", fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, destination)


def report(
    mimic_filter: MimicFilter,
    output_dir: str | os.PathLike,
    *,
    scores: Any = None,
    clean: Any = None,
    dataset: Any = None,
    id_column: str | None = None,
) -> dict[str, Path]:
    """Write the filter's figures, ``report.json`` and ``report.html`` into ``output_dir``.

    Args:
        mimic_filter: the filter from `build_filter`.
        output_dir: the folder to write into (created if needed).
        scores: the score log the filter was built from (anything `build_filter` accepts). Only used
            with ``clean``, to rebuild the filter with every identification method. When omitted,
            the methods are re-run on the per-window values stored in the filter's table
            (`MimicFilter.rebuild`), which gives the same result without re-reading the log.
        clean: ground-truth clean flags (1 = clean, 0 = noisy), one per sample of the filter in
            ``mimic_filter.table["sample_id"]`` order. Adds the method comparison.
        dataset: the training dataset (a `datasets.Dataset`, `pandas.DataFrame` or `pyarrow.Table`): the HTML
            page then shows the content of the samples with the lowest ``P(keep)`` (text, image thumbnails,
            labels). Its rows are matched to the sample ids as `MimicFilter.apply` matches them.
        id_column: the column of ``dataset`` holding the sample ids (``mimic_id_column``); by default the one
            the score log's provenance recorded, else row indices.

    Returns:
        ``{"window_histograms": Path, "keep_probability": Path, ["method_comparison": Path,] "report_json": Path,
        "report_html": Path}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "window_histograms": plot_window_histograms(mimic_filter, output_dir / "window_histograms.png"),
        "keep_probability": plot_keep_probability(mimic_filter, output_dir / "keep_probability.png"),
    }
    summary = mimic_filter.summary
    settings = summary["settings"]
    payload: dict[str, Any] = {
        "summary": summary,
        "quality": estimate_quality(mimic_filter),
    }
    if clean is not None:
        from .metrics import compute_filter_metrics

        clean = np.asarray(clean)
        if clean.shape != (mimic_filter.table.num_rows,):
            raise ValueError(
                f"clean has shape {clean.shape}, expected ({mimic_filter.table.num_rows},): one flag per sample, "
                "in mimic_filter.table['sample_id'] order."
            )
        per_method = _metrics_per_method(mimic_filter, clean, scores)
        payload["filter_metrics"] = compute_filter_metrics(mimic_filter.keep, clean, keep_prob=mimic_filter.keep_prob)
        payload["method_metrics"] = per_method
        paths["method_comparison"] = plot_method_comparison(
            per_method,
            output_dir / "method_comparison.png",
            title=f"Discard detection per method (aggregate={summary['aggregate_used']}, windows={settings['windows']})",
        )
    paths["report_json"] = write_json(output_dir / "report.json", payload)
    figures = {name: path for name, path in paths.items() if path.suffix == ".png"}
    paths["report_html"] = write_html_report(
        mimic_filter,
        output_dir / "report.html",
        figures=figures,
        quality=payload["quality"],
        method_metrics=payload.get("method_metrics"),
        dataset=dataset,
        id_column=id_column,
    )
    return paths


def write_html_report(
    mimic_filter: MimicFilter,
    destination: str | os.PathLike,
    *,
    figures: dict[str, Path] | None = None,
    quality: dict[str, float] | None = None,
    method_metrics: dict[str, dict[str, float]] | None = None,
    dataset: Any = None,
    id_column: str | None = None,
    lowest: int = LOWEST_SAMPLES,
) -> Path:
    """Render ``templates/report.html`` into one self-contained page (figures as base64 PNG, no other file).

    Every value is HTML-escaped by jinja2's autoescape, so a sample's text shows as text whatever it holds.

    Args:
        mimic_filter: the filter to show.
        destination: the ``.html`` file to write (atomically).
        figures: ``{name: png path}`` to inline, in that order.
        quality: the estimators of `estimate_quality` (computed when omitted).
        method_metrics: discard precision / recall / F1 per identification method, when measured.
        dataset, id_column: as in `report`: the training data whose rows show beside the lowest samples.
        lowest: how many samples to list, lowest ``P(keep)`` first.
    """
    import jinja2

    summary = mimic_filter.summary
    quality = quality if quality is not None else estimate_quality(mimic_filter)
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("hf_gradmimic", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    order = np.argsort(mimic_filter.keep_log_odds, kind="stable")[:lowest]
    content_columns, content = _sample_content(mimic_filter, order, dataset, id_column)
    page = environment.get_template(HTML_TEMPLATE).render(
        title=f"Grad-Mimic filter report: {summary['retained_fraction']:.1%} of {summary['n_samples']:,} samples kept",
        summary_rows=_summary_rows(summary, quality),
        warnings=list(summary.get("warnings") or []),
        figures=[
            {"name": FIGURE_CAPTIONS.get(name, name), "data": base64.b64encode(Path(path).read_bytes()).decode("ascii")}
            for name, path in (figures or {}).items()
        ],
        window_rows=_window_rows(summary),
        method_rows=[
            {
                "method": method,
                "precision": _number(values["discard_precision"]),
                "recall": _number(values["discard_recall"]),
                "f1": _number(values["discard_f1"]),
            }
            for method, values in (method_metrics or {}).items()
        ],
        provenance=json.dumps(summary.get("provenance"), indent=2, sort_keys=True)
        if summary.get("provenance")
        else None,
        has_dataset=dataset is not None,
        content_columns=content_columns,
        samples=_lowest_samples(mimic_filter, order, content),
    )
    return atomic_write(Path(destination), lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _summary_rows(summary: dict[str, Any], quality: dict[str, float]) -> list[tuple[str, str]]:
    settings = summary["settings"]
    return [
        ("samples", f"{summary['n_samples']:,}"),
        ("kept", f"{summary['retained_fraction']:.2%}"),
        ("mean mimic score", _number(quality["mean_mimic_score"])),
        ("records", f"{summary['n_records']:,}"),
        ("samples with a non-finite record (discarded)", str(summary.get("n_nonfinite_samples", 0))),
        ("samples without a scored record (prior)", str(summary.get("n_unscored_samples", 0))),
        ("method", str(settings["method"])),
        ("aggregation", f"{settings['aggregate']} (used: {summary['aggregate_used']})"),
        ("windows", str(settings["windows"])),
        ("labeling functions", ", ".join(map(str, settings.get("labeling_functions", ["mimic"])))),
        ("seed", str(settings["seed"])),
    ]


def _mimic_votes(summary: dict[str, Any]) -> bool:
    """Whether the mimic windows voted (``labeling_functions`` without ``"mimic"`` leaves them out)."""
    return "mimic" in summary["settings"].get("labeling_functions", ["mimic"])


def _window_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for window in summary["windows"]:
        note = "degenerate: all kept" if window["degenerate"] else ""
        if not _mimic_votes(summary):
            note = "not voting (labeling_functions leave out 'mimic')"
        rows.append(
            {
                "name": f"mimic/{window['name']}",
                "steps": f"{window['first_step']}–{window['last_step']}",
                "n_samples": _number(window.get("n_samples")),
                "cut": _number(window["threshold"]),
                "kept_fraction": _number(window.get("kept_fraction")),
                "accuracy": _number(window.get("estimated_accuracy")),
                "note": note,
            }
        )
    for function in summary.get("labeling_functions") or []:
        rows.append(
            {
                "name": str(function["name"]),
                "steps": "",
                "n_samples": _number(function.get("n_samples")),
                "cut": _number(function.get("boundary")),
                "kept_fraction": _number(function.get("kept_fraction")),
                "accuracy": _number(function.get("estimated_accuracy")),
                "note": "",
            }
        )
    return rows


_VOTE_KINDS = {1: ("keep", "K"), 0: ("discard", "D"), -1: ("abstain", "·")}


def _lowest_samples(mimic_filter: MimicFilter, order: np.ndarray, content: list[list[dict[str, str]]]) -> list[dict]:
    """The rows of the page's sample table: ids, probabilities, every labeling function's vote, the content."""
    table = mimic_filter.table.take(order)
    summary = mimic_filter.summary
    mimic = _mimic_votes(summary)
    names = [f"mimic/{name}" for name in summary["window_names"]] if mimic else []
    votes = [np.asarray(row if mimic else [], dtype=int) for row in table.column("votes").to_pylist()]
    if "lf_votes" in table.column_names:
        names += [
            str(function["name"])
            for function in summary.get("labeling_functions") or []
            if function.get("kind") != "score"
        ]
        votes = [
            np.concatenate([mimic, np.asarray(other, dtype=int)])
            for mimic, other in zip(votes, table.column("lf_votes").to_pylist())
        ]
    samples = []
    for position, record in enumerate(
        table.select(["sample_id", "keep_prob", "mean_mimic_score", "mean_weight"]).to_pylist()
    ):
        samples.append(
            {
                "sample_id": str(record["sample_id"]),
                "keep_prob": _number(record["keep_prob"]),
                "mean_mimic_score": _number(record["mean_mimic_score"]),
                "mean_weight": _number(record["mean_weight"]),
                "votes": [
                    {"name": name, "kind": _VOTE_KINDS[int(vote)][0], "symbol": _VOTE_KINDS[int(vote)][1]}
                    for name, vote in zip(names, votes[position])
                ],
                "content": content[position] if content else [],
            }
        )
    return samples


def _sample_content(
    mimic_filter: MimicFilter, order: np.ndarray, dataset: Any, id_column: str | None
) -> tuple[list[str], list[list[dict[str, str]]]]:
    """The column names and, per listed sample, its cells: text (cut to `TEXT_CHARACTERS`) or a PNG thumbnail."""
    if dataset is None:
        return [], []
    from .tables import as_rows

    if id_column is None:
        id_column = ((mimic_filter.summary.get("provenance") or {}).get("sample_ids") or {}).get("column")
    rows = as_rows(dataset)
    positions = mimic_filter.positions(dataset, id_column)[order]
    picked = rows.take(positions)
    if rows.kind == "pandas.DataFrame":
        records = picked.to_dict("records")
    elif rows.kind == "pyarrow.Table":
        records = picked.to_pylist()
    else:  # a datasets.Dataset: indexing decodes its Image columns to PIL images
        records = [picked[index] for index in range(len(picked))]
    columns = [name for name in rows.column_names if name != id_column]
    return columns, [[_cell(name, record[name]) for name in columns] for record in records]


def _cell(column: str, value: Any) -> dict[str, str]:
    thumbnail = _thumbnail(value)
    if thumbnail is not None:
        return {"column": column, "image": thumbnail, "text": ""}
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 8:
        text = f"[{len(value)} values]"
    else:
        text = str(value)
    if len(text) > TEXT_CHARACTERS:
        text = text[:TEXT_CHARACTERS] + "…"
    return {"column": column, "image": "", "text": text}


def _thumbnail(value: Any) -> str | None:
    """A base64 PNG thumbnail of a PIL image or of an undecoded ``datasets.Image`` value; None for anything else."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib requires pillow
        return None
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        try:
            value = Image.open(io.BytesIO(value["bytes"]))
        except OSError:
            return None
    if not isinstance(value, Image.Image):
        return None
    image = value.convert("RGB") if value.mode not in ("RGB", "L") else value.copy()
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    if max(image.size) < THUMBNAIL_PIXELS // 2:  # tiny images (8x8 digits) scaled up, pixels kept sharp
        factor = THUMBNAIL_PIXELS // 2 // max(image.size)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _metrics_per_method(mimic_filter: MimicFilter, clean: np.ndarray, scores: Any) -> dict[str, dict[str, float]]:
    """Discard-detection metrics of every identification method, with the filter's other settings."""
    from .metrics import compute_filter_metrics

    settings = mimic_filter.summary["settings"]
    per_method: dict[str, dict[str, float]] = {}
    # Labeling functions given as objects (e.g. a reference's predictions) cannot be rebuilt from their names.
    functions = settings.get("labeling_functions", ["mimic"])
    rebuildable = all(name in ("mimic", "loss", *SIGNAL_NAMES) for name in functions)
    for method in METHODS:
        if scores is not None and rebuildable:
            rebuilt = build_filter(
                scores,
                method=method,
                aggregate=settings["aggregate"],
                windows=settings["windows"],
                threshold=settings["threshold"] if method == "threshold" else None,
                topk=settings["topk"],
                seed=settings["seed"],
                labeling_functions=functions,
            )
            if not np.array_equal(rebuilt.sample_ids, mimic_filter.sample_ids):
                raise ValueError(
                    "scores= does not hold the same samples as mimic_filter; pass the log it was built from."
                )
        else:
            rebuilt = mimic_filter.rebuild(method=method)
        per_method[method] = compute_filter_metrics(rebuilt.keep, clean, keep_prob=rebuilt.keep_prob)
    return per_method
