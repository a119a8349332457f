"""A cancelled `dequeue` either raises `CancelledError` having changed
nothing, or its job is handed back; it never returns a job once cancelled, and never leaves a
message leased by nobody or budget reserved for nobody.

A stress test: consumers wait in `dequeue(timeout=...)` while a producer enqueues and a
canceller cancels consumers at random moments (seeded). Over the in-memory store, and over an
external store (the plain-Python reference adapter) through the prefetch buffer. Afterwards every
message is in a job some consumer returned, or visible, or leased by the dispatcher's buffer, and
the limiter holds exactly the returned jobs' reservations. The same runs with a store whose
lease renewal suspends. A mark cancelled on its way still settles its delivery, and a dequeue
cancelled while an asynchronous limiter's consume is on its way gives the reservation back.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    ProcessableMessage,
    create_in_memory_queue,
)
from tests.dispatcher.books import BookLimiter, SlowCorrection, SlowReplyLimiter, native_limiter, request
from tests.reference.storage import RecordingStorage

MESSAGES = 60
CONSUMERS = 120


def make(
    source: str, external: type[RecordingStorage[Any]] = RecordingStorage
) -> tuple[Any, LLMQueueDispatcher[Any]]:
    clock = ManualClock(1_000.0)  # no lease runs out during the test
    storage: Any = InMemoryStorage(clock=clock) if source == "memory" else external(clock)
    config = LLMQueueDispatcherConfig(clock=clock, buffer_size=8, visibility_timeout=300.0)
    return storage, LLMQueueDispatcher(storage, config)


async def stress(
    dispatcher: LLMQueueDispatcher[Any], limiter: Any, rng: random.Random
) -> tuple[list[ProcessableMessage[Any]], int]:
    """Runs producer, consumers and canceller; returns the jobs returned and how many
    consumers were cancelled."""
    consumers: list[asyncio.Task[Any]] = []
    cancelled: set[asyncio.Task[Any]] = set()

    async def produce() -> None:
        for i in range(MESSAGES):
            await dispatcher.enqueue(request(f"m{i}", tokens=1 + rng.randrange(50)))
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)

    async def consume_and_cancel() -> None:
        for _ in range(CONSUMERS):
            consumers.append(
                asyncio.ensure_future(dispatcher.dequeue(limiter, timeout=rng.choice([0.0, 0.001, 0.005])))
            )
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            pending = [task for task in consumers if not task.done() and task not in cancelled]
            if pending and rng.random() < 0.6:
                victim = rng.choice(pending)
                if victim.cancel():
                    cancelled.add(victim)

    await asyncio.gather(produce(), consume_and_cancel())
    await asyncio.wait(consumers)
    jobs = []
    for task in consumers:
        if task in cancelled:
            # A cancellation that was delivered ends the dequeue: no job comes back.
            assert task.cancelled(), f"a cancelled dequeue returned {task.result()!r}"
        else:
            job = task.result()
            if job is not None:
                jobs.append(job)
    return jobs, len(cancelled)


async def assert_books(
    storage: Any, dispatcher: LLMQueueDispatcher[Any], limiter: Any, jobs: list[Any]
) -> None:
    ids = [job.message.payload.id for job in jobs]
    assert len(ids) == len(set(ids)), "a message was handed out twice"
    if isinstance(storage, InMemoryStorage):
        assert storage.core.in_flight_count() == len(jobs)
        storage.core._check_invariants()
    else:
        assert dispatcher._prefetch is not None
        buffered = set(dispatcher._core.buffer_handles())
        held = {job.message.attributes.receipt_handle for job in jobs}
        assert not buffered & held
        for entry in storage.records.values():
            if entry.deadline is not None:  # leased: by a job or by the buffer, never by nobody
                assert entry.handle in held | buffered, entry.request.id
    assert (await dispatcher.get_queue_metrics()).processing.active_requests == len(jobs)
    metrics = limiter.get_metrics()
    assert metrics.rpm.used == pytest.approx(len(jobs))
    assert metrics.tpm.used == pytest.approx(sum(job.message.payload.token_info.estimated for job in jobs))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["native", "python"])
@pytest.mark.parametrize("source", ["memory", "prefetch"])
async def test_cancelled_dequeues_take_nothing(source: str, kind: str, seed: int) -> None:
    """Consumers cancelled at random moments while messages arrive: no cancelled
    dequeue returns a job, every message is owned (a returned job, the store, or the prefetch
    buffer), the budget matches the returned jobs, and every message is eventually processed."""
    rng = random.Random(seed)
    storage, dispatcher = make(source)
    limiter: Any = native_limiter(ManualClock(), rpm=1e9, tpm=1e12) if kind == "native" else BookLimiter()
    jobs, cancelled = await stress(dispatcher, limiter, rng)
    assert cancelled > 0
    await assert_books(storage, dispatcher, limiter, jobs)
    # Nothing was lost: the rest is dispatched and everything completes.
    while (job := await dispatcher.dequeue(limiter)) is not None:
        jobs.append(job)
    assert sorted(job.message.payload.id for job in jobs) == sorted(f"m{i}" for i in range(MESSAGES))
    for job in jobs:
        await job.mark_as_processed()
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    await dispatcher.close()


async def test_a_cancellation_landing_as_a_message_arrives_returns_nothing() -> None:
    """The race itself: the waiter is woken by an enqueue and cancelled in the same
    loop iteration. On Python 3.10/3.11 `asyncio.wait_for` used to swallow such a
    cancellation and the dequeue went on to return a job."""
    storage, dispatcher = make("memory")
    limiter: LLMThrottle = native_limiter(ManualClock())
    for round_ in range(20):
        waiter = asyncio.ensure_future(dispatcher.dequeue(limiter, timeout=5.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiter.done()
        await dispatcher.enqueue(request("arrives"))  # wakes the waiter ...
        assert waiter.cancel()  # ... and cancels it before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert storage.core.in_flight_count() == 0
        assert limiter.get_metrics().rpm.used == round_  # one per job taken below, none here
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed()


class SuspendingStorage(RecordingStorage[Any]):
    """The reference adapter whose lease renewal suspends, as a network call does."""

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        await asyncio.sleep(0)
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)
        await asyncio.sleep(0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["native", "python"])
async def test_cancellations_during_lease_renewal_take_nothing(kind: str, seed: int) -> None:
    """As `test_cancelled_dequeues_take_nothing`, with cancellations landing during
    the lease renewal of the prefetch path."""
    storage, dispatcher = make("prefetch", SuspendingStorage)
    limiter: Any = native_limiter(ManualClock(), rpm=1e9, tpm=1e12) if kind == "native" else BookLimiter()
    jobs, cancelled = await stress(dispatcher, limiter, random.Random(seed))
    assert cancelled > 0
    await assert_books(storage, dispatcher, limiter, jobs)
    await dispatcher.close()


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
