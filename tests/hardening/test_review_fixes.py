"""Defects found by the review of issues 9-13, each with its test: buffered leases kept alive
whatever the prefetch setting; a cancelled mark still settles its delivery; a dequeue cancelled
while an asynchronous limiter's consume is on its way gives the reservation back; `purge()` over
a store whose purge leaves in-flight messages; a `dequeue(timeout)` whose clocks disagree
yields to the event loop instead of spinning it."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageAttributes,
    Priority,
    QueueMessage,
    StorageError,
    TokenInfo,
    create_in_memory_queue,
)
from llm_queue_dispatcher.storage import QueueStorageAdapter
from tests.hardening.support import AsyncThrottleWithRelease


class Delegating(QueueStorageAdapter[Any]):
    """An external store with only the six required methods (the adapter's defaults for the
    rest: its purge leaves in-flight messages), over an `InMemoryStorage`."""

    def __init__(self, inner: InMemoryStorage[Any]) -> None:
        self.inner = inner

    async def enqueue(self, request: LLMRequest[Any]) -> QueueMessage[Any]:
        return await self.inner.enqueue(request)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        return await self.inner.dequeue(limit, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        await self.inner.delete_message(receipt_handle)

    async def update_visibility_timeout(self, receipt_handle: str, seconds: float) -> None:
        await self.inner.update_visibility_timeout(receipt_handle, seconds)

    async def get_approximate_message_count(self) -> int:
        return await self.inner.get_approximate_message_count()

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[Any]]:
        return await self.inner.peek_messages_by_priority(priority, limit)


class SlowReplyLimiter(AsyncThrottleWithRelease):
    """An asynchronous limiter whose consume takes effect at once and answers 50 ms later (a
    round trip to a shared limiter)."""

    consume_latency = 0.05


class SlowCorrection(SlowReplyLimiter):
    """An asynchronous limiter whose corrections answer 5 ms later."""

    async def consume(self, request_id: str, tokens: int, metadata: Any = None) -> bool:
        return self.inner.consume(request_id, tokens, metadata)

    async def adjust_consumption(self, request_id: str, tokens: int) -> None:
        self.inner.adjust_consumption(request_id, tokens)
        await asyncio.sleep(0.005)


def request(name: str, tokens: int = 100) -> LLMRequest[Any]:
    return LLMRequest(name, {"n": name}, Priority.NORMAL, TokenInfo(tokens))


@pytest.mark.parametrize("enable_prefetch", [False, True])
async def test_buffered_messages_keep_their_leases_while_a_slow_consumer_works(enable_prefetch: bool) -> None:
    """A consumer taking 20 s a message, a 30 s visibility and a buffer holding all five: each is
    handed out once with receive count 1, none is dead-lettered (``max_receive_count=2``), and
    the buffer never holds two copies of one message."""
    clock = ManualClock(1_000.0)
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock, max_receive_count=2, dead_letter=dead)
    config = LLMQueueDispatcherConfig(clock=clock, buffer_size=10, enable_prefetch=enable_prefetch)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(Delegating(inner), config)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    for i in range(5):
        await dispatcher.enqueue(request(str(i)))
    delivered = []
    for _ in range(8):
        job = await dispatcher.dequeue(limiter)
        if job is not None:
            delivered.append((job.message.payload.id, job.message.attributes.receive_count))
            clock.advance(20)
            await job.mark_as_processed()
        else:
            clock.advance(40)
        await asyncio.sleep(0)
        buffered = dispatcher._core.ids_above(-1.0)  # every buffered request id
        assert len(buffered) == len(set(buffered))
    await dispatcher.close()
    assert delivered == [(str(i), 1) for i in range(5)]
    assert await dead.get_approximate_message_count() == 0


@pytest.mark.parametrize("mark", ["processed", "failed", "dead_lettered"])
async def test_a_mark_cancelled_at_the_limiter_correction_still_settles(mark: str) -> None:
    throttle = LLMThrottle(600, 100_000, clock=ManualClock(1_000.0))  # no refill hides a leak
    limiter = SlowCorrection(throttle)
    dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue()
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    if mark == "processed":
        task = asyncio.ensure_future(job.mark_as_processed(actual_tokens=50))
    elif mark == "failed":
        task = asyncio.ensure_future(job.mark_as_failed(RuntimeError("x")))
    else:
        task = asyncio.ensure_future(job.mark_as_dead_lettered(RuntimeError("x")))
    await asyncio.sleep(0)  # the mark runs up to the shielded limiter call
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)  # the shielded correction completes
    assert job.settled
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    if mark == "processed":
        assert throttle.get_metrics().tpm.used == 50
        assert metrics.queue.total_messages == 0
    else:
        assert throttle.get_metrics().tpm.used == 0
        assert metrics.queue.failed == 1 or mark == "dead_lettered"


async def test_a_failed_mark_cancelled_still_wakes_a_waiting_dequeue() -> None:
    limiter = LLMThrottle(600, 100_000)
    dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue()
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    waiting = asyncio.ensure_future(dispatcher.dequeue(limiter, timeout=10.0))
    await asyncio.sleep(0.01)
    mark = asyncio.ensure_future(job.mark_as_failed(RuntimeError("x")))
    await asyncio.sleep(0)
    mark.cancel()
    started = time.monotonic()
    again = await waiting
    assert again is not None
    assert again.message.payload.id == "a"
    assert time.monotonic() - started < 5.0


async def test_a_dequeue_cancelled_while_the_limiter_answers_gives_the_reservation_back() -> None:
    inner = LLMThrottle(600, 10_000, clock=ManualClock(1_000.0))  # no refill hides a leak
    dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue()
    await dispatcher.enqueue(request("a", 1_000))
    task = asyncio.ensure_future(dispatcher.dequeue(SlowReplyLimiter(inner)))
    await asyncio.sleep(0.01)  # the consume took effect; its answer is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the answer arrives; the reservation is given back
    metrics = inner.get_metrics()
    assert metrics.tpm.used == 0
    assert metrics.rpm.used == 0
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1


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


async def test_a_waiting_dequeue_never_freezes_the_event_loop() -> None:
    """The store on a ManualClock, the dispatcher on the wall clock (a misconfiguration): the
    in-flight message's visibility end is long past by the dispatcher's reckoning, so each wait
    is worked out as 0. The dequeue must still yield: a 100 ms ticker keeps running."""
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock(1_000.0)))
    limiter = LLMThrottle(600, 100_000)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is not None
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.1)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    assert await dispatcher.dequeue(limiter, timeout=1.0) is None
    ticking.cancel()
    assert ticks >= 5


async def test_after_release_buffered_the_buffer_is_renewed_again() -> None:
    """`release_buffered` (what a stopping Worker calls) halts the background renewal only
    until the next dequeue: a buffer filled again keeps its leases under a slow consumer."""
    inner: InMemoryStorage[Any] = InMemoryStorage()
    config = LLMQueueDispatcherConfig(visibility_timeout=1.0, buffer_size=10)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(Delegating(inner), config)
    limiter = LLMThrottle(60_000, 10_000_000)
    for i in range(5):
        await dispatcher.enqueue(request(str(i)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_failed(RuntimeError("x"))  # visible again at once
    await dispatcher.release_buffered()
    assert (await inner.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    job = await dispatcher.dequeue(limiter)  # fills the buffer again
    assert job is not None
    await job.update_visibility(600.0)  # the handed-out one is its consumer's to extend
    await asyncio.sleep(2.5)  # a slow call: the buffered leases (1 s) must be renewed meanwhile
    attributes = await inner.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 5
    await job.mark_as_processed()
    await dispatcher.close()
    assert (await inner.get_queue_attributes()).approximate_number_of_messages == 4


def test_the_buffer_keeps_the_later_delivery_of_a_request() -> None:
    core = LLMQueueDispatcher(Delegating(InMemoryStorage()))._core

    def delivery(count: int) -> QueueMessage[Any]:
        attributes = MessageAttributes(
            message_id="m",
            receipt_handle=f"h{count}",
            enqueued_at=datetime.now(timezone.utc),
            receive_count=count,
            first_received_at=datetime.now(timezone.utc),
        )
        return QueueMessage("m", request("a"), attributes)

    assert core.buffer_insert([delivery(2)]) == []
    assert core.buffer_insert([delivery(1)]) == ["h1"]  # an older one coming back is not kept
    assert core.buffer_handles() == ["h2"]
    assert core.buffer_insert([delivery(3)]) == ["h2"]
    assert core.buffer_handles() == ["h3"]


class RenewalFails(Delegating):
    """Renewing the lease of request "stuck" fails with the store's error."""

    def __init__(self, inner: InMemoryStorage[Any]) -> None:
        super().__init__(inner)
        self.stuck: set[str] = set()

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        messages = await super().dequeue(limit, visibility_timeout)
        self.stuck |= {m.attributes.receipt_handle for m in messages if m.payload.id == "stuck"}
        return messages

    async def update_visibility_timeout(self, receipt_handle: str, seconds: float) -> None:
        if receipt_handle in self.stuck and seconds > 0:
            raise StorageError("lease renewal refused")
        await super().update_visibility_timeout(receipt_handle, seconds)


async def test_a_failing_renewal_of_another_buffered_message_does_not_fail_the_dequeue() -> None:
    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    store = RenewalFails(inner)
    config = LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0, buffer_size=10)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher.enqueue(LLMRequest("stuck", None, Priority.LOW, TokenInfo(10)))
    await dispatcher.enqueue(LLMRequest("first", None, Priority.URGENT, TokenInfo(10)))
    await dispatcher.enqueue(LLMRequest("second", None, Priority.HIGH, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "first"
    await job.mark_as_processed()
    clock.advance(20)  # every buffered lease is due for renewal; "stuck"'s fails
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "second"
    await job.mark_as_processed()
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
