"""Runnable examples in Markdown: the convention the README and the documentation site share.

- Every ```python block is a complete program. It is run as a script, in its own subprocess,
  with this interpreter (so with the installed package), from an empty working directory. It
  must exit with status 0.
- When the next fenced block is a ```text block, separated from the Python block by blank lines
  and at most one line of prose (the pages write "prints"), it is the expected standard
  output: compared line for line, trailing whitespace ignored. An expected line that ends in
  `...` matches any line that starts with the text before the `...`, for figures that vary from
  run to run.
- A block whose fence says ```python {.norun} (one that needs a server or a secret) is not run,
  only compiled, so it still has to be valid Python. (`{.norun}` is an attribute list: GitHub
  highlights the block as Python, MkDocs' superfences renders it with a `norun` class; a bare
  word after the language would break the fence on the documentation site.)

The blocks are read when the tests are collected, so the rule covers every block, present and
future, and a failure names the file, the block's heading and its line number.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WILDCARD = "..."
NORUN = "{.norun}"
TIMEOUT_SECONDS = 120.0

# An opening fence: up to three spaces, three or more backticks, an info string without backticks.
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    line: int  # 1-based line of the opening fence
    info: tuple[str, ...]  # the fence's info string, split on whitespace: ("python", "norun")
    code: str
    heading: str  # the nearest heading above it
    prose_before: int  # lines of prose between the previous block (or the file start) and this one

    @property
    def language(self) -> str:
        return self.info[0] if self.info else ""


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order (CommonMark backtick fences)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    heading = "(top)"
    prose = 0
    index = 0
    while index < len(lines):
        line = lines[index]
        opening = FENCE.match(line)
        if opening is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
                prose += 1
            elif line.strip():
                prose += 1
            index += 1
            continue
        fence = opening["fence"]
        indent = len(opening["indent"])
        closing = re.compile(rf"^ {{0,3}}`{{{len(fence)},}}\s*$")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            content = lines[end]
            strip = min(indent, len(content) - len(content.lstrip(" ")))  # the fence's indentation
            body.append(content[strip:])
            end += 1
        if end == len(lines):
            raise ValueError(f"line {index + 1}: the fenced block is never closed")
        blocks.append(
            Block(index + 1, tuple(opening["info"].split()), "\n".join(body) + "\n", heading, prose)
        )
        prose = 0
        index = end + 1
    return blocks


@dataclass(frozen=True)
class Example:
    block: Block
    expected: str | None  # the text block that shows its output, if one follows
    source: str = "README.md"  # the file it comes from, for the test id and error messages

    @property
    def id(self) -> str:
        return f"{self.block.heading} ({self.source}:{self.block.line})"


def examples(text: str, source: str = "README.md") -> list[Example]:
    """Every ```python block, paired with the ```text block that shows its output, if any."""
    blocks = parse_blocks(text)
    found: list[Example] = []
    for position, block in enumerate(blocks):
        if block.language != "python":
            continue
        following = blocks[position + 1] if position + 1 < len(blocks) else None
        shows_output = following is not None and following.language == "text" and following.prose_before <= 1
        found.append(
            Example(block, following.code if shows_output and following is not None else None, source)
        )
    return found


def line_matches(expected: str, actual: str) -> bool:
    expected, actual = expected.rstrip(), actual.rstrip()
    if expected.endswith(WILDCARD):
        return actual.startswith(expected[: -len(WILDCARD)])
    return expected == actual


def output_matches(expected: str, actual: str) -> bool:
    expected_lines, actual_lines = expected.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    return len(expected_lines) == len(actual_lines) and all(
        line_matches(e, a) for e, a in zip(expected_lines, actual_lines, strict=True)
    )


def run_example(example: Example, tmp_path: Path) -> None:
    """Runs one example as the convention says; fails the test with what it printed otherwise."""
    compiled = compile(example.block.code, f"{example.source}:{example.block.line}", "exec")
    if NORUN in example.block.info:
        assert compiled is not None  # marked norun: compiling is the whole check
        return
    script = tmp_path / f"example_line_{example.block.line}.py"
    script.write_text(example.block.code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, f"{example.id} failed:\n{proc.stderr}"
    if example.expected is not None:
        assert output_matches(example.expected, proc.stdout), (
            f"{example.id} printed\n{proc.stdout}\nbut the page shows\n{example.expected}"
        )
