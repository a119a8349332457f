"""The dispatcher's lifecycle: `purge`, `close`, `async with dispatcher`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    QueueStorageAdapter,
)
from tests.dispatcher.books import native_limiter
from tests.dispatcher.books import request as sized_request
from tests.dispatcher.support import counts, queue, request, throttle
from tests.reference.storage import ReferenceStorage


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


def dispatchers(clock: ManualClock) -> dict[str, LLMQueueDispatcher[Any]]:
    memory: QueueStorageAdapter[Any] = InMemoryStorage(clock=clock)
    reference: QueueStorageAdapter[Any] = ReferenceStorage(clock=clock)
    return {
        "memory": LLMQueueDispatcher(memory, LLMQueueDispatcherConfig(clock=clock)),
        "prefetch": LLMQueueDispatcher(
            reference, LLMQueueDispatcherConfig(clock=clock, enable_prefetch=True, prefetch_interval=0.01)
        ),
    }


@pytest.mark.parametrize("source", ["memory", "prefetch"])
def test_a_dispatcher_serves_a_second_event_loop(source: str) -> None:
    """The same dispatcher used in two `asyncio.run()` calls one after the other:
    enqueue, dequeue, a timed-out wait, and a wait woken by an enqueue all work in both."""
    clock = ManualClock(1_000.0)
    dispatcher = dispatchers(clock)[source]
    limiter: LLMThrottle = native_limiter(ManualClock())

    async def one_run(tag: str) -> list[str]:
        await dispatcher.enqueue(sized_request(f"{tag}-1"))
        first = await dispatcher.dequeue(limiter, timeout=1.0)
        assert first is not None
        await first.mark_as_processed()
        assert await dispatcher.dequeue(limiter, timeout=0.02) is None  # waits, times out
        waiting = asyncio.ensure_future(dispatcher.dequeue(limiter, timeout=5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await dispatcher.enqueue(sized_request(f"{tag}-2"))
        second = await waiting  # woken by the enqueue
        assert second is not None
        await second.mark_as_processed()
        return [first.message.payload.id, second.message.payload.id]

    assert asyncio.run(one_run("first")) == ["first-1", "first-2"]
    assert asyncio.run(one_run("second")) == ["second-1", "second-2"]
    dispatcher.stop()
