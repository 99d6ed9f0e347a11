"""Card rendering: the model card, the scored-dataset card and the reference card, from the templates
in ``hf_gradmimic/templates/`` (kept as Markdown + Jinja files, as trl keeps its cards).

The cards describe Grad-Mimic runs (Huang et al., arXiv 2501.06708): the Stage-1 settings
(reference, mimic layers, τ, normalisation...) and, for a scored dataset, the Stage-2 filter.
This module reads settings from the objects it is given and imports neither the trainer nor the
Hub upload code, so both can import it.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard
    from transformers import Trainer

    from .filter import MimicFilter

__all__ = [
    "DATASET_TAGS",
    "MODEL_TAGS",
    "REFERENCE_TAGS",
    "TEMPLATES_DIR",
    "card_code",
    "card_text",
    "dataset_card_data",
    "render_dataset_card",
    "render_model_card",
    "merge_card_text",
    "render_lora_reference_card",
    "render_reference_card",
    "template_path",
]

DATASET_TAGS: tuple[str, ...] = ("grad-mimic", "data-filtering")
MODEL_TAGS: tuple[str, ...] = ("grad-mimic", "data-filtering", "hf-gradmimic")
REFERENCE_TAGS: tuple[str, ...] = ("grad-mimic", "hf-gradmimic", "mimic-reference")
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
DATASET_CARD_TEMPLATE = "dataset_card.md"
MODEL_CARD_TEMPLATE = "model_card.md"
REFERENCE_CARD_TEMPLATE = "reference_card.md"
LORA_REFERENCE_CARD_TEMPLATE = "lora_reference_card.md"


def template_path(name: str) -> Path:
    """Path of the card template ``name`` (e.g. ``"model_card.md"``) inside the package."""
    path = TEMPLATES_DIR / name
    if not path.is_file():
        found = sorted(p.name for p in TEMPLATES_DIR.glob("*.md")) if TEMPLATES_DIR.is_dir() else []
        raise FileNotFoundError(f"Card template {name!r} not found in {TEMPLATES_DIR}; templates there: {found}.")
    return path


# ----------------------------------------------------------------------------------------------
# User and third-party strings on the cards

_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]#|!~])")


def _one_line(value: Any) -> str:
    """No line break (a new line could start a heading or a block) and no comment marker (ours delimit the
    generated section, which `merge_card_text` finds by its markers)."""
    text = " ".join(str(value).split())
    return text.replace("<!--", "<!- -").replace("-->", "- ->")


def card_text(value: Any) -> str | None:
    """``value`` as literal text on a card: HTML escaped (no ``<script>``), Markdown punctuation escaped (no fake
    heading, link or table cell), on one line, without comment markers. None stays None (the templates test it)."""
    if value is None:
        return None
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(_one_line(value), quote=False))


def card_code(value: Any) -> str | None:
    """``value`` for a code span of a card (between backticks in the templates, where HTML and Markdown are inert):
    on one line, without comment markers, a backtick (which would close the span) as a quote, and ``|`` escaped for
    table cells. None stays None."""
    if value is None:
        return None
    return _one_line(value).replace("`", "'").replace("|", "\\|")


# ----------------------------------------------------------------------------------------------
# Settings shown on the cards
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}f}"
    return str(value)


def _layers_text(layer_map: Mapping[str, str]) -> str:
    return (
        ", ".join(
            f"`{card_code(s)}`" if s == r else f"`{card_code(s)}` → reference `{card_code(r)}`"
            for s, r in layer_map.items()
        )
        or "n/a"
    )


def _provenance_settings(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `_training_settings` as the score log's provenance recorded them (`scores.read_provenance`)."""
    scorer = provenance.get("scorer") or {}
    reference = scorer.get("reference") or {}
    return {
        "mimic_reference": reference.get("source"),
        "mimic_reference_revision": reference.get("revision"),
        "mimic_layers": provenance.get("mimic_layers"),
        "mimic_temperature": provenance.get("temperature"),
        "mimic_normalize": provenance.get("normalize"),
        "mimic_reweight_scope": provenance.get("reweight_scope"),
        "mimic_warmup_steps": provenance.get("warmup_steps"),
        "mimic_scorer": scorer.get("name"),
        "mimic_mode": scorer.get("mode"),
        "mimic_score_terms": scorer.get("score_terms"),
    }


