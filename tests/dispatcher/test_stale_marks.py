"""A mark whose delivery went stale, a hand-out that fails, and a
limiter failing during a mark keep the books.

Every delivery has a reservation of its own (under its key, never the request id's): when a
message's lease runs out and it is dispatched again, a stale mark of the first delivery settles
the first delivery's reservation exactly (its call happened) and never touches the second's. A
failed second dispatch releases its own reservation and leaves the first one adjustable.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    ReceiptHandleError,
    ScoringConfig,
)
from tests.dispatcher.books import BookLimiter, FaultyClock, native_limiter, request
from tests.dispatcher.test_redelivery import SOURCES, redelivered


@pytest.mark.parametrize("source", SOURCES)
async def test_a_stale_processed_mark_settles_its_own_reservation_only(source: str) -> None:
    limiter = BookLimiter()
    _, first, second = await redelivered(source, limiter)
    assert limiter.used_tokens == 200  # two reservations of 100, one per delivery
    assert limiter.tokens == {first._key: 100, second._key: 100}
    with pytest.raises(ReceiptHandleError):
        await first.mark_as_processed(actual_tokens=80)
    assert limiter.tokens == {first._key: 80, second._key: 100}  # the live one is untouched
    await second.mark_as_processed(actual_tokens=120)
    assert limiter.used_tokens == 80 + 120


@pytest.mark.parametrize("source", SOURCES)
async def test_a_stale_failure_refunds_its_own_reservation_only(source: str) -> None:
    limiter = native_limiter(ManualClock(), rpm=600, tpm=10_000)
    _, first, second = await redelivered(source, limiter)
    assert limiter.get_metrics().tpm.used == 200
    await first.mark_as_failed(RuntimeError("x"))
    assert limiter.get_metrics().tpm.used == 100
    await second.mark_as_processed(actual_tokens=150)
    assert limiter.get_metrics().tpm.used == 150
    assert [r.tokens for r in limiter.get_consumption_history()] == [0, 150]
    assert limiter.get_metrics().rpm.used == 2  # both calls counted


@pytest.mark.parametrize("source", SOURCES)
async def test_a_stale_dead_letter_mark_refunds_its_own_reservation_only(source: str) -> None:
    limiter = native_limiter(ManualClock(), rpm=600, tpm=10_000)
    _, first, second = await redelivered(source, limiter)
    with pytest.raises(ReceiptHandleError):
        await first.mark_as_dead_lettered(RuntimeError("x"))
    assert limiter.get_metrics().tpm.used == 100
    await second.mark_as_failed(RuntimeError("y"))
    assert [r.tokens for r in limiter.get_consumption_history()] == [0, 0]


async def test_a_failed_redispatch_leaves_the_first_deliverys_reservation_adjustable() -> None:
    """The first lease ran out; a second dispatch reserves the same request id again and then
    fails at the take (its store clock raises), so that reservation is released. The first
    delivery, whose handle is still current, stays adjustable."""
    time = ManualClock(1_000.0)
    store_clock = FaultyClock(time)
    storage: InMemoryStorage[object] = InMemoryStorage(clock=store_clock)
    scoring = ScoringConfig(custom_scorers=[CustomScorer("c", 0.1, lambda message, context: 0.5)])
    dispatcher: LLMQueueDispatcher[object] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=time, scoring=scoring)
    )
    limiter = native_limiter(ManualClock(), rpm=600, tpm=10_000)
    await dispatcher.enqueue(request("a", 100))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    time.advance(31.0)
    store_clock.fail_at(3)  # the take of the second dispatch step (collect, request id, take)
    with pytest.raises(OSError, match="injected"):
        await dispatcher.dequeue(limiter)
    store_clock.disarm()
    assert limiter.get_metrics().tpm.used == 100  # the failed reservation was released
    await first.mark_as_processed(actual_tokens=30)
    assert limiter.get_metrics().tpm.used == 30


async def test_a_failed_hand_out_leaves_the_receive_count_as_it_was() -> None:
    """Three hand-outs failing in a row (the dispatcher's clock raises while the message is
    built) leave the message visible with receive count 0, not dead-lettered by
    ``max_receive_count=2``, and nothing reserved."""
    dispatcher_clock = FaultyClock(ManualClock(1_000.0))
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=ManualClock(1_000.0))
    storage: InMemoryStorage[Any] = InMemoryStorage(
        clock=ManualClock(1_000.0), max_receive_count=2, dead_letter=dead
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=dispatcher_clock)
    )
    limiter = native_limiter(ManualClock())
    await dispatcher.enqueue(request("a"))
    for _ in range(3):
        dispatcher_clock.fail_at(1)
        with contextlib.suppress(OSError):
            await dispatcher.dequeue(limiter)
        dispatcher_clock.disarm()
    assert await dead.get_approximate_message_count() == 0
    [message] = await storage.peek_messages_by_priority(2, 10)
    assert message.attributes.receive_count == 0
    assert message.attributes.first_received_at is None
    assert limiter.get_metrics().rpm.used == 0


@pytest.mark.parametrize("mark", ["processed", "failed", "dead_lettered"])
async def test_a_limiter_failing_in_a_mark_settles_the_message_and_logs(
    mark: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store step landed, so the mark completes: the dispatcher forgets the job and the
    limiter's failure is logged (the count it could not correct errs as reserved)."""
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock(1_000.0)))
    limiter = BookLimiter()
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    limiter.fail_on.add("adjust_consumption")
    with caplog.at_level(logging.WARNING):
        if mark == "processed":
            await job.mark_as_processed(actual_tokens=5)
        elif mark == "failed":
            await job.mark_as_failed(RuntimeError("x"))
        else:
            await job.mark_as_dead_lettered(RuntimeError("x"))
    assert job.settled
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert "rate limiter failed to correct request 'a'" in caplog.text
    expected_visible = 1 if mark == "failed" else 0
    assert metrics.queue.approximate_number_of_messages == expected_visible
