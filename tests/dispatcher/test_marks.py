"""Budget reservation and marks: what a dequeue takes from the limiter, mark_as_processed,
mark_as_failed, dead-lettering, update_visibility, `async with job`."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    MessageStateError,
    QueueStorageAdapter,
)
from tests.dispatcher.support import counts, queue, request, throttle
from tests.integer_like import int_likes
from tests.reference.storage import ReferenceStorage


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


@pytest.mark.parametrize("source", ["memory", "prefetch"])
@pytest.mark.parametrize("actual", [None, 700])
async def test_a_mark_ends_the_time_in_flight_of_a_max_concurrent_limiter(
    clock: ManualClock, source: str, actual: int | None
) -> None:
    """With ``LLMThrottle(max_concurrent=1)``, marking a job processed frees its slot of
    requests in flight at once, with an actual count or without one (the estimate stays)."""
    storage: QueueStorageAdapter[Any] = (
        InMemoryStorage(clock=clock) if source == "memory" else ReferenceStorage(clock=clock)
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=4)
    )
    limiter = LLMThrottle(600, 1_000_000, max_concurrent=1, clock=clock)
    await dispatcher.batch_enqueue([request("a", tokens=1_000), request("b", tokens=1_000)])
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert await dispatcher.dequeue(limiter) is None  # one in flight: the slot is taken
    await first.mark_as_processed(actual_tokens=actual)
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    assert limiter.get_metrics().consumption_history.total_tokens == (actual or 1_000) + 1_000


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


@pytest.mark.parametrize("seconds", int_likes(5), ids=lambda v: type(v).__name__)
async def test_integer_like_delays_are_valid_for_mark_as_failed_and_update_visibility(
    clock: ManualClock, seconds: object
) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.update_visibility(seconds)  # type: ignore[arg-type]
    await job.mark_as_failed(RuntimeError("provider error"), retry_after=seconds)  # type: ignore[arg-type]
    clock.advance(4.9)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(0.2)
    assert await dispatcher.dequeue(limiter) is not None


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


@pytest.mark.parametrize("retry_after", [10**400, math.inf, math.nan, -1.0, 43_200.5, "5", True])
async def test_a_bad_retry_after_is_refused_naming_it_and_the_job_stays_markable(
    clock: ManualClock, retry_after: Any
) -> None:
    """Refused at the mark, with nothing changed: the message stays leased, the reservation
    whole, and the job can still be marked (it is neither lost nor half settled)."""
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_000))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    with pytest.raises(InvalidRequestError, match="retry_after"):
        await job.mark_as_failed(RuntimeError("x"), retry_after=retry_after)
    assert not job.settled
    assert await counts(dispatcher) == (0, 1, 1)
    assert limiter.get_metrics().tpm.used == pytest.approx(1_000.0)
    await job.mark_as_failed(RuntimeError("x"), retry_after=5.0)
    assert job.settled
    assert limiter.get_metrics().tpm.used == pytest.approx(0.0)
