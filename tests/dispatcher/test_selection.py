"""Selection: the best message comes out, oversized requests never block, the score threshold."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    Priority,
)
from tests.dispatcher.support import counts, queue, request, throttle


async def test_urgent_behind_a_thousand_low_comes_out_first(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.batch_enqueue([request(f"low{i}", Priority.LOW) for i in range(1_000)])
    clock.advance(30.0)  # the LOW requests have waited a while; the URGENT one still wins
    await dispatcher.enqueue(request("urgent", Priority.URGENT))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "urgent"
    following = await dispatcher.dequeue(throttle(clock))
    assert following is not None
    assert following.message.payload.priority is Priority.LOW


async def test_dequeue_on_an_empty_queue_returns_none(clock: ManualClock) -> None:
    assert await queue(clock).dequeue(throttle(clock)) is None


async def test_oversized_request_never_blocks_and_is_reported(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("huge", Priority.URGENT, tokens=50_000))
    await dispatcher.enqueue(request("small", Priority.LOW, tokens=100))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "small"
    await job.mark_as_processed()
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        assert await dispatcher.dequeue(limiter, timeout=0.02) is None
    assert any("huge" in record.getMessage() for record in caplog.records)
    # The documented way out: take the unfittable requests and delete (or dead-letter) them.
    taken = await dispatcher.take_unfittable(limiter)
    assert [m.payload.id for m in taken] == ["huge"]
    assert await counts(dispatcher) == (0, 1, 1)
    await storage.delete_message(taken[0].attributes.receipt_handle)
    assert await counts(dispatcher) == (0, 0, 0)
    # Nothing was reserved for it: only the small request's tokens are gone.
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0 - 100)


async def test_unfittable_report_goes_to_the_configured_logger(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.dispatcher.custom")
    dispatcher = queue(clock, logger=logger)
    await dispatcher.enqueue(request("giant", tokens=1_000_000))
    with caplog.at_level(logging.WARNING, logger="tests.dispatcher.custom"):
        assert await dispatcher.dequeue(throttle(clock, tpm=1_000), timeout=0.02) is None
    assert any(r.name == "tests.dispatcher.custom" and "giant" in r.getMessage() for r in caplog.records)


async def test_best_below_min_score_threshold_gives_none_and_takes_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock, min_score_threshold=0.95)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is None
    assert await counts(dispatcher) == (1, 0, 1)
    assert limiter.get_metrics().tpm.available == pytest.approx(100_000.0)
    assert limiter.get_consumption_history() == []
    lenient = queue(clock, min_score_threshold=0.2)
    await lenient.enqueue(request("a"))
    assert await lenient.dequeue(limiter) is not None
