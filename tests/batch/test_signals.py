"""SIGTERM in the middle of ``llmqd batch``: the running calls get the grace, nothing answered is
lost, and the same command finishes the rest."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer

from .support import Case, Fake, command, environment, outcomes, write_requests


def wait_for_lines(out: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} results after {timeout} s")


@pytest.mark.parametrize(
    ("case", "latency", "grace"),
    [
        (Case("openai", "native"), 0.3, 10.0),
        (Case("openai", "native"), 3.0, 0.3),
        (Case("anthropic", "batch-api"), 0.3, 10.0),
    ],
    ids=["within-grace", "past-grace", "anthropic-batch-api-within-grace"],
)
def test_sigterm_in_the_middle_loses_nothing_and_resume_finishes(
    case: Case, tmp_path: Path, latency: float, grace: float
) -> None:
    server = (ProviderServer if case.provider == "openai" else AnthropicServer)().start()
    try:
        fake = Fake(case.provider, server)
        sigterm_then_resume(fake, case, tmp_path, latency, grace)
    finally:
        server.stop()


def sigterm_then_resume(fake: Fake, case: Case, tmp_path: Path, latency: float, grace: float) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 24, case)
    fake.server.configure(latency=latency)
    options = ("--rpm", "6000", "--tpm", "1000000", "--concurrency", "4", "--shutdown-grace", str(grace))
    process = subprocess.Popen(
        command(fake, requests, out, *options),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        if latency < 1:
            wait_for_lines(out, 4, 30)
        else:
            deadline = time.monotonic() + 30
            while sum(fake.calls.values()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        stopped_in = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stdout
    # The running calls finished within the grace, or were cut at its end.
    assert stopped_in < min(grace, latency) + 2.0, stopped_in
    first = [result.id for result in outcomes(out)] if out.exists() else []
    assert len(first) == len(set(first))
    assert len(first) < len(ids)
    if latency < 1:
        # Every call the provider answered made it to the output.
        assert set(first) == {key for key, count in fake.successes.items() if count}
    fake.server.configure(latency=0.0)
    resumed = subprocess.run(
        command(fake, requests, out, *options),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert resumed.returncode == 0, resumed.stderr
    final = [result.id for result in outcomes(out)]
    assert sorted(final) == ids
    assert final[: len(first)] == first
