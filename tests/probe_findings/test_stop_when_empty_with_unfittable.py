"""`Worker.run(stop_when_empty=True)` never returns while a request larger than the limiter can
ever grant is queued (`python/llm_queue_dispatcher/worker.py`).

The dispatcher knows such a request can never be dispatched (it logs "needs more tokens than
the limiter can ever grant; take it out with take_unfittable()", and fails its submitter with
a `RateLimitError` whose `available_in` is infinite), yet the worker's drain check counts it as
queued work, so a run meant to end when the work is done (a batch job, a script) waits for ever.
Expected: the run returns once nothing dispatchable is left, the unfittable request still queued
for `take_unfittable()`.
"""

from __future__ import annotations

import asyncio

import pytest

from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue


@pytest.mark.xfail(
    strict=True, reason="stop_when_empty waits for ever on a request the limiter can never grant"
)
async def test_a_worker_stopping_when_empty_returns_with_only_an_unfittable_request_left() -> None:
    limiter = LLMThrottle(600, 1_000)
    handled: list[str] = []

    async def handle(job: object) -> None:
        handled.append(job.message.payload.id)  # type: ignore[attr-defined]

    async with create_in_memory_queue() as dispatcher:
        await dispatcher.enqueue(LLMRequest("too-big", None, token_info=TokenInfo(5_000)))
        await dispatcher.enqueue(LLMRequest("fits", None, token_info=TokenInfo(10)))
        worker = Worker(dispatcher, limiter, handle)
        stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5.0)
        assert handled == ["fits"]
        assert stats.processed == 1
        [left] = await dispatcher.take_unfittable(limiter)
        assert left.payload.id == "too-big"
