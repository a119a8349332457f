"""`purge()` forgets the deliveries it removed, and marking them afterwards
settles their budget cleanly: a refund for a failure, the actual count for a completion, no
exception for a failure, no phantom in-flight entry.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    MessageStateError,
    QueueStorageAdapter,
)
from tests.dispatcher.books import BookLimiter, Delegating, native_limiter, request
from tests.reference.storage import ReferenceStorage

SOURCES = ["memory", "prefetch"]
LIMITERS = ["native", "python"]


def make(source: str, clock: ManualClock) -> tuple[QueueStorageAdapter[Any], LLMQueueDispatcher[Any]]:
    storage: QueueStorageAdapter[Any] = (
        InMemoryStorage(clock=clock) if source == "memory" else ReferenceStorage(clock=clock)
    )
    return storage, LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=2))


def limiter_of(kind: str) -> Any:
    return native_limiter(ManualClock(), rpm=600, tpm=100_000) if kind == "native" else BookLimiter()


def used(limiter: Any) -> tuple[float, float]:
    """(requests, tokens) the limiter counts as used."""
    metrics = limiter.get_metrics()
    return metrics.rpm.used, metrics.tpm.used


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("source", SOURCES)
async def test_purged_deliveries_leave_the_metrics_and_settle_cleanly(source: str, kind: str) -> None:
    """After a purge, `processing.active_requests` is 0 at once; marking the purged
    jobs afterwards raises nothing, refunds the failed one, counts the actual tokens of the
    processed ones, and leaves no phantom."""
    clock = ManualClock(1_000.0)
    _, dispatcher = make(source, clock)
    limiter = limiter_of(kind)
    await dispatcher.batch_enqueue([request("a", 100), request("b", 200), request("c", 300)])
    jobs = {}
    for _ in range(3):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        jobs[job.message.payload.id] = job
    assert set(jobs) == {"a", "b", "c"}
    assert used(limiter) == (3, 600)
    await dispatcher.purge()
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.processing.in_flight_details == []
    assert (metrics.queue.approximate_number_of_messages, metrics.queue.total_messages) == (0, 0)
    assert used(limiter) == (3, 600)  # the reservations are settled by the marks, not the purge
    await jobs["a"].mark_as_failed(RuntimeError("x"))
    await jobs["b"].mark_as_processed(actual_tokens=150)
    await jobs["c"].mark_as_processed()
    assert used(limiter) == (3, 150 + 300)
    for job in jobs.values():
        assert job.settled
        with pytest.raises(MessageStateError):
            await job.mark_as_processed()
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.queue.total_messages == 0
    # The ids are free again, and the queue works as before.
    await dispatcher.enqueue(request("a", 100))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(actual_tokens=10)
    assert used(limiter) == (4, 150 + 300 + 10)
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


@pytest.mark.parametrize("source", SOURCES)
async def test_a_purged_delivery_never_touches_the_message_enqueued_after(source: str) -> None:
    """The purged job's store operations are skipped, so a new message with the same
    id, enqueued and handed out after the purge, stays in flight with its own job."""
    clock = ManualClock(1_000.0)
    _, dispatcher = make(source, clock)
    limiter = native_limiter(ManualClock())
    await dispatcher.enqueue(request("a", 100))
    old = await dispatcher.dequeue(limiter)
    assert old is not None
    await dispatcher.purge()
    await dispatcher.enqueue(request("a", 100))
    new = await dispatcher.dequeue(limiter)
    assert new is not None
    await old.mark_as_failed(RuntimeError("x"))
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 1
    assert metrics.queue.approximate_number_of_messages_in_flight == 1
    assert metrics.queue.approximate_number_of_messages == 0
    await new.mark_as_processed()
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


@pytest.mark.parametrize("mark", ["processed", "failed", "dead_lettered"])
async def test_a_mark_after_a_purge_leaves_no_coroutine_unawaited(mark: str) -> None:
    """Marking a purged delivery awaits (or never creates) its store call."""
    dispatcher: LLMQueueDispatcher[object] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock(1_000.0)))
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(native_limiter(ManualClock()))
    assert job is not None
    await dispatcher.purge()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mark == "processed":
            await job.mark_as_processed()
        elif mark == "failed":
            await job.mark_as_failed(RuntimeError("x"))
        else:
            await job.mark_as_dead_lettered(RuntimeError("x"))
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_purge_over_a_store_whose_purge_leaves_in_flight_messages() -> None:
    """The adapter's default purge leaves in-flight messages: the dispatcher deletes the ones it
    leased (buffered and handed out), so nothing comes back after the leases run out."""
    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        Delegating(inner), LLMQueueDispatcherConfig(clock=clock, buffer_size=5)
    )
    limiter = LLMThrottle(600, 100_000, clock=clock)
    for i in range(3):
        await dispatcher.enqueue(request(str(i)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await dispatcher.purge()
    await job.mark_as_processed()
    clock.advance(31)
    assert await inner.get_approximate_message_count() == 0
    assert (await inner.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    assert await dispatcher.dequeue(limiter) is None
    await dispatcher.close()


async def test_a_mark_made_while_the_store_is_purged_settles_its_budget_only() -> None:
    class SlowPurge(Delegating):
        async def purge(self) -> None:
            await asyncio.sleep(0.2)
            await self.inner.purge()

    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        SlowPurge(inner), LLMQueueDispatcherConfig(clock=clock)
    )
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher.enqueue(request("a"))
    await dispatcher.enqueue(request("b"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    purge = asyncio.ensure_future(dispatcher.purge())
    await asyncio.sleep(0.1)  # the purge deleted the handed-out message and purges the store
    await job.mark_as_processed(actual_tokens=40)  # no ReceiptHandleError: settled, budget only
    await purge
    assert job.settled
    assert limiter.get_metrics().tpm.used == 40
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert await inner.get_approximate_message_count() == 0
    await dispatcher.close()
