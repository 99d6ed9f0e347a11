"""MkDocs hooks of the documentation site: the pages written from the code, so they cannot drift from it.

- ``<!-- gradmimic:cli -->`` in a page becomes the ``--help`` of ``gradmimic`` and of each of its commands
  (from `hf_gradmimic.cli.build_parser`, the parser the command itself uses);
- ``<!-- gradmimic:mimic-arguments -->`` becomes the table of every ``mimic_*`` field of `MimicArguments`
  (the fields `MimicConfig` and `MimicSFTConfig` add), read from ``hf_gradmimic/config.py`` with `ast`, so the
  build imports neither torch nor transformers;
- a Markdown link to a repository file outside ``docs/`` (``../examples/sft_lora.py``, as GitHub renders it)
  points, on the site, at a generated page ``source/<path>.md`` that shows the file.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SOURCE_PAGES = "source"
# Markdown inline links and images: ](target) or ](target "title"), the target without spaces.
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?(?P<title>\s+\"[^\"]*\")?\)")
CLI_MARKER = "<!-- gradmimic:cli -->"
FIELDS_MARKER = "<!-- gradmimic:mimic-arguments -->"


def _repo_target(page_src: str, target: str) -> str | None:
    """The repository path a page's relative link points at, when that is an existing file outside docs/."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return None
    resolved = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src), target))
    if resolved.startswith(("docs/", "../")) or resolved == "docs":
        return None
    return resolved if (REPO / resolved).is_file() else None


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=0)
    return "`" * max(3, longest + 1)


def _source_page(path: str) -> str:
    text = (REPO / path).read_text(encoding="utf-8")
    language = {".py": "python", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".sh": "bash"}.get(
        Path(path).suffix, "text"
    )
    fence = _fence(text)
    return (
        f"# `{path}`\n\nThe repository file `{path}`, as of this build of the site.\n\n"
        f"{fence}{language}\n{text.rstrip()}\n{fence}\n"
    )


def on_files(files, config):
    """Add a page for every repository file outside docs/ that a page links to."""
    referenced: set[str] = set()
    for file in files.documentation_pages():
        for match in LINK.finditer(Path(file.abs_src_path).read_text(encoding="utf-8")):
            path = _repo_target(file.src_uri, match["target"])
            if path is not None:
                referenced.add(path)
    for path in sorted(referenced):
        files.append(File.generated(config, f"{SOURCE_PAGES}/{path}.md", content=_source_page(path)))
    return files


def _rewrite_links(markdown: str, page_src: str) -> str:
    def replace(match: re.Match) -> str:
        path = _repo_target(page_src, match["target"])
        if path is None:
            return match[0]
        target = posixpath.relpath(f"{SOURCE_PAGES}/{path}.md", posixpath.dirname(page_src) or ".")
        return f"]({target}{match['anchor'] or ''}{match['title'] or ''})"

    return LINK.sub(replace, markdown)


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def _cli_reference() -> str:
    """The help of `gradmimic` and of each command, as the command prints it."""
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal; the page has a fixed width
    from hf_gradmimic.cli import build_parser
    from hf_gradmimic.testing import hub_server

    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    sections = [f"## `gradmimic`\n\n```text\n{_help(parser)}\n```\n"]
    for name, subparser in commands.choices.items():
        if name == "train":
            body = (
                "`gradmimic train` takes every `MimicConfig` / `TrainingArguments` option (`gradmimic train --help` "
                "lists them all; the `mimic_*` ones are in the [Python API](api.md#mimic-arguments)), plus "
                "`--model`, `--dataset` and the column options, and runs under "
                "`accelerate launch -m hf_gradmimic train ...`."
            )
        elif name == "hub":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
                hub_server.main(["--help"], prog="gradmimic hub")
            body = f"```text\n{printed.getvalue().rstrip()}\n```"
        else:
            body = f"```text\n{_help(subparser)}\n```"
        sections.append(f"## `gradmimic {name}`\n\n{body}\n")
    return "\n".join(sections)


def _literal(node: ast.AST, constants: dict[str, object]) -> object:
    """A literal, a module-level constant, or ``list(CONSTANT)``; None for anything else."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("list", "tuple")
        and node.args
    ):
        return _literal(node.args[0], constants)
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _mimic_arguments() -> str:
    """The fields of `MimicArguments` as a Markdown table: name, type, default, choices and help."""
    tree = ast.parse((REPO / "hf_gradmimic" / "config.py").read_text(encoding="utf-8"))
    constants: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value, constants)
            if value is not None:
                constants[node.targets[0].id] = value
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "MimicArguments"]
    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for statement in cls.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        keywords = {keyword.arg: keyword.value for keyword in getattr(statement.value, "keywords", [])}
        factory = keywords.get("default_factory")
        if "default" in keywords:
            default = ast.unparse(keywords["default"])
        elif isinstance(factory, ast.Lambda):  # default_factory=lambda: [...]: the value it returns
            default = ast.unparse(factory.body)
        else:
            default = f"{ast.unparse(factory)}()" if factory is not None else "required"
        metadata = keywords.get("metadata")
        entries = (
            dict(zip((_literal(key, constants) for key in metadata.keys), metadata.values))
            if isinstance(metadata, ast.Dict)
            else {}
        )
        help_text = " ".join(str(_literal(entries["help"], constants) if "help" in entries else "").split())
        choices = _literal(entries["choices"], constants) if "choices" in entries else None
        if choices:
            help_text += " Choices: " + ", ".join(f"`{choice}`" for choice in choices) + "."
        rows.append(
            f"| `{statement.target.id}` | `{ast.unparse(statement.annotation)}` | `{default}` | "
            f"{help_text.replace('|', chr(92) + '|')} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _cli_reference())
    if FIELDS_MARKER in markdown:
        markdown = markdown.replace(FIELDS_MARKER, _mimic_arguments())
    return _rewrite_links(markdown, page.file.src_uri)
