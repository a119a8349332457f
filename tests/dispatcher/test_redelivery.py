"""Deliveries are tracked by delivery, not by request id.

A message whose lease ran out and that was received again is a second delivery of the same
request id. The dispatcher tracks both; a stale mark of the first raises `ReceiptHandleError`
after settling its own delivery, and leaves the live one tracked and markable.
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
    ReceiptHandleError,
)
from tests.dispatcher.books import native_limiter, request
from tests.reference.storage import ReferenceStorage

SOURCES = ["memory", "prefetch"]


def make(source: str, clock: ManualClock) -> tuple[QueueStorageAdapter[Any], LLMQueueDispatcher[Any]]:
    storage: QueueStorageAdapter[Any] = (
        InMemoryStorage(clock=clock) if source == "memory" else ReferenceStorage(clock=clock)
    )
    config = LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0, buffer_size=1)
    return storage, LLMQueueDispatcher(storage, config)


async def redelivered(source: str, limiter: Any) -> tuple[LLMQueueDispatcher[Any], Any, Any]:
    """A dispatcher, the first (stale) delivery of "a" and its second (live) delivery."""
    clock = ManualClock(1_000.0)
    _, dispatcher = make(source, clock)
    await dispatcher.enqueue(request("a", 100))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    clock.advance(31.0)  # its lease ran out: "a" is visible again
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    assert second.message.payload.id == "a"
    assert second.message.attributes.receive_count == 2
    return dispatcher, first, second


@pytest.mark.parametrize("mark", ["processed", "failed", "dead_lettered"])
@pytest.mark.parametrize("source", SOURCES)
async def test_a_stale_mark_leaves_the_live_delivery_tracked(source: str, mark: str) -> None:
    """Both deliveries are tracked; a stale mark of the first raises
    `ReceiptHandleError` (processed, dead-lettered) or settles quietly (failed: the message is
    already back in the queue), and the live delivery stays tracked and is marked normally."""
    dispatcher, first, second = await redelivered(source, native_limiter(ManualClock()))
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 2
    if mark == "processed":
        with pytest.raises(ReceiptHandleError):
            await first.mark_as_processed(actual_tokens=80)
    elif mark == "dead_lettered":
        with pytest.raises(ReceiptHandleError):
            await first.mark_as_dead_lettered(RuntimeError("x"))
    else:
        await first.mark_as_failed(RuntimeError("x"))
    assert first.settled
    with pytest.raises(MessageStateError):
        await first.mark_as_processed()
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 1
    [detail] = metrics.processing.in_flight_details
    assert detail.request_id == "a"
    assert detail.started_at == second.dispatched_at
    assert metrics.queue.approximate_number_of_messages_in_flight == 1
    await second.mark_as_processed(actual_tokens=120)
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.queue.total_messages == 0
