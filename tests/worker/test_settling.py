"""Worker: each outcome of a handler settles its message once: processed with the returned
token count, retried after backoff or ``retry_after``, dead-lettered on `PermanentError`."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    PermanentError,
    ProcessableMessage,
    RetryableError,
    TokenInfo,
    TokenUsage,
    Worker,
    create_in_memory_queue,
)
from llm_queue_dispatcher.worker import backoff_delay
from tests.integer_like import IntLike
from tests.worker.support import fill, noop, roomy_limiter


async def test_concurrency_bound_and_each_message_handled_once() -> None:
    dispatcher = create_in_memory_queue()
    ids = await fill(dispatcher, 40)
    running = 0
    peak = 0
    handled: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        handled[job.message.payload.id] += 1
        return 70

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle, concurrency=4)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert peak == 4
    assert handled == Counter({request_id: 1 for request_id in ids})
    assert stats.processed == 40
    assert stats.tokens == 40 * 70
    assert stats.in_flight == 0
    # The returned counts reached the limiter: every record adjusted to 70 actual tokens.
    assert {record.actual_tokens for record in limiter.get_consumption_history()} == {70}
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_retryable_error_waits_its_retry_after_and_keeps_the_receive_count() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    attempts: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(job: ProcessableMessage[Any]) -> int:
        attempts.append((job.message.attributes.receive_count, loop.time()))
        if len(attempts) < 3:
            raise RetryableError("provider busy", retry_after=0.15)
        return 10

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert [count for count, _ in attempts] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    assert all(0.14 <= gap < 1.0 for gap in gaps), gaps
    assert (stats.processed, stats.retried, stats.dead_lettered) == (1, 2, 0)
    # The failed attempts gave their tokens back: only the successful one counts.
    assert limiter.get_metrics().consumption_history.total_tokens == 10


async def test_plain_exception_backs_off_with_jitter_bounded_by_max_retry_delay() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    delays: list[float] = []
    worker: Worker[Any]

    async def handle(job: ProcessableMessage[Any]) -> int:
        if job.message.attributes.receive_count < 4:
            raise RuntimeError("boom")
        return 1

    class Recording(Worker[Any]):
        def retry_delay(self, job: ProcessableMessage[Any], error: BaseException) -> float:
            delay = super().retry_delay(job, error)
            delays.append(delay)
            return delay

    worker = Recording(dispatcher, roomy_limiter(), handle, retry_base_delay=0.01, max_retry_delay=0.03)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert stats.retried == 3
    assert stats.processed == 1
    ceilings = [0.01, 0.02, 0.03]  # base * 2 ** (attempt - 1), capped at 0.03
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True)), delays


def test_backoff_delay_is_full_jitter_under_the_exponential_ceiling() -> None:
    rng = random.Random(12)
    for attempt in range(1, 40):
        ceiling = min(300.0, 2.0 ** (attempt - 1))
        samples = [backoff_delay(attempt, base=1.0, cap=300.0, rng=rng) for _ in range(400)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        # Spread over the whole interval, not clustered at its top (full jitter).
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling
    assert backoff_delay(10_000, base=1.0, cap=5.0, rng=rng) <= 5.0  # no overflow
    worker = Worker(create_in_memory_queue(), roomy_limiter(), noop, max_retry_delay=7.0, rng=rng)
    assert worker.max_retry_delay == 7.0


async def test_retry_after_of_a_retryable_error_wins_over_backoff_and_bad_values_fall_back() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    job = await dispatcher.dequeue(roomy_limiter())
    assert job is not None
    worker = Worker(dispatcher, roomy_limiter(), noop, max_retry_delay=2.0, rng=random.Random(1))
    assert worker.retry_delay(job, RetryableError("x", retry_after=45.0)) == 45.0
    assert worker.retry_delay(job, RetryableError("x", retry_after=1e9)) == 43_200.0
    for bad in (math.nan, -3.0, None):
        assert 0.0 <= worker.retry_delay(job, RetryableError("x", retry_after=bad)) <= 1.0
    await job.mark_as_processed()


async def test_permanent_error_dead_letters_at_once() -> None:
    dead: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(dead_letter=dead))
    await fill(dispatcher, 3)
    calls: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        calls[job.message.payload.id] += 1
        if job.message.payload.id == "r1":
            raise PermanentError("400: invalid model")
        return 5

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert calls["r1"] == 1
    assert (stats.processed, stats.dead_lettered, stats.retried) == (2, 1, 0)
    [moved] = await dead.dequeue(10, 30.0)
    assert moved.payload.id == "r1"
    assert limiter.get_metrics().consumption_history.total_tokens == 10  # r1's reservation refunded


async def test_a_bad_handler_result_is_processed_with_its_estimate() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1, tokens=40)

    async def handle(job: ProcessableMessage[Any]) -> Any:
        return "lots"

    worker = Worker(dispatcher, roomy_limiter(), handle)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert (stats.processed, stats.tokens) == (1, 40)


async def test_a_handler_returning_input_and_output_counts_corrects_each_limit() -> None:
    dispatcher = create_in_memory_queue()
    for n in range(3):
        request = LLMRequest(f"r{n}", None, token_info=TokenInfo(input=300, max_output=200))
        await dispatcher.enqueue(request)
    # A frozen clock: nothing refills, so each bucket's use is what the marks left.
    limiter = LLMThrottle(60_000, 100_000_000, itpm=10_000_000, otpm=10_000_000, clock=ManualClock())

    async def handle(job: ProcessableMessage[Any]) -> TokenUsage:
        return TokenUsage(input=280, output=35)

    stats = await asyncio.wait_for(Worker(dispatcher, limiter, handle).run(stop_when_empty=True), 10)
    assert (stats.processed, stats.tokens) == (3, 3 * 315)
    records = limiter.get_consumption_history()
    assert {(r.actual_tokens, r.input_tokens, r.output_tokens) for r in records} == {(315, 280, 35)}
    # Each limit holds its own count: the input 280 each, the output 35 each, the total 315 each.
    metrics = limiter.get_metrics()
    assert metrics.itpm is not None
    assert metrics.otpm is not None
    assert (metrics.itpm.used, metrics.otpm.used, metrics.tpm.used) == (3 * 280, 3 * 35, 3 * 315)


async def test_a_tampered_token_usage_is_processed_with_its_estimate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1, tokens=40)
    usage = TokenUsage(1, 2)
    object.__setattr__(usage, "output", -2)

    async def handle(job: ProcessableMessage[Any]) -> TokenUsage:
        return usage

    limiter = roomy_limiter()
    stats = await asyncio.wait_for(Worker(dispatcher, limiter, handle).run(stop_when_empty=True), 10)
    assert (stats.processed, stats.tokens) == (1, 40)
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens is None
    assert "not a token count" in caplog.text


async def test_a_handler_that_marks_its_own_job_is_not_marked_twice() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 2)

    async def handle(job: ProcessableMessage[Any]) -> int:
        await job.mark_as_processed(actual_tokens=3)
        return 3

    worker = Worker(dispatcher, roomy_limiter(), handle)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert stats.processed == 2
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


@pytest.mark.parametrize(
    "retry_after",
    [10**400, math.inf, IntLike(10**400), 1e300],
    ids=["int too large for a float", "inf", "integer-like", "1e300"],
)
async def test_an_absurd_retry_after_is_cut_to_the_store_limit_and_the_message_still_settled(
    retry_after: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A frozen clock: the message handed back can only come back if its delay were ~0, and a
    # failure to settle it would leave it in flight with its reservation held.
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock, visibility_timeout=1.0)
    await fill(dispatcher, 1)
    limiter = LLMThrottle(60_000, 1e8, clock=clock)
    calls = 0
    failed = asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> int:
        nonlocal calls
        calls += 1
        failed.set()
        raise RetryableError("wait", retry_after=retry_after)  # type: ignore[arg-type]

    worker = Worker(dispatcher, limiter, handle)
    run = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(failed.wait(), 5)
    for _ in range(50):
        await asyncio.sleep(0)
    assert worker.stats.retried == 1
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0  # marked: no phantom in flight
    assert metrics.queue.failed == 1
    assert limiter.get_metrics().consumption_history.total_tokens == 0  # the reservation refunded
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert calls == 1
    # Invisible for the store's longest delay, 43200 s: not before, and visible once it passed.
    clock.advance(43_199.0)
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 0
    clock.advance(2.0)
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1
    # Said once per worker, however often the handler asks for it.
    assert sum("longest a message can stay invisible" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "retry_after", [-1, math.nan, -(10**400), "10", True], ids=["-1", "nan", "-10**400", "str", "bool"]
)
async def test_a_negative_nan_or_non_number_retry_after_falls_back_to_backoff(retry_after: object) -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    job = await dispatcher.dequeue(roomy_limiter())
    assert job is not None
    worker = Worker(dispatcher, roomy_limiter(), noop, retry_base_delay=1.0, rng=random.Random(1))
    delay = worker.retry_delay(job, RetryableError("x", retry_after=retry_after))  # type: ignore[arg-type]
    assert 0.0 <= delay <= 1.0
    assert worker.retry_delay(job, RetryableError("x", retry_after=IntLike(45))) == 45.0  # type: ignore[arg-type]
    await job.mark_as_processed()


async def test_a_retry_delay_that_raises_still_hands_the_message_back() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    limiter = roomy_limiter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        if job.message.attributes.receive_count == 1:
            raise RuntimeError("boom")
        return 1

    class Broken(Worker[Any]):
        def retry_delay(self, job: ProcessableMessage[Any], error: BaseException) -> float:
            if job.message.attributes.receive_count == 1:
                raise OverflowError("a subclass's bug")
            return super().retry_delay(job, error)

    worker = Broken(dispatcher, limiter, handle, retry_base_delay=0.01, max_retry_delay=0.01)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert (stats.retried, stats.processed) == (1, 1)
    assert limiter.get_metrics().consumption_history.total_tokens == 1


async def test_a_plain_function_handler_is_called_once_and_its_message_dead_lettered() -> None:
    """A handler that is not async ran, but its result cannot be awaited: a retry would run it
    again for nothing, so its message is dead-lettered at once."""
    calls: list[str] = []

    def handle(job: Any) -> int:
        calls.append(job.message.payload.id)
        return 5

    async with create_in_memory_queue() as dispatcher:
        await dispatcher.enqueue(LLMRequest("a", None))
        worker = Worker(
            dispatcher, LLMThrottle(6_000, 1_000_000), handle, retry_base_delay=0.01, max_retry_delay=0.01
        )
        stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5.0)
        assert calls == ["a"]
        assert stats.dead_lettered == 1
        assert stats.retried == 0
