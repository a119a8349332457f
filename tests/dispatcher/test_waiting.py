"""`dequeue(timeout=...)`: returns at once without a timeout, wakes on enqueue, a mark, a refill or
a visibility expiry, without busy polling."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    ScoringConfig,
    ScoringWeights,
    create_in_memory_queue,
)
from tests.dispatcher.books import request as sized_request
from tests.dispatcher.support import CountingLimiter, queue, request, throttle


async def test_dequeue_without_timeout_returns_at_once(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=1_000)
    started = time.perf_counter()
    assert await dispatcher.dequeue(limiter) is None
    assert limiter.consume("drain", 1_000)
    await dispatcher.enqueue(request("a", tokens=500))  # needs 30 s of refill
    assert await dispatcher.dequeue(limiter, timeout=None) is None
    assert time.perf_counter() - started < 0.05


async def test_dequeue_timeout_returns_none_when_it_runs_out() -> None:
    dispatcher = create_in_memory_queue()
    started = time.perf_counter()
    assert await dispatcher.dequeue(LLMThrottle(600, 100_000), timeout=0.05) is None
    elapsed = time.perf_counter() - started
    assert 0.04 <= elapsed < 0.5


async def test_dequeue_timeout_wakes_on_enqueue(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    started = time.perf_counter()
    waiter = asyncio.create_task(dispatcher.dequeue(limiter, timeout=5.0))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await dispatcher.enqueue(request("a"))
    job = await asyncio.wait_for(waiter, 1.0)
    assert job is not None
    assert job.message.payload.id == "a"
    assert time.perf_counter() - started < 0.5


async def test_dequeue_timeout_wakes_on_a_mark(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    started = time.perf_counter()
    waiter = asyncio.create_task(dispatcher.dequeue(limiter, timeout=5.0))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await job.mark_as_failed(RuntimeError("retry"))
    again = await asyncio.wait_for(waiter, 1.0)
    assert again is not None
    assert again.message.attributes.receive_count == 2
    assert time.perf_counter() - started < 0.5


async def test_dequeue_timeout_wakes_on_refill_without_busy_polling() -> None:
    dispatcher = create_in_memory_queue()
    inner = LLMThrottle(6_000, 60_000)  # 1,000 tokens per second, system monotonic clock
    assert inner.consume("drain", 60_000)
    limiter = CountingLimiter(inner)
    await dispatcher.enqueue(request("a", tokens=150))  # fits after 0.15 s of refill
    started = time.perf_counter()
    job = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert job is not None
    assert job.message.payload.id == "a"
    assert 0.1 <= elapsed < 0.6
    assert sum(limiter.calls.values()) < 20, limiter.calls


async def test_dequeue_timeout_wakes_on_refill_with_the_native_limiter() -> None:
    dispatcher = create_in_memory_queue()
    limiter = LLMThrottle(6_000, 60_000)
    assert limiter.consume("drain", 60_000)
    await dispatcher.enqueue(request("a", tokens=150))
    started = time.perf_counter()
    job = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert job is not None
    assert 0.1 <= elapsed < 0.6


async def test_dequeue_timeout_wakes_on_visibility_expiry_without_busy_polling() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=0.15)
    limiter = CountingLimiter(LLMThrottle(600, 100_000))
    await dispatcher.enqueue(request("a"))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    limiter.calls.clear()
    started = time.perf_counter()
    again = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert again is not None
    assert again.message.attributes.receive_count == 2
    assert 0.1 <= elapsed < 0.6
    assert sum(limiter.calls.values()) < 20, limiter.calls


@pytest.mark.parametrize("timeout", [-1.0, math.nan, "soon"])
async def test_dequeue_rejects_a_bad_timeout(clock: ManualClock, timeout: Any) -> None:
    with pytest.raises(InvalidRequestError):
        await queue(clock).dequeue(throttle(clock), timeout=timeout)


class Counting:
    """A plain-Python limiter delegating to an `LLMThrottle`, counting `can_process` calls."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.checks = 0

    def can_process(self, estimated_tokens: int) -> Any:
        self.checks += 1
        return self.inner.can_process(estimated_tokens)

    def get_metrics(self) -> Any:
        return self.inner.get_metrics()

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
        return self.inner.consume(request_id, estimated_tokens, metadata)

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.inner.adjust_consumption(request_id, actual_tokens)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def counting_looks(dispatcher: LLMQueueDispatcher[Any]) -> list[int]:
    """Counts the dispatcher's attempts to dequeue (one per wake-up, plus the first look)."""
    looks = [0]
    attempt = dispatcher._attempt

    async def counted(limiter: Any) -> Any:
        looks[0] += 1
        return await attempt(limiter)

    dispatcher._attempt = counted  # type: ignore[method-assign]
    return looks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_message_that_fits_soon_is_waited_for_not_polled(kind: str) -> None:
    """950 tokens available, refilling at 100/s; the only message needs 1,000 (its
    cell's lower bound, 939, fits already). The dequeue sleeps until the bucket holds 1,000
    (0.5 s) and hands it out: a couple of looks, not one every 50 ms."""
    throttle = LLMThrottle(6_000, 6_000)  # the system monotonic clock, as the event loop's
    assert throttle.consume("earlier", 5_050)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(sized_request("big", 1_000))
    job = await dispatcher.dequeue(limiter, timeout=5.0)
    assert job is not None
    assert looks[0] <= 3, looks
    if kind == "python":
        assert limiter.checks <= 3, limiter.checks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_message_that_cannot_fit_before_the_timeout_sleeps_once(kind: str) -> None:
    """The message fits only in 5 s, the timeout is 0.3 s: one look, one sleep to
    the timeout, one last look."""
    throttle = LLMThrottle(6_000, 6_000)
    assert throttle.consume("earlier", 5_500)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(sized_request("big", 1_000))
    assert await dispatcher.dequeue(limiter, timeout=0.3) is None
    assert looks[0] <= 3, looks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_score_below_the_threshold_is_waited_for_until_it_crosses(kind: str) -> None:
    """Only the wait-time factor counts (weight 1: a NORMAL message scores age / 60)
    and the threshold is 0.5 / 60, so the message qualifies at an age of 0.5 s. The dequeue
    sleeps until then, not in 50 ms steps."""
    throttle = LLMThrottle(6_000, 1_000_000)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    weights = ScoringWeights(
        priority=0.0, efficiency=0.0, wait_time=1.0, retry=0.0, token_fit=0.0, processing_time=0.0
    )
    config = LLMQueueDispatcherConfig(scoring=ScoringConfig(weights=weights), min_score_threshold=0.5 / 60)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(), config)
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(sized_request("slow-riser", 100))
    job = await dispatcher.dequeue(limiter, timeout=5.0)
    assert job is not None
    assert job.score.total >= 0.5 / 60
    assert looks[0] <= 3, looks


