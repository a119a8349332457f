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


# Runs llmqd with a cap on the size of any file it writes (RLIMIT_FSIZE): a write past it fails
# with EFBIG after writing what fits, as a disk filling up mid-line does. (CPython ignores
# SIGXFSZ, so the process is not killed.)
FILE_SIZE_CAPPED = (
    "import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap)); sys.argv[0] = 'llmqd'; "
    "runpy.run_module('llm_queue_dispatcher.cli', run_name='__main__')"
)


def command(
    provider: ProviderServer, requests: Path | str, out: Path, *options: str, file_size_cap: int | None = None
) -> list[str]:
    start = ["-m", "llm_queue_dispatcher.cli"]
    if file_size_cap is not None:
        start = ["-c", FILE_SIZE_CAPPED, str(file_size_cap)]
    return [
        sys.executable,
        *start,
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
    provider: ProviderServer,
    requests: Path | str,
    out: Path,
    *options: str,
    stdin: str | None = None,
    file_size_cap: int | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(provider, requests, out, *options, file_size_cap=file_size_cap),
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
        input=stdin,
    )


def results(out: Path) -> list[dict[str, Any]]:
    # Strict UTF-8, split on "\n" only (a response may hold U+2028).
    return [json.loads(line) for line in out.read_bytes().decode("utf-8").split("\n") if line]


def last_results(out: Path) -> dict[str, dict[str, Any]]:
    """The result of each id: its last line."""
    return {line["id"]: line for line in results(out)}


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
        "1 line(s) need more tokens than --tpm 100000 allows in any minute: line 8 (about",
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
    from llm_queue_dispatcher.batch_formats import FORMATS, previous_results

    out = tmp_path / "out.jsonl"
    records = [
        {"id": "a", "status": "ok", "response": {"text": "one\u2028two\u0085three\x1cfour"}},
        {"id": "b", "status": "ok", "response": {"text": "plain"}},
    ]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert set(previous_results(out, FORMATS["native"])) == {"a", "b"}


# -- the output cannot be written ----------------------------------------------------------------
def test_a_full_disk_stops_the_run_at_once_and_sends_no_request_again(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 12)
    # /dev/full: every write fails with ENOSPC.
    done = run_cli(
        provider, requests, Path("/dev/full"), "--rpm", "6000", "--tpm", "1000000", "--concurrency", "2"
    )
    assert done.returncode == 3, done.stderr
    assert "cannot write /dev/full" in done.stderr
    assert "No space left on device" in done.stderr
    assert set(provider.calls.values()) == {1}  # each request answered went out once
    assert sum(provider.calls.values()) <= 2  # only the calls in flight when the first write failed
    assert "not written" in done.stdout


