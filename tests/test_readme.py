"""Every Python example of README.md runs as written and prints what the README shows.

The convention (also in the README's "Contributing" section):

- Every ```python block is a complete program. It is run as a script, in its own subprocess,
  with this interpreter (so with the installed package), from an empty working directory. It
  must exit with status 0.
- When the next fenced block is a ```text block, separated from the Python block by blank lines
  and at most one line of prose (the README writes "prints"), it is the expected standard
  output: compared line for line, trailing whitespace ignored. An expected line that ends in
  `...` matches any line that starts with the text before the `...`, for figures that vary from
  run to run (the Quick start's `651...`).
- A block whose fence says ```python norun (one that needs a server or a secret) is not run, only
  compiled, so it still has to be valid Python.

The blocks are read when the tests are collected, so the rule covers every block, present and
future, and a failure names the block by its heading and line number.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
WILDCARD = "..."
NORUN = "norun"
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

    @property
    def id(self) -> str:
        return f"{self.block.heading} (README.md:{self.block.line})"


def examples(text: str) -> list[Example]:
    """Every ```python block, paired with the ```text block that shows its output, if any."""
    blocks = parse_blocks(text)
    found: list[Example] = []
    for position, block in enumerate(blocks):
        if block.language != "python":
            continue
        following = blocks[position + 1] if position + 1 < len(blocks) else None
        shows_output = following is not None and following.language == "text" and following.prose_before <= 1
        found.append(Example(block, following.code if shows_output and following is not None else None))
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


README_EXAMPLES = examples(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("example", README_EXAMPLES, ids=[example.id for example in README_EXAMPLES])
def test_readme_example_runs_and_prints_what_the_readme_shows(example: Example, tmp_path: Path) -> None:
    compiled = compile(example.block.code, f"README.md:{example.block.line}", "exec")
    if NORUN in example.block.info:
        assert compiled is not None  # marked norun: compiling is the whole check
        return
    script = tmp_path / f"readme_line_{example.block.line}.py"
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
            f"{example.id} printed\n{proc.stdout}\nbut the README shows\n{example.expected}"
        )


def test_the_readme_examples_are_found() -> None:
    # Guards the parametrized test above against a parser that finds nothing.
    assert README_EXAMPLES
    assert any(example.expected is not None for example in README_EXAMPLES)


# --- the convention itself ------------------------------------------------------------------

SAMPLE = """# Title

```python
print("a")
```

prints

```text
a
```

```python
x = 1
```

Some prose.
More prose.

```text
not the output of the block above: two lines of prose lie between
```

```python norun
import secret_service
```

````python
if True:
    print("```")
````
```bash
echo no
```
"""


def test_blocks_pair_with_the_text_block_that_follows() -> None:
    found = examples(SAMPLE)
    assert [(e.block.line, e.block.info, e.expected) for e in found] == [
        (3, ("python",), "a\n"),
        (13, ("python",), None),
        (24, ("python", "norun"), None),
        (28, ("python",), None),  # the next block is bash
    ]
    assert found[0].block.heading == "Title"
    assert found[3].block.code == 'if True:\n    print("```")\n'


def test_an_unclosed_fence_is_an_error() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_blocks("```python\nprint(1)\n")


@pytest.mark.parametrize(
    ("expected", "actual", "matches"),
    [
        ("3500.0 6516.8...\n", "3500.0 6516.8333\n", True),
        ("3500.0 6516.8...\n", "3500.0 6516.9\n", False),
        ("a\nb\n", "a\nb\n", True),
        ("a\nb\n", "a\nb\nc\n", False),
        ("a\nb\n", "a\n", False),
        ("a  \n", "a\n", True),
        ("x...\n", "x\n", True),
        ("a\n", "ab\n", False),
    ],
)
def test_output_matching(expected: str, actual: str, matches: bool) -> None:
    assert output_matches(expected, actual) is matches
