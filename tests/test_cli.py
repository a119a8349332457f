"""`llmqd`, the entry point: a reader of its output going away (``llmqd simulate | head``) stops
the command quietly, as a command killed by SIGPIPE stops, with no traceback or message."""

from __future__ import annotations

import os
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
    # The reader is gone before the command writes (as `| head -1` is once it has its line):
    # a pipe whose read end is closed, so every write fails, however fast the command is.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "llm_queue_dispatcher.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert process.returncode == BROKEN_PIPE_STATUS
    assert process.stderr.decode() == ""
