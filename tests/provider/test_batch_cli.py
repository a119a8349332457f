"""``llmqd batch`` end to end, as a subprocess against the local OpenAI-compatible server:
results, bad input, failures, resume, and SIGTERM in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .server import ProviderServer


def write_requests(path: Path, count: int, *, max_tokens: int = 50, **extra: Any) -> list[str]:
    ids = [f"q{n:03d}" for n in range(count)]
    with path.open("w") as handle:
        for request_id in ids:
            line = {
                "id": request_id,
                "messages": [{"role": "user", "content": request_id}],
                "max_tokens": max_tokens,
            }
            handle.write(json.dumps({**line, **extra}) + "\n")
    return ids


def command(provider: ProviderServer, requests: Path, out: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llm_queue_dispatcher.cli",
        "batch",
        str(requests),
        "--out",
        str(out),
        "--base-url",
        provider.base_url,
        "--model",
        "test-model",
        "--progress",
        "none",
        *options,
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": "test-key"}


def run_cli(
    provider: ProviderServer, requests: Path, out: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(provider, requests, out, *options),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_batch_completes_every_request_once(provider: ProviderServer, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 30)
    provider.configure(fail_first={"q004": 1, "q011": 2}, completion_tokens=12)
    done = run_cli(provider, requests, out, "--rpm", "6000", "--tpm", "1000000", "--max-retry-delay", "0.05")
    assert done.returncode == 0, done.stderr
    lines = results(out)
    assert sorted(line["id"] for line in lines) == ids
    assert {line["status"] for line in lines} == {"ok"}
    by_id = {line["id"]: line for line in lines}
    assert by_id["q011"]["attempts"] == 3
    assert by_id["q000"]["response"]["choices"][0]["message"]["content"] == "echo: q000"
    assert by_id["q000"]["tokens"] == provider.usage["q000"] == 1 + 12
    assert provider.successes == Counter({request_id: 1 for request_id in ids})
    summary = done.stdout
    for row in (
        "done                30",
        "failed              0",
        "retried             3",
        "tokens              390",
    ):
        assert row in summary, summary
    assert "achieved RPM" in summary
    assert "achieved TPM" in summary


def test_bad_lines_are_reported_with_their_numbers_and_nothing_is_sent(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lines = [
        json.dumps({"id": "a", **good}),
        "{not json",
        json.dumps({"id": "b", "messages": []}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": "a", **good}),
        json.dumps({"id": "c", "priority": "soon", **good}),
        json.dumps({"id": "d", **good, "max_tokens": 10_000_000}),
        json.dumps({"id": "e", **good}),
    ]
    requests.write_text("\n".join(lines) + "\n")
    refused = run_cli(provider, requests, out, "--rpm", "600", "--tpm", "100000")
    assert refused.returncode == 2
    for expected in (
        "line 2: not JSON",
        "line 3: payload['messages'] must be a non-empty list",
        "line 4: expected a JSON object",
        "line 6: id 'a' repeats line 1",
        "line 7: priority",
        "line 8: needs about",
        "6 bad line(s); nothing sent",
    ):
        assert expected in refused.stderr, refused.stderr
    assert "line 9" not in refused.stderr
    assert not out.exists()
    assert sum(provider.calls.values()) == 0
    skipped = run_cli(provider, requests, out, "--rpm", "600", "--tpm", "100000", "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert sorted(line["id"] for line in results(out)) == ["a", "e"]


def test_failures_are_written_with_their_error_and_the_exit_status_says_so(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 6)
    provider.configure(status_for={"q001": 400}, fail_first={"q002": 10})
    done = run_cli(
        provider,
        requests,
        out,
        "--rpm",
        "6000",
        "--tpm",
        "1000000",
        "--max-attempts",
        "2",
        "--max-retry-delay",
        "0.05",
    )
    assert done.returncode == 1, done.stderr
    by_id = {line["id"]: line for line in results(out)}
    assert sorted(by_id) == ids
    assert by_id["q001"]["status"] == "failed"
    assert by_id["q001"]["error"]["status_code"] == 400
    assert by_id["q001"]["error"]["type"] == "PermanentError"
    assert provider.calls["q001"] == 1
    assert by_id["q002"]["status"] == "failed"
    assert by_id["q002"]["error"]["message"].startswith("gave up after 2 failed attempts")
    assert provider.calls["q002"] == 2
    assert "failed              2" in done.stdout


def test_a_resumed_run_sends_only_what_is_missing(provider: ProviderServer, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 20)
    earlier = [
        {"id": request_id, "status": "ok", "response": {}, "tokens": 1, "attempts": 1}
        for request_id in ids[:8]
    ]
    # A crash in the middle of a write left a last line cut off: that request is sent again.
    out.write_text("".join(json.dumps(line) + "\n" for line in earlier) + '{"id": "q008", "sta')
    done = run_cli(provider, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    lines = results(out)
    assert [line["id"] for line in lines[:8]] == ids[:8]
    assert sorted(line["id"] for line in lines) == ids
    assert set(provider.calls) == set(ids[8:])
    assert "already in output   8" in done.stdout
    again = run_cli(provider, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert again.returncode == 0
    assert len(results(out)) == 20
    assert set(provider.calls) == set(ids[8:])


def wait_for_lines(out: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} results after {timeout} s")


@pytest.mark.parametrize(("latency", "grace"), [(0.3, 10.0), (3.0, 0.3)], ids=["within-grace", "past-grace"])
def test_sigterm_in_the_middle_loses_nothing_and_resume_finishes(
    provider: ProviderServer, tmp_path: Path, latency: float, grace: float
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 24)
    provider.configure(latency=latency)
    options = ("--rpm", "6000", "--tpm", "1000000", "--concurrency", "4", "--shutdown-grace", str(grace))
    process = subprocess.Popen(
        command(provider, requests, out, *options),
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
            while sum(provider.calls.values()) < 4 and time.monotonic() < deadline:
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
    first = [line["id"] for line in results(out)] if out.exists() else []
    assert len(first) == len(set(first))
    assert len(first) < len(ids)
    if latency < 1:
        # Every call the provider answered made it to the output.
        assert set(first) == {key for key, count in provider.successes.items() if count}
    provider.configure(latency=0.0)
    resumed = subprocess.run(
        command(provider, requests, out, *options),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert resumed.returncode == 0, resumed.stderr
    final = [line["id"] for line in results(out)]
    assert sorted(final) == ids
    assert final[: len(first)] == first


def test_resume_reads_results_whose_text_holds_unicode_line_separators(tmp_path: Path) -> None:
    """A response holding U+2028 or U+0085 (written unescaped) is one result line, not several:
    resuming must not call the file corrupt."""
    from llm_queue_dispatcher.batch import _finished_ids

    out = tmp_path / "out.jsonl"
    records = [
        {"id": "a", "status": "ok", "response": {"text": "one\u2028two\u0085three\x1cfour"}},
        {"id": "b", "status": "ok", "response": {"text": "plain"}},
    ]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert _finished_ids(out) == {"a", "b"}
