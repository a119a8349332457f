"""`llmqd`, the entry point: a reader of its output going away (``llmqd simulate | head``) stops
the command quietly, as a command killed by SIGPIPE stops, with no traceback or message."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Exit status of a command whose output pipe closed (128 + SIGPIPE), as a shell reports it.
BROKEN_PIPE_STATUS = 141


@pytest.mark.parametrize(
    "args",
    [
        ["throttle-demo", "--requests", "20000", "--rpm", "1000000", "--tpm", "1000000000"],
        ["simulate", "--requests", "3000", "--strategy", "fifo", "--json", "--progress", "none"],
    ],
    ids=["throttle-demo", "simulate"],
)
def test_a_reader_that_goes_away_stops_the_command_quietly(args: list[str]) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "llm_queue_dispatcher.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.readline()
        process.stdout.close()  # as `| head -1` does after its line
        errors = process.stderr.read().decode()
        assert process.wait(timeout=120) == BROKEN_PIPE_STATUS
    assert errors == ""