async def test_a_waiting_dequeue_never_freezes_the_event_loop() -> None:
    """The store on a ManualClock, the dispatcher on the wall clock (a misconfiguration): the
    in-flight message's visibility end is long past by the dispatcher's reckoning, so each wait
    is worked out as 0. The dequeue must still yield: a 100 ms ticker keeps running."""
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock(1_000.0)))
    limiter = LLMThrottle(600, 100_000)
    await dispatcher.enqueue(sized_request("a"))
    assert await dispatcher.dequeue(limiter) is not None
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.1)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    assert await dispatcher.dequeue(limiter, timeout=1.0) is None
    ticking.cancel()
    assert ticks >= 5


class RefusingWithoutSayingWhen(Counting):
    """A plain limiter that refuses every request and says it could go in 0 seconds (or less)."""

    def __init__(self, available_in: float) -> None:
        super().__init__(LLMThrottle(60, 100_000))
        self.available_in = available_in

    def can_process(self, estimated_tokens: int) -> Any:
        self.checks += 1
        return SimpleNamespace(
            allowed=False, reason="tpm_limit", available_in=self.available_in, available_tokens={"tpm": 0}
        )

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
        return False


@pytest.mark.parametrize("available_in", [0.0, -5.0])
async def test_a_limiter_refusing_without_saying_when_is_asked_again_not_polled(available_in: float) -> None:
    """A waiting dequeue asks such a limiter again every few tens of milliseconds, not every
    millisecond (its answer may never change by itself): a few calls in 0.3 s, not hundreds."""
    dispatcher = create_in_memory_queue()
    await dispatcher.enqueue(request("a", tokens=10))
    limiter = RefusingWithoutSayingWhen(available_in)
    assert await dispatcher.dequeue(limiter, timeout=0.3) is None
    assert 1 <= limiter.checks <= 20, limiter.checks
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.approximate_number_of_messages == 1  # left where it was


class AdmittingWithNaNTokens(Counting):
    """A plain limiter whose checks admit at once but whose metrics report NaN tokens available:
    no message fits NaN, and the admission says to wait no time."""

    def can_process(self, estimated_tokens: int) -> Any:
        self.checks += 1
        return SimpleNamespace(
            allowed=True, reason=None, available_in=0.0, available_tokens={"tpm": math.nan}
        )

    def get_metrics(self) -> Any:
        metrics = self.inner.get_metrics()
        nan_tokens = SimpleNamespace(available=math.nan, limit=metrics.tpm.limit)
        return SimpleNamespace(rpm=metrics.rpm, tpm=nan_tokens)


async def test_a_limiter_reporting_nan_tokens_available_gets_a_typed_error_not_a_busy_poll() -> None:
    """A waiting dequeue asked such a limiter every millisecond (hundreds of checks in 0.3 s):
    its answer is refused at once, with the limiter named, and the message stays queued."""
    dispatcher = create_in_memory_queue()
    await dispatcher.enqueue(request("a", tokens=10))
    limiter = AdmittingWithNaNTokens(LLMThrottle(60, 100_000))
    started = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"reported get_metrics\(\)[.]tpm[.]available = nan"):
        await dispatcher.dequeue(limiter, timeout=0.3)
    assert time.monotonic() - started < 0.2
    assert limiter.checks <= 1
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.approximate_number_of_messages == 1
