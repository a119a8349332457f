"""``llmqd batch --provider anthropic`` under the fake Anthropic server's request, input-token and
output-token limits: each request answered once, no 429, and the tokens written are the ones the
server counted. In each run one of the server's token limits binds (more than a minute's worth
is asked), so the limiter must hold requests back for the server's bucket to refill. The limits
as Anthropic publishes them (--itpm, --otpm, --rpd, --tpd, --max-concurrent) reach the limiter."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher.batch import _check_flags, _limiter
from llm_queue_dispatcher.cli import _parser
from tests.provider.anthropic_server import AnthropicServer

from .support import Case, Fake, outcomes, run_cli


def write_lines(path: Path, case: Case, count: int, *, padding: int, max_tokens: int) -> list[str]:
    """``count`` requests; each question is its id followed by ``padding`` characters."""
    keys = [f"q{n:03d} " + "x" * padding for n in range(count)]
    path.write_text("".join(json.dumps(case.line(key, max_tokens=max_tokens)) + "\n" for key in keys))
    return keys


@pytest.mark.parametrize(
    ("binding", "case"),
    [("output_tokens", Case("anthropic", "native")), ("input_tokens", Case("anthropic", "batch-api"))],
    ids=["output-tokens-native", "input-tokens-batch-api"],
)
def test_the_servers_input_and_output_token_limits_are_never_exceeded(
    anthropic_server: AnthropicServer, anthropic_fake: Fake, tmp_path: Path, binding: str, case: Case
) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    if binding == "output_tokens":
        # 250 replies of 250 tokens: 62,500 output tokens against 60,000 a minute. The limiter's
        # one token budget, as large as the smaller limit, counts input and output together.
        anthropic_server.configure(rpm=6_000, itpm=120_000, otpm=60_000, output_tokens=250, latency=0.02)
        keys = write_lines(requests, case, 250, padding=0, max_tokens=300)
        tpm = 60_000
    else:
        # 250 questions of about 100 input tokens (the server counts characters / 4): 25,750
        # input tokens against 24,000 a minute; one output token each.
        anthropic_server.configure(rpm=6_000, itpm=24_000, otpm=1_000_000, output_tokens=1, latency=0.02)
        keys = write_lines(requests, case, 250, padding=395, max_tokens=1)
        tpm = 24_000
    done = run_cli(anthropic_fake, requests, out, "--rpm", "6000", "--tpm", str(tpm), "--concurrency", "16")
    assert done.returncode == 0, done.stderr
    assert anthropic_server.successes == Counter({key: 1 for key in keys})
    assert anthropic_server.statuses[429] == 0, anthropic_server.rate_limited
    assert anthropic_server.peak(binding) > anthropic_server.limit(binding)  # the refill was needed
    written = outcomes(out)
    assert len(written) == len(keys)
    assert all(result.ok for result in written)
    # The tokens counted are the server's: input plus output of each answer.
    used = sum(sum(anthropic_server.usage[key]) for key in keys)
    assert f"tokens              {used:,}" in done.stdout
    for result in written:
        usage = result.response["usage"]
        assert (usage["input_tokens"], usage["output_tokens"]) == anthropic_server.usage[result.id]


def limiter_of(*flags: str) -> Any:
    """The limiter ``llmqd batch`` builds from these flags."""
    args = _parser().parse_args(["batch", "requests.jsonl", "--out", "results.jsonl", "--rpm", "50", *flags])
    _check_flags(args)
    return _limiter(args)


def test_the_limit_flags_reach_the_limiter() -> None:
    flags = (
        "--itpm",
        "30000",
        "--otpm",
        "8000",
        "--rpd",
        "1000",
        "--tpd",
        "2000000",
        "--max-concurrent",
        "4",
    )
    metrics = limiter_of(*flags).get_metrics().to_dict()
    limits = {
        name: metrics[name]["limit"] for name in ("rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency")
    }
    # Without --tpm, tokens per minute are input and output together.
    assert limits == {
        "rpm": 50,
        "tpm": 38_000,
        "itpm": 30_000,
        "otpm": 8_000,
        "rpd": 1_000,
        "tpd": 2_000_000,
        "concurrency": 4,
    }
    alone = limiter_of("--tpm", "9000", "--otpm", "8000").get_metrics().to_dict()
    assert alone["tpm"]["limit"] == 9_000
    assert alone["otpm"]["limit"] == 8_000
    assert not {"itpm", "rpd", "tpd", "concurrency"} & set(alone)


def test_otpm_keeps_the_servers_output_token_limit_with_no_429(
    anthropic_server: AnthropicServer, anthropic_fake: Fake, tmp_path: Path
) -> None:
    # Anthropic reserves max_tokens from its output-token limit when a call starts and gives back
    # what the reply did not use when it ends: 100 calls of max_tokens 1,000 at once are 100,000
    # output tokens reserved against 60,000 a minute, though each reply uses 10.
    anthropic_server.configure(rpm=6_000, itpm=1_000_000, otpm=60_000, output_tokens=10, latency=0.5)
    requests = tmp_path / "requests.jsonl"
    keys = write_lines(requests, Case("anthropic", "native"), 150, padding=0, max_tokens=1_000)
    common = ("--rpm", "6000", "--concurrency", "100")
    # --tpm alone counts input and output together: the server's output limit is overrun.
    unpaced = run_cli(anthropic_fake, requests, tmp_path / "tpm.jsonl", *common, "--tpm", "1000000")
    assert unpaced.returncode == 0, unpaced.stderr
    assert anthropic_server.rate_limited["output_tokens"] > 10
    # --otpm keeps it. The limiter reserves each request's max_tokens from --otpm as the server
    # does, and the reply's usage gives back what it did not use.
    anthropic_server.configure()  # the buckets full again
    calls_before = Counter(anthropic_server.successes)
    statuses_before = anthropic_server.statuses[429]
    out = tmp_path / "otpm.jsonl"
    done = run_cli(anthropic_fake, requests, out, *common, "--itpm", "1000000", "--otpm", "60000")
    assert done.returncode == 0, done.stderr
    # At most one 429: the limiter takes a reservation when it dispatches, the server when the
    # call arrives. While the server's bucket is full it wastes the refill of that gap and ours
    # does not, so when a burst of dispatches reaches the server later than the next lone one
    # (a busy event loop sending 100 calls), ours can run ahead of it by that difference in
    # delay times the refill rate; the reply's headers bring it back down. Unpaced, above, the
    # server refused more than ten.
    assert anthropic_server.statuses[429] - statuses_before <= 1, anthropic_server.rate_limited
    assert anthropic_server.successes - calls_before == Counter({key: 1 for key in keys})
    assert all(result.ok for result in outcomes(out))
    assert "(limit 1,060,000)" in done.stdout  # the TPM: --itpm and --otpm together
