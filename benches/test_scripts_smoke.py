"""Smoke runs of the benchmark scripts that have no test of their own: each runs end to end on a
tiny configuration and prints its table, so a broken script is caught here rather than by the
next person who measures. Figures are not checked (timing belongs to the real runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("policies.py", ["--depths", "200", "--rounds", "20", "--tenants", "3"], "fair_priority"),
        ("store_memory.py", ["--messages", "2000", "--depths", "500", "--iterations", "50"], "500"),
        (
            "real_traffic.py",
            [
                "--traces",
                "tests/data/azure",
                "--loads",
                "2",
                "--strategy",
                "fifo",
                "--strategy",
                "fair_priority",
            ],
            "| fair_priority |",
        ),
    ],
)
def test_a_bench_script_runs_on_a_tiny_configuration(script: str, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHES / script), *args],
        cwd=BENCHES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
