"""``llmqd batch`` end to end against the local fake providers: every request answered and
written once, in each provider and file format; failures written with their error; transient
errors retried up to --max-attempts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.provider.server import ProviderServer

from .support import (
    Case,
    Fake,
    answer_text,
    case_id,
    last_outcomes,
    outcomes,
    results,
    run_cli,
    write_requests,
)


def test_a_batch_completes_every_request_once(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 30)
    provider.configure(fail_first={"q004": 1, "q011": 2}, completion_tokens=12)
    done = run_cli(
        openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000", "--max-retry-delay", "0.05"
    )
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


def test_every_request_is_answered_and_written_once_in_each_provider_and_format(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 12, case)
    fake.fail(fail_first={"q004": 1, "q007": 2})
    done = run_cli(fake, requests, out, "--rpm", "6000", "--tpm", "1000000", "--max-retry-delay", "0.05")
    assert done.returncode == 0, done.stderr
    written = outcomes(out)
    assert sorted(result.id for result in written) == ids
    assert all(result.ok for result in written)
    assert fake.successes == Counter({request_id: 1 for request_id in ids})
    assert fake.calls["q007"] == 3
    for result in written:
        assert answer_text(result.response) == f"echo: {result.id}"
    assert "retried             3" in done.stdout
    tokens = sum(fake.tokens_used(request_id) for request_id in ids)
    assert f"tokens              {tokens:,}" in done.stdout


@pytest.mark.parametrize("case", [Case("openai", "native"), Case("anthropic", "batch-api")], ids=case_id)
def test_the_batch_api_output_names_each_line_and_the_providers_request(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 4, case)
    fake.fail(refuse={"q002": 400})
    done = run_cli(fake, requests, out, "--rpm", "6000", "--tpm", "1000000", "--output-format", "batch-api")
    assert done.returncode == 1, done.stderr
    lines = {line["custom_id"]: line for line in results(out)}
    assert len({line["id"] for line in lines.values()}) == 4
    for line in lines.values():
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["request_id"].startswith("req_")  # the provider's request id header
    assert lines["q000"]["response"]["status_code"] == 200
    refused = lines["q002"]["response"]
    assert refused["status_code"] == 400
    # The provider's error answer, as it sent it.
    message = refused["body"]["error"]["message"]
    assert message == "refused q002"


def test_failures_are_written_with_their_error_and_the_exit_status_says_so(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 6)
    provider.configure(status_for={"q001": 400}, fail_first={"q002": 10})
    done = run_cli(
        openai_fake,
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


def test_a_failure_without_an_answer_is_an_error_code_in_the_batch_api_output(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, Case("openai", "batch-api"))
    provider.configure(
        drop_first={"q000": 10},
        body_for={"q001": ('{"error": {"message": "upstream overloaded"}}', "application/json")},
    )
    options = ("--rpm", "6000", "--tpm", "1000000", "--max-attempts", "2", "--max-retry-delay", "0.05")
    done = run_cli(openai_fake, requests, out, *options)
    assert done.returncode == 1, done.stderr
    lines = {line["custom_id"]: line for line in results(out)}
    assert lines["q000"]["response"] is None
    assert lines["q000"]["error"]["code"] == "connection_error"
    assert lines["q000"]["error"]["message"].startswith("gave up after 2 failed attempts")
    assert lines["q001"]["response"] is None
    assert lines["q001"]["error"]["code"] == "malformed_response"
    assert "upstream overloaded" in lines["q001"]["error"]["message"]
    assert lines["q002"]["response"]["status_code"] == 200


def test_connection_resets_and_5xx_are_retried_up_to_max_attempts_and_a_rerun_sends_them_again(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 5)
    provider.configure(drop_first={"q000": 2, "q001": 10}, fail_first={"q002": 10})
    options = ("--rpm", "6000", "--tpm", "1000000", "--max-attempts", "3", "--max-retry-delay", "0.05")
    first = run_cli(openai_fake, requests, out, *options)
    assert first.returncode == 1, first.stderr
    by_id = {line["id"]: line for line in results(out)}
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
    again = run_cli(openai_fake, requests, out, *options)
    assert again.returncode == 0, again.stderr
    assert (
        "already holds 5 of these requests: skipping 3 done; sending again 2 that failed on a transient error"
        in (again.stderr)
    )
    assert {result.ok for result in last_outcomes(out).values()} == {True}
    assert sorted(last_outcomes(out)) == ids
    assert (provider.calls["q001"], provider.calls["q002"], provider.calls["q003"]) == (4, 4, 1)


def test_a_2xx_that_is_no_completion_is_retried_and_never_written_as_ok(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    provider.configure(
        body_for={"q001": ('{"error": {"message": "upstream overloaded"}}', "application/json")}
    )
    done = run_cli(
        openai_fake,
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


def test_help_is_plain_text_and_names_the_api_key_variables() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "llm_queue_dispatcher.cli", "batch", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    for text in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "--provider", "custom_id"):
        assert text in shown.stdout
    assert "`" not in shown.stdout
    assert "--retry-failed" in shown.stdout
    assert "exit status" in shown.stdout


@pytest.mark.parametrize("case", [Case("openai", "batch-api"), Case("anthropic", "native")], ids=case_id)
def test_an_argument_the_sdk_does_not_name_is_sent_in_the_body_as_written(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    # A Batch API body is the HTTP request's JSON: a parameter newer than the installed SDK, or
    # one an OpenAI-compatible server adds, goes out as written (the SDK's extra_body).
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    line = case.line("q000", max_tokens=5, top_k=3, service_hint={"tier": "flex"})
    requests.write_text(json.dumps(line) + "\n")
    done = run_cli(fake, requests, out, "--rpm", "600", "--tpm", "100000")
    assert done.returncode == 0, done.stderr
    assert fake.calls["q000"] == 1
    sent = fake.server.bodies["q000"]
    assert (sent["top_k"], sent["service_hint"], sent["max_tokens"]) == (3, {"tier": "flex"}, 5)
    assert "extra_body" not in sent
