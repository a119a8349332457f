"""What ``llmqd batch`` writes: each result once, in the output format, and a run stopped at once,
with nothing sent again, when the output cannot be written (in each provider and format)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer

from .support import (
    WRITING_CASES,
    Case,
    Fake,
    case_id,
    last_outcomes,
    outcomes,
    results,
    run_cli,
    write_requests,
)


@pytest.mark.parametrize("case", WRITING_CASES, ids=case_id)
def test_a_full_disk_stops_the_run_at_once_and_sends_no_request_again(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 12, case)
    # /dev/full: every write fails with ENOSPC.
    done = run_cli(
        fake, requests, Path("/dev/full"), "--rpm", "6000", "--tpm", "1000000", "--concurrency", "2"
    )
    assert done.returncode == 3, done.stderr
    assert "cannot write /dev/full" in done.stderr
    assert "No space left on device" in done.stderr
    assert set(fake.calls.values()) == {1}  # each request answered went out once
    assert sum(fake.calls.values()) <= 2  # only the calls in flight when the first write failed
    assert "not written" in done.stdout


@pytest.mark.parametrize("case", WRITING_CASES, ids=case_id)
def test_a_write_cut_off_mid_line_keeps_the_whole_lines_and_the_next_run_finishes(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 20, case)
    options = ("--rpm", "6000", "--tpm", "1000000", "--concurrency", "1")
    # Room for a few result lines (each 300 to 600 bytes), then a write stops half way.
    stopped = run_cli(fake, requests, out, *options, file_size_cap=2_000)
    assert stopped.returncode == 3, stopped.stderr
    assert "File too large" in stopped.stderr
    first = outcomes(out)  # whole lines only: the part of the last one was cut off
    assert 1 <= len(first) < len(ids)
    assert all(result.ok for result in first)
    assert set(fake.calls.values()) == {1}
    assert sum(fake.calls.values()) == len(first) + 1  # the one whose line did not fit
    resumed = run_cli(fake, requests, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(last_outcomes(out)) == ids
    assert [result.id for result in outcomes(out)[: len(first)]] == [result.id for result in first]
    assert all(fake.calls[result.id] == 1 for result in first)


def test_a_reply_holding_a_lone_surrogate_is_written_escaped_as_valid_utf8(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 3)
    provider.configure(content_for={"q001": "half \ud800 of a pair, \u00e9"})
    done = run_cli(openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    by_id = {line["id"]: line for line in results(out)}  # decodes the file as strict UTF-8
    assert sorted(by_id) == ids
    assert by_id["q001"]["response"]["choices"][0]["message"]["content"] == "half \ud800 of a pair, \u00e9"
    assert b"\\ud800" in out.read_bytes()
    assert provider.calls == Counter({request_id: 1 for request_id in ids})


def test_the_response_is_the_json_the_provider_sent(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 1)
    done = run_cli(openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    response = results(out)[0]["response"]
    # The fake's fields, and none of the nulls the SDK's model has for fields it did not send.
    assert set(response) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(response["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_message_batches_results_hold_the_message_or_anthropics_error(
    anthropic_server: AnthropicServer, anthropic_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, Case("anthropic", "message-batches"))
    anthropic_server.configure(status_for={"q001": 403}, script={"q002": ["no-content"] * 5})
    options = ("--rpm", "6000", "--tpm", "1000000", "--max-attempts", "2", "--max-retry-delay", "0.05")
    done = run_cli(anthropic_fake, requests, out, *options)
    assert done.returncode == 1, done.stderr
    lines = {line["custom_id"]: line for line in results(out)}
    assert set(lines["q000"]) == {"custom_id", "result"}
    assert lines["q000"]["result"]["type"] == "succeeded"
    assert lines["q000"]["result"]["message"]["content"] == [{"type": "text", "text": "echo: q000"}]
    refused = lines["q001"]["result"]
    assert refused["type"] == "errored"
    assert refused["error"]["type"] == "error"
    assert refused["error"]["error"] == {"type": "permission_error", "message": "refused q001"}
    assert refused["error"]["request_id"].startswith("req_")
    malformed = lines["q002"]["result"]["error"]["error"]
    assert malformed["type"] == "api_error"  # a retry may cure it: a rerun sends it again
    assert malformed["message"].startswith("gave up after 2 failed attempts: malformed response")
