"""`RedisThrottle`: `LLMThrottle`'s semantics (checked against it step by step), plus release,
penalties and provider headers, on a real redis-server and a test clock.

One file past 700 lines: every test holds the shared limiter to the one class it mirrors,
`LLMThrottle`, through the same fixtures (a server, a test clock); split by topic, each part
would repeat them and lose the side-by-side reading."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InvalidConfigError,
    InvalidRequestError,
    LimiterUnavailableError,
    LLMThrottle,
    ManualClock,
    ProviderLimits,
    RateLimitError,
    UnknownRequestError,
)
from llm_queue_dispatcher.redis import (
    MAX_PROVIDER_WAIT,
    BucketUsage,
    RateLimitCheck,
    RedisThrottle,
    SharedRateLimitMetrics,
)
from tests.integer_like import IntLike, int_likes
from tests.redis.conftest import START, fresh_name
from tests.redis.support import ClockedRedisThrottle, RedisServer, RedisThrottleAnHourAhead, ReplyCutter

MakeThrottle = Callable[..., ClockedRedisThrottle]
US = 1e-6


# ----- the same decisions as LLMThrottle -----------------------------------------------------------

# The input part of a request (the rest is output), or None: the parts are not given.
INPUT = st.none() | st.integers(0, 2500)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("consume"), st.integers(0, 1500), st.none(), INPUT),
        # A request id of a small pool: often a second reservation under an id that has one.
        st.tuples(st.just("consume"), st.integers(0, 1500), st.integers(0, 3), INPUT),
        st.tuples(st.just("check"), st.integers(0, 1500), INPUT),
        st.tuples(st.just("adjust"), st.integers(0, 12), st.integers(0, 2500), INPUT),
        st.tuples(st.just("release"), st.integers(0, 12)),
        st.tuples(st.just("settle"), st.integers(0, 12)),
        st.tuples(st.just("advance"), st.integers(0, 25)),
        st.tuples(st.just("penalize"), st.integers(0, 10)),
        st.tuples(
            st.just("sync"),
            st.sampled_from(["requests", "tokens"]),
            st.integers(0, 1500),
            st.none() | st.integers(1, 30),
        ),
        # What a provider says of its input or output tokens (Anthropic's headers), in seconds.
        st.tuples(
            st.just("provider"),
            st.sampled_from(["input_tokens", "output_tokens"]),
            st.integers(0, 900),
            st.none() | st.integers(1, 30),
        ),
    ),
    max_size=35,
)
# The limits beyond rpm and tpm, at rates a double holds exactly per second (itpm 10/s, otpm 5/s,
# rpd 2^-14/s: a bucket of about 5 requests, tpd 1/16 a second), so both arithmetics stay exact.
LIMITS = st.sampled_from(
    [
        {},
        {"itpm": 600, "otpm": 300, "burst_itpm": 900},
        {"rpd": 86_400 * 2**-14, "tpd": 5_400},
        {"max_concurrent": 2},
        {"itpm": 600, "otpm": 300, "rpd": 86_400 * 2**-14, "tpd": 5_400, "max_concurrent": 3},
    ]
)


def parts(total: int, input_tokens: int | None) -> dict[str, int]:
    """The keyword arguments of a request of ``total`` tokens whose input is ``input_tokens``."""
    if input_tokens is None:
        return {}
    share = min(input_tokens, total)
    return {"input_tokens": share, "output_tokens": total - share}


def headers(bucket: str, remaining: int, reset: int | None) -> dict[str, str]:
    out = {f"x-ratelimit-remaining-{bucket}": str(remaining)}
    if reset is not None:
        out[f"x-ratelimit-reset-{bucket}"] = f"{reset}s"
    return out


@settings(max_examples=150, deadline=None)
@given(
    operations=OPERATIONS,
    strategy=st.sampled_from(["strict", "warn", "compensate"]),
    burst=st.sampled_from([None, 1800]),
    max_records=st.sampled_from([10_000, 3]),
    limits=LIMITS,
)
def test_decisions_match_llm_throttle(
    shared_server: RedisServer,
    operations: list[tuple[Any, ...]],
    strategy: Any,
    burst: int | None,
    max_records: int,
    limits: dict[str, Any],
) -> None:
    """Rates a double holds exactly per second and whole-second steps keep both arithmetics
    exact, so every grant, refusal, binding reason, wait (to the microsecond), adjustment
    outcome, penalty, provider figure and bucket level must agree, over every limit (requests,
    tokens, input and output tokens, requests and tokens per day, requests in flight) and with
    or without a request's input and output parts; releases and lower adjustments after an
    extra a bucket could not give included (both give back only what the grant really took, and
    cancel the debt it added). A second reservation under an id that has one is a grant of its
    own in both: the adjustments and releases that follow act on the latest, then on the one
    before it; history retention and a small record limit drop them alike, and free the slots
    they held."""

    async def scenario() -> None:
        clock = ManualClock(START)
        options: dict[str, Any] = {
            "burst_tpm": burst,
            "adjustment_failure_strategy": strategy,
            "max_history_records": max_records,
            **limits,
        }
        local = LLMThrottle(120, 1200, clock=clock, logger=logging.getLogger("quiet"), **options)
        shared = ClockedRedisThrottle(
            shared_server.url, fresh_name("differential"), rpm=120, tpm=1200, clock=clock, **options
        )
        granted: list[str] = []
        try:
            for step, operation in enumerate(operations):
                kind = operation[0]
                if kind == "advance":
                    clock.advance(operation[1])
                elif kind == "penalize":
                    local.penalize(operation[1])
                    await shared.penalize(operation[1])
                elif kind == "sync":
                    said = headers(*operation[1:])
                    assert await shared.sync_from_headers(said) == local.sync_from_headers(said)
                elif kind == "provider":
                    figures = ProviderLimits(**{f"{operation[1]}_remaining": operation[2]})
                    if operation[3] is not None:
                        figures = ProviderLimits(
                            **{
                                f"{operation[1]}_remaining": operation[2],
                                f"{operation[1]}_reset": operation[3],
                            }
                        )
                    local.apply_provider_limits(figures)
                    await shared.apply_provider_limits(figures)
                elif kind == "consume":
                    rid = f"r{step}" if operation[2] is None else f"k{operation[2]}"
                    given = parts(operation[1], operation[3])
                    expected = local.consume(rid, operation[1], **given)
                    assert await shared.consume(rid, operation[1], **given) == expected
                    if expected and rid not in granted:
                        granted.append(rid)
                elif kind == "check":
                    given = parts(operation[1], operation[2])
                    want = local.can_process(operation[1], **given)
                    got = await shared.can_process(operation[1], **given)
                    assert (got.allowed, got.reason) == (want.allowed, want.reason)
                    assert got.available_in == pytest.approx(want.available_in, rel=0, abs=2 * US) or (
                        math.isinf(got.available_in) and math.isinf(want.available_in)
                    )
                    assert got.available_tokens == pytest.approx(want.available_tokens, abs=1e-9)
                elif granted:
                    rid = granted[operation[1] % len(granted)]
                    expected_outcome = got_outcome = ("ok", None)
                    try:
                        if kind == "adjust":
                            local.adjust_consumption(rid, operation[2], **parts(operation[2], operation[3]))
                        elif kind == "settle":
                            local.settle(rid)
                        else:
                            local.release(rid)
                    except (RateLimitError, UnknownRequestError) as exc:
                        expected_outcome = (type(exc).__name__, getattr(exc, "reason", None))
                    try:
                        if kind == "adjust":
                            await shared.adjust_consumption(
                                rid, operation[2], **parts(operation[2], operation[3])
                            )
                        elif kind == "settle":
                            await shared.settle(rid)
                        else:
                            await shared.release(rid)
                    except (RateLimitError, UnknownRequestError) as exc:
                        got_outcome = (type(exc).__name__, getattr(exc, "reason", None))
                    assert got_outcome == expected_outcome
                want_metrics, got_metrics = local.get_metrics(), await shared.get_metrics()
                assert got_metrics.tpm.available == pytest.approx(want_metrics.tpm.available, abs=1e-9)
                assert got_metrics.rpm.available == pytest.approx(want_metrics.rpm.available, abs=1e-9)
                assert got_metrics.compensation.total_debt == pytest.approx(
                    want_metrics.compensation.total_debt, abs=1e-9
                )
                assert got_metrics.compensation.debts == pytest.approx(
                    want_metrics.compensation.debts, abs=1e-9
                )
                for name in ("itpm", "otpm", "rpd", "tpd", "concurrency"):
                    want_bucket, got_bucket = getattr(want_metrics, name), getattr(got_metrics, name)
                    assert (got_bucket is None) == (want_bucket is None), name
                    if want_bucket is not None:
                        assert got_bucket.available == pytest.approx(want_bucket.available, abs=1e-9), name
                assert got_metrics.consumption_history.count == want_metrics.consumption_history.count
                assert (
                    got_metrics.consumption_history.total_tokens
                    == want_metrics.consumption_history.total_tokens
                )
        finally:
            await shared.aclose()

    asyncio.run(scenario())


# ----- exact waits, capacity, strategies ---------------------------------------------------------


async def test_available_in_is_exact_to_the_microsecond(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=7, tpm=1000)
    assert await throttle.consume("a", 600)
    check = await throttle.can_process(777)
    assert isinstance(check, RateLimitCheck)
    assert (check.allowed, check.reason) == (False, "tpm_limit")
    assert check.available_in == pytest.approx(377 / (1000 / 60), abs=US)
    clock.advance(check.available_in - US)
    assert not (await throttle.can_process(777)).allowed
    assert not await throttle.consume("b", 777)
    clock.advance(US)
    assert (await throttle.can_process(777)).allowed
    assert await throttle.consume("b", 777)


async def test_more_than_the_capacity_never_fits(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000, burst_tpm=1500)
    check = await throttle.can_process(1501)
    assert (check.allowed, check.reason, check.available_in) == (False, "tpm_limit", math.inf)
    assert not await throttle.consume("big", 1501)
    with pytest.raises(RateLimitError) as raised:
        await throttle.consume_or_raise("big", 1501)
    assert (raised.value.reason, raised.value.available_in) == ("tpm_limit", math.inf)
    assert await throttle.consume("burst", 1500)


async def test_the_request_bucket_is_reported_first(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=1, tpm=1000)
    assert await throttle.consume("a", 900)
    check = await throttle.can_process(500)
    assert (check.reason, check.available_in) == ("rpm_limit", pytest.approx(60.0, abs=US))
    assert check.available_tokens == {"rpm": 0.0, "tpm": 100.0}


async def test_adjustment_strategies_on_a_short_bucket(
    clocked_throttle: MakeThrottle, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    strict = clocked_throttle(rpm=60, tpm=1000, adjustment_failure_strategy="strict")
    assert await strict.consume("a", 900)
    with pytest.raises(RateLimitError) as raised:
        await strict.adjust_consumption("a", 1300)
    assert raised.value.reason == "tpm_limit"
    assert (await strict.get_metrics()).tpm.available == 100.0  # nothing taken

    warn = clocked_throttle(rpm=60, tpm=1000, adjustment_failure_strategy="warn")
    assert await warn.consume("a", 900)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        await warn.adjust_consumption("a", 1300)
    assert "300" in caplog.text
    metrics = await warn.get_metrics()
    assert (metrics.tpm.available, metrics.compensation.total_debt) == (0.0, 0.0)

    compensate = clocked_throttle(rpm=60, tpm=1000)  # the default, as for LLMThrottle
    assert await compensate.consume("a", 900)
    await compensate.adjust_consumption("a", 1300)
    assert (await compensate.get_metrics()).compensation.total_debt == 300.0
    clock.advance(60)
    assert await compensate.consume("b", 100)  # takes 100 + the 300 owed
    metrics = await compensate.get_metrics()
    assert (metrics.tpm.available, metrics.compensation.total_debt) == (600.0, 0.0)


async def test_a_token_count_beyond_64_bits_counts_as_the_largest_one_as_in_llm_throttle(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000, adjustment_failure_strategy="warn")
    local = LLMThrottle(60, 1000, clock=clock, adjustment_failure_strategy="warn")
    assert await throttle.consume("a", 10)
    assert local.consume("a", 10)
    await throttle.adjust_consumption("a", 10**400)
    local.adjust_consumption("a", 10**400)
    # The limiter's state stays readable (a count Lua holds as inf broke every later read).
    got, want = await throttle.get_metrics(), local.get_metrics()
    assert want.consumption_history.total_tokens == 2**64 - 1
    assert got.consumption_history.total_tokens == pytest.approx(2**64 - 1)
    assert await throttle.consume("b", 10**400, input_tokens=10**400) is False
    assert (await throttle.can_process(10**400)).available_in == math.inf


async def test_a_huge_actual_count_holds_the_limiter_back_one_window_at_most(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000)
    assert await throttle.consume("a", 100)
    await throttle.adjust_consumption("a", 2**64 - 1)
    assert (await throttle.get_metrics()).compensation.total_debt == 1000.0
    assert (await throttle.can_process(100)).available_in == pytest.approx(60.0)
    clock.advance(60)
    assert await throttle.consume("b", 100)
    clock.advance(60)
    assert await throttle.consume("c", 100)
    assert (await throttle.get_metrics()).compensation.total_debt == 0.0


async def test_adjust_refunds_and_unknown_ids_are_refused(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000, history_retention=30.0)
    assert await throttle.consume("a", 500)
    await throttle.adjust_consumption("a", 200)
    assert (await throttle.get_metrics()).tpm.available == 800.0
    with pytest.raises(UnknownRequestError, match="never"):
        await throttle.adjust_consumption("nobody", 5)
    clock.advance(30)
    with pytest.raises(UnknownRequestError):
        await throttle.adjust_consumption("a", 100)  # older than the retention


async def test_release_gives_a_grant_back_whole(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000, adjustment_failure_strategy="compensate")
    assert await throttle.consume("a", 900)
    await throttle.adjust_consumption("a", 1200)  # 100 taken, 200 owed
    assert await throttle.consume("b", 0) is False  # the debt needs 200 tokens first
    await throttle.release("a")
    metrics = await throttle.get_metrics()
    assert (metrics.rpm.available, metrics.tpm.available) == (60.0, 1000.0)
    assert metrics.compensation.total_debt == 0.0
    assert metrics.consumption_history.count == 0
    with pytest.raises(UnknownRequestError):
        await throttle.release("a")  # forgotten: a second release gives nothing back
    with pytest.raises(UnknownRequestError):
        await throttle.adjust_consumption("a", 10)


# ----- penalties and provider headers --------------------------------------------------------------


async def test_penalize_refuses_everything_until_it_ends(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=600, tpm=100_000)
    await throttle.penalize(20)
    await throttle.penalize(5)  # an earlier end does not shorten it
    check = await throttle.can_process(1)
    assert (check.allowed, check.reason) == (False, "rpm_limit")
    assert check.available_in >= 20
    assert not await throttle.consume("a", 1)
    assert (await throttle.get_metrics()).penalty_remaining == 20.0
    clock.advance(19.999999)
    assert not await throttle.consume("a", 1)
    clock.advance(US)
    assert await throttle.consume("a", 1)
    for bad in (-1, math.nan, "5", True):
        with pytest.raises(InvalidRequestError, match="seconds"):
            await throttle.penalize(bad)


async def test_retry_after_header_penalizes(clocked_throttle: MakeThrottle, clock: ManualClock) -> None:
    throttle = clocked_throttle(rpm=600, tpm=100_000)
    limits = await throttle.sync_from_headers({"Retry-After": "7"})
    assert limits.retry_after == 7.0
    assert (await throttle.can_process(1)).available_in == pytest.approx(7.0, abs=US)
    clock.advance(7)
    assert await throttle.consume("a", 1)


async def test_a_header_lowers_a_bucket_and_refill_raises_it_at_its_own_rate_before_the_reset(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=600, tpm=60_000)  # 1,000 tokens a second
    await throttle.sync_from_headers(
        {"x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "20s"}
    )
    assert (await throttle.get_metrics()).tpm.available == 5000.0  # cut from 60,000 at once
    assert await throttle.consume("a", 3000)
    # Long before the provider's reset (t=20), the bucket refills at its own rate from 2,000.
    check = await throttle.can_process(4500)
    assert (check.reason, check.available_in) == ("tpm_limit", pytest.approx(2.5, abs=US))
    clock.advance(2)
    assert (await throttle.get_metrics()).tpm.available == 4000.0
    # A later figure never raises the level; a release gives back up to the capacity only.
    await throttle.sync_from_headers(
        {"x-ratelimit-remaining-tokens": "59000", "x-ratelimit-reset-tokens": "1s"}
    )
    assert (await throttle.get_metrics()).tpm.available == 4000.0
    await throttle.release("a")
    assert (await throttle.get_metrics()).tpm.available == 7000.0
    clock.advance(600)  # never above the configured limit
    assert (await throttle.get_metrics()).tpm.available == 60_000.0


async def test_remaining_without_a_reset_cuts_once(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=60, tpm=60_000)
    await throttle.sync_from_headers([("x-ratelimit-remaining-requests", "3")])
    assert (await throttle.get_metrics()).rpm.available == 3.0
    clock.advance(2)
    assert (await throttle.get_metrics()).rpm.available == 5.0  # refills as usual
    await throttle.sync_from_headers({"x-ratelimit-remaining-requests": "bogus"})
    assert (await throttle.get_metrics()).rpm.available == 5.0  # malformed: ignored


async def test_anthropic_headers_are_understood(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=60_000)
    await throttle.sync_from_headers(
        {"anthropic-ratelimit-requests-remaining": "2", "anthropic-ratelimit-tokens-remaining": "900"}
    )
    metrics = await throttle.get_metrics()
    assert (metrics.rpm.available, metrics.tpm.available) == (2.0, 900.0)


async def test_anthropic_input_and_output_headers_lower_their_buckets_on_the_server_clock(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    throttle = clocked_throttle(rpm=600, tpm=60_000, itpm=36_000, otpm=18_000)  # 600 and 300 a second
    await throttle.get_metrics()  # the state exists: what follows lowers it

    def instant(seconds: float) -> str:
        return datetime.fromtimestamp(clock.now() + seconds, timezone.utc).isoformat()

    read = await throttle.sync_from_headers(
        {
            "anthropic-ratelimit-input-tokens-remaining": "30000",
            "anthropic-ratelimit-input-tokens-reset": instant(30),
            "anthropic-ratelimit-output-tokens-remaining": "1000",
            "anthropic-ratelimit-output-tokens-reset": instant(10),
            "anthropic-ratelimit-tokens-remaining": "31000",
            "anthropic-ratelimit-tokens-reset": instant(30),
        }
    )
    assert (read.input_tokens_remaining, read.output_tokens_remaining) == (30_000, 1_000)
    metrics = await throttle.get_metrics()
    assert metrics.itpm is not None
    assert metrics.otpm is not None
    assert (metrics.tpm.available, metrics.itpm.available, metrics.otpm.available) == (31_000, 30_000, 1_000)
    assert await throttle.consume("a", 600, input_tokens=0, output_tokens=600)
    clock.advance(2)  # before the reset: its own rate from 400, 300 a second
    assert (await throttle.get_metrics()).otpm == _usage(1_000.0, 18_000.0)
    clock.advance(600)  # never above its own capacity
    assert (await throttle.get_metrics()).otpm == _usage(18_000.0, 18_000.0)


def _usage(available: float, limit: float) -> BucketUsage:
    used = limit - available
    return BucketUsage(used=used, available=available, limit=limit, percentage=used / limit * 100.0)


async def test_every_process_shares_the_slots_of_max_concurrent(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    name = fresh_name("slots")
    one = clocked_throttle(name=name, rpm=600, tpm=60_000, max_concurrent=2)
    two = clocked_throttle(name=name, rpm=600, tpm=60_000, max_concurrent=2)
    assert await one.consume("a", 10)
    clock.advance(5)
    assert await two.consume("b", 10)
    check = await one.can_process(1)
    assert (check.allowed, check.reason) == (False, "concurrency_limit")
    assert check.available_in == pytest.approx(55.0, abs=US)  # until "a" is forgotten
    assert check.available_tokens["concurrency"] == 0
    assert not await two.consume("c", 10)
    await one.settle("b")  # settled by the other process, without a count: its slot is free
    await one.settle("b")  # a second settle frees nothing more
    await one.adjust_consumption("b", 12)  # nor does an adjustment after it
    concurrency = (await two.get_metrics()).concurrency
    assert concurrency is not None
    assert (concurrency.used, concurrency.available) == (1.0, 1.0)
    assert await two.consume("c", 10)
    await two.release("c")
    assert await one.consume("d", 10)
    clock.advance(55)  # "a", never settled, is forgotten with its slot
    assert (await two.can_process(1)).allowed
    await one.reset()
    concurrency = (await two.get_metrics()).concurrency
    assert concurrency is not None
    assert concurrency.used == 0.0


async def test_metrics_of_every_limit_have_the_shape_of_llm_throttle(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    options: dict[str, Any] = {"itpm": 800, "otpm": 200, "rpd": 100, "tpd": 5_000, "max_concurrent": 4}
    local = LLMThrottle(60, 1_000, clock=clock, **options)
    shared = clocked_throttle(rpm=60, tpm=1_000, **options)
    assert local.consume("a", 300, input_tokens=200, output_tokens=100)
    assert await shared.consume("a", 300, input_tokens=200, output_tokens=100)
    want, got = local.get_metrics().to_dict(), (await shared.get_metrics()).to_dict()
    for name in ("rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency"):
        assert got[name] == want[name], name
    assert got["compensation"] == want["compensation"]
    assert shared.token_capacity == local.token_capacity == 200
    plain = clocked_throttle(rpm=60, tpm=1_000)
    assert (await plain.get_metrics()).to_dict().keys() == {
        "rpm",
        "tpm",
        "efficiency",
        "consumption_history",
        "compensation",
        "penalty_remaining",
    }
    assert "itpm" not in repr(plain)
    assert "max_concurrent=4" in repr(shared)


async def test_bad_parts_are_refused_and_change_nothing(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000, itpm=600, otpm=600)
    assert await throttle.consume("held", 10)
    before = (await throttle.get_metrics()).to_dict()
    for parts, message in (
        ({"input_tokens": 600, "output_tokens": 500}, r"input_tokens \+ output_tokens must equal"),
        ({"input_tokens": 1_001}, "input_tokens must be at most"),
        ({"output_tokens": -1}, "output_tokens must be >= 0"),
        ({"input_tokens": True}, "input_tokens"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            await throttle.consume("a", 1_000, **parts)
        with pytest.raises(InvalidRequestError, match=message):
            await throttle.can_process(1_000, **parts)
        with pytest.raises(InvalidRequestError, match=message):
            await throttle.adjust_consumption("held", 1_000, **parts)
    assert (await throttle.get_metrics()).to_dict() == before


async def test_strict_names_the_bucket_that_cannot_take_the_extra(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=60_000, otpm=18_000, adjustment_failure_strategy="strict")
    assert await throttle.consume("a", 17_000, input_tokens=1_000, output_tokens=16_000)
    with pytest.raises(RateLimitError) as raised:
        await throttle.adjust_consumption("a", 20_000, input_tokens=1_000, output_tokens=19_000)
    assert raised.value.reason == "otpm_limit"
    assert raised.value.available_in == pytest.approx(1_000 / 300, abs=US)


# ----- far futures and absurd delays -------------------------------------------------------------

HOSTILE_RETRY_AFTERS = [
    {"retry-after": "1e300"},
    {"retry-after-ms": "99999999999999999999"},
    {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
]
HOSTILE_RESETS = [
    {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "99999999999s"},
    {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "9999-12-31T23:59:59Z"},
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1e300"},
    {
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": "9999-12-31T23:59:59Z",
    },
]


async def _answers_at_once(limiter: RedisThrottle, other: Any) -> RateLimitCheck:
    """The limiter's answer within its client timeout, and the server still serving another
    client (a script that never ended would make every other client wait, then read BUSY)."""
    check = await limiter.can_process(1)
    assert not await limiter.consume("after", 1)
    assert await other.ping()
    return check


@pytest.fixture
async def other_client(private_server: RedisServer) -> Any:
    client = redis.asyncio.Redis.from_url(private_server.url, socket_timeout=2)
    yield client
    await client.aclose()


@pytest.mark.parametrize("said", HOSTILE_RETRY_AFTERS, ids=lambda said: next(iter(said.values())))
async def test_a_retry_after_far_in_the_future_holds_for_one_day_at_most(
    private_server: RedisServer, other_client: Any, said: dict[str, str]
) -> None:
    """Each answer comes at once, at most a day (plus a token's refill) away, and Redis keeps
    serving everyone: nothing a provider says can stop the shared limiter, let alone Redis."""
    url = f"{private_server.url}?socket_timeout=2"
    async with RedisThrottle(url, fresh_name("far"), rpm=600, tpm=60_000, otpm=60_000) as limiter:
        await limiter.sync_from_headers(said)
        check = await _answers_at_once(limiter, other_client)
        assert not check.allowed
        assert MAX_PROVIDER_WAIT - 5 <= check.available_in <= MAX_PROVIDER_WAIT + 1


@pytest.mark.parametrize("said", HOSTILE_RESETS, ids=lambda said: next(iter(said.values())))
async def test_a_reset_far_in_the_future_holds_nothing_down(
    private_server: RedisServer, other_client: Any, said: dict[str, str]
) -> None:
    """A drained figure with a reset in the year 9999 empties its bucket, which refills at its
    own rate at once (5,000 tokens within 5 s, a request within 0.1 s), and Redis keeps serving
    everyone."""
    url = f"{private_server.url}?socket_timeout=2"
    async with RedisThrottle(url, fresh_name("far"), rpm=600, tpm=60_000, otpm=60_000) as limiter:
        await limiter.sync_from_headers(said)
        check = await limiter.can_process(5_000, input_tokens=0, output_tokens=5_000)
        assert await other_client.ping()
        assert not check.allowed
        assert 0 < check.available_in <= 5.0  # 5,000 tokens at 1,000 a second, or a request


async def test_a_drained_bucket_that_refills_for_centuries_answers_at_once_as_llm_throttle_does(
    private_server: RedisServer, other_client: Any, clock: ManualClock
) -> None:
    """One token a minute into a bucket of a billion: the wait for a full bucket is 1,900 years,
    past the instants a double holds to the microsecond, and still one finite answer, equal to
    LLMThrottle's."""
    local = LLMThrottle(1, 1, burst_tpm=1e9, clock=clock)
    shared = ClockedRedisThrottle(
        f"{private_server.url}?socket_timeout=2", "centuries", rpm=1, tpm=1, burst_tpm=1e9, clock=clock
    )
    async with shared:
        assert local.consume("drain", 10**9)
        assert await shared.consume("drain", 10**9)
        clock.advance(60)
        for tokens in (2, 10**6, 10**9):
            want, got = local.can_process(tokens), await shared.can_process(tokens)
            assert (got.allowed, got.reason) == (want.allowed, want.reason) == (False, "tpm_limit")
            assert got.available_in == pytest.approx(want.available_in, rel=1e-12)
        assert (await shared.can_process(10**9)).available_in == pytest.approx(6e10, rel=1e-9)
        assert await other_client.ping()


async def test_any_number_reaching_the_scripts_is_bounded(
    private_server: RedisServer, other_client: Any
) -> None:
    """The scripts bound durations themselves (a client of another version, or one that skipped
    the checks, cannot freeze the limiter): above a day counts as a day, NaN as nothing."""
    async with RedisThrottle(f"{private_server.url}?socket_timeout=2", "raw", rpm=600, tpm=60_000) as limiter:
        for penalty in ("1e300", "inf", "nan", "-5"):
            await limiter._run("limiter_penalize", penalty)
        await limiter._run("limiter_sync", "inf", "0", "1e300", "nan", "nan")
        check = await _answers_at_once(limiter, other_client)
        assert MAX_PROVIDER_WAIT - 5 <= check.available_in <= MAX_PROVIDER_WAIT + 1
        metrics = await limiter.get_metrics()
        assert metrics.penalty_remaining <= MAX_PROVIDER_WAIT
        assert metrics.tpm.available == 60_000.0  # a NaN figure changed nothing


async def test_a_penalty_stored_beyond_a_day_ends_within_one(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    """A penalty some client stored years ahead is cut to a day from the first script that
    reads it, and stays cut: it ends a day later, not a day after every read."""
    throttle = clocked_throttle(rpm=600, tpm=60_000)
    state = throttle._keys[0]
    await throttle.redis.hset(state, "penalty", str(int((START + 10**9) * 1e6)))
    assert (await throttle.can_process(1)).available_in == pytest.approx(MAX_PROVIDER_WAIT, abs=US)
    clock.advance(MAX_PROVIDER_WAIT / 2)
    assert (await throttle.can_process(1)).available_in == pytest.approx(MAX_PROVIDER_WAIT / 2, abs=US)
    clock.advance(MAX_PROVIDER_WAIT / 2)
    assert await throttle.consume("a", 1)


async def test_penalties_above_a_day_count_as_a_day_and_are_logged_once(
    clocked_throttle: MakeThrottle, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """`LLMThrottle.penalize`'s rule: any number >= 0 is taken, infinity and an int too large for
    a float included, and above a day counts as a day; NaN and negatives are refused."""
    throttle = clocked_throttle(rpm=600, tpm=60_000)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        await throttle.penalize(1e308)
        await throttle.penalize(10**30)
        await throttle.penalize(math.inf)
        await throttle.penalize(10**400)
        await throttle.penalize(IntLike(10**400))  # type: ignore[arg-type]
        await throttle.sync_from_headers({"retry-after": "1e12", "x-ratelimit-reset-tokens": "1e12s"})
    [record] = [r for r in caplog.records if "one day" in r.getMessage()]
    assert throttle.name in record.getMessage()
    assert (await throttle.get_metrics()).penalty_remaining == MAX_PROVIDER_WAIT
    clock.advance(MAX_PROVIDER_WAIT)
    assert await throttle.consume("a", 1)
    other = clocked_throttle(rpm=600, tpm=60_000)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        await other.penalize(1e9)
    assert len([r for r in caplog.records if "one day" in r.getMessage()]) == 2  # once per limiter
    for bad in (math.nan, -1.0, -(10**400), -math.inf, IntLike(-1), "5", None, True):
        with pytest.raises(InvalidRequestError, match=r"^seconds must be a number >= 0"):
            await throttle.penalize(bad)  # type: ignore[arg-type]
    for bad in (math.nan, -1.0, -(10**400), -math.inf, IntLike(-1), "5", None, True):  # the same rule
        with pytest.raises(InvalidRequestError, match=r"^seconds must be a number >= 0"):
            LLMThrottle(600, 60_000).penalize(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("number", int_likes(60), ids=lambda v: type(v).__name__)
async def test_integer_like_numbers_are_valid_limits_and_penalties(
    clocked_throttle: MakeThrottle, number: object
) -> None:
    throttle = clocked_throttle(
        rpm=number, tpm=number, burst_rpm=number, burst_tpm=number, history_retention=number
    )
    assert (throttle.rpm, throttle.token_capacity) == (60.0, 60.0)
    await throttle.penalize(number)  # type: ignore[arg-type]
    assert (await throttle.get_metrics()).penalty_remaining == 60.0


# ----- the server's clock only -----------------------------------------------------------------------


async def test_a_host_clock_an_hour_off_changes_no_answer(redis_url: str) -> None:
    """Waits, refills and penalties run on the server's clock; a provider's absolute instant (a
    Retry-After date) is read against the server's clock too, so a date 30 s away holds for 30 s
    on a host an hour ahead as on one whose clock agrees."""
    said = {"retry-after": email.utils.formatdate(time.time() + 30, usegmt=True)}
    answers = []
    for kind in (RedisThrottle, RedisThrottleAnHourAhead):
        async with kind(redis_url, fresh_name("skewed-host"), rpm=600, tpm=60_000) as limiter:
            await limiter.sync_from_headers(said)
            check = await limiter.can_process(1)
            penalty = (await limiter.get_metrics()).penalty_remaining
            answers.append((check.allowed, check.reason, check.available_in, penalty))
    here, ahead = answers
    assert here[:2] == ahead[:2]
    assert not here[0]
    assert ahead[2] == pytest.approx(here[2], abs=0.1)
    assert 28 < here[2] <= 30.01  # an HTTP date counts whole seconds
    assert ahead[3] == pytest.approx(here[3], abs=0.1)


# ----- replies lost in transit ----------------------------------------------------------------------


async def test_calls_whose_reply_was_lost_are_applied_once(
    reply_cutter: ReplyCutter, clock: ManualClock
) -> None:
    """The script ran, the connection broke before its reply, redis-py resent the call: the
    resend answers as the first run did. A grant is charged once, an adjustment taken once, a
    release gives back one grant (not the one before it too)."""
    limiter = ClockedRedisThrottle(reply_cutter.url, fresh_name("lost"), rpm=60, tpm=1000, clock=clock)
    async with limiter:
        assert await limiter.consume("warm", 0)  # loads the scripts: a cut falls on one that runs
        await limiter.adjust_consumption("warm", 0)
        await limiter.release("warm")
        reply_cutter.armed = 1
        assert await limiter.consume("a", 100)
        reply_cutter.armed = 1
        await limiter.adjust_consumption("a", 300)
        assert await limiter.consume("b", 10)
        assert await limiter.consume("b", 20)  # a second reservation under "b"
        reply_cutter.armed = 1
        await limiter.release("b")
        assert reply_cutter.cuts == 3
        metrics = await limiter.get_metrics()
        assert (metrics.rpm.used, metrics.tpm.used) == (2.0, 310.0)  # "a" once at 300, the first "b"
        assert metrics.consumption_history.count == 2
        await limiter.release("b")  # the first "b" is still there to give back
        with pytest.raises(UnknownRequestError):
            await limiter.release("b")


async def test_a_grant_whose_replies_were_all_lost_is_given_back_by_the_next_call(
    reply_cutter: ReplyCutter, clock: ManualClock
) -> None:
    """The script ran, the reply was lost, the resend's reply too: the caller is told nothing was
    granted (fail closed), so the grant that landed is given back by the next call, once."""
    limiter = ClockedRedisThrottle(reply_cutter.url, fresh_name("lost"), rpm=60, tpm=1000, clock=clock)
    async with limiter:
        assert await limiter.consume("warm", 0)  # loads the scripts: a cut falls on one that runs
        await limiter.release("warm")
        reply_cutter.armed = 2  # the call and redis-py's resend
        with pytest.raises(LimiterUnavailableError, match="gives the grant back"):
            await limiter.consume("a", 100)
        assert reply_cutter.cuts == 2
        metrics = await limiter.get_metrics()
        assert (metrics.rpm.used, metrics.tpm.used, metrics.consumption_history.count) == (0.0, 0.0, 0)
        assert await limiter.consume("b", 1000)  # the whole budget is there
        assert (await limiter.get_metrics()).tpm.used == 1000.0  # settled once, not again


# ----- one budget for every process ----------------------------------------------------------------


async def test_two_instances_of_one_name_share_one_budget(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    name = fresh_name("shared")
    one = clocked_throttle(name=name, rpm=2, tpm=1000)
    two = clocked_throttle(name=name, rpm=2, tpm=1000)
    assert await one.consume("a", 400)
    assert await two.consume("b", 400)
    assert not await one.consume("c", 100)  # two requests a minute, both used
    assert (await two.can_process(100)).reason == "rpm_limit"
    await one.adjust_consumption("b", 100)  # adjusts the grant the other instance made
    assert (await two.get_metrics()).tpm.available == 500.0
    other = clocked_throttle(name=fresh_name("other"), rpm=2, tpm=1000)
    assert await other.consume("a", 900)  # another name: another budget


async def test_metrics_have_the_shape_of_llm_throttle(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000)
    assert await throttle.consume("a", 250)
    await throttle.adjust_consumption("a", 500)
    metrics = await throttle.get_metrics()
    assert isinstance(metrics, SharedRateLimitMetrics)
    assert metrics.tpm.to_dict() == {"used": 500.0, "available": 500.0, "limit": 1000.0, "percentage": 50.0}
    assert metrics.rpm.used == 1.0
    assert metrics.consumption_history.to_dict() == {
        "count": 1,
        "average_tokens_per_request": 500.0,
        "total_tokens": 500,
        "estimation_accuracy": 0.5,
    }
    assert metrics.efficiency == 0.5
    assert metrics.to_dict()["tpm"]["limit"] == 1000.0


async def test_a_refund_to_zero_is_not_an_estimation_miss(clocked_throttle: MakeThrottle) -> None:
    # mark_as_failed refunds through an adjustment to 0 tokens: the call failed, it measured
    # nothing, so the accuracy metrics ignore it (as LLMThrottle's do).
    throttle = clocked_throttle(rpm=60, tpm=1000)
    assert await throttle.consume("ok", 400)
    await throttle.adjust_consumption("ok", 400)
    assert await throttle.consume("failed", 300)
    await throttle.adjust_consumption("failed", 0)
    metrics = await throttle.get_metrics()
    assert metrics.consumption_history.estimation_accuracy == 1.0
    assert metrics.efficiency == 1.0
    assert metrics.tpm.available == 600.0  # the failed call's tokens came back


# ----- configuration and input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"rpm": 0, "tpm": 10},
        {"rpm": 10, "tpm": math.nan},
        {"rpm": 10, "tpm": 10, "burst_rpm": 5},
        {"rpm": 10, "tpm": 10, "burst_tpm": math.inf},
        {"rpm": 10, "tpm": 10, "adjustment_failure_strategy": "ignore"},
        {"rpm": 10, "tpm": 10, "history_retention": 0},
        {"rpm": 10, "tpm": 10, "max_history_records": 0},
        {"rpm": True, "tpm": 10},
        {"rpm": 10, "tpm": 10, "itpm": 0},
        {"rpm": 10, "tpm": 10, "otpm": math.nan},
        {"rpm": 10, "tpm": 10, "itpm": 10, "burst_itpm": 5},
        {"rpm": 10, "tpm": 10, "burst_otpm": 5},
        {"rpm": 10, "tpm": 10, "rpd": 0.5},
        {"rpm": 10, "tpm": 10, "tpd": "5"},
        {"rpm": 10, "tpm": 10, "max_concurrent": 0},
        {"rpm": 10, "tpm": 10, "max_concurrent": 1.0},
        {"rpm": 10, "tpm": 10, "max_concurrent": True},
    ],
)
def test_bad_configuration_is_refused(redis_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        RedisThrottle(redis_url, "x", **options)


async def test_a_history_retention_longer_than_redis_can_count_keeps_grants_like_llm_throttle(
    clocked_throttle: MakeThrottle, clock: ManualClock
) -> None:
    local_clock = ManualClock(0.0)
    local = LLMThrottle(60, 100, history_retention=1e308, clock=local_clock)
    throttle = clocked_throttle(rpm=60, tpm=100, history_retention=1e308)
    assert await throttle.consume("a", 10)
    assert local.consume("a", 10)
    # Ten years on, the grant is still there to adjust, in both.
    clock.advance(10 * 365 * 86_400.0)
    local_clock.advance(10 * 365 * 86_400.0)
    await throttle.adjust_consumption("a", 4)
    local.adjust_consumption("a", 4)
    assert (await throttle.get_metrics()).consumption_history.total_tokens == 4
    assert local.get_metrics().consumption_history.total_tokens == 4


@pytest.mark.parametrize("retention", [10**400, math.inf, math.nan, 0], ids=["10**400", "inf", "nan", "0"])
def test_a_history_retention_no_number_of_seconds_can_hold_is_refused_naming_it(
    redis_url: str, retention: Any
) -> None:
    with pytest.raises(InvalidConfigError, match="history_retention"):
        RedisThrottle(redis_url, "t", rpm=60, tpm=100, history_retention=retention)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"rpm": 0.5, "tpm": 1000}, "rpm"),
        ({"rpm": 0.999, "tpm": 1000}, "rpm"),
        ({"rpm": 60, "tpm": 0.5}, "tpm"),
        ({"rpm": 60, "tpm": 1000, "burst_rpm": 0.5}, "burst_rpm"),
        ({"rpm": 60, "tpm": 1000, "burst_tpm": 0.9}, "burst_tpm"),
        ({"rpm": 60, "tpm": 1000, "itpm": 0.5}, "itpm"),
        ({"rpm": 60, "tpm": 1000, "otpm": 0.5}, "otpm"),
        ({"rpm": 60, "tpm": 1000, "rpd": 0.5}, "rpd"),
        ({"rpm": 60, "tpm": 1000, "tpd": 0.5}, "tpd"),
        ({"rpm": 60, "tpm": 1000, "max_concurrent": 0}, "max_concurrent"),
    ],
)
def test_a_limit_that_can_never_admit_a_request_is_refused(
    redis_url: str, options: dict[str, Any], named: str
) -> None:
    """Every bucket must hold at least one request and one token, or nothing is ever granted."""
    with pytest.raises(InvalidConfigError, match=named):
        RedisThrottle(redis_url, "x", **options)
    RedisThrottle(redis_url, "x", rpm=1, tpm=1)  # the smallest limits that can admit a request


