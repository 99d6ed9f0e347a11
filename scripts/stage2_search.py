"""Stage-2 candidates measured on the realistic suite's saved runs: how the default of `build_filter` is chosen.

Reads the cells that ``scripts/compare_methods.py --suite realistic --work-dir DIR`` recorded (their score logs and
``cell_inputs.npz``), builds each candidate filter with the library's own `build_filter`, and prints, per candidate,
its discard F1 and AUROC (of ``keep_log_odds``, the ranking) beside the strongest baseline of the same cell (cleanlab with CV or with the
reference's probabilities, reference argmax ≠ label, the small-loss GMM on the plain model's log-loss, AUM), over
the tasks given (``--tasks``; the held-out task is left out of the choice). Nothing here is written to docs/.

    python scripts/stage2_search.py --work-dirs /tmp/suite/db /tmp/suite/bc --tasks digits bbc breast_cancer
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINES = ("cleanlab", "cleanlab_reference", "reference_disagreement", "loss_gmm", "aum")
CANDIDATES: dict[str, dict] = {
    f"{name}{' +gate' if gate else ''}": {
        "labeling_functions": functions,
        "aggregate": "mixture",
        "discard_requires_disagreement": gate,
    }
    for name, functions in {
        "mean": ["mean_loss"],
        "margin": ["mean_margin"],
        "mean+margin": ["mean_loss", "mean_margin"],
        "mean+last": ["mean_loss", "last_loss"],
        "last+margin": ["last_loss", "mean_margin"],
        "mean+last+margin": ["mean_loss", "last_loss", "mean_margin"],
        "window": ["window_loss"],
        "mean+ref": ["mean_loss", "reference_loss"],
        "margin+ref": ["mean_margin", "reference_loss"],
        "mean+margin+ref": ["mean_loss", "mean_margin", "reference_loss"],
        "mimic+mean+margin": ["mimic", "mean_loss", "mean_margin"],
    }.items()
    for gate in (False, True)
}
CANDIDATES["previous default"] = {"labeling_functions": ["mimic", "loss"], "method": "kmeans", "aggregate": "snorkel"}

# The default's labeling functions with each class a Student t of other degrees of freedom (inf: Gaussian classes).
CANDIDATES.update(
    {
        f"default, t {dof:g} dof": {
            "labeling_functions": ["mean_loss", "mean_margin", "reference_margin"],
            "aggregate": "mixture",
            "mixture_degrees_of_freedom": dof,
        }
        for dof in (3.0, 4.0, 5.0, 7.0, 10.0, 30.0, math.inf)
    }
)

REFERENCE_LOGITS = "<the reference's own logits>"
"""In a candidate's labeling functions: `PredictorMargin` over the cell's reference logits (``cell_inputs.npz``)."""

CANDIDATES.update(
    {
        f"mean+margin+{name} +gate": {
            "labeling_functions": ["mean_loss", "mean_margin", source],
            "aggregate": "mixture",
        }
        for name, source in (
            ("ref margin (log)", "reference_margin"),  # the reference's head on the student's current features
            ("ref margin (own logits)", REFERENCE_LOGITS),  # the reference model's own verdict
        )
    }
)


def metrics(keep: np.ndarray, keep_log_odds: np.ndarray, is_clean: np.ndarray) -> tuple[float, float]:
    from scipy.stats import rankdata
    from sklearn.metrics import f1_score, roc_auc_score

    # by rank: the log-odds hold +inf for samples never drawn (and a vote aggregate's ±inf)
    return 100 * f1_score(~is_clean, ~keep), 100 * roc_auc_score(is_clean, rankdata(keep_log_odds))


def main() -> None:
    from hf_gradmimic import build_filter
    from hf_gradmimic.filter import PredictorMargin

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dirs", nargs="+", required=True)
    parser.add_argument("--tasks", nargs="+", default=["digits", "bbc", "breast_cancer"])
    parser.add_argument("--candidates", nargs="+", default=None, help="default: every candidate")
    parser.add_argument("--per-setting", action="store_true", help="also print each setting's gaps")
    ns = parser.parse_args()
    ns.candidates = ns.candidates or list(CANDIDATES)
    # setting -> candidate -> [(f1, auroc)] over seeds; setting -> baseline -> [f1] over seeds
    results: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    baseline_f1: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for work in map(Path, ns.work_dirs):
        for line in (work / "realistic.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["task"] not in ns.tasks or record["reference"] == "oracle":
                continue
            cell = (
                work
                / f"{record['task']}_{record['reference']}_{record['noise']}_{record['regime']}_seed{record['seed']}"
            )
            inputs = np.load(cell / "cell_inputs.npz")
            is_clean = inputs["is_clean"]
            setting = (record["task"], record["regime"], record["reference"], record["noise"])
            for baseline in BASELINES:
                if baseline in record["detectors"]:
                    baseline_f1[setting][baseline].append(record["detectors"][baseline]["f1"] * 100)
            own_margin = PredictorMargin(inputs["reference_logits"], inputs["given"], name="reference_own_margin")
            for name in ns.candidates:
                settings = dict(CANDIDATES[name])
                settings["labeling_functions"] = [
                    own_margin if lf is REFERENCE_LOGITS else lf for lf in settings["labeling_functions"]
                ]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mimic_filter = build_filter(cell / "mimic", **settings)
                keep = np.ones(len(is_clean), dtype=bool)
                keep_log_odds = np.full(len(is_clean), np.inf)  # a sample never drawn stays kept
                keep[mimic_filter.sample_ids] = mimic_filter.keep
                keep_log_odds[mimic_filter.sample_ids] = mimic_filter.keep_log_odds
                results[setting][name].append(metrics(keep, keep_log_odds, is_clean))
    # The best baseline of a setting is the one with the highest mean F1 over the seeds (of those every seed has), as
    # in scripts/realistic_refs.py's headline: a user picks a method, not the best one per seed.
    seeds = {setting: len(by_candidate[ns.candidates[0]]) for setting, by_candidate in results.items()}
    best_of = {
        setting: max(np.mean(f1) for f1 in by_baseline.values() if len(f1) == seeds[setting])
        for setting, by_baseline in baseline_f1.items()
    }
    print(f"{len(results)} settings (mean over seeds); 'wins' = at or above the best baseline's mean F1")
    if ns.per_setting:
        for setting, by_candidate in sorted(results.items()):
            best = best_of[setting]
            gaps = [np.mean(np.asarray(by_candidate[name])[:, 0]) - best for name in ns.candidates]
            print(" ".join(map(str, setting)).ljust(34), f"best {best:5.1f}", " ".join(f"{g:+5.1f}" for g in gaps))
    for name in ns.candidates:
        gaps, aurocs = [], []
        for setting, by_candidate in results.items():
            runs = np.asarray(by_candidate[name])
            gaps.append(runs[:, 0].mean() - best_of[setting])
            aurocs.append(runs[:, 1].mean())
        gaps = np.asarray(gaps)
        print(
            f"{name:24s} wins {int((gaps >= 0).sum()):2d}/{len(gaps)}  within 1 point {int((gaps >= -1).sum()):2d}  "
            f"mean gap {gaps.mean():+.2f}  worst {gaps.min():+.2f}  mean AUROC {np.mean(aurocs):.2f}  "
            f"min AUROC {np.min(aurocs):.2f}"
        )


if __name__ == "__main__":
    main()
