"""User and third-party strings on the cards (`hf_gradmimic.cards`): escaped for Markdown and HTML, on one line, and
unable to inject the generated section's markers (which would duplicate the section on every later push)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from markdown_it import MarkdownIt

from hf_gradmimic import build_filter
from hf_gradmimic.cards import (
    CARD_SECTION_END,
    CARD_SECTION_START,
    dataset_card_data,
    merge_card_text,
    render_dataset_card,
    render_reference_card,
)

EVIL = f"x</code><script>alert(1)</script>\n# Fake heading\n{CARD_SECTION_END}\n| a | b |`"


def a_filter():
    n, steps = 16, 4
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "global_step": np.repeat(np.arange(1, steps + 1), n // 2 * 2)[: n * 2].astype(np.int64),
            "epoch": np.repeat([0.5, 1.0, 1.5, 2.0], n // 2).astype(np.float64),
            "sample_id": np.tile(np.arange(n), 2).astype(np.int64),
            "mimic_score": rng.normal(size=n * 2).astype(np.float32),
            "weight": np.full(n * 2, 1 / 8, np.float32),
            "loss": rng.random(n * 2).astype(np.float32),
            "batch_size": np.full(n * 2, 8, np.int32),
            "rank": np.zeros(n * 2, np.int32),
            "repeated": np.zeros(n * 2, bool),
            "status": np.zeros(n * 2, np.int8),
        }
    )
    return build_filter(table, method="threshold", aggregate="majority")


def html_of(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


def test_user_strings_on_a_dataset_card_are_escaped_and_cannot_end_its_section():
    card = render_dataset_card(
        dataset_card_data(None, "me/scored"),
        repo_id="me/scored",
        split="train",
        mimic_filter=a_filter(),
        num_rows=16,
        num_kept=8,
        has_filtered=True,
        training_config={"mimic_reference": EVIL, "mimic_layers": ["head"]},
        source_name=EVIL,
    )
    body = card.text
    rendered = html_of(body)
    assert "<script>" not in rendered and "<h1>Fake heading" not in rendered  # rendered by a Markdown renderer
    assert CARD_SECTION_END not in body and CARD_SECTION_START not in body
    first = merge_card_text("# Hand-written\n\nprose\n", body)
    second = merge_card_text(first, body)  # the next push
    assert second.count(CARD_SECTION_START) == 1 and second.count(CARD_SECTION_END) == 1
    assert second.startswith("# Hand-written\n\nprose")


def test_a_reference_cards_data_description_is_escaped():
    metadata = {
        "base_model": "org/base",
        "base_revision": "",
        "layers": json.dumps(["head"]),
        "method": "head",
        "train_rows": "10",
        "train_accuracy": "1.0",
        "eval_accuracy": "",
        "data": EVIL,
    }
    rendered = html_of(render_reference_card(metadata).text)
    assert "<script>" not in rendered and "<h1>Fake heading" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered  # shown, not dropped
