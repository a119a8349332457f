"""Custom scorers: their arguments, clamping, exceptions, the cap on evaluations, the lazily built
queue metrics of the context."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InvalidConfigError,
    ManualClock,
    Priority,
    QueueMessage,
    ScoringContext,
)
from tests.dispatcher.support import CountingLimiter, counts, request, scored_queue, throttle


async def test_custom_scorer_is_called_with_the_message_and_a_context(clock: ManualClock) -> None:
    seen: list[tuple[Any, Any]] = []

    def mine(message: QueueMessage[Any], context: ScoringContext) -> float:
        seen.append((message, context))
        return 0.5

    dispatcher = scored_queue(clock, CustomScorer("mine", 0.3, mine))
    limiter = throttle(clock, tpm=20_000)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    [(message, context)] = seen
    assert isinstance(message, QueueMessage)
    assert message.payload.id == "a"
    assert isinstance(context, ScoringContext)
    assert context.current_time == clock.now()
    assert context.rate_limiter_metrics.tpm.limit == pytest.approx(20_000.0)
    with pytest.raises(AttributeError):
        context.current_time = 0.0  # type: ignore[misc]
    assert job.score.breakdown["mine"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("raw", "counted"),
    [(0.25, 0.25), (5.0, 1.0), (-3.0, 0.0), (math.nan, 0.0), (math.inf, 1.0), (-math.inf, 0.0), (1, 1.0)],
)
async def test_custom_scores_are_clamped_and_nan_counts_as_zero(
    clock: ManualClock, raw: float, counted: float
) -> None:
    dispatcher = scored_queue(clock, CustomScorer("c", 0.4, lambda message, context: raw))
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.score.breakdown["c"] == pytest.approx(0.4 * counted)
    assert job.score.total == pytest.approx(sum(job.score.breakdown.values()))


@pytest.mark.parametrize("bad", [None, "0.5", b"1", 10**400, [0.5], object()])
@pytest.mark.parametrize("kind", ["native", "python"])
async def test_a_scorer_returning_no_number_is_a_config_error_naming_it_and_nothing_is_dequeued(
    clock: ManualClock, bad: object, kind: str
) -> None:
    """A score must be a number a float can hold (an int or a float, NaN counting as 0):
    anything else is the configured scorer's defect, reported as `InvalidConfigError` naming it
    and the value; nothing is reserved or taken."""
    dispatcher = scored_queue(
        clock,
        CustomScorer("fine", 0.1, lambda message, context: 0.5),
        CustomScorer("faulty", 0.2, lambda message, context: bad),
    )
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_000))
    with pytest.raises(InvalidConfigError, match="custom scorer 'faulty' returned"):
        await dispatcher.dequeue(limiter if kind == "native" else CountingLimiter(limiter))
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)
    assert limiter.get_metrics().rpm.used == 0
    assert await counts(dispatcher) == (1, 0, 1)


async def test_custom_scorer_exception_propagates_and_nothing_is_dequeued(clock: ManualClock) -> None:
    def broken(message: QueueMessage[Any], context: ScoringContext) -> float:
        raise KeyError("scorer bug")

    dispatcher = scored_queue(clock, CustomScorer("broken", 0.2, broken))
    limiter = throttle(clock, tpm=10_000)
    await dispatcher.enqueue(request("a", tokens=1_000))
    with pytest.raises(KeyError, match="scorer bug"):
        await dispatcher.dequeue(limiter)
    assert await counts(dispatcher) == (1, 0, 1)
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000.0)
    assert limiter.get_metrics().rpm.available == pytest.approx(600.0)
    assert limiter.get_consumption_history() == []


async def test_custom_scorer_that_decides_picks_the_winner(clock: ManualClock) -> None:
    dispatcher = scored_queue(
        clock, CustomScorer("vip", 5.0, lambda message, context: 1.0 if message.payload.id == "vip" else 0.0)
    )
    await dispatcher.batch_enqueue([request("high", Priority.HIGH), request("vip", Priority.LOW)])
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "vip"


async def test_max_candidates_to_evaluate_caps_custom_calls(clock: ManualClock) -> None:
    calls: list[str] = []

    def counting(message: QueueMessage[Any], context: ScoringContext) -> float:
        calls.append(message.payload.id)
        return (hash(message.payload.id) % 100) / 100

    dispatcher = scored_queue(clock, CustomScorer("c", 1.0, counting), max_candidates_to_evaluate=5)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(50)])
    limiter = throttle(clock)
    for _ in range(3):
        calls.clear()
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        assert 1 <= len(calls) <= 5
        assert job.message.payload.id in calls


async def test_queue_metrics_in_the_context_are_built_at_most_once_and_only_when_read(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Any] = []
    read_metrics = True

    def reader(message: QueueMessage[Any], context: ScoringContext) -> float:
        if read_metrics:
            reads.append(context.queue_metrics)
        return 0.5

    dispatcher = scored_queue(clock, CustomScorer("reader", 1.0, reader), max_candidates_to_evaluate=30)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(10)])
    report_type = type((await dispatcher.get_queue_metrics()).queue)
    built: list[int] = []
    original_init = report_type.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(report_type, "__init__", counting_init)
    limiter = throttle(clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert len(reads) == 10  # every equal candidate was scored
    assert len(built) == 1
    assert all(report is reads[0] for report in reads)
    assert reads[0].approximate_number_of_messages == 10
    reads.clear()
    built.clear()
    assert await dispatcher.dequeue(limiter) is not None
    assert len(built) == 1
    assert reads[0].approximate_number_of_messages == 9
    read_metrics = False
    built.clear()
    assert await dispatcher.dequeue(limiter) is not None
    assert built == []
