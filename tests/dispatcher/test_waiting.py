"""`dequeue(timeout=...)`: returns at once without a timeout, wakes on enqueue, a mark, a refill or
a visibility expiry, without busy polling."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from llm_queue_dispatcher import InvalidRequestError, LLMThrottle, ManualClock, create_in_memory_queue
from tests.dispatcher.support import CountingLimiter, queue, request, throttle


async def test_dequeue_without_timeout_returns_at_once(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=1_000)
    started = time.perf_counter()
    assert await dispatcher.dequeue(limiter) is None
    assert limiter.consume("drain", 1_000)
    await dispatcher.enqueue(request("a", tokens=500))  # needs 30 s of refill
    assert await dispatcher.dequeue(limiter, timeout=None) is None
    assert time.perf_counter() - started < 0.05


async def test_dequeue_timeout_returns_none_when_it_runs_out() -> None:
    dispatcher = create_in_memory_queue()
    started = time.perf_counter()
    assert await dispatcher.dequeue(LLMThrottle(600, 100_000), timeout=0.05) is None
    elapsed = time.perf_counter() - started
    assert 0.04 <= elapsed < 0.5


async def test_dequeue_timeout_wakes_on_enqueue(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    started = time.perf_counter()
    waiter = asyncio.create_task(dispatcher.dequeue(limiter, timeout=5.0))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await dispatcher.enqueue(request("a"))
    job = await asyncio.wait_for(waiter, 1.0)
    assert job is not None
    assert job.message.payload.id == "a"
    assert time.perf_counter() - started < 0.5


async def test_dequeue_timeout_wakes_on_a_mark(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    started = time.perf_counter()
    waiter = asyncio.create_task(dispatcher.dequeue(limiter, timeout=5.0))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await job.mark_as_failed(RuntimeError("retry"))
    again = await asyncio.wait_for(waiter, 1.0)
    assert again is not None
    assert again.message.attributes.receive_count == 2
    assert time.perf_counter() - started < 0.5


async def test_dequeue_timeout_wakes_on_refill_without_busy_polling() -> None:
    dispatcher = create_in_memory_queue()
    inner = LLMThrottle(6_000, 60_000)  # 1,000 tokens per second, system monotonic clock
    assert inner.consume("drain", 60_000)
    limiter = CountingLimiter(inner)
    await dispatcher.enqueue(request("a", tokens=150))  # fits after 0.15 s of refill
    started = time.perf_counter()
    job = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert job is not None
    assert job.message.payload.id == "a"
    assert 0.1 <= elapsed < 0.6
    assert sum(limiter.calls.values()) < 20, limiter.calls


async def test_dequeue_timeout_wakes_on_refill_with_the_native_limiter() -> None:
    dispatcher = create_in_memory_queue()
    limiter = LLMThrottle(6_000, 60_000)
    assert limiter.consume("drain", 60_000)
    await dispatcher.enqueue(request("a", tokens=150))
    started = time.perf_counter()
    job = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert job is not None
    assert 0.1 <= elapsed < 0.6


async def test_dequeue_timeout_wakes_on_visibility_expiry_without_busy_polling() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=0.15)
    limiter = CountingLimiter(LLMThrottle(600, 100_000))
    await dispatcher.enqueue(request("a"))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    limiter.calls.clear()
    started = time.perf_counter()
    again = await dispatcher.dequeue(limiter, timeout=2.0)
    elapsed = time.perf_counter() - started
    assert again is not None
    assert again.message.attributes.receive_count == 2
    assert 0.1 <= elapsed < 0.6
    assert sum(limiter.calls.values()) < 20, limiter.calls


@pytest.mark.parametrize("timeout", [-1.0, math.nan, "soon"])
async def test_dequeue_rejects_a_bad_timeout(clock: ManualClock, timeout: Any) -> None:
    with pytest.raises(InvalidRequestError):
        await queue(clock).dequeue(throttle(clock), timeout=timeout)
