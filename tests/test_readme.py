"""Every Python example of README.md runs as written and prints what the README shows.

The convention (shared with the documentation site's pages) is in `tests/markdown_examples.py`
and the documentation's "Contributing" page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.markdown_examples import Example, examples, output_matches, parse_blocks, run_example

README = Path(__file__).resolve().parent.parent / "README.md"
README_EXAMPLES = examples(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("example", README_EXAMPLES, ids=[example.id for example in README_EXAMPLES])
def test_readme_example_runs_and_prints_what_the_readme_shows(example: Example, tmp_path: Path) -> None:
    run_example(example, tmp_path)


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

```python {.norun}
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
        (24, ("python", "{.norun}"), None),
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
