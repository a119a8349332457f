"""The score a job carries: its breakdown into weighted factors and its reason."""

from __future__ import annotations

import math

import pytest

from llm_queue_dispatcher import CustomScorer, ManualClock, MessageScore, Priority
from tests.dispatcher.support import FACTOR_NAMES, queue, request, scored_queue, throttle


async def test_breakdown_holds_the_weighted_factors_and_sums_to_the_total(clock: ManualClock) -> None:
    dispatcher = scored_queue(clock, CustomScorer("bonus", 0.5, lambda message, context: 0.6))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", Priority.NORMAL, tokens=1_000))  # u = 0.1, 10 s at 0.01 s/token
    clock.advance(30.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert isinstance(job.score, MessageScore)
    assert list(job.score.breakdown) == [*FACTOR_NAMES, "bonus"]
    expected = {
        "priority": 0.25 * 0.4,
        "efficiency": 0.20 * (0.1 / 0.7),
        "wait_time": 0.20 * (30.0 / 60.0),
        "retry": 0.10 * 1.0,
        "token_fit": 0.15 * 1.0,
        "processing_time": 0.10 * (0.7 - (10_000 - 5_000) / 25_000 * 0.6),
        "bonus": 0.5 * 0.6,
    }
    assert job.score.breakdown == pytest.approx(expected, abs=1e-12)
    assert job.score.total == pytest.approx(sum(expected.values()), abs=1e-12)
    assert sum(job.score.breakdown.values()) == pytest.approx(job.score.total, abs=1e-12)


async def test_breakdown_of_an_urgent_retried_message(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", Priority.URGENT, tokens=9_500, ept=0.0))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    await first.mark_as_failed(RuntimeError("x"))
    clock.advance(2.5)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    u = 9_500 / 10_000  # the failed delivery's reservation was refunded: the bucket is full
    expected = {
        "priority": 0.25 * 1.0,
        "efficiency": 0.20 * 0.9,
        "wait_time": 0.20 * math.sqrt(2.5 / 10),
        "retry": 0.10 * 0.7,
        "token_fit": 0.15 * (1 - (u - 0.5) * 0.4),
        "processing_time": 0.10 * 1.0,
    }
    assert job.score.breakdown == pytest.approx(expected, abs=1e-12)


async def test_reason_names_the_top_factors(clock: ManualClock) -> None:
    dispatcher = scored_queue(clock, CustomScorer("house_rule", 2.0, lambda message, context: 1.0))
    await dispatcher.enqueue(request("a", Priority.URGENT))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert isinstance(job.reason, str)
    ranked = sorted(job.score.breakdown, key=lambda name: job.score.breakdown[name], reverse=True)
    assert ranked[0] == "house_rule"
    assert "house_rule" in job.reason
    assert ranked[1] in job.reason
