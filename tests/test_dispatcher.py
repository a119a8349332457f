"""LLMQueueDispatcher over the in-memory store: every item of the contract's "Dispatcher" and
"Factories" sections (enqueue, selection, budget reservation, marks, waiting, custom scorers,
scores, other rate limiters, metrics, purge, close, configuration, factories)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    DuplicateRequestError,
    InMemoryStorage,
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageScore,
    MessageStateError,
    Priority,
    QueueMessage,
    RateLimiter,
    ScoringConfig,
    ScoringContext,
    ScoringWeights,
    TokenInfo,
    create_fair_llm_queue_dispatcher,
    create_fair_queue,
    create_in_memory_llm_queue_dispatcher,
    create_in_memory_queue,
    create_llm_queue_dispatcher,
    create_prefetching_llm_queue_dispatcher,
    create_prefetching_queue,
    create_simple_priority_llm_queue_dispatcher,
    create_simple_priority_queue,
    create_throughput_optimized_llm_queue_dispatcher,
    create_throughput_optimized_queue,
)

FACTOR_NAMES = ["priority", "efficiency", "wait_time", "retry", "token_fit", "processing_time"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(10_000.0)


def request(
    request_id: str,
    priority: Priority = Priority.NORMAL,
    tokens: int = 100,
    ept: float | None = None,
    payload: Any = None,
) -> LLMRequest[Any]:
    return LLMRequest(
        id=request_id,
        payload=f"payload of {request_id}" if payload is None else payload,
        priority=priority,
        token_info=TokenInfo(tokens),
        expected_processing_time=ept,
    )


def queue(clock: ManualClock, **overrides: Any) -> LLMQueueDispatcher[Any]:
    return create_in_memory_queue(clock=clock, **overrides)


def throttle(clock: ManualClock | None, rpm: float = 600.0, tpm: float = 100_000.0) -> LLMThrottle:
    return LLMThrottle(rpm, tpm, clock=clock)


async def counts(dispatcher: LLMQueueDispatcher[Any]) -> tuple[int, int, int]:
    """(visible, in flight, total) as the dispatcher reports them."""
    q = (await dispatcher.get_queue_metrics()).queue
    return q.approximate_number_of_messages, q.approximate_number_of_messages_in_flight, q.total_messages


# ---------------------------------------------------------------------------------------------
# enqueue / batch_enqueue
# ---------------------------------------------------------------------------------------------


async def test_enqueue_returns_the_stored_message(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    payload = object()
    message = await dispatcher.enqueue(LLMRequest("a", payload, Priority.HIGH, TokenInfo(42)))
    assert isinstance(message, QueueMessage)
    assert message.payload.id == "a"
    assert message.payload.payload is payload  # kept by reference
    assert message.payload.priority is Priority.HIGH
    assert message.id == message.attributes.message_id
    assert message.attributes.receive_count == 0
    assert message.attributes.first_received_at is None
    assert message.attributes.enqueued_at == datetime.fromtimestamp(clock.now(), timezone.utc)
    assert await counts(dispatcher) == (1, 0, 1)


def _empty_id(r: LLMRequest[Any]) -> None:
    r.id = ""


def _bad_priority(r: LLMRequest[Any]) -> None:
    r.priority = 7  # type: ignore[assignment]


def _negative_processing_time(r: LLMRequest[Any]) -> None:
    r.expected_processing_time = -1.0


def _negative_tokens(r: LLMRequest[Any]) -> None:
    object.__setattr__(r.token_info, "estimated", -5)


def _not_token_info(r: LLMRequest[Any]) -> None:
    r.token_info = "lots"  # type: ignore[assignment]


BAD_MUTATIONS = [_empty_id, _bad_priority, _negative_processing_time, _negative_tokens, _not_token_info]


@pytest.mark.parametrize("mutate", BAD_MUTATIONS, ids=lambda f: f.__name__)
async def test_enqueue_revalidates_and_stores_nothing_on_bad_input(clock: ManualClock, mutate: Any) -> None:
    dispatcher = queue(clock)
    bad = request("a")
    mutate(bad)
    with pytest.raises(InvalidRequestError):
        await dispatcher.enqueue(bad)
    assert await counts(dispatcher) == (0, 0, 0)
    # Nothing was stored, so the id is free.
    await dispatcher.enqueue(request("a"))
    assert await counts(dispatcher) == (1, 0, 1)


async def test_enqueue_of_something_not_a_request_is_a_typed_error(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    with pytest.raises(InvalidRequestError):
        await dispatcher.enqueue({"id": "a", "payload": "hi"})  # type: ignore[arg-type]
    assert await counts(dispatcher) == (0, 0, 0)


async def test_duplicate_id_is_refused_until_the_first_is_deleted(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    with pytest.raises(DuplicateRequestError):
        await dispatcher.enqueue(request("a", Priority.URGENT))
    metrics = (await dispatcher.get_queue_metrics()).queue
    assert metrics.total_messages == 1
    assert metrics.messages_by_priority["URGENT"] == 0
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    with pytest.raises(DuplicateRequestError):  # in flight is not deleted
        await dispatcher.enqueue(request("a"))
    await job.mark_as_processed()
    await dispatcher.enqueue(request("a"))
    assert await counts(dispatcher) == (1, 0, 1)


async def test_batch_enqueue_stores_all_in_order(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    messages = await dispatcher.batch_enqueue([request(f"r{i}") for i in range(5)])
    assert [m.payload.id for m in messages] == [f"r{i}" for i in range(5)]
    assert await counts(dispatcher) == (5, 0, 5)
    assert await dispatcher.batch_enqueue([]) == []


async def test_batch_enqueue_is_validated_whole(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("existing"))
    bad = request("bad")
    bad.priority = 9  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError):
        await dispatcher.batch_enqueue([request("x1"), bad, request("x2")])
    with pytest.raises(DuplicateRequestError):
        await dispatcher.batch_enqueue([request("y1"), request("y2"), request("y1")])
    with pytest.raises(DuplicateRequestError):
        await dispatcher.batch_enqueue([request("z1"), request("existing")])
    assert await counts(dispatcher) == (1, 0, 1)
    # None of the refused batches left anything behind: all their ids are free.
    await dispatcher.batch_enqueue([request(i) for i in ("x1", "x2", "y1", "y2", "z1")])
    assert await counts(dispatcher) == (6, 0, 6)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------


async def test_urgent_behind_a_thousand_low_comes_out_first(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.batch_enqueue([request(f"low{i}", Priority.LOW) for i in range(1_000)])
    clock.advance(30.0)  # the LOW requests have waited a while; the URGENT one still wins
    await dispatcher.enqueue(request("urgent", Priority.URGENT))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "urgent"
    following = await dispatcher.dequeue(throttle(clock))
    assert following is not None
    assert following.message.payload.priority is Priority.LOW


async def test_dequeue_on_an_empty_queue_returns_none(clock: ManualClock) -> None:
    assert await queue(clock).dequeue(throttle(clock)) is None


async def test_oversized_request_never_blocks_and_is_reported(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("huge", Priority.URGENT, tokens=50_000))
    await dispatcher.enqueue(request("small", Priority.LOW, tokens=100))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "small"
    await job.mark_as_processed()
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        assert await dispatcher.dequeue(limiter, timeout=0.02) is None
    assert any("huge" in record.getMessage() for record in caplog.records)
    # The documented way out: take the unfittable requests and delete (or dead-letter) them.
    taken = await dispatcher.take_unfittable(limiter)
    assert [m.payload.id for m in taken] == ["huge"]
    assert await counts(dispatcher) == (0, 1, 1)
    await storage.delete_message(taken[0].attributes.receipt_handle)
    assert await counts(dispatcher) == (0, 0, 0)
    # Nothing was reserved for it: only the small request's tokens are gone.
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0 - 100)


async def test_unfittable_report_goes_to_the_configured_logger(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.dispatcher.custom")
    dispatcher = queue(clock, logger=logger)
    await dispatcher.enqueue(request("giant", tokens=1_000_000))
    with caplog.at_level(logging.WARNING, logger="tests.dispatcher.custom"):
        assert await dispatcher.dequeue(throttle(clock, tpm=1_000), timeout=0.02) is None
    assert any(r.name == "tests.dispatcher.custom" and "giant" in r.getMessage() for r in caplog.records)


async def test_best_below_min_score_threshold_gives_none_and_takes_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock, min_score_threshold=0.95)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is None
    assert await counts(dispatcher) == (1, 0, 1)
    assert limiter.get_metrics().tpm.available == pytest.approx(100_000.0)
    assert limiter.get_consumption_history() == []
    lenient = queue(clock, min_score_threshold=0.2)
    await lenient.enqueue(request("a"))
    assert await lenient.dequeue(limiter) is not None


# ---------------------------------------------------------------------------------------------
# budget reservation and marks
# ---------------------------------------------------------------------------------------------


async def test_selection_reserves_one_request_and_the_estimate(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=60, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_500))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    metrics = limiter.get_metrics()
    assert metrics.rpm.available == pytest.approx(59.0)
    assert metrics.tpm.available == pytest.approx(8_500.0)
    [record] = limiter.get_consumption_history()
    assert record.request_id == "a"
    assert record.estimated_tokens == 1_500


async def test_without_reserve_budget_the_limiter_is_only_consulted(clock: ManualClock) -> None:
    dispatcher = queue(clock, reserve_budget=False)
    limiter = throttle(clock, rpm=60, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_500))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(actual_tokens=3_000)
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)
    assert limiter.get_consumption_history() == []


@pytest.mark.parametrize("actual", [2_000, 500, 0])
async def test_mark_as_processed_adjusts_to_actual_tokens(clock: ManualClock, actual: int) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=60, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_500))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(actual_tokens=actual)
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0 - actual)
    assert await counts(dispatcher) == (0, 0, 0)


async def test_mark_as_processed_rejects_a_bad_token_count(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    with pytest.raises(InvalidRequestError):
        await job.mark_as_processed(actual_tokens=-1)
    # The bad call changed nothing: the message can still be marked.
    await job.mark_as_processed(actual_tokens=10)
    assert await counts(dispatcher) == (0, 0, 0)


async def test_mark_as_failed_refunds_and_redelivers_after_retry_after(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=60, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_500))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    first_received_at = job.message.attributes.first_received_at
    assert first_received_at is not None
    await job.mark_as_failed(RuntimeError("provider error"), retry_after=5.0)
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(4.9)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(0.2)
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.payload.id == "a"
    assert again.message.attributes.receive_count == 2
    assert again.message.attributes.first_received_at == first_received_at
    assert again.message.attributes.receipt_handle != job.message.attributes.receipt_handle


async def test_mark_as_failed_without_retry_after_redelivers_at_once(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_failed(ValueError("bad"))
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2


async def test_failed_message_is_dead_lettered_after_max_receive_count(clock: ManualClock) -> None:
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock, max_receive_count=2, dead_letter=dead)
    dispatcher = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    limiter = throttle(clock)
    payload = {"prompt": "hello"}
    await dispatcher.enqueue(request("a", payload=payload))
    for receive_count in (1, 2):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        assert job.message.attributes.receive_count == receive_count
        await job.mark_as_failed(RuntimeError("again"))
    assert await dispatcher.dequeue(limiter) is None
    assert await dead.get_approximate_message_count() == 1
    [moved] = await dead.dequeue(10, 30.0)
    assert moved.payload.id == "a"
    assert moved.payload.payload is payload
    metrics = (await dispatcher.get_queue_metrics()).queue
    assert metrics.dead_lettered == 1
    assert metrics.failed == 2
    assert metrics.total_messages == 0


ACTIONS = {
    "processed": lambda job: job.mark_as_processed(),
    "failed": lambda job: job.mark_as_failed(RuntimeError("x")),
}


@pytest.mark.parametrize("first", list(ACTIONS))
@pytest.mark.parametrize("second", list(ACTIONS))
async def test_marking_twice_raises_message_state_error(clock: ManualClock, first: str, second: str) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    await ACTIONS[first](job)
    with pytest.raises(MessageStateError):
        await ACTIONS[second](job)


async def test_update_visibility_extends_the_lease_from_now(clock: ManualClock) -> None:
    dispatcher = queue(clock, visibility_timeout=30.0)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    clock.advance(20.0)
    await job.update_visibility(100.0)  # leased until 120 s after the dequeue
    clock.advance(90.0)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(15.0)
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2


async def test_an_unmarked_message_comes_back_after_the_visibility_timeout(clock: ManualClock) -> None:
    dispatcher = queue(clock, visibility_timeout=30.0)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is not None
    clock.advance(29.75)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(0.5)
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2


async def test_async_with_processable_marks_processed_on_normal_exit(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    async with job as entered:
        assert entered is job
    assert await counts(dispatcher) == (0, 0, 0)
    with pytest.raises(MessageStateError):
        await job.mark_as_failed(RuntimeError("late"))


async def test_async_with_processable_marks_failed_and_reraises(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_000))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    with pytest.raises(ValueError, match="boom"):
        async with job:
            raise ValueError("boom")
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)  # refunded
    assert (await dispatcher.get_queue_metrics()).queue.failed == 1
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2
    with pytest.raises(MessageStateError):
        await job.mark_as_processed()


async def test_async_with_dispatcher_closes_it(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    closed: list[bool] = []
    original = dispatcher.close

    async def spy() -> None:
        closed.append(True)
        await original()

    dispatcher.close = spy  # type: ignore[method-assign]
    async with dispatcher as entered:
        assert entered is dispatcher
    assert closed == [True]
    with pytest.raises(KeyError):
        async with dispatcher:
            raise KeyError("inside")
    assert closed == [True, True]
    await original()  # closing again is harmless


# ---------------------------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------------------------


class CountingLimiter:
    """A plain-Python RateLimiter delegating to an LLMThrottle and counting calls."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def can_process(self, estimated_tokens: int) -> Any:
        self.calls["can_process"] += 1
        return self.inner.can_process(estimated_tokens)

    def get_metrics(self) -> Any:
        self.calls["get_metrics"] += 1
        return self.inner.get_metrics()

    def consume(self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None) -> bool:
        self.calls["consume"] += 1
        return self.inner.consume(request_id, estimated_tokens, metadata)

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.calls["adjust_consumption"] += 1
        self.inner.adjust_consumption(request_id, actual_tokens)


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


