"""Issue 9, defect 10: a waiting `dequeue(timeout=...)` sleeps until the exact moment the answer
can change, never polls. These tests run on real time (the event loop's clock, a monotonic
limiter, the wall clock for the store), count how often the dispatcher looks again, and assert
on that count, not on durations."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ScoringConfig,
    ScoringWeights,
)
from tests.hardening.support import request


class Counting:
    """A plain-Python limiter delegating to an `LLMThrottle`, counting `can_process` calls."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.checks = 0

    def can_process(self, estimated_tokens: int) -> Any:
        self.checks += 1
        return self.inner.can_process(estimated_tokens)

    def get_metrics(self) -> Any:
        return self.inner.get_metrics()

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
        return self.inner.consume(request_id, estimated_tokens, metadata)

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.inner.adjust_consumption(request_id, actual_tokens)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def counting_looks(dispatcher: LLMQueueDispatcher[Any]) -> list[int]:
    """Counts the dispatcher's attempts to dequeue (one per wake-up, plus the first look)."""
    looks = [0]
    attempt = dispatcher._attempt

    async def counted(limiter: Any) -> Any:
        looks[0] += 1
        return await attempt(limiter)

    dispatcher._attempt = counted  # type: ignore[method-assign]
    return looks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_message_that_fits_soon_is_waited_for_not_polled(kind: str) -> None:
    """Defect 10: 950 tokens available, refilling at 100/s; the only message needs 1,000 (its
    cell's lower bound, 939, fits already). The dequeue sleeps until the bucket holds 1,000
    (0.5 s) and hands it out: a couple of looks, not one every 50 ms."""
    throttle = LLMThrottle(6_000, 6_000)  # the system monotonic clock, as the event loop's
    assert throttle.consume("earlier", 5_050)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(request("big", 1_000))
    job = await dispatcher.dequeue(limiter, timeout=5.0)
    assert job is not None
    assert looks[0] <= 3, looks
    if kind == "python":
        assert limiter.checks <= 3, limiter.checks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_message_that_cannot_fit_before_the_timeout_sleeps_once(kind: str) -> None:
    """Defect 10: the message fits only in 5 s, the timeout is 0.3 s: one look, one sleep to
    the timeout, one last look."""
    throttle = LLMThrottle(6_000, 6_000)
    assert throttle.consume("earlier", 5_500)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(request("big", 1_000))
    assert await dispatcher.dequeue(limiter, timeout=0.3) is None
    assert looks[0] <= 3, looks


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_score_below_the_threshold_is_waited_for_until_it_crosses(kind: str) -> None:
    """Defect 10: only the wait-time factor counts (weight 1: a NORMAL message scores age / 60)
    and the threshold is 0.5 / 60, so the message qualifies at an age of 0.5 s. The dequeue
    sleeps until then, not in 50 ms steps."""
    throttle = LLMThrottle(6_000, 1_000_000)
    limiter: Any = throttle if kind == "native" else Counting(throttle)
    weights = ScoringWeights(
        priority=0.0, efficiency=0.0, wait_time=1.0, retry=0.0, token_fit=0.0, processing_time=0.0
    )
    config = LLMQueueDispatcherConfig(scoring=ScoringConfig(weights=weights), min_score_threshold=0.5 / 60)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(), config)
    looks = counting_looks(dispatcher)
    await dispatcher.enqueue(request("slow-riser", 100))
    job = await dispatcher.dequeue(limiter, timeout=5.0)
    assert job is not None
    assert job.score.total >= 0.5 / 60
    assert looks[0] <= 3, looks
