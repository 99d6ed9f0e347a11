"""`scripts/clip_curation_benchmark.py --quick`: the image–text benchmark end to end, and its captioned digits."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_gradmimic.testing.captioned_digits import DIGIT_NAMES, caption, caption_tokenizer, captioned_digits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "clip_curation_benchmark.py"
MARKER = "<!-- Comments below are written by hand and kept when the script rewrites this file. -->"


def test_captioned_digits_swap_the_stated_fraction_and_tokenize_every_caption():
    data = captioned_digits(seed=0, mismatch_fraction=0.3)
    pool = data["pool"][:]
    matched = np.asarray(pool["matched"])
    assert abs((1 - matched.mean()) - 0.3) < 0.05
    labels, caption_labels = np.asarray(pool["label"]), np.asarray(pool["caption_label"])
    np.testing.assert_array_equal(matched, labels == caption_labels)
    for text, label in zip(pool["caption"][:20], caption_labels[:20]):  # the caption names its caption_label
        assert DIGIT_NAMES[label] in text.split() or str(label) in text.split()
    tokenizer = caption_tokenizer()
    ids = tokenizer(caption(3, 0))["input_ids"]
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
    assert len(data["trusted"]) == 300 and len(data["test"]) == 400 and len(set(pool["uid"])) == len(matched)
    with pytest.raises(ValueError, match="mismatch_fraction"):
        captioned_digits(mismatch_fraction=1.0)


def table_row(text: str, label_start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label_start}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")][1:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_run_reports_every_detector_and_student_from_its_records(tmp_path):
    output, records = tmp_path / "clip.md", tmp_path / "records.json"
    output.write_text(f"stale generated part\n{MARKER}\nhand-written comment\n")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output), "--json", str(records)],
        check=True,
        timeout=380,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    text = output.read_text()
    assert "stale generated part" not in text and text.rstrip().endswith("hand-written comment")
    (record,) = json.loads(records.read_text())["records"]
    for label, name in (("Grad-Mimic filter", "mimic_filter"), ("CLIP score", "clip_score")):
        cells = table_row(text, label)
        detector = record["detectors"][name]
        assert float(cells[2]) == pytest.approx(100 * detector["f1"], abs=0.051)
        assert float(cells[4]) == pytest.approx(detector["auroc"], abs=5e-4) and 0 <= detector["auroc"] <= 1
    for label, name in (("plain `Trainer`", "plain"), ("`MimicTrainer`", "mimic"), ("plain on the matched", "oracle")):
        assert float(table_row(text, label)[0]) == pytest.approx(100 * record["accuracy"][name], abs=0.051)
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", text.split("## Time per optimizer step")[1])]
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers)
