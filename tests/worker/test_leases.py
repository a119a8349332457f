"""Worker: a running handler keeps its message leased, and a message delivered again while its
handler runs (the lease ran out while the event loop was blocked) is not handled twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
    RetryableError,
    TokenInfo,
    Worker,
    create_in_memory_queue,
)
from tests.worker.support import fill, roomy_limiter


async def test_a_slow_handler_keeps_its_message_leased() -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=0.2)
    )
    await fill(dispatcher, 1)
    started = asyncio.Event()
    calls = 0

    async def slow(job: ProcessableMessage[Any]) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0.9)  # 4.5 times the visibility
        return 1

    worker = Worker(dispatcher, roomy_limiter(), slow)
    run = asyncio.ensure_future(worker.run())
    await started.wait()
    # A second consumer on the same store (another worker's dispatcher) sees nothing meanwhile.
    other: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    assert await other.dequeue(roomy_limiter(), timeout=0.7) is None
    await asyncio.sleep(0.4)
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert calls == 1
    assert stats.processed == 1


async def test_without_heartbeat_the_message_would_have_been_redelivered() -> None:
    # The control of the test above: the same slow call without a worker loses its lease.
    storage: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=0.2)
    )
    await fill(dispatcher, 1)
    assert await dispatcher.dequeue(roomy_limiter()) is not None
    other: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    assert await other.dequeue(roomy_limiter(), timeout=0.7) is not None


@pytest.mark.parametrize("outcome", ["processed", "failed"])
async def test_a_message_delivered_again_while_its_handler_runs_is_not_handled_twice(
    outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock, visibility_timeout=30.0)
    limiter = LLMThrottle(600, 1_000_000, clock=clock)
    await dispatcher.enqueue(LLMRequest("slow", None, Priority.URGENT, TokenInfo(1_000)))
    calls: Counter[str] = Counter()
    slow_started, proceed = asyncio.Event(), asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> int:
        request_id = job.message.payload.id
        calls[request_id] += 1
        if request_id == "slow":
            slow_started.set()
            # Blocks the event loop past the visibility timeout, as time.sleep(31) would on a
            # real clock: no lease renewal can run meanwhile, so the lease runs out.
            clock.advance(31.0)
            await proceed.wait()
            if outcome == "failed":
                raise RetryableError("provider busy", retry_after=600.0)
        return 800

    worker = Worker(dispatcher, limiter, handle, concurrency=4)
    run = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(slow_started.wait(), 5)
    # Wakes the idle dequeue, which finds "slow" visible again (URGENT: taken first).
    await dispatcher.enqueue(LLMRequest("other", None, Priority.LOW, TokenInfo(800)))
    for _ in range(500):
        if calls["other"] and (worker.stats.redelivered or calls["slow"] > 1):
            break
        await asyncio.sleep(0.01)
    proceed.set()
    worker.stop()  # the running handler finishes within the grace
    stats = await asyncio.wait_for(run, 5)

    assert calls == Counter({"slow": 1, "other": 1})
    assert stats.redelivered == 1
    assert "delivered again" in caplog.text
    metrics = await dispatcher.get_queue_metrics()
    # Nothing left in flight in the dispatcher's books: the earlier delivery was closed too.
    assert metrics.processing.active_requests == 0
    history = limiter.get_metrics().consumption_history
    if outcome == "processed":
        assert (stats.processed, stats.retried) == (2, 0)
        # Deleted through the new delivery's receipt handle: the queue is empty.
        assert metrics.queue.total_messages == 0
        # Two requests served, two reservations kept: the second one of "slow" was given back,
        # the first corrected to the actual count.
        assert (history.count, history.total_tokens) == (2, 1_600)
    else:
        assert (stats.processed, stats.retried) == (1, 1)
        # Both reservations of "slow" went back: the second released, the first refunded.
        assert history.total_tokens == 800
        # Handed back through the new delivery, after its retry_after: not visible before.
        assert metrics.queue.approximate_number_of_messages == 0
        clock.advance(601.0)
        again = await dispatcher.dequeue(limiter)
        assert again is not None
        assert (again.message.payload.id, again.message.attributes.receive_count) == ("slow", 3)
        await again.mark_as_processed()


class _CountingStorage(InMemoryStorage[Any]):
    """Counts the visibility changes of messages whose handler has started (`started`): the
    lease renewals."""

    def __init__(self) -> None:
        super().__init__()
        self.started: set[str] = set()
        self.renewals = 0

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        if receipt_handle in self.started:
            self.renewals += 1
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)


async def test_handlers_that_end_within_half_the_visibility_renew_no_lease() -> None:
    storage = _CountingStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=0.4)
    )
    await fill(dispatcher, 20)

    async def quick(job: ProcessableMessage[Any]) -> int:
        storage.started.add(job.message.attributes.receipt_handle)
        await asyncio.sleep(0.01)
        return 1

    worker = Worker(dispatcher, roomy_limiter(), quick, concurrency=4)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
    assert stats.processed == 20
    assert len(storage.started) == 20
    assert storage.renewals == 0
    await asyncio.sleep(0.3)  # past half the visibility of the last ones: nothing renews them late
    assert storage.renewals == 0


async def test_a_handler_running_past_half_the_visibility_renews_at_each_half() -> None:
    storage = _CountingStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=1.0)
    )
    await fill(dispatcher, 1)

    async def slow(job: ProcessableMessage[Any]) -> int:
        storage.started.add(job.message.attributes.receipt_handle)
        await asyncio.sleep(1.25)  # renewals due at 0.5 and 1.0 s, the next at 1.5
        return 1

    worker = Worker(dispatcher, roomy_limiter(), slow)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
    assert stats.processed == 1
    assert storage.renewals == 2
    await asyncio.sleep(0.5)
    assert storage.renewals == 2  # none after the mark


class _CountingEach(_CountingStorage):
    """Counts the lease renewals of each started message."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed_by: Counter[str] = Counter()

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        if receipt_handle in self.started:
            self.renewed_by[receipt_handle] += 1
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)


async def test_handlers_that_start_together_each_renew_their_lease_at_each_half() -> None:
    """Leases taken within a moment share one timer: each handler running past half the
    visibility still renews its own lease at each half, the others none, and none after the
    mark."""
    storage = _CountingEach()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=1.0)
    )
    await fill(dispatcher, 6)

    async def slow(job: ProcessableMessage[Any]) -> int:
        storage.started.add(job.message.attributes.receipt_handle)
        await asyncio.sleep(1.25 if job.message.payload.id in ("r0", "r2", "r4") else 0.2)
        return 1

    worker = Worker(dispatcher, roomy_limiter(), slow, concurrency=6)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
    assert stats.processed == 6
    assert sorted(storage.renewed_by.values()) == [2, 2, 2]
    await asyncio.sleep(0.5)
    assert sorted(storage.renewed_by.values()) == [2, 2, 2]