def test_a_write_cut_off_mid_line_keeps_the_whole_lines_and_the_next_run_finishes(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 20)
    options = ("--rpm", "6000", "--tpm", "1000000", "--concurrency", "1")
    # Room for a few result lines (each about 400 bytes), then a write stops half way.
    stopped = run_cli(provider, requests, out, *options, file_size_cap=2_000)
    assert stopped.returncode == 3, stopped.stderr
    assert "File too large" in stopped.stderr
    first = results(out)  # whole lines only: the part of the last one was cut off
    assert 1 <= len(first) < len(ids)
    assert {line["status"] for line in first} == {"ok"}
    assert set(provider.calls.values()) == {1}
    assert sum(provider.calls.values()) == len(first) + 1  # the one whose line did not fit
    resumed = run_cli(provider, requests, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(last_results(out)) == ids
    assert [line["id"] for line in results(out)[: len(first)]] == [line["id"] for line in first]
    assert all(provider.calls[line["id"]] == 1 for line in first)


def test_a_reply_holding_a_lone_surrogate_is_written_escaped_as_valid_utf8(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 3)
    provider.configure(content_for={"q001": "half \ud800 of a pair, \u00e9"})
    done = run_cli(provider, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    by_id = last_results(out)  # decodes the file as strict UTF-8
    assert sorted(by_id) == ids
    assert by_id["q001"]["response"]["choices"][0]["message"]["content"] == "half \ud800 of a pair, \u00e9"
    assert b"\\ud800" in out.read_bytes()
    assert provider.calls == Counter({request_id: 1 for request_id in ids})


# -- retries and reruns --------------------------------------------------------------------------
def test_connection_resets_and_5xx_are_retried_up_to_max_attempts_and_a_rerun_sends_them_again(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 5)
    provider.configure(drop_first={"q000": 2, "q001": 10}, fail_first={"q002": 10})
    options = ("--rpm", "6000", "--tpm", "1000000", "--max-attempts", "3", "--max-retry-delay", "0.05")
    first = run_cli(provider, requests, out, *options)
    assert first.returncode == 1, first.stderr
    by_id = last_results(out)
    assert by_id["q000"]["status"] == "ok"
    assert by_id["q000"]["attempts"] == 3
    for request_id in ("q001", "q002"):
        assert by_id[request_id]["status"] == "failed"
        assert by_id[request_id]["error"]["retryable"] is True
        assert by_id[request_id]["error"]["message"].startswith("gave up after 3 failed attempts")
        assert provider.calls[request_id] == 3
    assert by_id["q001"]["error"]["type"] == "RetryableError"
    assert by_id["q002"]["error"]["status_code"] == 500
    assert "2 request(s) failed on transient errors" in first.stderr
    provider.configure(drop_first={}, fail_first={})
    again = run_cli(provider, requests, out, *options)
    assert again.returncode == 0, again.stderr
    assert (
        "already holds 5 of these requests: skipping 3 done; sending again 2 that failed on a transient error"
        in (again.stderr)
    )
    assert {line["status"] for line in last_results(out).values()} == {"ok"}
    assert sorted(last_results(out)) == ids
    assert (provider.calls["q001"], provider.calls["q002"], provider.calls["q003"]) == (4, 4, 1)


def test_retry_failed_sends_permanent_failures_again(provider: ProviderServer, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    provider.configure(status_for={"q001": 401})
    options = ("--rpm", "6000", "--tpm", "1000000")
    first = run_cli(provider, requests, out, *options)
    assert first.returncode == 1, first.stderr
    assert last_results(out)["q001"]["error"]["retryable"] is False
    provider.configure(status_for={})
    rerun = run_cli(provider, requests, out, *options)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping 2 done; 1 failed for good (--retry-failed sends them again)" in rerun.stderr
    assert provider.calls["q001"] == 1
    assert "already in output   3" in rerun.stdout
    retried = run_cli(provider, requests, out, *options, "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "sending again 1 failed for good (--retry-failed)" in retried.stderr
    assert provider.calls["q001"] == 2
    assert last_results(out)["q001"]["status"] == "ok"


def test_a_2xx_that_is_no_completion_is_retried_and_never_written_as_ok(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    provider.configure(
        body_for={"q001": ('{"error": {"message": "upstream overloaded"}}', "application/json")}
    )
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
    lines = [line for line in results(out) if line["id"] == "q001"]
    assert [line["status"] for line in lines] == ["failed"]
    assert "upstream overloaded" in lines[0]["error"]["message"]
    assert lines[0]["error"]["retryable"] is True
    assert provider.calls["q001"] == 2


# -- what is refused before anything is sent -----------------------------------------------------
def assert_refused(done: subprocess.CompletedProcess[str], provider: ProviderServer, *named: str) -> None:
    """Exit status 2, one error line naming each of ``named``, nothing sent."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("usage:")]
    assert len(errors) == 1, done.stderr
    for name in named:
        assert name in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert sum(provider.calls.values()) == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--rpm", "0.5"), ("--rpm", "0"), ("--tpm", "0.9"), ("--tpm", "-5"), ("--default-max-tokens", "-1")],
)
def test_a_bad_flag_is_one_line_naming_it_and_nothing_is_sent(
    provider: ProviderServer, tmp_path: Path, flag: str, value: str
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    options = {"--rpm": "600", "--tpm": "100000", flag: value}
    done = run_cli(provider, requests, out, *(item for pair in options.items() for item in pair))
    assert_refused(done, provider, flag, value)
    assert not out.exists()


@pytest.mark.parametrize("where", ["a-directory", "the-input", "under-a-file"])
def test_an_out_that_cannot_be_the_results_file_is_refused(
    provider: ProviderServer, tmp_path: Path, where: str
) -> None:
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 3)
    before = requests.read_bytes()
    out = {"a-directory": tmp_path, "the-input": requests, "under-a-file": requests / "results.jsonl"}[where]
    done = run_cli(provider, requests, out, "--rpm", "600", "--tpm", "100000")
    assert_refused(done, provider, "--out")
    assert requests.read_bytes() == before


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
            "line 2: not UTF-8 (byte 0xe9 at column 47)",
        ),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "line 2: not JSON (NaN"),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
            "line 2: not JSON (Infinity",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "seed": -Infinity}',
            "line 2: not JSON (-Infinity",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "line 2: not JSON"),
    ],
    ids=["not-utf8", "nan", "infinity", "minus-infinity", "nested-deep"],
)
def test_a_line_that_is_not_plain_json_is_refused_with_its_number(
    provider: ProviderServer, tmp_path: Path, line: bytes, reason: str
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    good = b'{"messages": [{"role": "user", "content": "fine"}]}'
    requests.write_bytes(good + b"\n" + line + b"\n" + good.replace(b"fine", b"also fine") + b"\n")
    done = run_cli(provider, requests, out, "--rpm", "600", "--tpm", "100000")
    assert done.returncode == 2, done.stderr
    assert reason in done.stderr
    assert "1 bad line(s); nothing sent" in done.stderr
    assert "Traceback" not in done.stderr
    assert sum(provider.calls.values()) == 0
    assert not out.exists()


def test_lines_needing_more_than_the_tpm_are_reported_once_with_a_count(
    provider: ProviderServer, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 12, max_tokens=5_000)
    done = run_cli(provider, requests, out, "--rpm", "600", "--tpm", "1000")
    assert done.returncode == 2
    mentions = [line for line in done.stderr.splitlines() if "--tpm" in line]
    assert len(mentions) == 1, done.stderr
    assert "12 line(s) need more tokens than --tpm 1000 allows in any minute:" in mentions[0]
    assert "line 1 (about 5,009 tokens), line 2 (about 5,009 tokens)" in mentions[0]
    assert "and 7 more" in mentions[0]
    assert "12 bad line(s); nothing sent" in done.stderr
    assert sum(provider.calls.values()) == 0


def test_a_dash_reads_the_requests_from_standard_input(provider: ProviderServer, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 4)
    done = run_cli(provider, "-", out, "--rpm", "6000", "--tpm", "1000000", stdin=requests.read_text())
    assert done.returncode == 0, done.stderr
    assert sorted(last_results(out)) == ids


def test_help_is_plain_text_and_names_the_api_key_variable() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "llm_queue_dispatcher.cli", "batch", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    assert "OPENAI_API_KEY" in shown.stdout
    assert "`" not in shown.stdout
    assert "--retry-failed" in shown.stdout
    assert "exit status" in shown.stdout
