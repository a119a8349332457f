"""The documentation site: it builds with ``mkdocs build --strict`` (no broken link, anchor or
API reference), and every Python example on its pages runs as written and prints what the page
shows (the README's convention, `tests/markdown_examples.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.markdown_examples import Example, examples, parse_blocks, run_example

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
DOCS_EXAMPLES = [
    example
    for page in PAGES
    for example in examples(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))
]


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    built = tmp_path / "site"
    # Every page of the navigation was rendered, the API reference included.
    for page in ("index.html", "getting-started/index.html", "reference/dispatcher/index.html"):
        assert (built / page).is_file(), page
    reference = (built / "reference" / "dispatcher" / "index.html").read_text(encoding="utf-8")
    assert "LLMQueueDispatcher" in reference
    assert "dequeue" in reference  # a method documented from its docstring


@pytest.mark.parametrize("example", DOCS_EXAMPLES, ids=[example.id for example in DOCS_EXAMPLES])
def test_documentation_example_runs_and_prints_what_the_page_shows(example: Example, tmp_path: Path) -> None:
    run_example(example, tmp_path)


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda page: page.name)
def test_every_fence_renders_on_the_site_and_on_github(page: Path) -> None:
    # A fence's info string is a language, optionally followed by an attribute list: "python
    # {.norun}". A bare word after the language ("python norun") is no fence at all to MkDocs'
    # superfences: the block and every heading after it would render as plain text.
    for block in parse_blocks(page.read_text(encoding="utf-8")):
        assert len(block.info) <= 1 or (len(block.info) == 2 and block.info[1].startswith("{")), (
            f"{page.name}:{block.line}: fence info {' '.join(block.info)!r}"
        )


def test_the_documentation_examples_are_found() -> None:
    assert len(PAGES) >= 10
    assert len(DOCS_EXAMPLES) >= 5
    assert any(example.expected is not None for example in DOCS_EXAMPLES)
