"""Smoke run of scripts/bench_overhead.py --quick: the cases of issue #26 build, train in lockstep and are reported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)  # forks one child per case; minutes when the machine is busy
def test_quick_run_covers_the_new_cases(bench, tmp_path):
    candidates = ["plain", "mimic-head", "mimic-head-verdict", "mimic-select", "vmap-inner"]
    saved = tmp_path / "run.json"
    arguments = ["--quick", "--models", "gpt2", "--candidates", ",".join(candidates), "--steps", "2", "--warmup", "0"]
    # A fresh interpreter: the script forks its children, which can deadlock when forked from a process whose
    # torch thread pools already ran (this test session's).
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--json", str(saved)], capture_output=True, text=True
    )
    assert saved.exists(), done.stderr[-3000:]
    run = json.loads(saved.read_text())
    assert done.returncode == 0, (run["errors"], done.stderr[-3000:])
    measured = {result["candidate"]: result for result in run["results"]}
    assert set(measured) == set(candidates)
    for result in measured.values():
        assert len(result["step_times"]) == 2 and all(t > 0 for t in result["step_times"])
    assert measured["vmap-inner"]["layer"] == "transformer.h.1.mlp.c_fc"
    summary = bench.summarise(run["results"], ["gpt2"], {"gpt2": candidates})
    checks = [what for what, *_ in bench.verdicts(summary)]
    assert any("reference's verdict" in what for what in checks)
    assert any("mimic-select" in what and "step time" in what for what in checks)


def test_clip_inner_case_names_both_towers(bench):
    size = bench.MODELS["clip"]["full"]
    names = bench.layer_names("clip", "mimic-inner", size)
    assert [name.split(".")[0] for name in names] == ["vision_model", "text_model"]
