"""A stopping `Worker` gives back what no handler finished without using up a receive: the
messages its cancelled handlers held, a job whose handler never started, and the messages leased
ahead into the dispatcher's buffer. So with ``max_receive_count=1`` a worker stopped and started
again any number of times dead-letters nothing a handler did not finish."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    Priority,
    ProcessableMessage,
    TokenInfo,
    Worker,
)

MESSAGES = 12


class ExternalStore(InMemoryStorage[Any]):
    """An `InMemoryStorage` the dispatcher treats as another store (a prefetch buffer)."""


@pytest.mark.parametrize("store", ["memory", "prefetch"])
async def test_a_worker_stopped_and_restarted_many_times_dead_letters_nothing_unfinished(store: str) -> None:
    rng = random.Random(7)
    dead: InMemoryStorage[Any] = InMemoryStorage()
    kind = InMemoryStorage if store == "memory" else ExternalStore
    storage: InMemoryStorage[Any] = kind(max_receive_count=1, dead_letter=dead)
    config = LLMQueueDispatcherConfig(visibility_timeout=600.0, buffer_size=5)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    for i in range(MESSAGES):
        await dispatcher.enqueue(LLMRequest(f"r{i}", None, Priority.NORMAL, TokenInfo(10)))
    limiter = LLMThrottle(1e9, 1e12)
    finished: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> int | None:
        # Every fifth handler finishes; the others are still working when the worker stops.
        if rng.random() < 0.2:
            finished.append(job.message.payload.id)
            return 1
        await asyncio.sleep(60)
        return 1

    for _ in range(25):
        worker = Worker(dispatcher, limiter, handle, concurrency=3, shutdown_grace=0.0, handle_signals=False)
        run = asyncio.ensure_future(worker.run())
        for _ in range(rng.randrange(4)):  # stops at every stage: before, during, after hand-outs
            await asyncio.sleep(0)
        worker.stop()
        await asyncio.wait_for(run, 10)
    attributes = await storage.get_queue_attributes()
    assert attributes.dead_lettered == 0
    assert await dead.get_approximate_message_count() == 0
    # Whatever no handler finished is back, visible, its stopped receives undone.
    visible = [m for p in range(4) for m in await storage.peek_messages_by_priority(p, 100)]
    assert sorted(m.payload.id for m in visible) == sorted(
        f"r{i}" for i in range(MESSAGES) if f"r{i}" not in finished
    )
    assert {m.attributes.receive_count for m in visible} <= {0}
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert limiter.get_metrics().consumption_history.count == len(finished)


async def test_a_job_whose_handler_never_started_is_given_back() -> None:
    """The stop cancels a handler's task before its first step (its handler never ran, so no
    handler code can release the message): the worker gives it back itself."""
    storage: InMemoryStorage[Any] = InMemoryStorage(max_receive_count=1)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    await dispatcher.enqueue(LLMRequest("a", None, Priority.NORMAL, TokenInfo(10)))
    started: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> int | None:
        started.append(job.message.payload.id)
        return None

    worker = Worker(dispatcher, LLMThrottle(1e9, 1e12), handle, shutdown_grace=0.0, handle_signals=False)
    loop = asyncio.get_running_loop()
    original = loop.create_task

    def create_task(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = original(coro, **kwargs)
        if kwargs.get("name", "").startswith("llmqd-job-"):
            worker.stop()
            # Cancelled before its first step: the coroutine never runs.
            task.cancel()
        return task

    loop.create_task = create_task  # type: ignore[method-assign]
    try:
        stats = await asyncio.wait_for(worker.run(), 10)
    finally:
        loop.create_task = original  # type: ignore[method-assign]
    assert started == []
    assert stats.released == 1
    [message] = await storage.peek_messages_by_priority(int(Priority.NORMAL), 10)
    assert message.attributes.receive_count == 0
