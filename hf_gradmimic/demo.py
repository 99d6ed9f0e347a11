"""The offline end-to-end demo behind `make demo` (and `gradmimic demo`).

1. scikit-learn's bundled digits; 40% of the training labels flipped symmetrically (fixed seed), and 100 samples
   with their clean labels held out of the pool as the trusted set a user has;
2. the reference: a head linear-probed on those trusted samples over the shared frozen backbone
   (`build_reference`, the recipe that shares the student's coordinates), not on the pool's clean labels (an oracle
   reference flatters every method);
3. plain `Trainer` and `MimicTrainer` trained on the pool's noisy labels over the same backbone;
4. Stage 2: `build_filter`'s default from the recorded scores, beside the paper's filter (Snorkel over the mimic
   and loss windows) and two baselines on the same pool: the reference's argmax against the label, and the
   small-loss GMM on the plain model's log-loss;
5. a table of test accuracies and discard-detection precision / recall / F1, computed by the
   run (nothing here is a constant), report figures and the scored dataset in ``demo_output/``;
6. the loopback Hub server: the scored dataset pushed with its card, loaded back with
   `datasets.load_dataset`, and the card's first lines printed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import write_json
from .filter.identification import DEFAULT_METHOD


@dataclass
class DemoSettings:
    output_dir: str = "demo_output"
    noise_rate: float = 0.4
    trusted_samples: int = 100
    seed: int = 0
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 5e-2
    probe_epochs: int = 100
    temperature: float = 0.5
    method: str = DEFAULT_METHOD
    push: bool = True
    progress: bool = True


def _training_args(settings: DemoSettings, output_dir: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        eval_strategy="epoch",
        logging_strategy="epoch",
        use_cpu=True,
        seed=settings.seed,
        disable_tqdm=not settings.progress,
    )


def _test_accuracy(trainer) -> float:
    return float(trainer.evaluate()["eval_accuracy"])


def _logits(model, dataset) -> np.ndarray:
    """``model``'s logits on every row of a digits split (one batch: the split is small)."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(pixel_values=torch.as_tensor(np.asarray(dataset["pixel_values"]))).logits.numpy()


@contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """With ``shown=False``, no progress bar from transformers, datasets or huggingface_hub (loading weights,
    ``map``, uploads) until the block ends; then each is as it was."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    switches = [
        (datasets.is_progress_bar_enabled(), datasets.disable_progress_bars, datasets.enable_progress_bars),
        (
            not huggingface_hub.utils.are_progress_bars_disabled(),
            huggingface_hub.utils.disable_progress_bars,
            huggingface_hub.utils.enable_progress_bars,
        ),
        (
            transformers_logging.is_progress_bar_enabled(),
            transformers_logging.disable_progress_bar,
            transformers_logging.enable_progress_bar,
        ),
    ]
    if not shown:
        for enabled, disable, _ in switches:
            if enabled:
                disable()
    try:
        yield
    finally:
        if not shown:
            for enabled, _, enable in switches:
                if enabled:
                    enable()


def run_demo(settings: DemoSettings | None = None, log=print) -> dict[str, Any]:
    """Run the whole pipeline; returns the figures it printed."""
    settings = settings or DemoSettings()
    with progress_bars(settings.progress):
        return _run_demo(settings, log)


def _run_demo(settings: DemoSettings, log) -> dict[str, Any]:
    import datasets
    from transformers import Trainer, TrainingArguments

    from . import MimicConfig, MimicTrainer, build_filter, build_reference, report
    from .baselines import cross_entropy_per_row, reference_disagreement, small_loss_gmm
    from .filter import estimate_quality
    from .metrics import accuracy_compute_metrics, compute_filter_metrics
    from .testing.digits import digits_model, load_noisy_digits

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_caching()

    log(
        f"[1/6] digits: flipping {settings.noise_rate:.0%} of the training labels (seed {settings.seed}); "
        f"{settings.trusted_samples} samples with their clean labels held out of the pool as the trusted set"
    )
    data = load_noisy_digits(noise_rate=settings.noise_rate, seed=settings.seed)
    train, test = data["train"], data["test"]
    rng = np.random.default_rng([settings.seed, 1])  # a stream apart from the flips' (seeded by `seed` alone)
    trusted_rows = np.sort(rng.choice(train.num_rows, size=settings.trusted_samples, replace=False))
    pool = train.select(np.setdiff1d(np.arange(train.num_rows), trusted_rows))
    is_clean = np.asarray(pool["is_clean"])
    trusted = train.select(trusted_rows).remove_columns(["label", "is_clean"]).rename_column("clean_label", "label")
    noisy = pool.remove_columns(["clean_label", "is_clean"])
    given = np.asarray(noisy["label"])

    log(f"[2/6] reference: a head linear-probed on the {settings.trusted_samples} trusted samples")
    reference = build_reference(
        digits_model(seed=settings.seed),
        trusted,
        layers=["classifier"],
        output_dir=out / "reference",
        eval_dataset=test,
        epochs=settings.probe_epochs,
        data_description=f"{settings.trusted_samples} trusted samples of the digits training split, clean labels",
        base_model="hf-gradmimic/digits-random-backbone",
        seed=settings.seed,
    )
    reference_accuracy = float(reference.metadata["eval_accuracy"])

    log("[3/6] plain Trainer and MimicTrainer on the pool's noisy labels")
    plain = Trainer(
        model=digits_model(seed=settings.seed),
        args=TrainingArguments(**_training_args(settings, out / "plain")),
        train_dataset=noisy,
        eval_dataset=test,
        compute_metrics=accuracy_compute_metrics,
    )
    plain.train()
    mimic_args = MimicConfig(
        **_training_args(settings, out / "mimic"),
        mimic_reference=str(out / "reference"),
        mimic_layers=["classifier"],
        mimic_temperature=settings.temperature,
    )
    mimic = MimicTrainer(
        model=digits_model(seed=settings.seed),
        args=mimic_args,
        train_dataset=noisy,
        eval_dataset=test,
        compute_metrics=accuracy_compute_metrics,
    )
    mimic.train()
    plain_accuracy, mimic_accuracy = _test_accuracy(plain), _test_accuracy(mimic)

    log("[4/6] Stage 2: build_filter's default, the paper's filter, and two baselines on the same pool")
    mimic_filter = build_filter(out / "mimic", seed=settings.seed)
    mimic_filter.save(out / "filter")
    paper_filter = build_filter(
        out / "mimic",
        labeling_functions=["mimic", "loss"],
        method=settings.method,
        aggregate="snorkel",
        windows="epoch",
        seed=settings.seed,
    )
    reference_model = digits_model(seed=settings.seed)
    reference_model.load_state_dict(reference.tensors, strict=False)
    disagreement = reference_disagreement(_logits(reference_model, noisy), given)
    small_loss = small_loss_gmm(cross_entropy_per_row(_logits(plain.model, noisy), given), seed=settings.seed)
    ids = mimic_filter.sample_ids
    detectors = {
        "build_filter default": mimic_filter.evaluate(is_clean[ids]),
        "paper's filter (Snorkel over windows)": paper_filter.evaluate(is_clean[paper_filter.sample_ids]),
        "reference argmax != label": compute_filter_metrics(
            ~disagreement.issues, is_clean, keep_score=disagreement.clean_score
        ),
        "small-loss GMM, plain Trainer": compute_filter_metrics(
            ~small_loss.issues, is_clean, keep_score=small_loss.clean_score
        ),
    }
    audit = detectors["build_filter default"]
    quality = estimate_quality(mimic_filter)
    figures = report(mimic_filter, out / "report", scores=out / "mimic", clean=is_clean[ids])

    results = {
        "n_trusted": int(settings.trusted_samples),
        "n_pool": int(noisy.num_rows),
        "reference_test_accuracy": reference_accuracy,
        "plain_test_accuracy": plain_accuracy,
        "mimic_test_accuracy": mimic_accuracy,
        "discard_precision": audit["discard_precision"],
        "discard_recall": audit["discard_recall"],
        "discard_f1": audit["discard_f1"],
        "retained_fraction": quality["retained_fraction"],
        "true_clean_fraction": float(is_clean.mean()),
        "mean_mimic_score": quality["mean_mimic_score"],
        "detectors": {
            name: {key: float(metrics[key]) for key in ("discard_precision", "discard_recall", "discard_f1")}
            for name, metrics in detectors.items()
        },
    }
    log("")
    log(format_table(results, settings))
    log("")
    log(format_detectors(results["detectors"]))
    log("")
    log(f"[5/6] report figures: {', '.join(str(p) for p in figures.values() if str(p).endswith('.png'))}")

    if settings.push:
        results.update(_push_and_reload(noisy, mimic_filter, mimic_args, out, log))
    else:
        from .hub import save_scored_dataset

        local_copy = save_scored_dataset(noisy, mimic_filter, out / "scored_dataset")
        results["local_copy"] = str(local_copy)
        log(f"[6/6] scored dataset saved to {local_copy} (push skipped; reload it with datasets.load_from_disk)")
    write_json(out / "results.json", results)
    return results


def _push_and_reload(dataset, mimic_filter, mimic_args, out: Path, log) -> dict[str, Any]:
    import datasets
    import huggingface_hub.constants
    from huggingface_hub import DatasetCard

    from .hub import push_scored_dataset

    endpoint = os.environ.get("HF_ENDPOINT", "")
    if not endpoint.startswith("http://127.0.0.1") or huggingface_hub.constants.ENDPOINT != endpoint:
        raise RuntimeError(
            "The demo pushes to the loopback Hub, which must be started (and HF_ENDPOINT set) before "
            "huggingface_hub is imported: run it with `gradmimic demo` or `make demo`, or pass push=False."
        )
    log(f"[6/6] loopback Hub at {endpoint}: pushing the scored dataset with its card")
    repo_id = "demo-user/digits-noisy-scored"
    result = push_scored_dataset(
        dataset, mimic_filter, repo_id, local_dir=out / "scored_dataset", training_config=mimic_args
    )
    full = datasets.load_dataset(repo_id, split="train")
    filtered = datasets.load_dataset(repo_id, "filtered", split="train")
    card = DatasetCard.load(repo_id)
    log(
        f"loaded back with datasets.load_dataset: {full.num_rows} rows (default config), {filtered.num_rows} rows ('filtered')"
    )
    log("dataset card (below its YAML metadata), first lines:")
    for line in card.text.strip().splitlines()[:14]:
        log("    " + line)
    return {"hub_rows": full.num_rows, "hub_filtered_rows": filtered.num_rows, "local_copy": str(result.local_path)}


def format_table(results: dict[str, Any], settings: DemoSettings) -> str:
    rows = [
        (f"test accuracy, reference ({results['n_trusted']} trusted samples)", results["reference_test_accuracy"]),
        (f"test accuracy, plain Trainer ({settings.noise_rate:.0%} noisy labels)", results["plain_test_accuracy"]),
        (f"test accuracy, MimicTrainer (τ = {settings.temperature})", results["mimic_test_accuracy"]),
        ("discard precision (noisy among discarded)", results["discard_precision"]),
        ("discard recall (noisy samples found)", results["discard_recall"]),
        ("discard F1", results["discard_f1"]),
        ("retained fraction (true clean fraction)", results["retained_fraction"]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{label:{width}}  {value:.3f}" for label, value in rows]
    lines[-1] += f"  ({results['true_clean_fraction']:.3f})"
    return "\n".join(lines)


def format_detectors(detectors: dict[str, dict[str, float]]) -> str:
    """The discard precision / recall / F1 of each detector on the pool, one row each."""
    title = "discard detection on the pool"
    width = max(len(title), *map(len, detectors))
    lines = [f"{title:{width}}  precision  recall     F1", f"{'-' * width}  ---------  ------  -----"]
    lines += [
        f"{name:{width}}  {m['discard_precision']:9.3f}  {m['discard_recall']:6.3f}  {m['discard_f1']:5.3f}"
        for name, m in detectors.items()
    ]
    return "\n".join(lines)