# ---------------------------------------------------------------------------------------------
# custom scorers
# ---------------------------------------------------------------------------------------------


def scored_queue(clock: ManualClock, *scorers: CustomScorer, **overrides: Any) -> LLMQueueDispatcher[Any]:
    return queue(clock, scoring=ScoringConfig(custom_scorers=list(scorers)), **overrides)


async def test_custom_scorer_is_called_with_the_message_and_a_context(clock: ManualClock) -> None:
    seen: list[tuple[Any, Any]] = []

    def mine(message: QueueMessage[Any], context: ScoringContext) -> float:
        seen.append((message, context))
        return 0.5

    dispatcher = scored_queue(clock, CustomScorer("mine", 0.3, mine))
    limiter = throttle(clock, tpm=20_000)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    [(message, context)] = seen
    assert isinstance(message, QueueMessage)
    assert message.payload.id == "a"
    assert isinstance(context, ScoringContext)
    assert context.current_time == clock.now()
    assert context.rate_limiter_metrics.tpm.limit == pytest.approx(20_000.0)
    with pytest.raises(AttributeError):
        context.current_time = 0.0  # type: ignore[misc]
    assert job.score.breakdown["mine"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("raw", "counted"),
    [(0.25, 0.25), (5.0, 1.0), (-3.0, 0.0), (math.nan, 0.0), (math.inf, 1.0), (-math.inf, 0.0), (1, 1.0)],
)
async def test_custom_scores_are_clamped_and_nan_counts_as_zero(
    clock: ManualClock, raw: float, counted: float
) -> None:
    dispatcher = scored_queue(clock, CustomScorer("c", 0.4, lambda message, context: raw))
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.score.breakdown["c"] == pytest.approx(0.4 * counted)
    assert job.score.total == pytest.approx(sum(job.score.breakdown.values()))


