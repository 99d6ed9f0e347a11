"""Figures and numbers for a Grad-Mimic Stage-2 filter.

`report` draws, with matplotlib's Agg canvas (no pyplot, so no global backend is touched):

- ``window_histograms.png``: per window (labeling function), the histogram of the samples' mean
  mimic scores ``m_i = <-g_i, v> / ||v||`` in that window, split by the window's keep / discard
  vote (the style of Figure 3 of Huang et al., arXiv 2501.06708, Section 4.2);
- ``keep_probability.png``: the distribution of the aggregated ``P(keep)`` with the 0.5 cut;
- ``method_comparison.png`` (when ground-truth ``clean`` flags are given): discard precision,
  recall and F1 of every identification method (threshold, kmeans, gmm, topk) with the filter's
  aggregation and windows, computed by `hf_gradmimic.metrics.compute_filter_metrics`.

and ``report.json`` with the filter's summary, the two quality estimators of Section 5.1
(retained fraction, mean mimic score) and, with ``clean``, the metrics of every method.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write, write_json
from .filter import METHODS, MimicFilter, build_filter, estimate_quality

__all__ = ["report"]

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
) -> dict[str, Path]:
    """Write the filter's figures and ``report.json`` into ``output_dir``.

    Args:
        mimic_filter: the filter from `build_filter`.
        output_dir: the folder to write into (created if needed).
        scores: the score log the filter was built from (anything `build_filter` accepts). Only used
            with ``clean``, to rebuild the filter with every identification method. When omitted,
            the methods are re-run on the per-window values stored in the filter's table
            (`MimicFilter.rebuild`), which gives the same result without re-reading the log.
        clean: ground-truth clean flags (1 = clean, 0 = noisy), one per sample of the filter in
            ``mimic_filter.table["sample_id"]`` order. Adds the method comparison.

    Returns:
        ``{"window_histograms": Path, "keep_probability": Path, ["method_comparison": Path,] "report_json": Path}``.
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
    return paths


def _metrics_per_method(mimic_filter: MimicFilter, clean: np.ndarray, scores: Any) -> dict[str, dict[str, float]]:
    """Discard-detection metrics of every identification method, with the filter's other settings."""
    from .metrics import compute_filter_metrics

    settings = mimic_filter.summary["settings"]
    per_method: dict[str, dict[str, float]] = {}
    # Labeling functions given as objects (e.g. a reference's predictions) cannot be rebuilt from their names.
    functions = settings.get("labeling_functions", ["mimic"])
    rebuildable = all(name in ("mimic", "loss") for name in functions)
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
                raise ValueError("scores= does not hold the same samples as mimic_filter; pass the log it was built from.")
        else:
            rebuilt = mimic_filter.rebuild(method=method)
        per_method[method] = compute_filter_metrics(rebuilt.keep, clean, keep_prob=rebuilt.keep_prob)
    return per_method