def _training_settings(
    training_config: Any, reference: str | None, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Stage-1 settings for the cards, from a MimicConfig, a dict of its fields or a MimicTrainer; with none given,
    from the score log's ``provenance``."""
    from .layer_lookup import parse_layer_map

    if training_config is None and provenance:
        training_config = _provenance_settings(provenance)
    trainer_reference = None
    used: dict[str, Any] = {}  # what a trainer ran with, where a `scorer=` object overrides its config
    if (
        training_config is not None
        and not isinstance(training_config, Mapping)
        and hasattr(training_config, "reference_name")
    ):
        trainer_reference = training_config.reference_name  # a MimicTrainer: its config is .args
        scorer = getattr(training_config, "scorer", None)
        used = {
            "mimic_scorer": getattr(scorer, "name", None),
            "mimic_mode": getattr(training_config, "mode", None),
            "mimic_score_terms": getattr(scorer, "score_terms_mode", None),
        }
        if trainer_reference and not getattr(training_config, "reference_in_memory", True):
            reference = reference or trainer_reference  # the path or repo id given as `reference=`: the one used
        training_config = training_config.args
    if training_config is None:
        raw: Mapping[str, Any] = {}
    elif isinstance(training_config, Mapping):
        raw = training_config
    else:
        raw = {name: getattr(training_config, name) for name in dir(training_config) if name.startswith("mimic_")}
    raw = {**raw, **{name: value for name, value in used.items() if value is not None}}
    layer_map = parse_layer_map(raw.get("mimic_layers")) if raw.get("mimic_layers") is not None else {}
    reference = (
        reference
        or raw.get("mimic_reference")
        or (f"in-memory reference ({trainer_reference})" if trainer_reference else None)
    )
    recorded = provenance or {}
    return {
        "reference": card_code(reference or "not recorded"),
        "reference_revision": card_code(raw.get("mimic_reference_revision")),
        "reference_sha256": card_code(((recorded.get("scorer") or {}).get("reference") or {}).get("tensors_sha256")),
        "student": card_code((recorded.get("student") or {}).get("base_model")),
        "library_version": recorded.get("hf_gradmimic_version"),
        "layer_names": list(layer_map),
        "layers": _layers_text(layer_map) if layer_map else "not recorded",
        "temperature": f"{raw['mimic_temperature']:g}" if raw.get("mimic_temperature") is not None else "not recorded",
        "normalize": raw.get("mimic_normalize") or "not recorded",
        "reweight_scope": raw.get("mimic_reweight_scope") or "not recorded",
        "warmup_steps": raw.get("mimic_warmup_steps", "not recorded"),
        "scorer": card_code(raw.get("mimic_scorer") or "mimic"),
        "mode": raw.get("mimic_mode") or "the scorer's default",
        "score_terms": raw.get("mimic_score_terms") or "full",
    }


def _filter_settings(mimic_filter: MimicFilter) -> dict[str, Any]:
    """Stage-2 settings and results for the dataset card, from the filter's summary."""
    from .filter import estimate_quality

    summary = mimic_filter.summary
    settings = summary.get("settings", {})
    quality = estimate_quality(mimic_filter)
    windows = []
    for position, window in enumerate(summary.get("windows", [])):
        first, last = window.get("first_step"), window.get("last_step")
        windows.append(
            {
                "name": card_text(window.get("name", str(position))),
                "steps": f"{first}–{last}" if first is not None else "n/a",
                "n_samples": window.get("n_samples", "n/a"),
                "threshold": _fmt(window.get("threshold")),
                "kept_fraction": _fmt(window.get("kept_fraction")),
                "accuracy": _fmt(window.get("estimated_accuracy")),
                "degenerate": bool(window.get("degenerate", False)),
            }
        )
    method = settings.get("method", "n/a")
    if method == "threshold":
        method = f"threshold (b·w > {_fmt(settings.get('threshold'), 3)})"
    elif method == "topk":
        method = f"topk ({_fmt(settings.get('topk'), 1)} % per window)"
    return {
        "method": method,
        "aggregate": settings.get("aggregate", "n/a"),
        "aggregate_used": summary.get("aggregate_used", settings.get("aggregate", "n/a")),
        "windows": settings.get("windows", "n/a"),
        "n_windows": summary.get("n_windows", len(windows)),
        "window_rows": windows,
        "has_accuracies": any(w["accuracy"] != "n/a" for w in windows),
        "retained_fraction": _fmt(quality["retained_fraction"]),
        "mean_mimic_score": _fmt(quality["mean_mimic_score"]),
        "n_records": summary.get("n_records", "n/a"),
    }


# ----------------------------------------------------------------------------------------------
# Dataset card
# ----------------------------------------------------------------------------------------------


def dataset_card_data(existing_readme: str | None, repo_id: str) -> DatasetCardData:
    """The YAML of the repo's README (``configs``, ``dataset_info``...) with our tags added.

    Everything `datasets` wrote is kept as parsed: ``configs`` is what makes
    ``load_dataset(repo_id, "filtered")`` find the filtered files.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCard(existing_readme).data if existing_readme else DatasetCardData()
    tags = list(data.get("tags") or [])
    data.tags = tags + [tag for tag in DATASET_TAGS if tag not in tags]
    if not getattr(data, "pretty_name", None):
        data.pretty_name = f"{repo_id.split('/')[-1]} (Grad-Mimic scores)"
    return data


CARD_SECTION_START = "<!-- hf-gradmimic: start of the generated section; edit outside it -->"
CARD_SECTION_END = "<!-- hf-gradmimic: end of the generated section -->"


def merge_card_text(existing: str | None, generated: str) -> str:
    """The card body: ``generated`` between the section markers, merged with the body already on the Hub.

    A body holding our markers gets the section between them replaced; a body with prose of its own (a README
    written by hand) keeps it, and the section goes after it; an empty body becomes the section alone. Nothing
    written by hand is lost.
    """
    if CARD_SECTION_START in generated or CARD_SECTION_END in generated:  # card_text/card_code keep markers out
        raise ValueError("The generated card section holds one of its own markers; escape the values put in it.")
    section = f"{CARD_SECTION_START}\n{generated.strip()}\n{CARD_SECTION_END}\n"
    body = existing or ""
    start = body.find(CARD_SECTION_START)
    end = body.find(CARD_SECTION_END, start) if start != -1 else -1
    if start != -1 and end > start:
        return body[:start] + section + body[end + len(CARD_SECTION_END) :].lstrip("\n")
    if not body.strip():
        return "\n" + section
    return body.rstrip() + "\n\n" + section


def render_dataset_card(
    card_data: DatasetCardData,
    *,
    repo_id: str,
    split: str,
    mimic_filter: MimicFilter,
    num_rows: int,
    num_kept: int,
    has_filtered: bool,
    reference: str | None = None,
    training_config: Any = None,
    source_name: str | None = None,
    filtered_config: str = "filtered",
) -> DatasetCard:
    """Render ``templates/dataset_card.md`` for a scored dataset.

    Args:
        card_data: the `DatasetCardData` to put in the YAML header (already merged with what the
            repo's README holds, see `dataset_card_data`).
        repo_id / split: where the data is, for the loading snippet.
        mimic_filter: the Stage-2 filter whose settings and results are described.
        num_rows / num_kept: rows of the ``default`` / ``filtered`` configs.
        has_filtered: whether the repo has a ``filtered`` config.
        reference / training_config: the Stage-1 settings (see `push_scored_dataset`).
        source_name: the name of the dataset the rows come from, if known.
        filtered_config: the name of the config holding the kept rows.
    """
    from huggingface_hub import DatasetCard

    return DatasetCard.from_template(
        card_data=card_data,
        template_path=str(template_path(DATASET_CARD_TEMPLATE)),
        repo_id=repo_id,
        split=split,
        num_rows=num_rows,
        num_kept=num_kept,
        has_filtered=has_filtered,
        filtered_config=filtered_config,
        source_name=card_code(source_name),
        pretty_name=card_text(getattr(card_data, "pretty_name", None)),
        package_version=__version__,
        training=_training_settings(training_config, reference, mimic_filter.summary.get("provenance")),
        selection=_filter_settings(mimic_filter),
    )


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def _base_model(model: Any) -> str | None:
    """The Hub id the model was loaded from (None for a local folder or a model built from a config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is None or os.path.isdir(name):
        return None
    return str(name)


def _framework_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"hf-gradmimic": __version__}
    for name, label in (
        ("transformers", "Transformers"),
        ("torch", "PyTorch"),
        ("datasets", "Datasets"),
        ("huggingface_hub", "huggingface_hub"),
    ):
        try:
            versions[label] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _import_module_of(cls: type) -> str:
    """Where the quick-start snippet imports the model class from: ``transformers`` when it exports it."""
    import transformers

    try:
        exported = getattr(transformers, cls.__name__, None)
    except Exception:  # transformers' lazy module may fail importing an unrelated optional backend
        exported = None
    return "transformers" if exported is cls else cls.__module__


def _hub_url(repo_id: str | None, kind: str = "") -> str | None:
    """The Hub page of ``repo_id``, percent-encoded (a ``)`` or space cannot end the link early)."""
    from urllib.parse import quote

    return None if repo_id is None else f"https://huggingface.co/{kind}{quote(str(repo_id), safe='/')}"


def _reference_card_values(metadata: Mapping[str, str]) -> dict[str, Any]:
    """A reference's metadata (written by `build_reference`, or read from a file anyone could have written) as the
    reference cards show it: code-span values for names, escaped text for the rest."""
    code = ("base_model", "base_revision", "method", "adapter_init")
    return {key: card_code(value) if key in code else card_text(value) for key, value in metadata.items()}


def render_model_card(
    trainer: Trainer,
    model_name: str | None = None,
    dataset_name: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    *,
    language: str | list[str] | None = None,
    license: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
) -> ModelCard:
    """Render ``templates/model_card.md`` for a `MimicTrainer` (trl-style).

    The card names the base model and the Grad-Mimic settings (reference and its revision, mimic
    layers, τ, normalisation, reweighting scope, warm-up), the training run and how to build the
    Stage-2 filter from the score log. `MimicTrainer.create_model_card` saves it as
    ``<output_dir>/README.md``, which ``Trainer.push_to_hub`` uploads.

    Args:
        trainer: the `MimicTrainer` (trained or not); any `transformers.Trainer` works, the Grad-Mimic
            settings it does not have then read "not recorded".
        model_name: the model's name (default: the Hub repo name, else the output folder's name).
        dataset_name: the training dataset's Hub id (or ids), for the metadata.
        tags: more tags, added to ``grad-mimic``, ``data-filtering``, ``hf-gradmimic`` and the model's own.
        language / license: the card's metadata, as `Trainer.create_model_card` takes them.
        finetuned_from: the base model (default: the one the model was loaded from).
        tasks: the task, as a pipeline tag (``"text-classification"``); with several, the first.
    """
    from huggingface_hub import ModelCard, ModelCardData

    args = trainer.args
    model = trainer.model
    hub_model_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    if model_name is None:
        model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(args.output_dir).absolute().name
    all_tags = list(MODEL_TAGS)
    extra = [tags] if isinstance(tags, str) else list(tags or [])
    for tag in [*getattr(trainer, "_tag_names", []), *(getattr(model, "model_tags", None) or []), *extra]:
        if tag not in all_tags:
            all_tags.append(tag)
    base_model = finetuned_from or _base_model(model)
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    task = tasks if isinstance(tasks, str) or tasks is None else next(iter(tasks), None)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        language=[language] if isinstance(language, str) else language,  # a list, as `Trainer`'s card has it
        license=license,
        library_name="transformers",
        model_name=model_name,
        pipeline_tag=task,
        tags=all_tags,
    )
    dataset_name = datasets[0] if datasets else None
    state = trainer.state
    model_class = type(trainer.accelerator.unwrap_model(model))
    return ModelCard.from_template(
        card_data=card_data,
        template_path=str(template_path(MODEL_CARD_TEMPLATE)),
        base_model=card_text(base_model),
        base_model_url=_hub_url(base_model),
        model_class=model_class.__name__,
        model_module=_import_module_of(model_class),
        hub_model_id=card_code(hub_model_id or model_name),
        model_name=card_text(model_name),
        dataset_name=card_text(dataset_name),
        dataset_url=_hub_url(dataset_name, "datasets/"),
        training=_training_settings(trainer, None),
        alignment_check=bool(getattr(getattr(trainer, "mimic_diagnostics", None), "checks_alignment", False)),
        record_scores=bool(getattr(args, "mimic_record_scores", False)),
        run={
            "global_step": state.global_step,
            "epochs": _fmt(float(state.epoch), 2) if state.epoch else "0",
            "learning_rate": args.learning_rate,
            "batch_size": args.per_device_train_batch_size,
            "accumulation": args.gradient_accumulation_steps,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "seed": args.seed,
        },
        framework_versions=_framework_versions(),
    )


# ----------------------------------------------------------------------------------------------
# Reference card
# ----------------------------------------------------------------------------------------------


def render_reference_card(metadata: Mapping[str, str]) -> ModelCard:
    """Render ``templates/reference_card.md`` for a reference built by `hf_gradmimic.build_reference`.

    Args:
        metadata: the reference's safetensors metadata (``base_model``, ``layers`` as a JSON list,
            ``method``, ``train_rows``, accuracies, ``data``...).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = metadata["base_model"]
    return ModelCard.from_template(
        card_data=ModelCardData(base_model=base if "/" in base else None, tags=list(REFERENCE_TAGS)),
        template_path=str(template_path(REFERENCE_CARD_TEMPLATE)),
        package_version=__version__,
        **{
            **_reference_card_values(metadata),
            "layers": card_text(", ".join(json.loads(metadata["layers"]))),
            "layers_list": json.dumps(json.loads(metadata["layers"])),
        },
    )


def render_lora_reference_card(metadata: Mapping[str, str]) -> ModelCard:
    """Render ``templates/lora_reference_card.md`` for a LoRA reference adapter built by
    ``hf_gradmimic.build_reference(..., method="lora")`` (its metadata: ``base_model``, ``train_rows``, losses...)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = metadata["base_model"]
    return ModelCard.from_template(
        card_data=ModelCardData(
            base_model=base if "/" in base else None, library_name="peft", tags=[*REFERENCE_TAGS, "lora"]
        ),
        template_path=str(template_path(LORA_REFERENCE_CARD_TEMPLATE)),
        package_version=__version__,
        **_reference_card_values(metadata),
    )
