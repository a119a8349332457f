"""The shared limiter across processes: four processes whose clocks are minutes apart never get
more than the budget in any window (the server's clock rules), and nobody gets anything while
Redis is down (fail closed)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from llm_queue_dispatcher import LimiterUnavailableError, UnknownRequestError
from llm_queue_dispatcher.redis import RedisThrottle
from llm_queue_dispatcher.redis._connection import script
from tests.redis.conftest import Workers, fresh_name
from tests.redis.support import RedisServer, free_port

pytestmark = pytest.mark.fault

# Both buckets hold a minute's refill (the smallest burst LLMThrottle allows); the test empties the
# token bucket first, so from then on every grant must come from the refill: 100 tokens a second.
RPM = TPM = 6_000.0
CAPACITY = 6_000.0
RATE = TPM / 60  # tokens a second
TOKENS = 10  # per request: about ten grants a second for the four processes together
SKEWS = (-600.0, -90.0, 75.0, 420.0)  # seconds each process's clock is off


def window_violations(grants: list[dict[str, Any]], *, emptied_at: float) -> list[str]:
    """Grants ordered by when their call returned. Their server instants are unknown but lie within
    [before, after] of the call, so the checks take the widest span the instants can have.

    * Every run of consecutive grants fits burst + rate x span (the budget of any window).
    * Since the bucket was emptied at ``emptied_at``, the tokens granted up to any grant fit
      rate x (its return - emptied_at): a per-process bucket, or one refilled from a client's
      clock minutes ahead, would break this within a second.
    """
    ordered = sorted(grants, key=lambda g: g["after"])
    bad: list[str] = []
    total = 0
    for i, grant in enumerate(ordered):
        total += grant["tokens"]
        if total > RATE * (grant["after"] - emptied_at) + 1e-6:
            bad.append(f"{total} tokens {grant['after'] - emptied_at:.4f} s after the bucket was emptied")
        earliest, tokens = grant["before"], 0
        for j in range(i, len(ordered)):
            earliest = min(earliest, ordered[j]["before"])
            tokens += ordered[j]["tokens"]
            span = ordered[j]["after"] - earliest
            if j - i + 1 > CAPACITY + RPM / 60 * span or tokens > CAPACITY + RATE * span + 1e-6:
                bad.append(f"{j - i + 1} requests, {tokens} tokens in {span:.4f} s")
    return bad


def test_four_processes_with_skewed_clocks_share_one_budget(
    private_server: RedisServer,
    workers: Workers,
) -> None:
    async def empty_the_bucket() -> float:
        async with RedisThrottle(private_server.url, "gpt", rpm=RPM, tpm=TPM) as limiter:
            before = time.time()
            assert await limiter.consume("empty", int(CAPACITY))
            return before

    emptied_at = asyncio.run(empty_the_bucket())
    for skew in SKEWS:
        workers.start(
            "limiter", url=private_server.url, name="gpt", rpm=RPM, tpm=TPM, tokens=TOKENS, skew=skew,
            seconds=5.0,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while len({r["pid"] for r in workers.records() if r["event"] == "grant"}) < 4:
        assert time.monotonic() < deadline, "not every process got a grant"
        time.sleep(0.01)
    time.sleep(2.0)
    killed_at = time.time()
    private_server.kill()  # Redis goes down while all four keep asking
    workers.wait(60)
    records = workers.records()
    grants = [r for r in records if r["event"] == "grant"]
    assert not window_violations(grants, emptied_at=emptied_at)
    granting = {r["pid"] for r in grants}
    assert len(granting) == 4
    # The budget was used, not refused wholesale.
    assert sum(g["tokens"] for g in grants) >= 0.7 * RATE * (killed_at - emptied_at)
    # Fail closed: nothing granted to a call that started after Redis went down ...
    assert not [g for g in grants if g["before"] > killed_at + 0.05]
    # ... and every process was told so.
    unavailable = {r["pid"] for r in records if r["event"] == "unavailable"}
    assert unavailable == granting


def test_the_window_check_can_fail() -> None:
    paced = [{"before": i * 0.1, "after": i * 0.1 + 0.001, "tokens": TOKENS} for i in range(1, 40)]
    assert not window_violations(paced, emptied_at=0.0)
    doubled = paced + [{**g, "tokens": TOKENS} for g in paced]  # two buckets' worth
    assert window_violations(doubled, emptied_at=0.0)
    skewed = [{"before": 0.5, "after": 0.6, "tokens": 600}]  # a refill of minutes at once
    assert window_violations(skewed, emptied_at=0.0)


async def test_every_method_fails_closed_when_redis_is_unreachable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisThrottle(url, "down", rpm=60, tpm=1000) as limiter:
        started = time.monotonic()
        for call in (
            limiter.consume("a", 1),
            limiter.consume_or_raise("a", 1),
            limiter.can_process(1),
            limiter.adjust_consumption("a", 1),
            limiter.release("a"),
            limiter.get_metrics(),
            limiter.penalize(1),
            limiter.sync_from_headers({"retry-after": "1"}),
        ):
            with pytest.raises(LimiterUnavailableError, match="failing closed"):
                await call
        assert time.monotonic() - started < 5


async def test_a_hung_server_fails_closed_within_the_timeout(private_server: RedisServer) -> None:
    url = private_server.url + "?socket_timeout=0.5"
    async with RedisThrottle(url, "hung", rpm=60, tpm=1000) as limiter:
        assert await limiter.consume("a", 1)
        private_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(LimiterUnavailableError, match="Timeout"):
                await limiter.consume("b", 1)
            assert time.monotonic() - started < 1.5
        finally:
            private_server.resume()
        assert await asyncio.wait_for(limiter.consume("c", 1), 5)


async def test_a_grant_made_after_its_caller_timed_out_is_given_back_by_the_next_call(
    private_server: RedisServer,
) -> None:
    """Redis paused past the client's timeout: the consume fails closed, but it was sent, and the
    server runs it when it resumes. The limiter's next call gives that grant back: the books show
    only what callers were told they got."""
    url = private_server.url + "?socket_timeout=0.5"
    async with RedisThrottle(url, "paused", rpm=60, tpm=1000) as limiter:
        assert await limiter.consume("a", 10)
        private_server.pause()
        try:
            with pytest.raises(LimiterUnavailableError, match="gives the grant back"):
                await limiter.consume("b", 100)
        finally:
            private_server.resume()
        metrics = await limiter.get_metrics()
        assert metrics.consumption_history.count == 1  # "a" only
        assert metrics.consumption_history.total_tokens == 10
        assert metrics.tpm.used <= 10.0  # "b"'s 100 tokens are back (10 used, less any refill)
        with pytest.raises(UnknownRequestError):
            await limiter.release("b")
        await limiter.release("a")  # "a" is untouched


async def test_a_consume_that_runs_only_after_it_was_settled_grants_nothing(redis_url: str) -> None:
    """The other order: the lost call reaches the server after the next call settled it (still in
    a socket buffer while the new connection's call ran). It finds its reply already kept, a
    refusal, and changes nothing."""
    async with RedisThrottle(redis_url, fresh_name("late"), rpm=60, tpm=1000) as limiter:
        late_key = f"{limiter._prefix}reply:{'0' * 32}".encode()
        limiter._unsettled.append(late_key)
        assert (await limiter.get_metrics()).consumption_history.count == 0  # settles first
        assert not limiter._unsettled
        late = await limiter._connection.run(
            script("limiter_common", "limiter_consume"),
            [*limiter._keys, late_key],
            (limiter._time_argument(), *limiter._settings, b"late", 100),
        )
        assert late[0] == 0
        metrics = await limiter.get_metrics()
        assert (metrics.consumption_history.count, metrics.rpm.used, metrics.tpm.used) == (0, 0.0, 0.0)
