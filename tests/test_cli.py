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


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--rpm", "0.5"], "--rpm"),
        (["--tpm", "0.9", "--tokens", "1"], "--tpm"),
        (["--rpm", "1e-300"], "--rpm"),
        (["--tokens", "9007199254740993"], "--tokens"),
    ],
    ids=["rpm below one", "tpm below one", "rpm subnormal", "tokens past 2**53"],
)
def test_throttle_demo_refuses_a_limit_no_bucket_can_hold_in_one_line_naming_the_flag(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_queue_dispatcher.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["throttle-demo", *args])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}:" in error
    assert "Traceback" not in error
