"""Running the same ``llmqd batch`` command again resumes from its output, in each provider and
file format: the ids done and failed for good are skipped, those that failed on a transient
error are sent again, and --retry-failed sends every failed one."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from llm_queue_dispatcher.batch_formats import FORMATS, Refused, previous_results
from tests.provider.server import ProviderServer

from .support import (
    CASES,
    RESUMING_CASES,
    Case,
    Fake,
    case_id,
    last_outcomes,
    outcomes,
    results,
    run_cli,
    write_requests,
)

OPTIONS = ("--rpm", "6000", "--tpm", "1000000", "--max-retry-delay", "0.05")


def test_a_resumed_run_sends_only_what_is_missing(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 20)
    earlier = [
        {"id": request_id, "status": "ok", "response": {}, "tokens": 1, "attempts": 1}
        for request_id in ids[:8]
    ]
    # A crash in the middle of a write left a last line cut off: that request is sent again.
    out.write_text("".join(json.dumps(line) + "\n" for line in earlier) + '{"id": "q008", "sta')
    done = run_cli(openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    lines = results(out)
    assert [line["id"] for line in lines[:8]] == ids[:8]
    assert sorted(line["id"] for line in lines) == ids
    assert set(provider.calls) == set(ids[8:])
    assert "already in output   8" in done.stdout
    again = run_cli(openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert again.returncode == 0
    assert len(results(out)) == 20
    assert set(provider.calls) == set(ids[8:])


@pytest.mark.parametrize("case", RESUMING_CASES, ids=case_id)
def test_a_resumed_run_sends_only_what_is_missing_in_each_provider_and_format(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    first_ids = write_requests(requests, 6, case)
    first = run_cli(fake, requests, out, *OPTIONS)
    assert first.returncode == 0, first.stderr
    # A crash in the middle of the last write: half its line is in the file.
    data = out.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = results(out)[-1]
    out.write_bytes(data[: last_start + (len(data) - last_start) // 2])
    ids = first_ids + write_requests(requests, 6, case, start=6)
    resumed = run_cli(fake, requests, out, *OPTIONS)
    assert resumed.returncode == 0, resumed.stderr
    assert "removing an incomplete last line" in resumed.stderr
    assert "already holds 5 of these requests: skipping 5 done" in resumed.stderr
    assert sorted(last_outcomes(out)) == ids
    assert len(outcomes(out)) == 12  # each id once
    cut_id = cut.get("id") if "status" in cut else cut["custom_id"]
    assert {key: count for key, count in fake.calls.items() if count != 1} == {cut_id: 2}
    again = run_cli(fake, requests, out, *OPTIONS)
    assert again.returncode == 0, again.stderr
    assert len(outcomes(out)) == 12
    assert sum(fake.calls.values()) == 13


@pytest.mark.parametrize("case", RESUMING_CASES, ids=case_id)
def test_a_rerun_sends_the_transient_failures_again_and_retry_failed_the_others(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 4, case)
    fake.fail(fail_first={"q001": 10}, refuse={"q002": 400})
    first = run_cli(fake, requests, out, *OPTIONS, "--max-attempts", "2")
    assert first.returncode == 1, first.stderr
    written = last_outcomes(out)
    assert [request_id for request_id in ids if written[request_id].ok] == ["q000", "q003"]
    assert (fake.calls["q001"], fake.calls["q002"]) == (2, 1)
    assert "1 request(s) failed on transient errors" in first.stderr
    fake.fail()  # the provider recovers; q002 would now be accepted too
    rerun = run_cli(fake, requests, out, *OPTIONS)
    assert rerun.returncode == 0, rerun.stderr
    assert (
        "already holds 4 of these requests: skipping 2 done; 1 failed for good (--retry-failed sends "
        "them again); sending again 1 that failed on a transient error"
    ) in rerun.stderr
    assert (fake.calls["q001"], fake.calls["q002"]) == (3, 1)
    assert not last_outcomes(out)["q002"].ok
    retried = run_cli(fake, requests, out, *OPTIONS, "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "sending again 1 failed for good (--retry-failed)" in retried.stderr
    assert fake.calls["q002"] == 2
    assert all(result.ok for result in last_outcomes(out).values())
    assert sorted(last_outcomes(out)) == ids
    assert fake.calls["q000"] == 1


def test_retry_failed_sends_permanent_failures_again(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    provider.configure(status_for={"q001": 401})
    options = ("--rpm", "6000", "--tpm", "1000000")
    first = run_cli(openai_fake, requests, out, *options)
    assert first.returncode == 1, first.stderr
    assert {line["id"]: line for line in results(out)}["q001"]["error"]["retryable"] is False
    provider.configure(status_for={})
    rerun = run_cli(openai_fake, requests, out, *options)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping 2 done; 1 failed for good (--retry-failed sends them again)" in rerun.stderr
    assert provider.calls["q001"] == 1
    assert "already in output   3" in rerun.stdout
    retried = run_cli(openai_fake, requests, out, *options, "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "sending again 1 failed for good (--retry-failed)" in retried.stderr
    assert provider.calls["q001"] == 2
    assert last_outcomes(out)["q001"].ok


def test_resume_reads_results_whose_text_holds_unicode_line_separators(tmp_path: Path) -> None:
    """A response holding U+2028 or U+0085 (written unescaped) is one result line, not several:
    resuming must not call the file corrupt."""
    out = tmp_path / "out.jsonl"
    records = [
        {"id": "a", "status": "ok", "response": {"text": "one\u2028two\u0085three\x1cfour"}},
        {"id": "b", "status": "ok", "response": {"text": "plain"}},
    ]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert set(previous_results(out, FORMATS["native"])) == {"a", "b"}


def test_resume_reads_an_output_that_an_editor_saved_with_a_byte_order_mark(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    records = [{"id": "a", "status": "ok", "response": {}}, {"id": "b", "status": "ok", "response": {}}]
    out.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(r) + "\n" for r in records).encode())
    assert set(previous_results(out, FORMATS["native"])) == {"a", "b"}


# What a rerun makes of each result the provider formats can hold, the ones llmqd does not write
# included (Anthropic's canceled and expired results; OpenAI's insufficient quota).
BATCH_API_LINES = [
    ({"response": {"status_code": 200, "body": {}}, "error": None}, (True, False)),
    (
        {"response": {"status_code": 400, "body": {"error": {"message": "bad"}}}, "error": None},
        (False, False),
    ),
    ({"response": {"status_code": 404, "body": {}}, "error": None}, (False, False)),
    ({"response": {"status_code": 408, "body": {}}, "error": None}, (False, True)),
    (
        {"response": {"status_code": 429, "body": {"error": {"code": "rate_limit_exceeded"}}}, "error": None},
        (False, True),
    ),
    (
        {"response": {"status_code": 429, "body": {"error": {"code": "insufficient_quota"}}}, "error": None},
        (False, False),
    ),
    ({"response": {"status_code": 503, "body": {}}, "error": None}, (False, True)),
    ({"response": None, "error": {"code": "timeout", "message": "x"}}, (False, True)),
    ({"response": None, "error": {"code": "connection_error", "message": "x"}}, (False, True)),
    ({"response": None, "error": {"code": "malformed_response", "message": "x"}}, (False, True)),
    ({"response": None, "error": {"code": "request_failed", "message": "x"}}, (False, False)),
    ({"response": None, "error": {"code": "batch_expired", "message": "x"}}, (False, False)),
]
MESSAGE_BATCHES_RESULTS = [
    ({"type": "succeeded", "message": {}}, (True, False)),
    (
        {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error"}}},
        (False, False),
    ),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error"}}}, (False, True)),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "api_error"}}}, (False, True)),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "timeout_error"}}}, (False, True)),
    ({"type": "canceled"}, (False, True)),
    ({"type": "expired"}, (False, True)),
]


@pytest.mark.parametrize(("line", "expected"), BATCH_API_LINES)
def test_a_batch_api_result_is_done_transient_or_failed_for_good(
    tmp_path: Path, line: dict[str, object], expected: tuple[bool, bool]
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "a", **line}) + "\n")
    before = previous_results(out, FORMATS["batch-api"])["a"]
    assert (before.ok, before.retryable) == expected


@pytest.mark.parametrize(("result", "expected"), MESSAGE_BATCHES_RESULTS)
def test_a_message_batches_result_is_done_transient_or_failed_for_good(
    tmp_path: Path, result: dict[str, object], expected: tuple[bool, bool]
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "a", "result": result}) + "\n")
    before = previous_results(out, FORMATS["message-batches"])["a"]
    assert (before.ok, before.retryable) == expected


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        ("native", {"id": "a", "status": "maybe"}),
        ("native", {"id": "a", "status": None}),
        ("batch-api", {"custom_id": "a", "response": None, "error": None}),
        ("batch-api", {"custom_id": "a", "response": {"status_code": "200", "body": {}}, "error": None}),
        ("message-batches", {"custom_id": "a", "result": {"type": "unheard-of"}}),
    ],
    ids=[
        "native-unknown-status",
        "native-no-status",
        "batch-api-no-outcome",
        "batch-api-text-status",
        "message-batches-unknown-type",
    ],
)
def test_a_result_line_without_a_known_outcome_is_refused_not_read_as_a_failure_for_good(
    tmp_path: Path, fmt: str, line: dict[str, object]
) -> None:
    # Read as failed for good, its request would be skipped by every rerun without a word.
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(line) + "\n")
    with pytest.raises(Refused, match="line 1 is not an llmqd batch result"):
        previous_results(out, FORMATS[fmt])


@pytest.mark.parametrize("case", [c for c in CASES if c.format != "native"], ids=case_id)
def test_an_output_in_another_format_is_refused_and_nothing_is_sent(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, case)
    out.write_text(
        json.dumps({"id": "q000", "status": "ok", "response": {}, "tokens": 1, "attempts": 1}) + "\n"
    )
    before = out.read_bytes()
    refused = run_cli(fake, requests, out, *OPTIONS)
    assert refused.returncode == 2
    assert (
        f"holds results in the native format and this run writes the {case.format} format; pass "
        "--output-format native to go on with it"
    ) in refused.stderr
    assert sum(fake.calls.values()) == 0
    assert out.read_bytes() == before
    going_on = run_cli(fake, requests, out, *OPTIONS, "--output-format", "native")
    assert going_on.returncode == 0, going_on.stderr
    assert "skipping 1 done" in going_on.stderr
    assert sorted(line["id"] for line in results(out)[1:]) == ["q001", "q002"]
