"""The documentation site and the report page, opened in headless Chromium (Debian's `chromium`).

The site is built the way `make docs` builds it (`mkdocs build --strict`, into a temporary folder), served on
127.0.0.1 by a standard-library HTTP server that this module starts and stops, and its pages are rendered by
Chromium (`--dump-dom`: the DOM after the page's scripts ran). Checks: the pages render with their titles and
every public API name; no internal link or anchor of any built page is broken; and `report.html` renders its
samples without running the scripts a sample's text holds. Nothing here uses the network.

`make test` installs the `docs` extra and sets GRADMIMIC_REQUIRE_DOCS=1, and `.ci/run` installs Chromium: a missing
one then fails these tests instead of skipping them.
"""

from __future__ import annotations

import functools
import http.server
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BUILD_TIMEOUT = 180
PAGE_TIMEOUT = 45
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require(available: bool, what: str) -> None:
    if not available:
        if os.environ.get("GRADMIMIC_REQUIRE_DOCS") == "1":
            pytest.fail(f"{what} is missing, and GRADMIMIC_REQUIRE_DOCS=1 requires it.")
        pytest.skip(f"{what} is not installed")


class Links(HTMLParser):
    """The link targets (a href, link href, script src, img src) and the element ids of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        attribute = {"a": "href", "link": "href", "script": "src", "img": "src"}.get(tag)
        if attribute and attrs.get(attribute):
            self.targets.append(attrs[attribute])


@functools.cache
def parse_page(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The site built into ``root/site`` and a report into ``root/report``, served from ``root`` on 127.0.0.1."""
    _require(_has_module("mkdocs") and _has_module("mkdocstrings_handlers.python"), "mkdocs (the `docs` extra)")
    root = tmp_path_factory.mktemp("served")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    build = subprocess.Popen(
        # Not --quiet: it hides the warnings, and --strict then has nothing to abort on.
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(root / "site")],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        report_path = _write_report(root)  # while the site builds
        output, _ = build.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield {
            "root": root,
            "site": root / "site",
            "report": report_path,
            "url": f"http://127.0.0.1:{server.server_address[1]}",
        }
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _write_report(root: Path) -> Path:
    from hf_gradmimic import build_filter, report

    from report_data import image_text_dataset, write_scored_run

    run = write_scored_run(root / "run")
    # Majority vote: the page is what is under test here, and it spares the LabelModel's torch import.
    mimic_filter = build_filter(run, aggregate="majority")
    return report(mimic_filter, root / "report", dataset=image_text_dataset())["report_html"]


def render(url: str, tmp_path: Path) -> str:
    """The DOM of ``url`` after Chromium loaded it and ran its scripts."""
    _require(Path(CHROMIUM).is_file(), "chromium (Debian's package)")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT,
    )
    assert result.returncode == 0 and "</html>" in result.stdout, (
        f"chromium could not render {url}: {result.stderr[-2000:]}"
    )
    return result.stdout


def title_of(dom: str) -> str:
    match = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert match, "the page has no <title>"
    return match.group(1).strip()


def test_the_pages_render_with_their_titles_and_every_public_name(served, tmp_path):
    import hf_gradmimic
    import hf_gradmimic.filter

    pages = {
        "index.html": ("hf-gradmimic", ["Set up", "About this site"]),
        "guides/quickstart.html": ("Quick start", ["make demo", "build_filter"]),
        "reference/api.html": (
            "Python API",
            [f'id="hf_gradmimic.{name}"' for name in hf_gradmimic.__all__ if name != "__version__"]
            + ['id="mimic-arguments"', "mimic_temperature"],
        ),
        "reference/filter.html": (
            "hf_gradmimic.filter",
            [f'id="hf_gradmimic.filter.{name}"' for name in hf_gradmimic.filter.__all__],
        ),
        "reference/cli.html": ("Command line", ["gradmimic filter", "--on-bad-shard", "gradmimic hub", "--data-dir"]),
    }
    for page, (title, expected) in pages.items():
        dom = render(f"{served['url']}/site/{page}", tmp_path)
        assert title_of(dom).startswith(title), (page, title_of(dom))
        missing = [text for text in expected if text not in dom]
        assert not missing, f"{page} lacks {missing}"
        # Material's scripts ran: they mark the root element.
        assert re.search(r'<html[^>]*class="[^"]*\bjs\b', dom), page


def test_no_internal_link_or_anchor_is_broken(served):
    site = served["site"]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 20, [page.name for page in pages]
    broken = []
    for page in pages:
        for target in parse_page(page).targets:
            parts = urlsplit(target)
            if parts.scheme or target.startswith(("//", "mailto:", "javascript:")):
                continue
            relative = unquote(parts.path)
            if relative.startswith("/"):  # 404.html links from the site's root: it is served at any path
                resolved = Path(posixpath.normpath(posixpath.join(site.as_posix(), relative.lstrip("/"))))
                if resolved.is_dir():
                    resolved = resolved / "index.html"
            elif relative:
                resolved = Path(posixpath.normpath(posixpath.join(page.parent.as_posix(), relative)))
                if resolved.is_dir():
                    resolved = resolved / "index.html"
            else:
                resolved = page
            if site.resolve() not in resolved.resolve().parents:
                broken.append((page.relative_to(site), target, "leaves the site"))
            elif not resolved.is_file():
                broken.append((page.relative_to(site), target, "no such file"))
            elif (
                parts.fragment
                and resolved.suffix == ".html"
                and unquote(parts.fragment) not in parse_page(resolved).ids
            ):
                broken.append((page.relative_to(site), target, "no such anchor"))
    assert not broken, "\n".join(map(str, broken))


def test_the_report_page_renders_its_samples_as_text(served, tmp_path):
    from report_data import HOSTILE_TEXT

    dom = render(f"{served['url']}/{served['report'].relative_to(served['root']).as_posix()}", tmp_path)
    # The sample text sets document.title if its <script> ran.
    assert title_of(dom).startswith("Grad-Mimic filter report:") and "pwned" not in title_of(dom)
    for section in ("Summary", "Figures", "Windows and labeling functions", "Provenance"):
        assert f">{section}</h2>" in dom, section
    assert dom.count("data:image/png;base64,") >= 2 + 50  # two figures, one thumbnail per listed sample
    escaped = HOSTILE_TEXT.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert dom.count(escaped) == 50