@pytest.mark.parametrize("name", ["", "a{b}", "has space", "new\nline", "colon:name", "x" * 81, "é", 5])
def test_bad_names_are_refused(redis_url: str, name: Any) -> None:
    with pytest.raises(InvalidConfigError, match="name"):
        RedisThrottle(redis_url, name, rpm=1, tpm=1)
    with pytest.raises(InvalidConfigError, match="namespace"):
        RedisThrottle(redis_url, "ok", rpm=1, tpm=1, namespace=name)


async def test_bad_arguments_are_refused_and_change_nothing(clocked_throttle: MakeThrottle) -> None:
    throttle = clocked_throttle(rpm=60, tpm=1000)
    for tokens in (-1, 1.5, math.nan, True, "10"):
        with pytest.raises(InvalidRequestError, match="estimated_tokens"):
            await throttle.consume("a", tokens)
        with pytest.raises(InvalidRequestError, match="estimated_tokens"):
            await throttle.can_process(tokens)
    for request_id in ("", None, 5, "\ud800"):
        with pytest.raises(InvalidRequestError):
            await throttle.consume(request_id, 1)  # type: ignore[arg-type]
    assert await throttle.consume("a", 1)
    with pytest.raises(InvalidRequestError, match="actual_tokens"):
        await throttle.adjust_consumption("a", -5)
    metrics = await throttle.get_metrics()
    assert (metrics.rpm.available, metrics.tpm.available) == (59.0, 999.0)
