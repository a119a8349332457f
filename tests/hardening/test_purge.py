"""Issue 9, defect 5: `purge()` forgets the deliveries it removed, and marking them afterwards
settles their budget cleanly: a refund for a failure, the actual count for a completion, no
exception for a failure, no phantom in-flight entry.
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    MessageStateError,
    QueueStorageAdapter,
)
from tests.hardening.support import BookLimiter, native_limiter, request
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
    """Defect 5: after a purge, `processing.active_requests` is 0 at once; marking the purged
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
    """Defect 5: the purged job's store operations are skipped, so a new message with the same
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
