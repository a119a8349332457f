"""Requests larger than the limiter's token capacity never block others and never go unnoticed."""

from __future__ import annotations

import logging

import pytest

from llm_queue_dispatcher import (
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
    create_in_memory_queue,
)


async def test_an_oversized_request_is_logged_counted_and_taken_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(1_000.0)
    limiter = LLMThrottle(60, 1_000, clock=clock)
    async with create_in_memory_queue(clock=clock) as dispatcher:
        await dispatcher.enqueue(LLMRequest("huge", None, Priority.URGENT, TokenInfo(5_000)))
        await dispatcher.enqueue(LLMRequest("small", None, Priority.LOW, TokenInfo(100)))
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        assert job.message.payload.id == "small"  # the URGENT giant does not block it
        await job.mark_as_processed()
        with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
            assert await dispatcher.dequeue(limiter) is None
            assert await dispatcher.dequeue(limiter) is None
        warnings = [r.getMessage() for r in caplog.records if "huge" in r.getMessage()]
        assert len(warnings) == 1  # once per request, not once per dequeue
        assert (await dispatcher.get_queue_metrics()).queue.unfittable_messages == 1
        taken = await dispatcher.take_unfittable(limiter)
        assert [m.payload.id for m in taken] == ["huge"]
        metrics = await dispatcher.get_queue_metrics()
        assert metrics.queue.unfittable_messages == 0
        assert metrics.queue.approximate_number_of_messages_in_flight == 1
