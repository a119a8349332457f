"""What the tests of `llmqd simulate` share: running the command in-process."""

from __future__ import annotations

import pytest

from llm_queue_dispatcher.cli import main


def outcome(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of ``llmqd simulate ARGS`` (an argparse refusal as
    SystemExit too); anything else raised fails the test."""
    try:
        status = main(["simulate", *args])
    except SystemExit as exit:
        status = int(exit.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err
