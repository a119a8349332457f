"""Requests larger than the limiter's token capacity never block others and never go unnoticed."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
    create_in_memory_queue,
)
from tests.reference.storage import ReferenceStorage


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


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("store", ["memory", "buffer"])
async def test_a_request_is_unfittable_by_the_part_its_limit_counts(
    store: str, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 10,000 tokens a minute in all, 3,000 of input and 500 of output.
    clock = ManualClock(1_000.0)
    limiter = LLMThrottle(60, 10_000, itpm=3_000, otpm=500, clock=clock)
    storage: Any = InMemoryStorage(clock=clock) if store == "memory" else ReferenceStorage(clock=clock)
    requests = [
        LLMRequest("fits", None, token_info=TokenInfo(input=3_000, max_output=500)),
        LLMRequest("long-prompt", None, token_info=TokenInfo(input=3_001, max_output=10)),
        LLMRequest("long-reply", None, token_info=TokenInfo(input=10, max_output=501)),
        # Without parts, the input and output limits count the whole estimate.
        LLMRequest("no-parts", None, token_info=TokenInfo(600)),
        LLMRequest("small", None, token_info=TokenInfo(400)),
    ]
    config = LLMQueueDispatcherConfig(clock=clock, policy=policy)  # type: ignore[arg-type]
    async with LLMQueueDispatcher(storage, config) as dispatcher:
        await dispatcher.batch_enqueue(requests)
        sent = []
        with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
            while (job := await dispatcher.dequeue(limiter)) is not None:
                sent.append(job.message.payload.id)
                await job.mark_as_processed(input_tokens=0, output_tokens=0)  # each limit refunded
            assert await dispatcher.dequeue(limiter) is None
        assert sorted(sent) == ["fits", "small"]
        never = {"long-prompt", "long-reply", "no-parts"}
        warned = {name for name in never if any(name in r.getMessage() for r in caplog.records)}
        assert warned == never
        assert "input 3000, output 500" in caplog.text
        assert (await dispatcher.get_queue_metrics()).queue.unfittable_messages == 3
        taken = await dispatcher.take_unfittable(limiter)
        assert sorted(m.payload.id for m in taken) == sorted(never)
        assert (await dispatcher.get_queue_metrics()).queue.unfittable_messages == 0
