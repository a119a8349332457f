"""`Worker` given a plain (not async) function as its handler calls it again and again, for
ever without ``max_receive_count`` (`python/llm_queue_dispatcher/worker.py`).

The worker awaits the handler's result; an int cannot be awaited, so every call ends in a
`TypeError`, which the worker retries with backoff like any failure (logged at INFO only). The
function ran each time: whatever it sent, it sends again. `Worker` checks only ``callable``
at construction. Expected (the contract is silent; what `submit`'s own pool now does): a
handler whose result is not awaitable is a permanent failure at its first call (the message
dead-lettered, the function not called again), or refused at construction where that can be
told.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm_queue_dispatcher import LLMRequest, LLMThrottle, Worker, create_in_memory_queue


@pytest.mark.xfail(strict=True, reason="a handler that is not async is retried for ever")
async def test_a_plain_function_handler_is_not_called_again_and_again() -> None:
    calls: list[str] = []

    def handle(job: Any) -> int:
        calls.append(job.message.payload.id)
        return 5

    async with create_in_memory_queue() as dispatcher:
        await dispatcher.enqueue(LLMRequest("a", None))
        worker = Worker(
            dispatcher, LLMThrottle(6_000, 1_000_000), handle, retry_base_delay=0.01, max_retry_delay=0.01
        )
        running = asyncio.create_task(worker.run(stop_when_empty=True))
        done, _ = await asyncio.wait({running}, timeout=1.0)
        if not done:
            worker.stop()
            await running
        assert calls == ["a"]
        assert worker.stats.dead_lettered == 1
