"""``llmqd batch --provider anthropic`` under the fake Anthropic server's request, input-token and
output-token limits: each request answered once, no 429, and the tokens written are the ones the
server counted. In each run one of the server's token limits binds (more than a minute's worth
is asked), so the limiter must hold requests back for the server's bucket to refill."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

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
