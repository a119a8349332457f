"""A dead-letter store that already holds a request id keeps the second copy
(it used to be counted as dead-lettered and stored nowhere). The storage contract's side is in
tests/conformance/test_dead_letter_copies.py; here the dispatcher's paths."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    QueueStorageAdapter,
)
from tests.dispatcher.books import native_limiter, request
from tests.reference.storage import ReferenceStorage


def stores(source: str, clock: ManualClock) -> tuple[QueueStorageAdapter[Any], QueueStorageAdapter[Any]]:
    if source == "memory":
        dead: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
        return dead, InMemoryStorage(clock=clock, max_receive_count=2, dead_letter=dead)
    reference_dead: ReferenceStorage[Any] = ReferenceStorage(clock=clock)
    return reference_dead, ReferenceStorage(clock=clock, max_receive_count=2, dead_letter=reference_dead)


@pytest.mark.parametrize("source", ["memory", "prefetch"])
async def test_every_dead_lettered_copy_is_kept(source: str) -> None:
    """The same request id dead-lettered three times — twice by a handler's
    `mark_as_dead_lettered`, once by the receive-count rule — leaves three copies in the
    dead-letter store, each counted once."""
    clock = ManualClock(1_000.0)
    dead, storage = stores(source, clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, visibility_timeout=10.0, buffer_size=1)
    )
    limiter = native_limiter(ManualClock())
    for _ in range(2):
        await dispatcher.enqueue(request("a"))
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_dead_lettered(RuntimeError("permanent"))
    await dispatcher.enqueue(request("a"))
    for _ in range(2):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_failed(RuntimeError("transient"))
    clock.advance(1.0)
    assert await dispatcher.dequeue(limiter) is None  # the second failure dead-lettered it
    assert (await storage.get_queue_attributes()).dead_lettered == 3
    copies = await dead.peek_messages_by_priority(2, 10)
    assert [m.payload.id for m in copies] == ["a", "a", "a"]
    assert len({m.id for m in copies}) == 3
