"""The dispatcher's lifecycle: `purge`, `close`, `async with dispatcher`."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import InMemoryStorage, LLMQueueDispatcher, LLMQueueDispatcherConfig, ManualClock
from tests.dispatcher.support import counts, queue, request, throttle


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
