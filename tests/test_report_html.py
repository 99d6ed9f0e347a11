"""`report.html`: one self-contained page per filter, read back with the standard library's HTML parser.

The oracles are independent of the page's code: the filter's own table sorted by pandas, the dataset's
rows, the colours the images were drawn with, the PNG files `report` wrote and the provenance file.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from report_data import HOSTILE_TEXT, PROVENANCE, image_text_dataset, sample_colour, write_scored_run


class PageTables(HTMLParser):
    """Every <table> as rows of cells; a cell is its text and the src of its images. Also counts <script> tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[dict]]] = []
        self.scripts = 0
        self.images: list[str] = []
        self.pre: list[str] = []
        self._cell: dict | None = None
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = {"text": "", "images": []}
            self.tables[-1][-1].append(self._cell)
        elif tag == "img":
            self.images.append(attrs["src"])
            if self._cell is not None:
                self._cell["images"].append(attrs["src"])
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_pre:
            self.pre[-1] += data


def parse(path) -> PageTables:
    page = PageTables()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from hf_gradmimic import build_filter

    output_dir = write_scored_run(tmp_path_factory.mktemp("run"))
    return output_dir, build_filter(output_dir), image_text_dataset()


def sample_table(page: PageTables) -> tuple[list[str], list[list[dict]]]:
    (table,) = [t for t in page.tables if t[0][0]["text"] == "#"]
    return [cell["text"] for cell in table[0]], table[1:]


def test_the_page_lists_the_lowest_keep_probabilities_with_their_escaped_text_and_their_images(run, tmp_path):
    from hf_gradmimic import report

    output_dir, mimic_filter, dataset = run
    paths = report(mimic_filter, tmp_path, dataset=dataset)
    page = parse(paths["report_html"])
    assert page.scripts == 0  # the hostile text stayed text
    header, rows = sample_table(page)
    assert header[:6] == ["#", "sample id", "P(keep)", "mean mimic score", "mean b·w", "votes"]
    assert header[6:] == ["image", "text", "label"]

    frame = mimic_filter.table.select(["sample_id", "keep_prob"]).to_pandas()
    listed = [int(row[1]["text"]) for row in rows]
    assert len(listed) == 50 == len(set(listed))
    listed_prob = frame.set_index("sample_id").loc[listed, "keep_prob"].to_numpy()
    unlisted_prob = frame[~frame.sample_id.isin(listed)].keep_prob.to_numpy()
    assert np.all(np.diff(listed_prob) >= 0) and listed_prob.max() <= unlisted_prob.min()
    np.testing.assert_allclose([float(row[2]["text"]) for row in rows], listed_prob, rtol=1e-3)
    # The noisy quarter (every fourth id) holds the 24 lowest.
    assert all(sample_id % 4 == 0 for sample_id in listed[:24])

    summary = mimic_filter.summary  # one vote per voting source: the mimic windows when they vote, and vote functions
    n_functions = len(summary["window_names"]) * ("mimic" in summary["settings"]["labeling_functions"]) + sum(
        entry.get("kind") != "score" for entry in summary["labeling_functions"]
    )
    for row, sample_id in zip(rows, listed):
        assert len(row[5]["text"]) == n_functions and set(row[5]["text"]) <= {"K", "D", "·"}
        (image_src,) = row[6]["images"]
        thumbnail = decode_png(image_src).convert("RGB")
        assert thumbnail.getpixel((0, 0)) == sample_colour(sample_id)
        assert thumbnail.size[0] / thumbnail.size[1] == pytest.approx(16 / 12)
        assert row[7]["text"] == f"sample {sample_id}: {HOSTILE_TEXT}"  # unescaped by the parser: shown as written
        assert row[8]["text"] == str(sample_id % 3)


