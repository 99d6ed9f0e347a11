"""Every ```python block of README.md, and of the guides that hold the README's former blocks, executed as written,
each page top to bottom in one namespace (as a reader runs them).

A snippet's free variables (``model``, ``train``, ``pairs``...) are small fixtures under the snippet's own names, and
the Hub repos it names (``my-org/...``) are hosted by the loopback Hub (tests/conftest.py `hub_server`), reached by
the real clients through HF_ENDPOINT. The snippets themselves are not edited: a block that this test cannot run as
written fails it, and a new block without fixtures fails it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The README and the documentation pages that took over its other python blocks when it shrank (issue 27).
PAGES = ("README.md", "docs/guides/quickstart.md", "docs/guides/image-text.md", "docs/guides/llm-sft-lora.md")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(encoding="utf-8"), re.S | re.M)


def first_line(block: str) -> str:
    return next(line for line in block.splitlines() if line.strip())


def clip_fixtures(tmp_path: Path) -> dict:
    """``my-org/pairs`` (a dataset of image–caption pairs with a ``uid``), ``my-org/base-clip`` and
    ``my-org/reference-clip`` (tiny CLIPs with 12 layers per tower, as the snippet's mimic layers name) on the Hub."""
    import datasets
    from huggingface_hub import HfApi
    from transformers import CLIPConfig, CLIPModel

    from tiny_dual_encoders import TEXT, VISION, pair_batch

    config = CLIPConfig(
        text_config={**TEXT, "num_hidden_layers": 12, "projection_dim": 8},
        vision_config={**VISION, "num_hidden_layers": 12, "projection_dim": 8},
        projection_dim=8,
    )
    api = HfApi()
    for name, seed in (("base-clip", 0), ("reference-clip", 1)):
        torch.manual_seed(seed)
        folder = tmp_path / name
        CLIPModel(config).save_pretrained(folder)
        api.create_repo(f"my-org/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"my-org/{name}", folder_path=str(folder))
    batch = pair_batch(16, seed=2)
    columns = {key: value.numpy().tolist() for key, value in batch.items()}
    datasets.Dataset.from_dict({**columns, "uid": [f"pair-{i:03d}" for i in range(16)]}).push_to_hub("my-org/pairs")
    return {"max_steps": 10}  # windows=10 in the block: one step per window


def api_fixtures(tmp_path: Path) -> dict:
    """``model``, ``train``, ``test`` (noisy digits) and ``my-org/probe-reference`` on the Hub (build_reference,
    pushed); ``reference_logits``: that reference's logits on ``train``."""
    from hf_gradmimic import build_reference
    from hf_gradmimic.testing.digits import digits_model, load_noisy_digits

    digits = load_noisy_digits(noise_rate=0.4, seed=0)
    train, test = digits["train"].select(range(160)), digits["test"].select(range(64))
    trusted = digits["train"].select(range(160, 460))
    trusted = trusted.remove_columns("label").rename_column("clean_label", "label")
    reference = build_reference(
        digits_model(),
        trusted,
        layers=["classifier"],
        output_dir=tmp_path / "probe",
        epochs=20,
        push_to_hub=True,
        repo_id="my-org/probe-reference",
    )
    probe = digits_model()
    probe.classifier.load_state_dict({key.split(".")[-1]: value for key, value in reference.tensors.items()})
    with torch.no_grad():
        reference_logits = probe(pixel_values=train[:]["pixel_values"]).logits.numpy()
    return {"model": digits_model(), "train": train, "test": test, "reference_logits": reference_logits}


def sft_fixtures(tmp_path: Path) -> dict:
    """``base_model`` (a tiny Llama), its ``tokenizer``, ``trusted_pairs`` and ``pairs`` (prompt-completion rows)."""
    import datasets
    from test_sft import pairs, tiny_llama, word_tokenizer

    return {
        "base_model": tiny_llama(),
        "tokenizer": word_tokenizer(),
        "trusted_pairs": pairs(8, seed=1),
        "pairs": datasets.Dataset.from_list(pairs(16)),
    }


def mixin_fixtures(tmp_path: Path) -> dict:
    """``MyTrainingArguments`` and ``MyTrainer``: a user's own `TrainingArguments` and `Trainer` subclasses."""
    from dataclasses import dataclass, field

    from transformers import Trainer, TrainingArguments

    @dataclass
    class MyTrainingArguments(TrainingArguments):
        my_option: int = field(default=1, metadata={"help": "An option of the user's own trainer."})

    class MyTrainer(Trainer):
        pass

    return {"MyTrainingArguments": MyTrainingArguments, "MyTrainer": MyTrainer}


# Each block, by its first line, with what it needs.
FIXTURES = {
    "from datasets import load_dataset": clip_fixtures,
    "from hf_gradmimic import MimicConfig, MimicTrainer, build_filter, load_scores": api_fixtures,
    "from hf_gradmimic.filter import PredictorMargin": None,  # the previous block's run and fixtures
    "from peft import LoraConfig, get_peft_model": sft_fixtures,
    "from dataclasses import dataclass": mixin_fixtures,
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_runs_as_written(page, hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write to "out", "lora-ref"...
    blocks = python_blocks(page)
    unknown = [first_line(block) for block in blocks if first_line(block) not in FIXTURES]
    assert not unknown, f"a python block of {page} without fixtures here: {unknown}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two that wait on each other
    try:
        namespace: dict = {}
        for number, block in enumerate(blocks, start=1):
            make = FIXTURES[first_line(block)]
            if make is not None:
                namespace.update(make(tmp_path / f"fixtures-{number}"))
            exec(compile(block, f"{page} python block {number}", "exec"), namespace)  # noqa: S102
            check_block(first_line(block), namespace, tmp_path)
    finally:
        torch.set_num_threads(threads)


def check_block(first: str, namespace: dict, tmp_path: Path) -> None:
    """What each block (named by its first line) promises, read from its results."""
    from hf_gradmimic import MimicFilter, load_scores

    if first == "from datasets import load_dataset":  # a stream trained by id; two filters over the same pairs
        assert isinstance(namespace["mimic_filter"], MimicFilter)
        uids = set(namespace["mimic_filter"].sample_ids)
        assert uids == {f"pair-{i:03d}" for i in range(16)}
        assert len(namespace["baseline"].table) == 16
    elif first.startswith("from hf_gradmimic import MimicConfig"):  # scores in out/mimic_scores, the kept rows
        assert len(load_scores("out")) > 0
        kept = namespace["mimic_filter"].apply(namespace["train"])
        assert len(namespace["clean_train"]) == len(kept) == int(namespace["mimic_filter"].keep.sum())
    elif first == "from hf_gradmimic.filter import PredictorMargin":
        summary = namespace["mimic_filter"].summary
        sources = {entry["labeling_function"] for entry in summary["labeling_functions"]}
        assert sources == {"mean_loss", "mean_margin", "reference"} and summary["aggregate_used"] == "mixture"
        assert summary["agreement_gate"]["reference_margins"] == ["reference"]
    elif first == "from peft import LoraConfig, get_peft_model":  # a PEFT adapter as reference, the SFT run's scores
        assert (tmp_path / "lora-ref" / "adapter_config.json").is_file()
        scores = load_scores("out").to_pandas()
        assert set(scores.sample_id) == set(range(16))
        assert len(namespace["mimic_filter"].sample_ids) == 16
    elif first == "from dataclasses import dataclass":
        config = namespace["MyMimicConfig"](output_dir=str(tmp_path / "mixin"), use_cpu=True, mimic_layers=["x"])
        assert config.my_option == 1 and config.mimic_layers == ["x"]
        assert issubclass(namespace["MyMimicTrainer"], namespace["MyTrainer"])
    else:
        raise AssertionError(f"no check for the block starting {first!r}")


@pytest.mark.parametrize("page", PAGES)
def test_the_blocks_are_found(page):
    """The extraction itself: every ```python fence of the page is one block (none swallowed or split)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = python_blocks(page)
    assert blocks and len(blocks) == text.count("```python\n")
    assert np.all([block.strip() for block in blocks])


def test_every_fixture_serves_a_block():
    """No fixtures left behind for a block that no page holds any more."""
    used = {first_line(block) for page in PAGES for block in python_blocks(page)}
    assert set(FIXTURES) == used
