"""What ``llmqd batch`` reads, and what it refuses before anything is sent: bad flags, an --out
that cannot be the results file, bad lines in each format (named by their number), lines no
minute can hold; which format a file is read in; Anthropic's required max_tokens."""

from __future__ import annotations

import codecs
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from llm_queue_dispatcher.anthropic import estimate_messages_input_tokens, estimate_messages_tokens
from llm_queue_dispatcher.batch_formats import read_requests
from llm_queue_dispatcher.openai import estimate_chat_tokens
from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer

from .support import (
    ENDPOINTS,
    Case,
    Fake,
    case_id,
    command,
    environment,
    last_outcomes,
    results,
    run_cli,
    write_requests,
)

LIMITS = ("--rpm", "600", "--tpm", "100000")


def assert_refused(done: subprocess.CompletedProcess[str], fake: Fake, *named: str) -> None:
    """Exit status 2, one error line naming each of ``named``, nothing sent."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("usage:")]
    assert len(errors) == 1, done.stderr
    for name in named:
        assert name in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert sum(fake.calls.values()) == 0


def assert_lines_refused(
    done: subprocess.CompletedProcess[str], fake: Fake, out: Path, *expected: str
) -> None:
    """Exit status 2, each of ``expected`` said, nothing sent, no output."""
    assert done.returncode == 2, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sum(fake.calls.values()) == 0
    assert not out.exists()


# -- the native format ---------------------------------------------------------------------------
def test_bad_lines_are_reported_with_their_numbers_and_nothing_is_sent(
    openai_fake: Fake, tmp_path: Path
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
    refused = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        openai_fake,
        out,
        "line 2: not JSON",
        "line 3: payload['messages'] must be a non-empty list",
        "line 4: expected a JSON object",
        "line 6: id 'a' repeats line 1",
        "line 7: priority",
        "1 line(s) need more tokens than --tpm 100000 allows in any minute: line 8 (about",
        "6 bad line(s); nothing sent",
    )
    assert "line 9" not in refused.stderr
    skipped = run_cli(openai_fake, requests, out, *LIMITS, "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert sorted(line["id"] for line in results(out)) == ["a", "e"]


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
        (
            b'{"messages": [{"role": "user", "content": "x\\ud800"}]}',
            "line 2: messages[0].content holds a lone surrogate",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "metadata": {"\\udfff": 1}}',
            "line 2: a key of metadata holds a lone surrogate",
        ),
    ],
    ids=["not-utf8", "nan", "infinity", "minus-infinity", "nested-deep", "lone-surrogate", "surrogate-key"],
)
def test_a_line_that_is_not_plain_json_is_refused_with_its_number(
    openai_fake: Fake, tmp_path: Path, line: bytes, reason: str
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    good = b'{"messages": [{"role": "user", "content": "fine"}]}'
    requests.write_bytes(good + b"\n" + line + b"\n" + good.replace(b"fine", b"also fine") + b"\n")
    done = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(done, openai_fake, out, reason, "1 bad line(s); nothing sent")


def test_a_line_holding_a_lone_surrogate_is_refused_and_skip_invalid_sends_the_others(
    openai_fake: Fake, tmp_path: Path
) -> None:
    # Valid JSON, but UTF-8 cannot encode a lone surrogate: no attempt could ever send it. A
    # pair of escapes is one character, and goes.
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    lines = [
        b'{"id": "plain", "messages": [{"role": "user", "content": "plain"}], "max_tokens": 5}',
        b'{"id": "lone", "messages": [{"role": "user", "content": "lone \\udc00"}], "max_tokens": 5}',
        b'{"id": "pair", "messages": [{"role": "user", "content": "pair \\ud83d\\ude00"}], "max_tokens": 5}',
    ]
    requests.write_bytes(b"\n".join(lines) + b"\n")
    refused = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused, openai_fake, out, "line 2: messages[0].content holds a lone surrogate", "1 bad line(s)"
    )
    skipped = run_cli(openai_fake, requests, out, *LIMITS, "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert sorted(line["id"] for line in results(out)) == ["pair", "plain"]
    assert openai_fake.calls == Counter({"plain": 1, "pair \U0001f600": 1})


def test_lines_needing_more_than_the_tpm_are_reported_once_with_a_count(
    openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 12, max_tokens=5_000)
    done = run_cli(openai_fake, requests, out, "--rpm", "600", "--tpm", "1000")
    assert done.returncode == 2
    mentions = [line for line in done.stderr.splitlines() if "--tpm" in line]
    assert len(mentions) == 1, done.stderr
    assert "12 line(s) need more tokens than --tpm 1000 allows in any minute:" in mentions[0]
    assert "line 1 (about 5,009 tokens), line 2 (about 5,009 tokens)" in mentions[0]
    assert "and 7 more" in mentions[0]
    assert "12 bad line(s); nothing sent" in done.stderr
    assert sum(openai_fake.calls.values()) == 0


def test_lines_needing_more_than_a_token_limit_counts_are_reported_naming_its_flag(
    anthropic_fake: Fake, tmp_path: Path
) -> None:
    # --otpm counts the output part alone (max_tokens): 2,000 output tokens fit an --otpm of
    # 2,000 whatever the input, 2,001 never do.
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, Case("anthropic", "native"), max_tokens=2_001)
    done = run_cli(anthropic_fake, requests, out, "--rpm", "600", "--itpm", "100000", "--otpm", "2000")
    assert_lines_refused(
        done,
        anthropic_fake,
        out,
        "3 line(s) need more tokens of output (max_tokens) than --otpm 2000 allows in any minute: "
        "line 1 (about 2,001 tokens)",
        "3 bad line(s); nothing sent",
    )


def test_a_line_fitting_each_limit_by_its_parts_is_sent(anthropic_fake: Fake, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 2, Case("anthropic", "native"), max_tokens=2_000)
    done = run_cli(anthropic_fake, requests, out, "--rpm", "600", "--itpm", "100000", "--otpm", "2000")
    assert done.returncode == 0, done.stderr
    assert sum(anthropic_fake.calls.values()) == 2


@pytest.mark.parametrize(("flag", "counted"), [("--itpm", "of input "), ("--tpm", "")])
def test_the_input_part_and_the_whole_estimate_are_checked_against_their_limits(
    flag: str, counted: str
) -> None:
    line = {"id": "a", "model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 4_000}]}
    limits = {"--tpm": 100_000.0, "--itpm": 100_000.0, "--otpm": 100.0, flag: 500.0}
    read = read_requests(
        (json.dumps(line) + "\n").encode(),
        provider="anthropic",
        input_format="auto",
        model=None,
        default_max_tokens=None,
        token_limits=limits,
    )
    assert read.entries == []
    [error] = read.errors
    assert f"need more tokens {counted}than {flag} 500 allows in any minute" in error


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_each_request_carries_its_input_and_its_most_output_apart(provider: str) -> None:
    # The parts a limiter with --itpm and --otpm charges apart: max_output is the most the reply
    # may use (max_tokens, times n with OpenAI; --default-max-tokens where a line sets none).
    call = {"model": "m", "messages": [{"role": "user", "content": "How long is a minute? " * 10}]}
    lines = [{"id": "set", **call, "max_tokens": 300}, {"id": "default", **call}]
    if provider == "openai":
        lines.append({"id": "n", **call, "max_tokens": 300, "n": 3})
    read = read_requests(
        "".join(json.dumps(line) + "\n" for line in lines).encode(),
        provider=provider,
        input_format="auto",
        model=None,
        default_max_tokens=50,
        token_limits={"--tpm": 100_000.0},
    )
    assert read.errors == []
    infos = {entry.request.id: entry.request.token_info for entry in read.entries}
    payload = {**call, "max_tokens": 300}
    if provider == "openai":
        whole = estimate_chat_tokens(payload)
        expected = {"set": 300, "default": 50, "n": 900}
    else:
        whole = estimate_messages_tokens(payload)
        expected = {"set": 300, "default": 50}
        assert infos["set"].input == estimate_messages_input_tokens(payload)
    assert {request_id: info.max_output for request_id, info in infos.items()} == expected
    assert infos["set"].estimated == whole
    for info in infos.values():
        assert info.input == whole - 300
        assert info.input + info.max_output == info.estimated


@pytest.mark.parametrize(
    "case", [Case("openai", "native"), Case("anthropic", "message-batches")], ids=case_id
)
def test_a_dash_reads_the_requests_from_standard_input(case: Case, fake: Fake, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 4, case)
    done = run_cli(fake, "-", out, "--rpm", "6000", "--tpm", "1000000", stdin=requests.read_text())
    assert done.returncode == 0, done.stderr
    assert sorted(last_outcomes(out)) == ids


@pytest.mark.parametrize(
    "case", [Case("openai", "native"), Case("anthropic", "message-batches")], ids=case_id
)
def test_a_utf8_file_starting_with_a_byte_order_mark_is_read_whole(
    case: Case, fake: Fake, tmp_path: Path
) -> None:
    # Windows tools write UTF-8 with a byte order mark; it is not part of the first line.
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 3, case)
    requests.write_bytes(codecs.BOM_UTF8 + requests.read_bytes())
    done = run_cli(fake, requests, out, "--rpm", "6000", "--tpm", "1000000")
    assert done.returncode == 0, done.stderr
    assert sorted(last_outcomes(out)) == ids
    piped = run_cli(
        fake,
        "-",
        tmp_path / "piped.jsonl",
        "--rpm",
        "6000",
        "--tpm",
        "1000000",
        stdin=requests.read_text(encoding="utf-8"),
    )
    assert piped.returncode == 0, piped.stderr
    assert sorted(last_outcomes(tmp_path / "piped.jsonl")) == ids


# -- flags and --out -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--rpm", "0.5"),
        ("--rpm", "0"),
        ("--tpm", "0.9"),
        ("--tpm", "-5"),
        ("--default-max-tokens", "-1"),
        # Each bounded to what the object it feeds accepts: the worker's backoff cap, the
        # token counts of a request, the limiter's limits; a progress line a flood.
        ("--max-retry-delay", "50000"),
        ("--max-retry-delay", "-1"),
        ("--default-max-tokens", str(2**53 + 1)),
        ("--progress-interval", "0.001"),
        ("--max-attempts", "0"),
        ("--max-rate-limited", "0"),
        ("--concurrency", "0"),
        ("--shutdown-grace", "-1"),
        ("--timeout", "0"),
        ("--itpm", "0.5"),
        ("--otpm", "nan"),
        ("--rpd", "0.5"),
        ("--tpd", "inf"),
        ("--max-concurrent", "0"),
        ("--max-concurrent", str(2**64)),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_and_nothing_is_sent(
    openai_fake: Fake, tmp_path: Path, flag: str, value: str
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    options = {"--rpm": "600", "--tpm": "100000", flag: value}
    done = run_cli(openai_fake, requests, out, *(item for pair in options.items() for item in pair))
    assert_refused(done, openai_fake, flag, value)
    assert not out.exists()


@pytest.mark.parametrize("given", [(), ("--itpm", "30000"), ("--otpm", "8000")], ids=["none", "itpm", "otpm"])
def test_tpm_is_required_unless_itpm_and_otpm_are_both_given(
    anthropic_fake: Fake, tmp_path: Path, given: tuple[str, ...]
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, Case("anthropic", "native"))
    done = run_cli(anthropic_fake, requests, out, "--rpm", "600", *given)
    assert_refused(done, anthropic_fake, "--tpm is required (or --itpm and --otpm")
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--input-format", "message-batches"), "--input-format message-batches"),
        (("--output-format", "message-batches"), "--output-format message-batches"),
        (("--input-format", "jsonl"), "--input-format"),
    ],
    ids=["message-batches-in", "message-batches-out", "unknown-format"],
)
def test_a_format_the_provider_cannot_serve_is_one_line_naming_it(
    openai_fake: Fake, tmp_path: Path, options: tuple[str, ...], named: str
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3)
    done = run_cli(openai_fake, requests, out, *LIMITS, *options)
    assert_refused(done, openai_fake, named)
    assert not out.exists()


@pytest.mark.parametrize("where", ["a-directory", "the-input", "under-a-file"])
def test_an_out_that_cannot_be_the_results_file_is_refused(
    openai_fake: Fake, tmp_path: Path, where: str
) -> None:
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 3)
    before = requests.read_bytes()
    out = {"a-directory": tmp_path, "the-input": requests, "under-a-file": requests / "results.jsonl"}[where]
    done = run_cli(openai_fake, requests, out, *LIMITS)
    assert_refused(done, openai_fake, "--out")
    assert requests.read_bytes() == before


# -- the provider batch formats ------------------------------------------------------------------
def test_bad_batch_api_lines_are_reported_with_their_numbers_and_nothing_is_sent(
    openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    good = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    lines = [
        {"custom_id": "a", **good},
        {"custom_id": "b", **good, "method": "GET"},
        {"custom_id": "c", **good, "url": "/v1/messages"},
        {"custom_id": "d", **good, "url": "/v1/embeddings"},
        {**good},
        {"custom_id": "", **good},
        {"custom_id": 7, **good},
        {"custom_id": "a", **good},
        {"custom_id": "e", **good, "body": "hi"},
        {"custom_id": "f", **good, "bodyy": {}},
        {"id": "g", **body},
        {"custom_id": "h", **good, "priority": "high", "tenant": "acme"},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        openai_fake,
        out,
        "line 2: method must be 'POST', got 'GET'",
        "line 3: url must be '/v1/chat/completions' with --provider openai, got '/v1/messages' "
        "(that is --provider anthropic's)",
        "line 4: url must be '/v1/chat/completions' with --provider openai, got '/v1/embeddings'\n",
        "line 5: custom_id must be a non-empty string, got None",
        "line 6: custom_id must be a non-empty string, got ''",
        "line 7: custom_id must be a non-empty string, got 7",
        "line 8: id 'a' repeats line 1",
        "line 9: body must be an object of the call's arguments, got 'hi'",
        "line 10: unknown key 'bodyy'",
        "line 11: unknown key 'id'",
        "10 bad line(s); nothing sent",
    )
    assert "line 1:" not in refused.stderr
    assert "line 12" not in refused.stderr
    skipped = run_cli(openai_fake, requests, out, *LIMITS, "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert sorted(line["custom_id"] for line in results(out)) == ["a", "h"]


def test_bad_message_batches_lines_are_reported_with_their_numbers(
    anthropic_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    params = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lines = [
        {"custom_id": "a", "params": params},
        {"custom_id": "b", "params": [params]},
        {"custom_id": "c", "params": {**params, "max_tokens": 0}},
        {"custom_id": "a", "params": params},
        {"custom_id": "d", "params": params, "method": "POST"},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = run_cli(anthropic_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        anthropic_fake,
        out,
        "line 2: params must be an object of the call's arguments",
        "line 3: payload['max_tokens'] must be >= 1, got 0",
        "line 4: id 'a' repeats line 1",
        "line 5: unknown key 'method'",
        "4 bad line(s); nothing sent",
    )


def test_a_message_batches_file_needs_the_anthropic_provider(openai_fake: Fake, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 3, Case("anthropic", "message-batches"))
    # Refused for the file, not line by line: its lines may well be bad chat completions too.
    with requests.open("a") as handle:
        handle.write(json.dumps({"custom_id": "x", "params": {"messages": []}}) + "\n")
    done = run_cli(openai_fake, requests, out, *LIMITS)
    assert_refused(
        done, openai_fake, "line 1 is in Anthropic's Message Batches format", "--provider anthropic"
    )
    assert not out.exists()


def test_the_first_line_says_the_format_and_every_line_must_follow_it(
    openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    batch_api = Case("openai", "batch-api").line("a", max_tokens=5)
    native = Case("openai", "native").line("b", max_tokens=5)
    requests.write_text(json.dumps(batch_api) + "\n" + json.dumps(native) + "\n")
    refused = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(refused, openai_fake, out, "line 2: unknown key 'id'", "1 bad line(s)")
    requests.write_text(json.dumps(native) + "\n" + json.dumps(batch_api) + "\n")
    refused = run_cli(openai_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        openai_fake,
        out,
        "line 2: 'custom_id' is a key of the provider's batch files, not of the call: this file is read "
        "as the native format (see --input-format)",
    )
    # Named, the format is not guessed from the first line.
    requests.write_text(json.dumps(batch_api) + "\n")
    refused = run_cli(openai_fake, requests, out, *LIMITS, "--input-format", "native")
    assert_lines_refused(refused, openai_fake, out, "line 1: 'custom_id' is a key of the provider's")


def test_batch_api_input_may_be_written_in_the_native_format(openai_fake: Fake, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 3, Case("openai", "batch-api"))
    done = run_cli(
        openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000", "--output-format", "native"
    )
    assert done.returncode == 0, done.stderr
    lines = results(out)
    assert sorted(line["id"] for line in lines) == ids
    assert {line["status"] for line in lines} == {"ok"}


def test_batch_api_lines_carry_a_priority_and_a_tenant(
    provider: ProviderServer, openai_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    case = Case("openai", "batch-api")
    lines = [case.line(f"low-{n}", max_tokens=5) for n in range(6)]
    lines.append({**case.line("urgent", max_tokens=5), "priority": "urgent", "tenant": "acme"})
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_cli(openai_fake, requests, out, "--rpm", "6000", "--tpm", "1000000", "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    assert results(out)[0]["custom_id"] == "urgent"


# -- Anthropic -----------------------------------------------------------------------------------
def test_anthropic_requires_max_tokens_and_default_max_tokens_fills_it(
    anthropic_server: AnthropicServer, anthropic_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    anthropic_server.configure(output_tokens=100)
    lines = [
        {"id": "set", "messages": [{"role": "user", "content": "set"}], "max_tokens": 80},
        {"id": "unset", "messages": [{"role": "user", "content": "unset"}]},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = run_cli(anthropic_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        anthropic_fake,
        out,
        "line 2: no max_tokens: Anthropic requires it; set it on the line or pass --default-max-tokens",
        "1 bad line(s)",
    )
    done = run_cli(anthropic_fake, requests, out, *LIMITS, "--default-max-tokens", "64")
    assert done.returncode == 0, done.stderr
    by_id = {line["id"]: line for line in results(out)}
    assert by_id["set"]["response"]["usage"]["output_tokens"] == 80
    assert by_id["unset"]["response"]["usage"]["output_tokens"] == 64  # max_tokens 64 was sent
    assert by_id["unset"]["response"]["stop_reason"] == "max_tokens"


def test_anthropic_refuses_a_default_max_tokens_of_zero(anthropic_fake: Fake, tmp_path: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    write_requests(requests, 2, Case("anthropic", "native"))
    done = run_cli(anthropic_fake, requests, out, *LIMITS, "--default-max-tokens", "0")
    assert_refused(done, anthropic_fake, "--default-max-tokens 0")


def test_anthropic_reads_its_key_and_endpoint_from_its_own_variables(
    anthropic_server: AnthropicServer, anthropic_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids = write_requests(requests, 2, Case("anthropic", "native"))
    no_key = environment()
    del no_key["ANTHROPIC_API_KEY"]
    refused = run_cli(anthropic_fake, requests, out, *LIMITS, env=no_key)
    assert_refused(refused, anthropic_fake, "set ANTHROPIC_API_KEY to the API key")
    # No --base-url: $ANTHROPIC_BASE_URL, as the SDK reads it.
    argv = command(anthropic_fake, requests, out, *LIMITS)
    at = argv.index("--base-url")
    del argv[at : at + 2]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(ANTHROPIC_BASE_URL=anthropic_fake.base_url, OPENAI_API_KEY=""),
    )
    assert done.returncode == 0, done.stderr
    assert sorted(anthropic_server.successes) == ids


def test_the_batch_api_url_of_anthropic_is_its_messages_endpoint(
    anthropic_fake: Fake, tmp_path: Path
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    line = Case("anthropic", "batch-api").line("a", max_tokens=5)
    requests.write_text(json.dumps({**line, "url": ENDPOINTS["openai"]}) + "\n")
    refused = run_cli(anthropic_fake, requests, out, *LIMITS)
    assert_lines_refused(
        refused,
        anthropic_fake,
        out,
        "line 1: url must be '/v1/messages' with --provider anthropic, got '/v1/chat/completions' "
        "(that is --provider openai's)",
    )
