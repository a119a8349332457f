"""Marks with input and output counts through the dispatcher: `LLMThrottle` (the dispatch core's
reservation by key, in Rust) and `RedisThrottle` (keyed reservations from Python, its Lua
scripts) end with the same books on every limit."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
)
from tests.redis.conftest import START, fresh_name
from tests.redis.support import ClockedRedisThrottle, RedisServer

MARK = st.sampled_from(["parts", "total", "none", "failed", "release"])
JOBS = st.lists(
    st.tuples(st.integers(0, 900), st.integers(0, 300), MARK, st.integers(0, 900), st.integers(0, 300)),
    min_size=1,
    max_size=8,
)
# Every request is handed out at once; a mark may still take more than a bucket holds then (warn
# or compensate apply).
LIMITS = {"itpm": 7_500, "otpm": 2_600, "tpd": 54_000, "max_concurrent": 8}


async def run(limiter: Any, clock: ManualClock, jobs: list[tuple[int, int, str, int, int]]) -> None:
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock)
    )
    for i, (input_tokens, max_output, *_) in enumerate(jobs):
        info = TokenInfo(input=input_tokens, max_output=max_output)
        await dispatcher.enqueue(LLMRequest(f"r{i}", None, Priority.NORMAL, info))
    handed = []
    while (job := await dispatcher.dequeue(limiter)) is not None:
        handed.append(job)
    assert len(handed) == len(jobs)
    # Marked in request order: the two paths may hand out in another order, and under "warn"
    # the books depend on the order of the marks.
    for job in sorted(handed, key=lambda j: int(j.message.payload.id[1:])):
        _, _, mark, actual_in, actual_out = jobs[int(job.message.payload.id[1:])]
        if mark == "parts":
            await job.mark_as_processed(input_tokens=actual_in, output_tokens=actual_out)
        elif mark == "total":
            await job.mark_as_processed(actual_in + actual_out, output_tokens=actual_out)
        elif mark == "none":
            await job.mark_as_processed()
        elif mark == "failed":
            await job.mark_as_failed(RuntimeError("x"))
        else:
            await job.release()
    await dispatcher.close()


@settings(max_examples=40, deadline=None)
@given(jobs=JOBS, strategy=st.sampled_from(["warn", "compensate"]))
def test_marks_by_parts_leave_the_same_books_in_rust_and_lua(
    shared_server: RedisServer, jobs: list[tuple[int, int, str, int, int]], strategy: str
) -> None:
    async def scenario() -> None:
        clock = ManualClock(START)
        options: dict[str, Any] = {"adjustment_failure_strategy": strategy, **LIMITS}
        local = LLMThrottle(120, 10_000, clock=clock, logger=logging.getLogger("quiet"), **options)
        shared = ClockedRedisThrottle(
            shared_server.url, fresh_name("parts-marks"), rpm=120, tpm=10_000, clock=clock, **options
        )
        try:
            await run(local, clock, jobs)
            await run(shared, clock, jobs)
            want, got = local.get_metrics(), await shared.get_metrics()
            assert got.tpm.available == pytest.approx(want.tpm.available, abs=1e-9)
            assert got.rpm.available == pytest.approx(want.rpm.available, abs=1e-9)
            for name in ("itpm", "otpm", "tpd", "concurrency"):
                want_bucket, got_bucket = getattr(want, name), getattr(got, name)
                assert want_bucket is not None
                assert got_bucket is not None
                assert got_bucket.available == pytest.approx(want_bucket.available, abs=1e-9), name
            assert got.compensation.debts == pytest.approx(want.compensation.debts, abs=1e-9)
            assert got.consumption_history.total_tokens == want.consumption_history.total_tokens
        finally:
            await shared.aclose()

    asyncio.run(scenario())
