"""Worker: stopping, the grace, cancellation, and what is released when it ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ProcessableMessage,
    Worker,
    create_in_memory_queue,
)
from tests.worker.support import fill, noop, roomy_limiter


async def test_stop_waits_for_running_handlers_within_the_grace() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 3)
    started = 0

    async def handle(job: ProcessableMessage[Any]) -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(0.3)
        return 1

    worker = Worker(dispatcher, roomy_limiter(), handle, concurrency=2, shutdown_grace=5.0)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert time.monotonic() - begun < 1.0
    assert started == 2  # no new dequeue after stop
    assert (stats.processed, stats.released) == (2, 0)
    queue = (await dispatcher.get_queue_metrics()).queue
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (1, 0)


async def test_past_the_grace_handlers_are_cancelled_and_their_messages_released_at_once() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 2, tokens=500)
    cancelled = 0

    async def stuck(job: ProcessableMessage[Any]) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return 1

    limiter = LLMThrottle(60_000, 1_000_000)
    worker = Worker(dispatcher, limiter, stuck, concurrency=2, shutdown_grace=0.2)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert 0.2 <= time.monotonic() - begun < 1.0
    assert cancelled == 2
    assert stats.released == 2
    # Reservations released whole: their requests too, not only their tokens.
    assert limiter.get_metrics().consumption_history.total_tokens == 0
    assert limiter.get_metrics().consumption_history.count == 0
    # Visible at once for the next worker, the stopped receive undone: this is their first.
    again = [await dispatcher.dequeue(limiter) for _ in range(2)]
    assert sorted(job.message.payload.id for job in again if job) == ["r0", "r1"]
    assert {job.message.attributes.receive_count for job in again if job} == {1}


async def test_a_handler_that_swallows_cancellation_still_has_its_message_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("llm_queue_dispatcher.worker._CANCEL_WAIT", 0.1)
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 1)
    release_it = asyncio.Event()

    async def stubborn(job: ProcessableMessage[Any]) -> int:
        while not release_it.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await release_it.wait()
        return 1

    worker = Worker(dispatcher, roomy_limiter(), stubborn, shutdown_grace=0.05)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.05)
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert stats.released == 1
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1
    release_it.set()
    await asyncio.sleep(0.05)  # its late mark finds the message already released
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1


async def test_cancelling_run_releases_everything_it_held() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 5, tokens=1_000)

    async def slow(job: ProcessableMessage[Any]) -> int:
        await asyncio.sleep(60)
        return 1

    limiter = LLMThrottle(60_000, 1_000_000)
    worker = Worker(dispatcher, limiter, slow, concurrency=3, shutdown_grace=30.0)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    assert worker.stats.in_flight == 3
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert worker.stats.released == 3
    assert not worker.running
    queue = (await dispatcher.get_queue_metrics()).queue
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (5, 0)
    assert limiter.get_metrics().consumption_history.total_tokens == 0


async def test_stop_before_run_returns_at_once_and_run_twice_is_refused() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, roomy_limiter(), noop)
    worker.stop()
    stats = await asyncio.wait_for(worker.run(), 2)
    assert stats.processed == 0
    run = asyncio.ensure_future(worker.run(stop_when_empty=True))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await worker.run()
    stats = await asyncio.wait_for(run, 5)
    assert stats.processed == 1


async def test_a_failing_dequeue_stops_the_worker_gracefully_and_propagates() -> None:
    def broken(message: Any, context: Any) -> float:
        raise ZeroDivisionError("scorer bug")

    from llm_queue_dispatcher import CustomScorer, ScoringConfig

    dispatcher = create_in_memory_queue(
        scoring=ScoringConfig(custom_scorers=[CustomScorer("bug", 0.1, broken)])
    )
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, roomy_limiter(), noop)
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(worker.run(), 5)
    assert not worker.running


async def test_stop_when_empty_also_notices_a_message_the_store_dead_lettered() -> None:
    dead: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(max_receive_count=1, dead_letter=dead)
    )
    await fill(dispatcher, 1)

    async def failing(job: ProcessableMessage[Any]) -> int:
        raise RuntimeError("always")

    worker = Worker(dispatcher, roomy_limiter(), failing, retry_base_delay=0.01)
    begun = time.monotonic()
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
    assert time.monotonic() - begun < 2.5  # within one idle check after the expiry
    assert stats.retried == 1
    assert (await dead.get_queue_attributes()).approximate_number_of_messages == 1


class ExternalStore(InMemoryStorage[Any]):
    """An `InMemoryStorage` the dispatcher must treat as an external store (leased ahead into
    a prefetch buffer): a subclass is not driven through the in-memory core."""


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_stopping_gives_back_the_messages_leased_ahead_into_the_buffer(how: str) -> None:
    store = ExternalStore()
    config = LLMQueueDispatcherConfig(visibility_timeout=600.0, buffer_size=10, enable_prefetch=True)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    assert dispatcher._prefetch is not None  # the premise: a prefetch buffer
    await fill(dispatcher, 20)
    handled: list[str] = []

    async def slow(job: ProcessableMessage[Any]) -> int | None:
        handled.append(job.message.payload.id)
        await asyncio.sleep(60)
        return None

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, slow, concurrency=2, shutdown_grace=0.0)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.2)
    assert len(handled) == 2
    assert (await store.get_queue_attributes()).approximate_number_of_messages < 18  # leased ahead
    if how == "stop":
        worker.stop()
        await run
    else:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    queue = await store.get_queue_attributes()
    # The two handled ones are released too: all 20 are visible to another worker at once.
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (20, 0)
