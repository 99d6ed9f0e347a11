"""The ``gradmimic`` command line: train, make-reference, filter, report, push, demo, hub.

``train`` reads every `MimicConfig` field the way `HfArgumentParser` does, so each option has the
dataclass's help, and it runs unchanged under ``accelerate launch -m hf_gradmimic train ...``.
Errors a user can fix (a wrong path, a missing column, a bad option) print one line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROG = "gradmimic"


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


@dataclass
class DataArguments:
    """What to train on (the `train` subcommand's own options, beside `MimicConfig`)."""

    model: str = field(metadata={"help": "Student model: a Hub id or a local directory (save_pretrained)."})
    dataset: str = field(
        metadata={
            "help": "Training data: a Hub dataset id, a directory written by `save_to_disk`, or a csv/json/parquet file."
        }
    )
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (text classification)."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column for sentence pairs."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (image classification)."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(default=None, metadata={"help": "Split to evaluate on (optional)."})
    max_length: int = field(default=128, metadata={"help": "Token length for text inputs."})


def _load_dataset(source: str):
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise UserError(f"Dataset file {source} is not csv, json or parquet.")
        return datasets.load_dataset(kind, data_files=str(path))
    if source.startswith((".", "/")) and not path.exists():
        raise UserError(f"Dataset path {source} does not exist.")
    return datasets.load_dataset(source)


def _split(dataset_dict: Any, name: str):
    if name not in dataset_dict:
        raise UserError(f"Split {name!r} not in the dataset; splits: {list(dataset_dict)}.")
    return dataset_dict[name]


def _require_columns(dataset: Any, columns: Sequence[Optional[str]]) -> None:
    missing = [c for c in columns if c and c not in dataset.column_names]
    if missing:
        raise UserError(f"Column(s) {missing} not in the dataset; columns: {dataset.column_names}.")


def _require_existing_if_local(source: str, option: str) -> None:
    """A ``source`` that reads as a local path (``/x``, ``./x``, ``a/b/c``) must exist: it is not a Hub repo id, and
    the Hub client's own message ("Repo id must be in the form ...") would not say so."""
    from .reference.loading import looks_local

    if looks_local(source) and not Path(source).expanduser().exists():
        raise UserError(
            f"{option} {source}: the path does not exist (looked for {Path(source).expanduser().absolute()})."
        )


def _require_class_ids(dataset: Any, label_column: str, num_labels: int) -> None:
    """The probe's labels are class ids 0 .. num_labels − 1 (a `ClassLabel`, or integers)."""
    values = set(dataset[label_column])
    bad = sorted(
        (v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_labels), key=str
    )
    if bad:
        raise UserError(
            f"Column {label_column!r} must hold class ids 0..{num_labels - 1} (--num-labels {num_labels}); it holds "
            f"{bad[:5]}. Map text labels to ids first (e.g. `dataset.class_encode_column({label_column!r})`), or "
            "raise --num-labels."
        )


def _refuse_file_as_output_dir(output: str, option: str) -> None:
    """Before any work: the output is a folder; an existing file there would only fail at the end."""
    if Path(output).exists() and not Path(output).is_dir():
        raise UserError(
            f"{option} {output} is an existing file, not a folder: the output is a folder. Choose another "
            "path, or remove the file."
        )


def _label_ids(train: Any, label_column: str) -> tuple[list[str], Callable[[list], list[int]]]:
    """The class names (``id2label`` order) and the map from the column's values to class ids: a `ClassLabel`'s own
    names and ids; otherwise the distinct values in order (numbers by value, not as text: 10 after 9), each value's
    id its position, so that the ids trained on and the names in the model's config agree."""
    feature = train.features[label_column]
    names = getattr(feature, "names", None)
    if names:
        return list(names), list
    values = sorted(set(train[label_column]), key=lambda value: (isinstance(value, str), value))
    position = {value: index for index, value in enumerate(values)}
    return [str(value) for value in values], lambda batch: [position[value] for value in batch]


def run_train(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    from .config import MimicConfig

    parser = HfArgumentParser(
        (DataArguments, MimicConfig),
        prog=f"{PROG} train",
        description="Fine-tune a model with MimicTrainer (Grad-Mimic reweighting).",
    )
    data_args, config = parser.parse_args_into_dataclasses(args=list(argv))
    if not data_args.text_column and not data_args.image_column:
        raise UserError("Name the input with --text_column (text classification) or --image_column (images).")
    _require_existing_if_local(data_args.model, "--model")
    dataset_dict = _load_dataset(data_args.dataset)
    train = _split(dataset_dict, data_args.train_split)
    _require_columns(
        train, [data_args.text_column, data_args.text_pair_column, data_args.image_column, data_args.label_column]
    )
    evaluation = _split(dataset_dict, data_args.eval_split) if data_args.eval_split else None

    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    names, label_ids = _label_ids(train, data_args.label_column)
    label_kwargs = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    if data_args.text_column:
        from transformers import AutoTokenizer, DataCollatorWithPadding

        processor = AutoTokenizer.from_pretrained(data_args.model)
        model = AutoModelForSequenceClassification.from_pretrained(
            data_args.model, ignore_mismatched_sizes=True, **label_kwargs
        )
        columns = [data_args.text_column] + ([data_args.text_pair_column] if data_args.text_pair_column else [])

        def encode(batch):
            encoded = processor(*[batch[c] for c in columns], truncation=True, max_length=data_args.max_length)
            encoded["labels"] = label_ids(batch[data_args.label_column])
            return encoded

        collator = DataCollatorWithPadding(processor)
    else:
        from transformers import AutoImageProcessor, DefaultDataCollator

        processor = AutoImageProcessor.from_pretrained(data_args.model)
        model = AutoModelForImageClassification.from_pretrained(
            data_args.model, ignore_mismatched_sizes=True, **label_kwargs
        )

        def encode(batch):
            encoded = processor([image.convert("RGB") for image in batch[data_args.image_column]])
            encoded["labels"] = label_ids(batch[data_args.label_column])
            return encoded

        collator = DefaultDataCollator()
    # The raw columns stay beside the encoded ones (Trainer drops the unused ones from each batch): the score log's
    # row check then recognises the very file trained on at `push`, and a `--mimic_id_column` reaches the trainer.
    train_encoded = train.map(encode, batched=True, remove_columns=_raw_columns_to_drop(train, config))
    eval_encoded = (
        evaluation.map(encode, batched=True, remove_columns=_raw_columns_to_drop(evaluation, config))
        if evaluation is not None
        else None
    )

    from .trainer import MimicTrainer

    trainer = MimicTrainer(
        model=model,
        args=config,
        train_dataset=train_encoded,
        eval_dataset=eval_encoded,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model()
    print(
        f"Scores written to {Path(config.output_dir) / 'mimic_scores'}; build the filter with `{PROG} filter {config.output_dir}`."
    )
    return 0


def _raw_columns_to_drop(dataset: Any, config: Any) -> list[str]:
    """None when `Trainer` removes the unused columns itself (``remove_unused_columns``, the default); otherwise every
    raw column but the sample ids (text or images would reach the collator)."""
    if config.remove_unused_columns:
        return []
    return [name for name in dataset.column_names if name != config.mimic_id_column]


def run_make_reference(args: argparse.Namespace) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .reference import build_reference

    # Every input checked before the model is loaded and the probe trained.
    _require_existing_if_local(args.model, "--model")
    _refuse_file_as_output_dir(args.output_dir, "--output-dir")
    if args.push_to_hub and not args.repo_id:
        raise UserError("--push-to-hub needs --repo-id: the Hub repo to push the reference to.")
    dataset_dict = _load_dataset(args.dataset)
    train = _split(dataset_dict, args.split)
    _require_columns(train, [args.text_column, args.label_column])
    _require_class_ids(train, args.label_column, args.num_labels)
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, revision=args.revision, num_labels=args.num_labels
    )
    encoded = train.map(
        lambda b: tokenizer(b[args.text_column], truncation=True, max_length=args.max_length), batched=True
    )
    encoded = encoded.rename_column(args.label_column, "labels") if args.label_column != "labels" else encoded
    encoded = encoded.remove_columns(
        [c for c in encoded.column_names if c not in ("input_ids", "attention_mask", "token_type_ids", "labels")]
    )
    from transformers import DataCollatorWithPadding

    result = build_reference(
        model,
        encoded,
        layers=args.layers,
        output_dir=args.output_dir,
        data_collator=DataCollatorWithPadding(tokenizer),
        epochs=args.epochs,
        base_model=args.model,
        base_revision=args.revision,
        push_to_hub=args.push_to_hub,
        repo_id=args.repo_id,
    )
    print(f"Reference written to {result.path} (training accuracy {result.metadata['train_accuracy']}).")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    from .filter import build_filter

    _refuse_file_as_output_dir(args.output, "--output")
    mimic_filter = build_filter(
        args.scores,
        method=args.method,
        aggregate=args.aggregate,
        windows=_windows(args.windows),
        threshold=args.threshold,
        topk=args.topk,
        seed=args.seed,
        on_bad_shard=args.on_bad_shard,
        engine=args.engine,
        labeling_functions=args.labeling_functions,
        discard_requires_disagreement=args.discard_requires_disagreement,
        mixture_degrees_of_freedom=args.mixture_degrees_of_freedom,
    )
    path = mimic_filter.save(args.output)
    summary = mimic_filter.summary
    print(f"Filter saved to {path}: keeps {summary['retained_fraction']:.1%} of {summary['n_samples']} samples.")
    return 0


def _degrees_of_freedom(value: str) -> float:
    """``--mixture-degrees-of-freedom``: a number that the library's own check accepts (positive, or ``inf``). A
    UserError passes through argparse (which turns only ValueError and TypeError into its usage message), so the
    mistake is reported in one line."""
    from .filter.posterior import check_degrees_of_freedom

    try:
        degrees_of_freedom = float(value)
        check_degrees_of_freedom(degrees_of_freedom, "--mixture-degrees-of-freedom")
    except ValueError as error:
        raise UserError(
            f"--mixture-degrees-of-freedom must be a positive number or 'inf' (Gaussian classes), not {value!r}."
        ) from error
    return degrees_of_freedom


def _windows(value: str) -> Any:
    if value in ("epoch", "step"):
        return value
    try:
        return int(value)
    except ValueError as error:
        raise UserError(f"--windows must be 'epoch', 'step' or a whole number, not {value!r}.") from error


def run_report(args: argparse.Namespace) -> int:
    import numpy as np

    from .filter import MimicFilter
    from .metrics import clean_flags_array
    from .reporting import report

    _refuse_file_as_output_dir(args.output, "--output")
    mimic_filter = MimicFilter.load(args.filter)
    clean = None
    if args.clean_dataset:
        dataset = _load_dataset(args.clean_dataset)
        dataset = _split(dataset, args.split) if hasattr(dataset, "keys") else dataset
        _require_columns(dataset, [args.clean_column, *([args.id_column] if args.id_column else [])])
        # Matched by id (or by row index, checked against the training set the log recorded); a sample or row
        # that cannot be matched is an error, never a silent misalignment.
        positions = mimic_filter.positions(dataset, args.id_column)
        flags = clean_flags_array(dataset[args.clean_column], f"Column {args.clean_column!r} of --clean-dataset")
        clean = np.asarray(flags)[positions]
    dataset = None
    if args.dataset:  # the training data, whose lowest-P(keep) rows report.html shows
        dataset = _load_dataset(args.dataset)
        dataset = _split(dataset, args.split) if hasattr(dataset, "keys") else dataset
    paths = report(
        mimic_filter, args.output, scores=args.scores, clean=clean, dataset=dataset, id_column=args.id_column
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from .filter import MimicFilter
    from .hub import push_scored_dataset

    dataset = _load_dataset(args.dataset)
    dataset = _split(dataset, args.split) if hasattr(dataset, "keys") else dataset
    result = push_scored_dataset(
        dataset,
        MimicFilter.load(args.filter),
        args.repo_id,
        split=args.split,
        private=args.private,
        push_filtered=not args.no_filtered,
        revision=args.revision,
        id_column=args.id_column,
        check_dataset=not args.no_check_dataset,
    )
    print(f"Pushed to {result.repo_id} (local copy: {result.local_path}).")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    hub = None
    if not args.no_push:
        # Start the loopback Hub and point the clients at it before they are imported: they read
        # HF_ENDPOINT once, at import time.
        from .testing.hub_server import HubServer

        hub = HubServer(Path(args.output_dir) / "hub_storage", tokens={"hf_demo_token": "demo-user"}).start()
        # The loopback Hub is on this machine: offline mode (for the real Hub) must not block it.
        os.environ.update(
            {
                "HF_ENDPOINT": hub.url,
                "HF_TOKEN": "hf_demo_token",
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HOME": str(Path(args.output_dir).resolve() / "hf_home"),
            }
        )
    try:
        from .demo import DemoSettings
        from .demo import run_demo as run

        settings = DemoSettings(output_dir=args.output_dir, push=not args.no_push, progress=not args.quiet)
        if args.quick:
            settings.epochs, settings.probe_epochs = 4, 20
        run(settings)
    finally:
        if hub is not None:
            hub.stop()
    return 0


def run_hub(argv: Sequence[str]) -> int:
    from .testing.hub_server import main as hub_main

    return hub_main(list(argv), prog=f"{PROG} hub") or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Grad-Mimic data selection for Hugging Face Trainer users.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "train",
        help="Fine-tune with MimicTrainer (every MimicConfig option; see `gradmimic train --help`).",
        add_help=False,
    )

    ref = commands.add_parser(
        "make-reference", help="Build a reference by linear probing the student's frozen features."
    )
    ref.add_argument("--model", required=True, help="The student's pretrained checkpoint (Hub id or directory).")
    ref.add_argument("--revision", default=None, help="Revision of --model.")
    ref.add_argument("--dataset", required=True, help="Trusted labelled data (Hub id, save_to_disk directory or file).")
    ref.add_argument("--split", default="train", help="Split to use.")
    ref.add_argument("--text-column", default="text", help="Text column.")
    ref.add_argument("--label-column", default="label", help="Label column.")
    ref.add_argument("--num-labels", type=int, required=True, help="Number of classes.")
    ref.add_argument("--layers", nargs="+", default=["classifier"], help="Mimic layer(s) (the head).")
    ref.add_argument("--epochs", type=int, default=100, help="Probe epochs over the cached features.")
    ref.add_argument("--max-length", type=int, default=128, help="Token length.")
    ref.add_argument("--output-dir", default="mimic_reference", help="Where reference.safetensors and its card go.")
    ref.add_argument("--push-to-hub", action="store_true", help="Also upload the folder to the Hub.")
    ref.add_argument("--repo-id", default=None, help="Hub repo for --push-to-hub.")

    # The library's own lists (numpy and pyarrow, no torch), so the choices cannot drift from it.
    from .filter import (
        AGGREGATES,
        BAD_SHARD_POLICIES,
        DEFAULT_AGGREGATE,
        DEFAULT_DEGREES_OF_FREEDOM,
        DEFAULT_LABELING_FUNCTIONS,
        DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN,
        DEFAULT_METHOD,
        ENGINES,
        METHODS,
        SIGNAL_NAMES,
    )

    flt = commands.add_parser("filter", help="Stage 2: build the ensemble filter from a score log.")
    flt.add_argument("scores", help="An output_dir of MimicTrainer, or its mimic_scores/ folder.")
    flt.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="Identification per window.")
    flt.add_argument(
        "--aggregate",
        default=DEFAULT_AGGREGATE,
        choices=AGGREGATES,
        help="How the labeling functions combine: 'mixture' (continuous signals and votes) or a vote rule.",
    )
    flt.add_argument("--windows", default="epoch", help="'epoch', 'step' or a number of equal windows.")
    flt.add_argument(
        "--threshold", type=float, default=None, help="For --method threshold: keep when b·w > this (default 1)."
    )
    flt.add_argument("--topk", type=float, default=50, help="For --method topk: percent kept per window.")
    flt.add_argument("--seed", type=int, default=0, help="LabelModel seed.")
    flt.add_argument(
        "--on-bad-shard",
        default="error",
        choices=BAD_SHARD_POLICIES,
        help="An unreadable shard of the log: stop and name it (error), or leave it out with a warning (skip).",
    )
    flt.add_argument(
        "--engine",
        default="streaming",
        choices=ENGINES,
        help="streaming: bounded memory, spills to the temporary folder when the log does not fit; memory: all "
        "records in RAM; ray: on the current Ray cluster (pip install 'hf-gradmimic[ray]'). Same result.",
    )
    flt.add_argument(
        "--labeling-functions",
        nargs="+",
        default=None,
        choices=["mimic", "loss", *SIGNAL_NAMES],
        help="The sources of evidence: continuous ones from the score log (mean_loss, mean_margin, last_loss, "
        "last_loss_linear, window_loss, reference_loss, reference_margin) and votes (mimic: the paper's windows; "
        "loss: per-window small-loss votes). "
        f"Default: {' '.join(DEFAULT_LABELING_FUNCTIONS)} for a log with the student's margin (classification; "
        "without reference_margin when the log lacks it), "
        f"{' '.join(DEFAULT_LABELING_FUNCTIONS_WITHOUT_MARGIN)} otherwise. "
        "A reference's own logits (PredictorMargin, PredictorAgreement) or a zero-shot model's: "
        "build_filter(labeling_functions=[...]) in Python.",
    )
    flt.add_argument(
        "--discard-requires-disagreement",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="With --aggregate mixture: discard a sample only where the student (or the reference, when its margin "
        "is a labeling function) does not predict its given label (the agreement gate).",
    )
    flt.add_argument(
        "--mixture-degrees-of-freedom",
        type=_degrees_of_freedom,
        default=DEFAULT_DEGREES_OF_FREEDOM,
        help="With --aggregate mixture: the Student t degrees of freedom of each class's signals ('inf': Gaussian "
        "classes).",
    )
    flt.add_argument(
        "--output", default="mimic_filter", help="Directory for the filter (Parquet table + JSON summary)."
    )

    rep = commands.add_parser(
        "report",
        help="Figures of a filter (histograms, keep probabilities, detection quality) "
        "and report.html, one page to review it.",
    )
    rep.add_argument("filter", help="A directory saved by `gradmimic filter`.")
    rep.add_argument("--scores", default=None, help="The score log (for per-window histograms).")
    rep.add_argument("--clean-dataset", default=None, help="A dataset with ground-truth clean flags, for P/R/F1.")
    rep.add_argument("--clean-column", default="is_clean", help="Column of clean flags in --clean-dataset.")
    rep.add_argument(
        "--dataset",
        default=None,
        help="The training data (Hub id, save_to_disk directory or file): report.html shows the content "
        "of the samples with the lowest keep probability.",
    )
    rep.add_argument(
        "--id-column",
        default=None,
        help="Sample-id column (the trainer's mimic_id_column) of --clean-dataset (default: row index) and "
        "of --dataset (default: the one the log recorded).",
    )
    rep.add_argument("--split", default="train", help="Split of --clean-dataset and --dataset.")
    rep.add_argument("--output", default="mimic_report", help="Directory for the figures, report.json and report.html.")

    push = commands.add_parser(
        "push", help="Push the dataset with mimic-score and filter columns, and a card, to the Hub."
    )
    push.add_argument("--dataset", required=True, help="The training dataset (Hub id, save_to_disk directory or file).")
    push.add_argument("--filter", required=True, help="A directory saved by `gradmimic filter`.")
    push.add_argument("--repo-id", required=True, help="Target dataset repo.")
    push.add_argument("--split", default="train", help="Split name.")
    push.add_argument("--id-column", default=None, help="Sample-id column (default: row index).")
    push.add_argument("--revision", default=None, help="Branch to push to.")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--no-filtered", action="store_true", help="Do not push the 'filtered' config.")
    push.add_argument(
        "--no-check-dataset",
        action="store_true",
        help="With row-index ids: skip the check that --dataset has the training set's rows (only for a "
        "copy known to hold the same rows in the same order).",
    )

    demo = commands.add_parser("demo", help="The offline end-to-end demo (digits, 40%% label noise).")
    demo.add_argument("--output-dir", default="demo_output", help="Where everything is written.")
    demo.add_argument("--quick", action="store_true", help="Fewer epochs (a smoke run).")
    demo.add_argument("--no-push", action="store_true", help="Skip the loopback Hub round trip.")
    demo.add_argument("--quiet", action="store_true", help="No progress bars.")

    # `hub` passes its arguments to the server's own parser (see main): listed here for --help only.
    commands.add_parser(
        "hub", help="Serve the loopback Hub-protocol server (for offline tests and demos).", add_help=False
    )
    return parser


COMMANDS = {
    "make-reference": run_make_reference,
    "filter": run_filter,
    "report": run_report,
    "push": run_push,
    "demo": run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            return run_train(argv[1:])
        if argv and argv[0] == "hub":
            # The server's own parser reads the options: an argparse.REMAINDER after a subcommand
            # does not take leading "--x" options, so `gradmimic hub --port 8080` was refused.
            return run_hub(argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError, OSError) as error:
        # Library errors carry a message written for users; a traceback adds nothing.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from .hub import ScoredPushError

        if not isinstance(error, ScoredPushError):
            raise
        # A refused token or a failed upload: the message names the repo, the cause and the saved local copy.
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