async def test_custom_scorer_exception_propagates_and_nothing_is_dequeued(clock: ManualClock) -> None:
    def broken(message: QueueMessage[Any], context: ScoringContext) -> float:
        raise KeyError("scorer bug")

    dispatcher = scored_queue(clock, CustomScorer("broken", 0.2, broken))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_000))
    with pytest.raises(KeyError, match="scorer bug"):
        await dispatcher.dequeue(limiter)
    assert await counts(dispatcher) == (1, 0, 1)
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)
    assert limiter.get_metrics().rpm.available == pytest.approx(600.0)
    assert limiter.get_consumption_history() == []


async def test_custom_scorer_that_decides_picks_the_winner(clock: ManualClock) -> None:
    dispatcher = scored_queue(
        clock, CustomScorer("vip", 5.0, lambda message, context: 1.0 if message.payload.id == "vip" else 0.0)
    )
    await dispatcher.batch_enqueue([request("urgent", Priority.URGENT), request("vip", Priority.LOW)])
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "vip"


async def test_max_candidates_to_evaluate_caps_custom_calls(clock: ManualClock) -> None:
    calls: list[str] = []

    def counting(message: QueueMessage[Any], context: ScoringContext) -> float:
        calls.append(message.payload.id)
        return (hash(message.payload.id) % 100) / 100

    dispatcher = scored_queue(clock, CustomScorer("c", 1.0, counting), max_candidates_to_evaluate=5)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(50)])
    limiter = throttle(clock)
    for _ in range(3):
        calls.clear()
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        assert 1 <= len(calls) <= 5
        assert job.message.payload.id in calls


