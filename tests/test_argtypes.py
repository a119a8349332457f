"""The argument types the ``llmqd`` commands share: a bad flag is a one-line usage error naming
it, before anything runs."""

from __future__ import annotations

import argparse

import pytest

from llm_queue_dispatcher import LLMThrottle
from llm_queue_dispatcher._argtypes import limit_per_minute


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmqd")
    parser.add_argument("--rpm", type=limit_per_minute)
    return parser


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("inf", "must be a finite number, got inf"),
        ("nan", "must be a finite number, got nan"),
        ("1e400", "must be a finite number, got 1e400"),
        ("0.5", "must be >= 1 (a limit below one per minute never admits a request), got 0.5"),
        ("0", "must be >= 1"),
        ("-60", "must be >= 1"),
        ("sixty", "must be a number of requests or tokens per minute, got 'sixty'"),
    ],
)
def test_a_limit_per_minute_below_one_or_not_finite_is_a_one_line_error_naming_the_flag(
    text: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--rpm", text])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"llmqd: error: argument --rpm: {says}")


@pytest.mark.parametrize(("text", "value"), [("1", 1.0), ("60", 60.0), ("1e308", 1e308), ("2.5", 2.5)])
def test_a_limit_per_minute_the_limiter_accepts_is_read_as_a_float(text: str, value: float) -> None:
    assert parser().parse_args(["--rpm", text]).rpm == value
    LLMThrottle(value, value)  # the limiter agrees