def test_the_page_inlines_the_figures_and_shows_the_summary_windows_and_provenance(run, tmp_path):
    from hf_gradmimic import report

    output_dir, mimic_filter, _ = run
    clean = (mimic_filter.sample_ids % 4 != 0).astype(int)
    paths = report(mimic_filter, tmp_path, clean=clean)
    page = parse(paths["report_html"])
    figures = [decode_png(src) for src in page.images]
    for name in ("window_histograms", "keep_probability", "method_comparison"):
        assert any(figure.size == Image.open(paths[name]).size for figure in figures), name
    inlined = {base64.b64decode(src.split(",", 1)[1]) for src in page.images}
    assert {
        paths[name].read_bytes() for name in ("window_histograms", "keep_probability", "method_comparison")
    } <= inlined

    (provenance,) = page.pre
    recorded = json.loads((output_dir / "mimic_scores" / "provenance.json").read_text())
    assert json.loads(provenance) == recorded and recorded["scorer"] == PROVENANCE["scorer"]
    summary = {row[0]["text"]: row[1]["text"] for row in page.tables[0]}
    assert summary["samples"] == f"{mimic_filter.summary['n_samples']:,}"
    assert summary["kept"] == f"{mimic_filter.keep.mean():.2%}"
    windows = [t for t in page.tables if t[0][0]["text"] == "labeling function"][0][1:]
    expected = [f"mimic/{name}" for name in mimic_filter.summary["window_names"]]
    expected += [function["name"] for function in mimic_filter.summary["labeling_functions"]]
    assert [row[0]["text"] for row in windows] == expected
    methods = [t for t in page.tables if t[0][0]["text"] == "method"][0][1:]
    report_json = json.loads(paths["report_json"].read_text())
    for row in methods:
        assert float(row[3]["text"]) == pytest.approx(
            report_json["method_metrics"][row[0]["text"]]["discard_f1"], rel=1e-3
        )
    # Without a dataset the samples are listed, with no content columns.
    header, rows = sample_table(page)
    assert len(header) == 6 and len(rows) == 50


def test_gradmimic_report_writes_the_page_with_the_dataset_it_is_given(run, tmp_path):
    from hf_gradmimic.cli import main

    output_dir, mimic_filter, dataset = run
    mimic_filter.save(tmp_path / "filter")
    dataset.save_to_disk(str(tmp_path / "data"))
    assert (
        main(
            [
                "report",
                str(tmp_path / "filter"),
                "--dataset",
                str(tmp_path / "data"),
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    header, rows = sample_table(parse(tmp_path / "report" / "report.html"))
    assert header[6:] == ["image", "text", "label"]
    assert rows[0][7]["text"] == f"sample {rows[0][1]['text']}: {HOSTILE_TEXT}"


def test_a_shuffled_dataset_is_refused_rather_than_shown_beside_the_wrong_samples(run, tmp_path):
    from hf_gradmimic.reporting import write_html_report

    _, mimic_filter, dataset = run
    with pytest.raises(ValueError, match="rows differ"):
        write_html_report(mimic_filter, tmp_path / "page.html", dataset=dataset.shuffle(seed=0))
    assert not (tmp_path / "page.html").exists()


def test_rows_are_matched_by_the_id_column_the_log_recorded(run, tmp_path):
    """A log whose ids are a column's values (mimic_id_column): the page finds each sample's row by that id."""
    from hf_gradmimic import build_filter, load_scores
    from hf_gradmimic.reporting import write_html_report
    from hf_gradmimic.score_log_io import ScoreWriter, write_provenance

    output_dir, _, dataset = run
    records = load_scores(output_dir).to_pandas()
    writer = ScoreWriter(tmp_path / "by_id")
    for step, rows in records.groupby("global_step"):
        writer.add_step(
            global_step=int(step),
            epoch=float(rows.epoch.iloc[0]),
            sample_ids=np.array([f"uid-{i}" for i in rows.sample_id]),
            mimic_scores=rows.mimic_score.to_numpy(),
            weights=rows.weight.to_numpy(),
            losses=rows.loss.to_numpy(),
            batch_size=int(rows.batch_size.iloc[0]),
        )
    writer.close()
    write_provenance(tmp_path / "by_id", {"sample_ids": {"column": "uid"}})
    mimic_filter = build_filter(tmp_path / "by_id", aggregate="majority")
    # The dataset in another order, with the id column: rows are found by id, not by position.
    with_ids = dataset.add_column("uid", [f"uid-{i}" for i in range(len(dataset))]).shuffle(seed=3)
    page = parse(write_html_report(mimic_filter, tmp_path / "page.html", dataset=with_ids))
    header, rows = sample_table(page)
    assert header[6:] == ["image", "text", "label"]  # the id column is the sample id, not repeated
    for row in rows:
        index = int(row[1]["text"].removeprefix("uid-"))
        assert row[7]["text"] == f"sample {index}: {HOSTILE_TEXT}"
        assert decode_png(row[6]["images"][0]).convert("RGB").getpixel((0, 0)) == sample_colour(index)
