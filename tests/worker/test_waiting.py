"""Worker: an idle worker sleeps in the dispatcher and wakes when there is work."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ProcessableMessage,
    TokenInfo,
    Worker,
    create_in_memory_queue,
)
from tests.worker.support import fill, noop, roomy_limiter


async def test_idle_worker_sleeps_instead_of_polling() -> None:
    class Counting(LLMQueueDispatcher[Any]):
        calls = 0

        async def dequeue(self, rate_limiter: Any, *, timeout: float | None = None) -> Any:
            Counting.calls += 1
            return await super().dequeue(rate_limiter, timeout=timeout)

    dispatcher = Counting(InMemoryStorage())
    # The budget is spent: one request per minute, already taken.
    limiter = LLMThrottle(1, 1_000_000)
    assert limiter.consume("earlier", 1)
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, limiter, noop)
    run = asyncio.ensure_future(worker.run())
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert Counting.calls == 1
    assert time.process_time() - cpu < 0.2
    # An empty queue: the same.
    Counting.calls = 0
    await dispatcher.purge()
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.3)
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert Counting.calls == 1


async def test_a_new_message_wakes_an_idle_worker_at_once() -> None:
    dispatcher = create_in_memory_queue()
    done = asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> int:
        done.set()
        return 1

    worker = Worker(dispatcher, roomy_limiter(), handle)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    await fill(dispatcher, 1)
    await asyncio.wait_for(done.wait(), 2)
    assert time.monotonic() - begun < 0.5  # woken by the enqueue, not by the 30 s idle timeout
    worker.stop()
    await asyncio.wait_for(run, 5)


async def test_a_worker_stopping_when_empty_returns_with_only_an_unfittable_request_left() -> None:
    """A request larger than the limiter can ever grant is never dispatched: a run meant to end
    with its work ends, and leaves it queued for `take_unfittable`."""
    limiter = LLMThrottle(600, 1_000)
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    async with create_in_memory_queue() as dispatcher:
        await dispatcher.enqueue(LLMRequest("too-big", None, token_info=TokenInfo(5_000)))
        await dispatcher.enqueue(LLMRequest("fits", None, token_info=TokenInfo(10)))
        worker = Worker(dispatcher, limiter, handle)
        stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5.0)
        assert handled == ["fits"]
        assert stats.processed == 1
        [left] = await dispatcher.take_unfittable(limiter)
        assert left.payload.id == "too-big"
