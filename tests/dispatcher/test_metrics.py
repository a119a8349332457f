"""`get_queue_metrics()`: counts, waits, throughput, in-flight details, `to_dict()`, retention."""

from __future__ import annotations

import json

import pytest

from llm_queue_dispatcher import (
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
    create_in_memory_queue,
)
from tests.dispatcher.support import SteppedClock, queue, request, throttle


async def test_queue_metrics_report_counts_waits_throughput_and_in_flight(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=600, tpm=100_000)
    await dispatcher.batch_enqueue(
        [
            request("u", Priority.URGENT, tokens=100),
            request("h", Priority.HIGH, tokens=200),
            request("n1", Priority.NORMAL, tokens=300),
            request("n2", Priority.NORMAL, tokens=400),
        ]
    )
    clock.advance(10.0)
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert (
        q.approximate_number_of_messages,
        q.approximate_number_of_messages_in_flight,
        q.total_messages,
    ) == (4, 0, 4)
    assert q.messages_by_priority == {"URGENT": 1, "HIGH": 1, "NORMAL": 2, "LOW": 0}
    assert q.oldest_message_age == pytest.approx(10.0)
    assert q.failed == 0
    assert q.dead_lettered == 0
    assert metrics.processing.active_requests == 0
    assert metrics.processing.in_flight_details == []

    urgent = await dispatcher.dequeue(limiter)
    clock.advance(20.0)
    high = await dispatcher.dequeue(limiter)
    assert urgent is not None
    assert high is not None
    assert (urgent.message.payload.id, high.message.payload.id) == ("u", "h")
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert (
        q.approximate_number_of_messages,
        q.approximate_number_of_messages_in_flight,
        q.total_messages,
    ) == (2, 2, 4)
    assert q.messages_by_priority == {"URGENT": 0, "HIGH": 0, "NORMAL": 2, "LOW": 0}
    assert q.average_wait_time == pytest.approx(20.0)  # waited 10 s and 30 s
    p = q.wait_time_percentiles
    assert 10.0 <= p.p50 <= p.p95 <= p.p99 <= 30.0
    assert metrics.processing.active_requests == 2
    details = {d.request_id: d for d in metrics.processing.in_flight_details}
    assert set(details) == {"u", "h"}
    assert details["h"].estimated_tokens == 200
    assert details["h"].priority == Priority.HIGH
    assert details["h"].score == pytest.approx(high.score.total)

    await urgent.mark_as_processed(actual_tokens=1_000)  # estimated 100: the actual count counts
    await high.mark_as_failed(RuntimeError("x"))
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert q.throughput.tokens_per_minute == pytest.approx(1_000.0)
    assert q.throughput.messages_per_minute == pytest.approx(1.0)
    assert q.failed == 1
    assert metrics.processing.active_requests == 0
    third = await dispatcher.dequeue(limiter)
    assert third is not None
    await third.mark_as_processed()  # no actual count: its estimate counts
    q = (await dispatcher.get_queue_metrics()).queue
    assert q.throughput.tokens_per_minute == pytest.approx(
        1_000.0 + third.message.payload.token_info.estimated
    )
    assert q.throughput.messages_per_minute == pytest.approx(2.0)

    performance = (await dispatcher.get_queue_metrics()).performance
    assert performance.prefetch_enabled is False
    latency = performance.dequeue_latency
    assert 0.0 < latency.p50 <= latency.p99 < 1.0


async def test_queue_metrics_to_dict_is_plain_data(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.batch_enqueue([request("a", Priority.LOW), request("b", Priority.URGENT)])
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    metrics = await dispatcher.get_queue_metrics()
    data = metrics.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["queue"]["messages_by_priority"] == {"URGENT": 0, "HIGH": 0, "NORMAL": 0, "LOW": 1}
    assert data["queue"]["approximate_number_of_messages_in_flight"] == 1
    assert data["processing"]["active_requests"] == 1
    assert data["processing"]["in_flight_details"][0]["request_id"] == "b"
    assert set(data["queue"]["wait_time_percentiles"]) == {"p50", "p95", "p99"}
    assert set(data["queue"]["throughput"]) == {"messages_per_minute", "tokens_per_minute"}
    assert set(data["performance"]["dequeue_latency"]) == {"p50", "p99"}
    assert data["queue"]["total_messages"] == metrics.queue.total_messages == 2


async def test_wait_samples_older_than_metrics_retention_are_dropped(clock: ManualClock) -> None:
    dispatcher = queue(clock, metrics_retention=60.0)
    await dispatcher.enqueue(request("a"))
    clock.advance(5.0)
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert (await dispatcher.get_queue_metrics()).queue.average_wait_time == pytest.approx(5.0)
    clock.advance(120.0)
    assert (await dispatcher.get_queue_metrics()).queue.average_wait_time == 0.0


async def test_two_hundred_thousand_dispatches_keep_the_recorder_bounded() -> None:
    """200k enqueue-dispatch-complete cycles at a constant depth of 10, 1 ms of
    clock apart (all within the 300 s retention, so only a count bound can hold the memory):
    the recorder holds no more after 200k cycles than after 100k (give or take a per-second
    bucket), and less than one element per cycle; `get_queue_metrics()` then works over that bounded state."""
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock)
    limiter = LLMThrottle(1e12, 1e15, clock=ManualClock())
    for i in range(10):
        await dispatcher.enqueue(LLMRequest(f"waiting-{i}", None, token_info=TokenInfo(1)))
    sizes = []
    for half in range(2):
        for i in range(100_000):
            await dispatcher.enqueue(LLMRequest(f"r{half}-{i}", None, token_info=TokenInfo(10)))
            job = await dispatcher.dequeue(limiter)
            assert job is not None
            await job.mark_as_processed(actual_tokens=7)
            clock.advance(0.001)
        sizes.append(dispatcher._core._samples_held)
    # Per-second buckets of the last minute may differ by one at the two instants measured.
    assert sizes[1] <= sizes[0] + 100, sizes
    # And far below one element per cycle (the unbounded windows held six per cycle).
    assert sizes[1] < 200_000, sizes
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.approximate_number_of_messages == 10
    assert metrics.processing.active_requests == 0
    assert metrics.queue.throughput.messages_per_minute > 0
    assert dispatcher._core._samples_held <= sizes[1] + 100


async def test_a_clock_stepped_back_never_gives_negative_waits_or_ages() -> None:
    clock = SteppedClock(10_000.0)
    dispatcher = create_in_memory_queue(clock=clock)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    clock.now -= 100.0  # stepped back below every enqueue
    job = await dispatcher.dequeue(throttle(None))
    assert job is not None
    clock.now -= 50.0  # and again, below the dispatch
    metrics = await dispatcher.get_queue_metrics()
    q = metrics.queue
    assert q.oldest_message_age == 0.0
    assert q.average_wait_time == 0.0
    assert (q.wait_time_percentiles.p50, q.wait_time_percentiles.p95, q.wait_time_percentiles.p99) == (
        0.0,
        0.0,
        0.0,
    )
    assert [d.age for d in metrics.processing.in_flight_details] == [0.0]
    assert all(t.wait_time_percentiles.p99 == 0.0 for t in metrics.tenants.values())
    assert min(_numbers(metrics.to_dict())) >= 0.0


def _numbers(data: object) -> list[float]:
    if isinstance(data, dict):
        return [n for value in data.values() for n in _numbers(value)]
    if isinstance(data, list):
        return [n for value in data for n in _numbers(value)]
    return [float(data)] if isinstance(data, (int, float)) else []
