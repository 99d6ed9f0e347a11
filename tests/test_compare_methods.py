"""`scripts/compare_methods.py --quick`: the method-comparison benchmark end to end, in a subprocess."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_methods.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, label: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is ``label``."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")][1:]
        for line in text.splitlines()
        if line.startswith(f"| {label} |")
    ]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_run_reports_every_method_with_finite_numbers(tmp_path):
    output = tmp_path / "results.md"
    output.write_text(f"old generated part\n{load_script().COMMENTS_MARKER}\nhand-written comment\n")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--suite", "realistic", "oracle", "--output", str(output)],
        check=True,
        timeout=400,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    text = output.read_text()
    assert "old generated part" not in text and text.rstrip().endswith("hand-written comment")
    assert "--quick" in text and "torch" in text and "load average" in text
    methods = load_script().METHODS
    for label, scorer, _, _ in methods.values():
        rows = table_rows(text, label)
        # accuracy in both regimes + the timing row; Grad-Mimic rows also have a discard-F1 row per regime
        assert len(rows) == (5 if scorer == "mimic" else 3), (label, rows)
        for cells in rows:
            numbers = [float(x) for cell in cells for x in re.findall(r"-?\d+(?:\.\d+)?|nan|inf", cell)]
            assert numbers and all(math.isfinite(x) for x in numbers), (label, cells)
    accuracies = [
        float(cell.split("±")[0])
        for name, (label, *_) in methods.items()
        for cells in table_rows(text, label)[:2]
        for cell in cells
    ]
    assert all(0 <= value <= 100 for value in accuracies)
    # The realistic-reference section (issue #16) comes first and covers every detector and trainer.
    assert text.index("## Realistic references") < text.index("## Oracle reference")
    realistic = load_realistic()
    for label in [*realistic._detector_labels().values(), *realistic.TRAINERS.values()]:
        rows = table_rows(text, label)
        assert rows, label
        for cells in rows:
            numbers = [float(x) for cell in cells for x in re.findall(r"-?\d+(?:\.\d+)?|nan|inf", cell)]
            assert numbers and all(math.isfinite(x) for x in numbers), (label, cells)
    # The Stage-2 targets table has the quick run's one setting, with finite figures.
    (target_row,) = [line for line in text.splitlines() if line.startswith("| digits | probe | trusted100 | 40% |")]
    assert all(math.isfinite(float(x)) for x in re.findall(r"[-+]?\d+\.\d+", target_row)), target_row


def load_realistic():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import realistic_refs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return realistic_refs


def test_targets_compare_the_default_filter_with_the_best_baseline():
    """The target lines are read off the records: a hand-made record set gives the verdict a person would."""
    realistic = load_realistic()
    detectors = {name: {"f1": 0.5, "auroc": 0.9} for name in realistic.DETECTORS}
    detectors["cleanlab"]["f1"], detectors["stage2"]["f1"] = 0.8, 0.7
    records = [
        {
            "task": "digits",
            "regime": "probe",
            "reference": "trusted100",
            "noise": 0.4,
            "seed": seed,
            "detectors": detectors,
            "accuracy": {"mimic": 0.9, "plain": 0.88},
        }
        for seed in (0, 1)
    ]

    def rows_and_lines(records):
        lines = realistic.targets(records)
        return [line for line in lines if line.startswith("| digits |")], "\n".join(lines)

    (row,), text = rows_and_lines(records)
    # The default's 70.0 against the best baseline, cleanlab's 80.0: a gap of -10.0; Stage 1 gains 2.0 points.
    assert "| 70.0 | 80.0 (cleanlab) | -10.0 |" in row and "| +2.0 | 2 |" in row
    assert "at or above the best baseline in 0, within 1 point in 0" in text
    detectors["stage2"]["f1"] = 0.85
    (row,), text = rows_and_lines(records)
    assert "| 85.0 | 80.0 (cleanlab) | +5.0 |" in row and "at or above the best baseline in 1" in text


def test_each_held_out_task_is_reported_on_its_own_line():
    """The held-out tasks are left out of the tuned-on count and get one line each: a task looked at since it was
    held out and one that never was are not averaged together."""
    realistic = load_realistic()
    records = []
    for task, default_f1 in (("digits", 0.9), ("penguins", 0.7), ("anes96", 0.85)):
        detectors = {name: {"f1": 0.5, "auroc": 0.9} for name in realistic.DETECTORS}
        detectors["aum"]["f1"], detectors["stage2"]["f1"] = 0.8, default_f1
        records += [
            {
                "task": task,
                "regime": "probe",
                "reference": reference,
                "noise": 0.2,
                "seed": 0,
                "detectors": detectors,
                "accuracy": {"mimic": 0.9, "plain": 0.9},
            }
            for reference in ("trusted50", "trusted100")
        ]
    text = "\n".join(realistic.targets(records))
    assert "Tuned-on tasks (2 settings): the default is at or above the best baseline in 2" in text
    assert "Held-out task penguins (2 settings, never tuned on): at or above the best baseline in 0" in text
    assert "worst gap -10.0, mean -10.00" in text
    assert "Held-out task anes96 (2 settings, never tuned on): at or above the best baseline in 2" in text