async def test_queue_metrics_in_the_context_are_built_at_most_once_and_only_when_read(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Any] = []
    read_metrics = True

    def reader(message: QueueMessage[Any], context: ScoringContext) -> float:
        if read_metrics:
            reads.append(context.queue_metrics)
        return 0.5

    dispatcher = scored_queue(clock, CustomScorer("reader", 1.0, reader), max_candidates_to_evaluate=30)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(10)])
    report_type = type((await dispatcher.get_queue_metrics()).queue)
    built: list[int] = []
    original_init = report_type.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(report_type, "__init__", counting_init)
    limiter = throttle(clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert len(reads) == 10  # every equal candidate was scored
    assert len(built) == 1
    assert all(report is reads[0] for report in reads)
    assert reads[0].approximate_number_of_messages == 10
    reads.clear()
    built.clear()
    assert await dispatcher.dequeue(limiter) is not None
    assert len(built) == 1
    assert reads[0].approximate_number_of_messages == 9
    read_metrics = False
    built.clear()
    assert await dispatcher.dequeue(limiter) is not None
    assert built == []


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------


async def test_breakdown_holds_the_weighted_factors_and_sums_to_the_total(clock: ManualClock) -> None:
    dispatcher = scored_queue(clock, CustomScorer("bonus", 0.5, lambda message, context: 0.6))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", Priority.NORMAL, tokens=1_000))  # u = 0.1, 10 s at 0.01 s/token
    clock.advance(30.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert isinstance(job.score, MessageScore)
    assert list(job.score.breakdown) == [*FACTOR_NAMES, "bonus"]
    expected = {
        "priority": 0.25 * 0.4,
        "efficiency": 0.20 * (0.1 / 0.7),
        "wait_time": 0.20 * (30.0 / 60.0),
        "retry": 0.10 * 1.0,
        "token_fit": 0.15 * 1.0,
        "processing_time": 0.10 * (0.7 - (10_000 - 5_000) / 25_000 * 0.6),
        "bonus": 0.5 * 0.6,
    }
    assert job.score.breakdown == pytest.approx(expected, abs=1e-12)
    assert job.score.total == pytest.approx(sum(expected.values()), abs=1e-12)
    assert sum(job.score.breakdown.values()) == pytest.approx(job.score.total, abs=1e-12)


async def test_breakdown_of_an_urgent_retried_message(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", Priority.URGENT, tokens=9_500, ept=0.0))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    await first.mark_as_failed(RuntimeError("x"))
    clock.advance(2.5)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    u = 9_500 / 10_000  # the failed delivery's reservation was refunded: the bucket is full
    expected = {
        "priority": 0.25 * 1.0,
        "efficiency": 0.20 * 0.9,
        "wait_time": 0.20 * math.sqrt(2.5 / 10),
        "retry": 0.10 * 0.7,
        "token_fit": 0.15 * (1 - (u - 0.5) * 0.4),
        "processing_time": 0.10 * 1.0,
    }
    assert job.score.breakdown == pytest.approx(expected, abs=1e-12)


async def test_reason_names_the_top_factors(clock: ManualClock) -> None:
    dispatcher = scored_queue(clock, CustomScorer("house_rule", 2.0, lambda message, context: 1.0))
    await dispatcher.enqueue(request("a", Priority.URGENT))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert isinstance(job.reason, str)
    ranked = sorted(job.score.breakdown, key=lambda name: job.score.breakdown[name], reverse=True)
    assert ranked[0] == "house_rule"
    assert "house_rule" in job.reason
    assert ranked[1] in job.reason


# ---------------------------------------------------------------------------------------------
# any RateLimiter
# ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    allowed: bool
    reason: str | None
    available_in: float
    available_tokens: dict[str, float]


class FixedBudgetLimiter:
    """A RateLimiter in plain Python: a fixed budget that never refills."""

    def __init__(self, tokens: float, requests: float = 100.0, accept: bool = True) -> None:
        self.tokens = tokens
        self.capacity = tokens
        self.requests = requests
        self.accept = accept
        self.consumed: list[tuple[str, int]] = []
        self.adjusted: list[tuple[str, int]] = []
        self._reserved: dict[str, int] = {}

    def can_process(self, estimated_tokens: int) -> Check:
        if estimated_tokens > self.capacity:
            return Check(False, "tpm_limit", math.inf, self._available())
        allowed = self.requests >= 1 and estimated_tokens <= self.tokens
        return Check(
            allowed, None if allowed else "tpm_limit", 0.0 if allowed else math.inf, self._available()
        )

    def _available(self) -> dict[str, float]:
        return {"rpm": self.requests, "tpm": self.tokens}

    def get_metrics(self) -> Any:
        bucket = SimpleNamespace
        return SimpleNamespace(
            rpm=bucket(used=0.0, available=self.requests, limit=100.0, percentage=0.0),
            tpm=bucket(
                used=self.capacity - self.tokens, available=self.tokens, limit=self.capacity, percentage=0.0
            ),
        )

    def consume(self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None) -> bool:
        if not self.accept or estimated_tokens > self.tokens or self.requests < 1:
            return False
        self.consumed.append((request_id, estimated_tokens))
        self._reserved[request_id] = estimated_tokens
        self.tokens -= estimated_tokens
        self.requests -= 1
        return True

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.adjusted.append((request_id, actual_tokens))
        self.tokens += self._reserved.pop(request_id) - actual_tokens


async def test_a_plain_python_rate_limiter_works(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = FixedBudgetLimiter(tokens=2_000)
    assert isinstance(limiter, RateLimiter)
    await dispatcher.batch_enqueue(
        [
            request("too-big-now", Priority.URGENT, tokens=5_000),
            request("high", Priority.HIGH, tokens=500),
            request("low", Priority.LOW, tokens=100),
        ]
    )
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "high"
    assert limiter.consumed == [("high", 500)]
    await job.mark_as_processed(actual_tokens=700)
    assert limiter.adjusted == [("high", 700)]
    assert limiter.tokens == 1_300
    nxt = await dispatcher.dequeue(limiter)
    assert nxt is not None
    assert nxt.message.payload.id == "low"
    await nxt.mark_as_failed(RuntimeError("x"))
    assert limiter.adjusted[-1] == ("low", 0)
    assert limiter.tokens == 1_300


async def test_a_limiter_that_refuses_to_consume_gets_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = FixedBudgetLimiter(tokens=2_000, accept=False)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is None
    assert await counts(dispatcher) == (1, 0, 1)


async def test_a_plain_python_limiter_without_requests_left_gets_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(FixedBudgetLimiter(tokens=2_000, requests=0)) is None


async def test_custom_scorers_see_a_plain_limiters_metrics(clock: ManualClock) -> None:
    seen: list[float] = []

    def spy(message: QueueMessage[Any], context: ScoringContext) -> float:
        seen.append(context.rate_limiter_metrics.tpm.available)
        return 0.0

    dispatcher = scored_queue(clock, CustomScorer("spy", 0.1, spy))
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(FixedBudgetLimiter(tokens=1_234)) is not None
    assert seen == [1_234]


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


async def test_queue_metrics_report_counts_waits_throughput_and_in_flight(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=600, tpm=100_000)
    await dispatcher.batch_enqueue(
        [
            request("u", Priority.URGENT, tokens=100),
            request("h", Priority.HIGH, tokens=200),
            request("n1", Priority.NORMAL, tokens=300),
            request("n2", Priority.NORMAL, tokens=400),
        ]
    )
    clock.advance(10.0)
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert (
        q.approximate_number_of_messages,
        q.approximate_number_of_messages_in_flight,
        q.total_messages,
    ) == (4, 0, 4)
    assert q.messages_by_priority == {"URGENT": 1, "HIGH": 1, "NORMAL": 2, "LOW": 0}
    assert q.oldest_message_age == pytest.approx(10.0)
    assert q.failed == 0
    assert q.dead_lettered == 0
    assert metrics.processing.active_requests == 0
    assert metrics.processing.in_flight_details == []

    urgent = await dispatcher.dequeue(limiter)
    clock.advance(20.0)
    high = await dispatcher.dequeue(limiter)
    assert urgent is not None
    assert high is not None
    assert (urgent.message.payload.id, high.message.payload.id) == ("u", "h")
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert (
        q.approximate_number_of_messages,
        q.approximate_number_of_messages_in_flight,
        q.total_messages,
    ) == (2, 2, 4)
    assert q.messages_by_priority == {"URGENT": 0, "HIGH": 0, "NORMAL": 2, "LOW": 0}
    assert q.average_wait_time == pytest.approx(20.0)  # waited 10 s and 30 s
    p = q.wait_time_percentiles
    assert 10.0 <= p.p50 <= p.p95 <= p.p99 <= 30.0
    assert metrics.processing.active_requests == 2
    details = {d.request_id: d for d in metrics.processing.in_flight_details}
    assert set(details) == {"u", "h"}
    assert details["h"].estimated_tokens == 200
    assert details["h"].priority == Priority.HIGH
    assert details["h"].score == pytest.approx(high.score.total)

    await urgent.mark_as_processed(actual_tokens=1_000)  # estimated 100: the actual count counts
    await high.mark_as_failed(RuntimeError("x"))
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert q.throughput.tokens_per_minute == pytest.approx(1_000.0)
    assert q.throughput.messages_per_minute == pytest.approx(1.0)
    assert q.failed == 1
    assert metrics.processing.active_requests == 0
    third = await dispatcher.dequeue(limiter)
    assert third is not None
    await third.mark_as_processed()  # no actual count: its estimate counts
    q = (await dispatcher.get_queue_metrics()).queue
    assert q.throughput.tokens_per_minute == pytest.approx(
        1_000.0 + third.message.payload.token_info.estimated
    )
    assert q.throughput.messages_per_minute == pytest.approx(2.0)

    performance = (await dispatcher.get_queue_metrics()).performance
    assert performance.prefetch_enabled is False
    latency = performance.dequeue_latency
    assert 0.0 < latency.p50 <= latency.p99 < 1.0


async def test_queue_metrics_to_dict_is_plain_data(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.batch_enqueue([request("a", Priority.LOW), request("b", Priority.URGENT)])
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    metrics = await dispatcher.get_queue_metrics()
    data = metrics.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["queue"]["messages_by_priority"] == {"URGENT": 0, "HIGH": 0, "NORMAL": 0, "LOW": 1}
    assert data["queue"]["approximate_number_of_messages_in_flight"] == 1
    assert data["processing"]["active_requests"] == 1
    assert data["processing"]["in_flight_details"][0]["request_id"] == "b"
    assert set(data["queue"]["wait_time_percentiles"]) == {"p50", "p95", "p99"}
    assert set(data["queue"]["throughput"]) == {"messages_per_minute", "tokens_per_minute"}
    assert set(data["performance"]["dequeue_latency"]) == {"p50", "p99"}
    assert data["queue"]["total_messages"] == metrics.queue.total_messages == 2


async def test_wait_samples_older_than_metrics_retention_are_dropped(clock: ManualClock) -> None:
    dispatcher = queue(clock, metrics_retention=60.0)
    await dispatcher.enqueue(request("a"))
    clock.advance(5.0)
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert (await dispatcher.get_queue_metrics()).queue.average_wait_time == pytest.approx(5.0)
    clock.advance(120.0)
    assert (await dispatcher.get_queue_metrics()).queue.average_wait_time == 0.0


# ---------------------------------------------------------------------------------------------
# purge, close
# ---------------------------------------------------------------------------------------------


async def test_purge_removes_everything(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(3)])
    assert await dispatcher.dequeue(limiter) is not None
    await dispatcher.purge()
    assert await counts(dispatcher) == (0, 0, 0)
    assert await dispatcher.dequeue(limiter) is None
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(3)])  # ids are free again
    assert await counts(dispatcher) == (3, 0, 3)


async def test_close_leaves_in_memory_messages_where_they_are(clock: ManualClock) -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    await dispatcher.batch_enqueue([request("a"), request("b")])
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    dispatcher.stop()
    await dispatcher.close()
    await dispatcher.close()
    assert await storage.get_approximate_message_count() == 1
    await job.mark_as_processed()  # a message handed out before close can still be settled
    assert await storage.get_approximate_message_count() == 1
    other = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    remaining = await other.dequeue(throttle(clock))
    assert remaining is not None
    assert remaining.message.payload.id != job.message.payload.id


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

BAD_CONFIG = [
    ("buffer_size", 0),
    ("buffer_size", 2.5),
    ("buffer_size", True),
    ("prefetch_interval", 0.0),
    ("prefetch_interval", -1.0),
    ("prefetch_interval", math.nan),
    ("prefetch_interval", math.inf),
    ("max_candidates_to_evaluate", 0),
    ("max_candidates_to_evaluate", "20"),
    ("min_score_threshold", math.nan),
    ("min_score_threshold", "high"),
    ("metrics_retention", 0.0),
    ("metrics_retention", -5.0),
    ("visibility_timeout", -1.0),
    ("visibility_timeout", 43_200.5),
    ("visibility_timeout", math.nan),
    ("enable_prefetch", "yes"),
    ("reserve_budget", 1),
    ("logger", "llm_queue_dispatcher"),
    ("clock", 5),
    ("scoring", {"priority": 1.0}),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_field_raises_invalid_config_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        LLMQueueDispatcherConfig(**{field: value})
    with pytest.raises(InvalidConfigError, match=field):
        create_in_memory_queue(**{field: value})


def test_a_config_broken_after_construction_is_refused_by_the_dispatcher(clock: ManualClock) -> None:
    config = LLMQueueDispatcherConfig(clock=clock)
    config.buffer_size = 0
    with pytest.raises(InvalidConfigError, match="buffer_size"):
        LLMQueueDispatcher(InMemoryStorage(clock=clock), config)


@pytest.mark.parametrize("field", FACTOR_NAMES)
@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1"])
def test_bad_weight_raises_invalid_config_error(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        ScoringWeights(**{field: value})


def _score(message: QueueMessage[Any], context: ScoringContext) -> float:
    return 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: CustomScorer("", 1.0, _score),
        lambda: CustomScorer("x", -1.0, _score),
        lambda: CustomScorer("x", math.nan, _score),
        lambda: CustomScorer("x", 1.0, "not callable"),  # type: ignore[arg-type]
        lambda: ScoringConfig(
            custom_scorers=[CustomScorer("x", 1.0, _score), CustomScorer("x", 0.5, _score)]
        ),
        lambda: ScoringConfig(custom_scorers=[CustomScorer("priority", 1.0, _score)]),
    ],
    ids=["empty-name", "negative-weight", "nan-weight", "not-callable", "duplicate-name", "shadows-a-factor"],
)
def test_bad_custom_scorer_raises_invalid_config_error(make: Any) -> None:
    with pytest.raises(InvalidConfigError):
        make()


def test_unknown_override_raises_invalid_config_error(clock: ManualClock) -> None:
    with pytest.raises(InvalidConfigError, match="bufer_size"):
        create_in_memory_queue(clock=clock, bufer_size=10)


# ---------------------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------------------


def test_factory_aliases_are_the_same_functions() -> None:
    assert create_in_memory_queue is create_in_memory_llm_queue_dispatcher
    assert create_prefetching_llm_queue_dispatcher is create_prefetching_queue
    assert create_simple_priority_llm_queue_dispatcher is create_simple_priority_queue
    assert create_throughput_optimized_llm_queue_dispatcher is create_throughput_optimized_queue
    assert create_fair_llm_queue_dispatcher is create_fair_queue


async def observed_weights(dispatcher: LLMQueueDispatcher[Any], clock: ManualClock) -> tuple[float, ...]:
    """The six weights, read back from the breakdown of a probe message whose factors are all
    exactly 1 except token fit (0.88 at u = 0.8)."""
    await dispatcher.enqueue(request("probe", Priority.URGENT, tokens=8_000, ept=0.5))
    clock.advance(10.0)  # URGENT waits at most 10 s: wait factor 1
    job = await dispatcher.dequeue(throttle(clock, tpm=10_000))
    assert job is not None
    b = job.score.breakdown
    return (
        b["priority"],
        b["efficiency"],
        b["wait_time"],
        b["retry"],
        b["token_fit"] / 0.88,
        b["processing_time"],
    )


PRESETS = [
    (create_llm_queue_dispatcher, (0.25, 0.20, 0.20, 0.10, 0.15, 0.10)),
    (create_prefetching_queue, (0.25, 0.20, 0.20, 0.10, 0.15, 0.10)),
    (create_simple_priority_queue, (0.8, 0.05, 0.1, 0.05, 0.0, 0.0)),
    (create_throughput_optimized_queue, (0.15, 0.35, 0.1, 0.05, 0.25, 0.1)),
    (create_fair_queue, (0.2, 0.1, 0.5, 0.15, 0.05, 0.0)),
]


@pytest.mark.parametrize(("factory", "weights"), PRESETS, ids=[f.__name__ for f, _ in PRESETS])
async def test_factory_preset_weights(clock: ManualClock, factory: Any, weights: tuple[float, ...]) -> None:
    dispatcher = factory(InMemoryStorage(clock=clock), clock=clock)
    assert await observed_weights(dispatcher, clock) == pytest.approx(weights, abs=1e-12)


async def test_in_memory_factory_uses_default_weights(clock: ManualClock) -> None:
    observed = await observed_weights(create_in_memory_queue(clock=clock), clock)
    assert observed == pytest.approx((0.25, 0.20, 0.20, 0.10, 0.15, 0.10), abs=1e-12)


def test_factory_preset_settings(clock: ManualClock) -> None:
    prefetching = create_prefetching_queue(InMemoryStorage(clock=clock), clock=clock).config
    assert (prefetching.enable_prefetch, prefetching.buffer_size, prefetching.prefetch_interval) == (
        True,
        100,
        5.0,
    )
    throughput = create_throughput_optimized_queue(InMemoryStorage(clock=clock), clock=clock).config
    assert (throughput.enable_prefetch, throughput.buffer_size, throughput.max_candidates_to_evaluate) == (
        True,
        200,
        50,
    )
    plain = create_llm_queue_dispatcher(InMemoryStorage(clock=clock)).config
    assert (plain.enable_prefetch, plain.buffer_size, plain.max_candidates_to_evaluate) == (False, 50, 20)


async def test_explicit_config_and_overrides_win_over_presets(clock: ManualClock) -> None:
    mine = ScoringWeights(0.1, 0.2, 0.3, 0.1, 0.2, 0.1)
    dispatcher = create_simple_priority_queue(
        InMemoryStorage(clock=clock),
        LLMQueueDispatcherConfig(clock=clock, scoring=ScoringConfig(weights=mine)),
    )
    assert await observed_weights(dispatcher, clock) == pytest.approx(mine.as_tuple(), abs=1e-12)
    prefetching = create_prefetching_queue(InMemoryStorage(clock=clock), clock=clock, buffer_size=7)
    assert (prefetching.config.buffer_size, prefetching.config.enable_prefetch) == (7, True)
    throughput = create_throughput_optimized_queue(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock, max_candidates_to_evaluate=5)
    )
    assert throughput.config.max_candidates_to_evaluate == 5


def test_overrides_win_over_config_and_leave_it_untouched(clock: ManualClock) -> None:
    config = LLMQueueDispatcherConfig(clock=clock, buffer_size=10, visibility_timeout=60.0)
    dispatcher = create_llm_queue_dispatcher(InMemoryStorage(clock=clock), config, buffer_size=20)
    assert dispatcher.config.buffer_size == 20
    assert dispatcher.config.visibility_timeout == 60.0
    assert config.buffer_size == 10
    in_memory = create_in_memory_queue(config, min_score_threshold=0.0)
    assert in_memory.config.min_score_threshold == 0.0
    assert in_memory.config.buffer_size == 10


async def test_in_memory_factory_store_shares_the_config_clock(clock: ManualClock) -> None:
    dispatcher = create_in_memory_queue(LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0))
    message = await dispatcher.enqueue(request("a"))
    assert message.attributes.enqueued_at.timestamp() == clock.now()
    limiter = throttle(clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.attributes.first_received_at == datetime.fromtimestamp(clock.now(), timezone.utc)
    clock.advance(29.5)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(1.0)  # only the manual clock moved: the lease ran out on it
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2


async def test_in_memory_factory_accepts_a_plain_callable_clock() -> None:
    now = [1_700_000_000.0]
    dispatcher = create_in_memory_queue(clock=lambda: now[0])
    message = await dispatcher.enqueue(request("a"))
    assert message.attributes.enqueued_at.timestamp() == 1_700_000_000.0
    now[0] += 42.0
    q = (await dispatcher.get_queue_metrics()).queue
    assert q.oldest_message_age == pytest.approx(42.0)
