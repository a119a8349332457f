"""``drop_expired``: a request whose deadline has passed is removed, not sent: dead-lettered to
the dead-letter store where there is one, logged, and counted in ``queue.expired_deadlines``.
Both policies, the in-memory store and an external one (the prefetch buffer)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
    QueueStorageAdapter,
)
from tests.policies.support import Store, make_dispatcher, make_store, request

POLICIES = ["score", "fair_priority"]
STORES = ["memory", "external"]


async def dead_letter_ids(store: QueueStorageAdapter[str]) -> set[str]:
    target = store.dead_letter  # type: ignore[attr-defined]
    found = set()
    for priority in Priority:
        for message in await target.peek_messages_by_priority(int(priority), 100):
            found.add(message.payload.id)
    return found


async def dequeue(
    dispatcher: LLMQueueDispatcher[str], limiter: LLMThrottle
) -> ProcessableMessage[str] | None:
    """A dequeue, then the event loop runs (an external store's background fill lands)."""
    job = await dispatcher.dequeue(limiter)
    for _ in range(3):
        await asyncio.sleep(0)
    return job


async def drain(dispatcher: LLMQueueDispatcher[str], limiter: LLMThrottle) -> list[str]:
    """Dequeues and marks processed until nothing is handed out; the ids handed out."""
    handed: list[str] = []
    while (job := await dequeue(dispatcher, limiter)) is not None:
        handed.append(job.message.payload.id)
        await job.mark_as_processed()
    return handed


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", STORES)
async def test_expired_requests_are_dead_lettered_and_counted(
    policy: str, kind: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(1_000.0)
    store = make_store(kind, clock, dead_letter=True)
    dispatcher = make_dispatcher(store, clock, policy=policy, drop_expired=True, min_score_threshold=0.0)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    t0 = clock.now()
    await dispatcher.enqueue(request("late", deadline=t0 + 10))
    await dispatcher.enqueue(request("fine"))
    await dispatcher.enqueue(request("later", deadline=t0 + 20))

    # A deadline equal to now has not passed.
    clock.advance(10.0)
    first = await dequeue(dispatcher, limiter)
    assert first is not None
    assert first.message.payload.id == "late"
    assert (await dispatcher.get_queue_metrics()).queue.expired_deadlines == 0
    await first.mark_as_failed(RuntimeError("retry"))

    # A quarter second later it has: removed, never handed out again.
    clock.advance(0.25)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        handed = await drain(dispatcher, limiter)
    assert sorted(handed) == ["fine", "later"]
    assert any("late" in r.getMessage() and "deadline" in r.getMessage() for r in caplog.records)
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.expired_deadlines == 1
    assert metrics.queue.approximate_number_of_messages == 0
    assert await dead_letter_ids(store) == {"late"}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", STORES)
async def test_a_request_in_flight_is_not_dropped_until_it_is_visible_again(policy: str, kind: Store) -> None:
    clock = ManualClock(1_000.0)
    store = make_store(kind, clock, dead_letter=True)
    dispatcher = make_dispatcher(store, clock, policy=policy, drop_expired=True, min_score_threshold=0.0)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher.enqueue(request("soon", priority=Priority.URGENT, deadline=clock.now() + 5))
    await dispatcher.enqueue(request("other"))
    job = await dequeue(dispatcher, limiter)
    assert job is not None
    assert job.message.payload.id == "soon"
    clock.advance(10.0)  # its deadline passes while it is in flight
    assert await drain(dispatcher, limiter) == ["other"]
    assert (await dispatcher.get_queue_metrics()).queue.expired_deadlines == 0
    await job.mark_as_failed(RuntimeError("retry"))  # visible again, and late
    assert await drain(dispatcher, limiter) == []
    assert (await dispatcher.get_queue_metrics()).queue.expired_deadlines == 1
    assert await dead_letter_ids(store) == {"soon"}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", STORES)
async def test_without_drop_expired_a_late_request_is_still_sent(policy: str, kind: Store) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(make_store(kind, clock, dead_letter=True), clock, policy=policy)
    await dispatcher.enqueue(request("late", deadline=clock.now() + 1))
    clock.advance(100.0)
    job = await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock))
    assert job is not None
    assert job.message.payload.id == "late"
    assert (await dispatcher.get_queue_metrics()).queue.expired_deadlines == 0


@pytest.mark.parametrize("policy", POLICIES)
async def test_without_a_dead_letter_store_expired_requests_are_dropped_and_counted(policy: str) -> None:
    clock = ManualClock(1_000.0)
    store = make_store("memory", clock)
    dispatcher = make_dispatcher(store, clock, policy=policy, drop_expired=True)
    await dispatcher.enqueue(request("a", deadline=clock.now() + 1))
    await dispatcher.enqueue(request("b", deadline=clock.now() - 5))  # late on arrival
    clock.advance(2.0)
    assert await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock)) is None
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.expired_deadlines == 2
    assert metrics.queue.dead_lettered == 2
    assert metrics.queue.approximate_number_of_messages == 0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", STORES)
async def test_expired_requests_are_dropped_even_while_the_budget_is_held(policy: str, kind: Store) -> None:
    """No budget, nothing dispatched: the expired request is removed all the same, and the
    held winner is the one still waiting."""
    clock = ManualClock(1_000.0)
    store = make_store(kind, clock, dead_letter=True)
    dispatcher = make_dispatcher(store, clock, policy=policy, drop_expired=True)
    limiter = LLMThrottle(600, 60_000, clock=clock)
    assert limiter.consume("other traffic", 60_000)
    await dispatcher.enqueue(request("soon", priority=Priority.URGENT, tokens=500, deadline=clock.now() + 1))
    await dispatcher.enqueue(request("patient", priority=Priority.URGENT, tokens=2_000))
    clock.advance(1.25)  # 1,250 tokens back: "soon" would fit, but its deadline has passed
    assert await dispatcher.dequeue(limiter) is None
    assert (await dispatcher.get_queue_metrics()).queue.expired_deadlines == 1
    assert await dead_letter_ids(store) == {"soon"}
    # Held for "patient". (Over an external store the first dequeue's own fill of the empty
    # buffer counts as a change, so time_until_ready() reads 0 after it: reported; the next
    # dequeue reports the wait.)
    assert await dispatcher.dequeue(limiter) is None
    assert dispatcher.time_until_ready() == pytest.approx(0.75)
    clock.advance(0.75)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "patient"
