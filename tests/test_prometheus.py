"""`llm_queue_dispatcher.prometheus`: what a scrape reports, and that a scrape only reads a snapshot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llm_queue_dispatcher import (
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    QueueMetrics,
    SchedulingMetrics,
    SloAttainment,
    TenantMetrics,
    TokenInfo,
    WaitTimePercentiles,
    create_in_memory_queue,
)
from llm_queue_dispatcher.metrics import (
    LatencyPercentiles,
    PerformanceMetrics,
    ProcessingMetrics,
    QueueMetricsReport,
)
from llm_queue_dispatcher.prometheus import QueueCollector

_LIMITS = ("rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency")


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _registry(collector: QueueCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


async def test_a_scrape_reports_the_queue_the_limiter_and_the_recorded_events() -> None:
    clock = ManualClock(1_000.0)
    limiter = LLMThrottle(60, 10_000, clock=clock)
    dispatcher = create_in_memory_queue(clock=clock)
    collector = QueueCollector()
    registry = _registry(collector)
    watched = collector.watch(dispatcher, limiter, queue="chat")
    for index, priority in enumerate([Priority.URGENT, Priority.LOW, Priority.LOW, Priority.NORMAL]):
        await dispatcher.enqueue(LLMRequest(f"r{index}", None, priority, TokenInfo(1_000)))
    clock.advance(4.0)
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    watched.record_dispatch(first, 0.0002)
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    assert (first.message.payload.id, second.message.payload.id) == ("r0", "r3")  # URGENT, NORMAL
    watched.record_dispatch(second, 0.00003)
    await first.mark_as_processed(actual_tokens=800)
    watched.record_completion(first, 800)
    await second.mark_as_failed(RuntimeError("provider down"))

    await collector.refresh()
    samples = _samples(generate_latest(registry))

    assert all(name.startswith("llmqd_") for name, _ in samples)
    # r3 (NORMAL) failed and is visible again; r1 and r2 (LOW) never left.
    assert _value(samples, "llmqd_queue_messages", queue="chat", priority="LOW") == 2
    assert _value(samples, "llmqd_queue_messages", queue="chat", priority="NORMAL") == 1
    assert _value(samples, "llmqd_queue_messages", queue="chat", priority="URGENT") == 0
    assert _value(samples, "llmqd_in_flight_messages", queue="chat") == 0
    assert _value(samples, "llmqd_dispatched_total", queue="chat") == 2
    assert _value(samples, "llmqd_completed_total", queue="chat") == 1
    assert _value(samples, "llmqd_completed_tokens_total", queue="chat") == 800
    assert _value(samples, "llmqd_failed_total", queue="chat") == 1
    assert _value(samples, "llmqd_dead_lettered_total", queue="chat") == 0
    # Two dispatches reserved 1 request and 1,000 tokens each; the completion refunded 200 and
    # the failure its 1,000; no time passed since.
    assert _value(samples, "llmqd_limiter_available_tokens", queue="chat") == pytest.approx(9_200)
    assert _value(samples, "llmqd_limiter_capacity_tokens", queue="chat") == 10_000
    assert _value(samples, "llmqd_limiter_available_requests", queue="chat") == pytest.approx(58)
    assert _value(samples, "llmqd_limiter_capacity_requests", queue="chat") == 60
    # Both waited 4 s: the URGENT one and the NORMAL one.
    assert _value(samples, "llmqd_wait_time_seconds_count", queue="chat", priority="URGENT") == 1
    assert _value(samples, "llmqd_wait_time_seconds_bucket", queue="chat", priority="URGENT", le="2.5") == 0
    assert _value(samples, "llmqd_wait_time_seconds_bucket", queue="chat", priority="URGENT", le="5.0") == 1
    assert _value(samples, "llmqd_wait_time_seconds_sum", queue="chat", priority="NORMAL") == pytest.approx(
        4.0
    )
    assert _value(samples, "llmqd_wait_time_seconds_count", queue="chat", priority="HIGH") == 0
    assert _value(samples, "llmqd_dequeue_latency_seconds_count", queue="chat") == 2
    assert _value(samples, "llmqd_dequeue_latency_seconds_bucket", queue="chat", le="5e-05") == 1
    assert _value(samples, "llmqd_window_wait_p50_seconds", queue="chat") == pytest.approx(4.0)
    assert _value(samples, "llmqd_oldest_message_age_seconds", queue="chat") == pytest.approx(4.0)


class _FakeSource:
    """A dispatcher stand-in whose report is fixed, counting how often it is read."""

    def __init__(self, tenants: dict[str, TenantMetrics]) -> None:
        self.reads = 0
        self.tenants = tenants

    async def get_queue_metrics(self) -> QueueMetrics:
        self.reads += 1
        return QueueMetrics(
            queue=QueueMetricsReport(messages_by_priority={"URGENT": 3, "HIGH": 0, "NORMAL": 0, "LOW": 0}),
            processing=ProcessingMetrics(),
            performance=PerformanceMetrics(),
            tenants=self.tenants,
        )


async def test_tenants_are_exported_and_capped() -> None:
    tenants = {
        "acme": TenantMetrics(
            visible=5,
            in_flight=2,
            tokens_in_window=1_500.0,
            tokens_served=40_000,
            wait_time_percentiles=WaitTimePercentiles(p50=1.0, p95=3.0, p99=7.5),
        ),
        "tiny": TenantMetrics(visible=1),
        "": TenantMetrics(in_flight=1),
    }
    collector = QueueCollector(max_tenants=2)
    registry = _registry(collector)
    collector.watch(_FakeSource(tenants), queue="q")
    await collector.refresh()
    samples = _samples(generate_latest(registry))
    assert _value(samples, "llmqd_tenant_messages", queue="q", tenant="acme", state="visible") == 5
    assert _value(samples, "llmqd_tenant_messages", queue="q", tenant="acme", state="in_flight") == 2
    assert _value(samples, "llmqd_tenant_window_tokens", queue="q", tenant="acme") == 1_500
    assert _value(samples, "llmqd_tenant_served_tokens_total", queue="q", tenant="acme") == 40_000
    assert _value(samples, "llmqd_tenant_wait_p99_seconds", queue="q", tenant="acme") == 7.5
    exported = {labels for name, labels in samples if name == "llmqd_tenant_window_tokens"}
    # Two tenants at most: the busiest first, then by name ("" before "tiny").
    assert exported == {(("queue", "q"), ("tenant", "acme")), (("queue", "q"), ("tenant", ""))}


async def test_a_scrape_reads_only_the_snapshot() -> None:
    source = _FakeSource({})
    collector = QueueCollector()
    registry = _registry(collector)
    collector.watch(source, queue="q")
    before = _samples(generate_latest(registry))
    assert source.reads == 0
    assert ("llmqd_queue_messages", (("priority", "URGENT"), ("queue", "q"))) not in before
    await collector.refresh()
    assert source.reads == 1
    # From another thread too (prometheus-client's own HTTP server scrapes from one).
    for _ in range(3):
        text = await asyncio.to_thread(generate_latest, registry)
    assert source.reads == 1
    assert _value(_samples(text), "llmqd_queue_messages", queue="q", priority="URGENT") == 3


async def test_start_keeps_refreshing_and_render_serves_the_text_format() -> None:
    source = _FakeSource({})
    collector = QueueCollector()
    collector.watch(source, queue="q")
    task = collector.start(interval=0.01)
    try:
        await asyncio.sleep(0.1)
    finally:
        task.cancel()
    assert source.reads >= 3
    assert collector.last_refresh is not None
    body, content_type = await collector.render()
    assert content_type.startswith("text/plain")
    assert b'llmqd_queue_messages{priority="URGENT",queue="q"} 3.0' in body


async def test_an_async_limiter_is_awaited() -> None:
    clock = ManualClock()
    inner = LLMThrottle(30, 5_000, clock=clock)

    class AsyncLimiter:
        async def get_metrics(self) -> Any:
            await asyncio.sleep(0)
            return inner.get_metrics()

    collector = QueueCollector()
    collector.watch(create_in_memory_queue(clock=clock), AsyncLimiter(), queue="q")
    body, _ = await collector.render()
    assert _value(_samples(body), "llmqd_limiter_capacity_tokens", queue="q") == 5_000


def test_bad_watches_and_arguments_are_refused() -> None:
    collector = QueueCollector()
    dispatcher = create_in_memory_queue()
    with pytest.raises(InvalidConfigError, match="get_queue_metrics"):
        collector.watch(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="get_metrics"):
        collector.watch(dispatcher, object())
    for name in ("priority", "le", "limit", "__x", "bad-name"):
        with pytest.raises(InvalidConfigError, match="label name"):
            collector.watch(dispatcher, **{name: "x"})
    collector.watch(dispatcher, queue="a")
    with pytest.raises(InvalidConfigError, match="labels"):
        collector.watch(dispatcher, region="eu")
    with pytest.raises(InvalidConfigError, match="already watched"):
        collector.watch(dispatcher, queue="a")
    with pytest.raises(InvalidConfigError, match="max_tenants"):
        QueueCollector(max_tenants=-1)
    with pytest.raises(InvalidConfigError, match="interval"):
        collector.start(interval=0)


async def test_bad_event_records_are_refused_and_count_nothing() -> None:
    clock = ManualClock()
    limiter = LLMThrottle(60, 10_000, clock=clock)
    dispatcher = create_in_memory_queue(clock=clock)
    collector = QueueCollector()
    watched = collector.watch(dispatcher, limiter)
    await dispatcher.enqueue(LLMRequest("a", None, Priority.HIGH, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    for latency in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(InvalidRequestError, match="dequeue_seconds"):
            watched.record_dispatch(job, latency)
    with pytest.raises(InvalidRequestError, match="tokens"):
        watched.record_completion(job, -5)
    samples = _samples(generate_latest(_registry(collector)))
    assert _value(samples, "llmqd_dispatched_total") == 0
    assert _value(samples, "llmqd_completed_total") == 0
    assert _value(samples, "llmqd_wait_time_seconds_count", priority="HIGH") == 0


def test_a_class_instead_of_a_dispatcher_or_limiter_and_labels_no_scrape_can_write_are_refused() -> None:
    """A class has the methods, unbound (the first refresh raised `TypeError`); a label value
    with a lone surrogate cannot be written as UTF-8 (every scrape raised). Refused at
    ``watch``, which then watches nothing."""
    collector = QueueCollector()
    dispatcher = create_in_memory_queue()
    with pytest.raises(InvalidConfigError, match="get_queue_metrics"):
        collector.watch(LLMQueueDispatcher)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="get_metrics"):
        collector.watch(dispatcher, LLMThrottle)
    with pytest.raises(InvalidConfigError, match="label queue must be a str of valid Unicode"):
        collector.watch(dispatcher, queue="\ud800")
    # Nothing was watched: the first good watch may choose its labels.
    collector.watch(dispatcher, region="eu")


async def test_event_records_of_a_non_job_or_of_more_tokens_than_a_count_holds_are_refused() -> None:
    """One completion of 10**400 tokens was counted, and every later scrape raised
    `OverflowError`; a record of something that is not a job raised `AttributeError`."""
    clock = ManualClock()
    limiter = LLMThrottle(60, 10_000, clock=clock)
    dispatcher = create_in_memory_queue(clock=clock)
    collector = QueueCollector()
    watched = collector.watch(dispatcher, limiter)
    await dispatcher.enqueue(LLMRequest("a", None, Priority.HIGH, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    for tokens in (10**400, 2**53 + 1):
        with pytest.raises(InvalidRequestError, match="tokens must be None or an int within"):
            watched.record_completion(job, tokens)
    for bad in (None, "job", job.message):
        with pytest.raises(InvalidRequestError, match="job must be a ProcessableMessage"):
            watched.record_dispatch(bad, 0.001)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="job must be a ProcessableMessage"):
            watched.record_completion(bad, 5)  # type: ignore[arg-type]
    watched.record_completion(job, 2**53)
    samples = _samples(generate_latest(_registry(collector)))
    assert _value(samples, "llmqd_dispatched_total") == 0
    assert _value(samples, "llmqd_completed_total") == 1
    assert _value(samples, "llmqd_completed_tokens_total") == 2**53


class _BackwardsSource:
    """A dispatcher stand-in whose report says what a clock stepped back could make it say."""

    async def get_queue_metrics(self) -> QueueMetrics:
        return QueueMetrics(
            queue=QueueMetricsReport(
                oldest_message_age=-3.0,
                wait_time_percentiles=WaitTimePercentiles(p50=-1.0, p95=-0.5, p99=float("nan")),
            ),
            processing=ProcessingMetrics(),
            performance=PerformanceMetrics(dequeue_latency=LatencyPercentiles(p50=-1e-6, p99=-1.0)),
            tenants={
                "acme": TenantMetrics(visible=1, wait_time_percentiles=WaitTimePercentiles(-2.0, -2.0, -2.0))
            },
        )


async def test_no_wait_age_or_latency_is_shown_below_zero() -> None:
    collector = QueueCollector()
    collector.watch(_BackwardsSource(), queue="q")
    body, _ = await collector.render()
    seconds = {key: value for key, value in _samples(body).items() if key[0].endswith("_seconds")}
    assert {name for name, _ in seconds} >= {
        "llmqd_oldest_message_age_seconds",
        "llmqd_window_wait_p50_seconds",
        "llmqd_window_wait_p99_seconds",
        "llmqd_window_dequeue_latency_p99_seconds",
        "llmqd_tenant_wait_p95_seconds",
    }
    assert set(seconds.values()) == {0.0}


async def test_names_follow_the_prometheus_conventions() -> None:
    clock = ManualClock()
    limiter = LLMThrottle(60, 10_000, clock=clock)
    dispatcher = create_in_memory_queue(clock=clock)
    collector = QueueCollector()
    watched = collector.watch(dispatcher, limiter, queue="q")
    await dispatcher.enqueue(LLMRequest("a", None, Priority.HIGH, TokenInfo(10), tenant="acme"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    watched.record_dispatch(job, 0.001)
    body, _ = await collector.render()
    families = list(text_string_to_metric_families(body.decode()))
    assert len(families) > 20
    for family in families:
        assert family.name.startswith("llmqd_"), family.name
        # Base units: seconds, not minutes or milliseconds; rates per second.
        assert not any(unit in family.name for unit in ("minute", "_ms", "millis")), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            if family.type == "gauge":
                # "quantile" belongs to summaries; a gauge says its percentile in its name.
                assert "quantile" not in sample.labels, sample
        if family.type == "counter":
            assert family.samples, family.name
    types = {family.name: family.type for family in families}
    assert types["llmqd_wait_time_seconds"] == "histogram"
    assert types["llmqd_window_wait_p95_seconds"] == "gauge"
    assert types["llmqd_dispatched"] == "counter"  # exposed as llmqd_dispatched_total


async def test_a_scrape_reports_slo_attainment_and_the_binding_limit() -> None:
    clock = ManualClock(1_000.0)
    limiter = LLMThrottle(600, 1_000, clock=clock)
    dispatcher = create_in_memory_queue(clock=clock, slo_targets={"URGENT": 1.0}, visibility_timeout=3_600)
    collector = QueueCollector()
    registry = _registry(collector)
    collector.watch(dispatcher, limiter, queue="chat")
    await dispatcher.enqueue(LLMRequest("u", None, Priority.URGENT, TokenInfo(900)))
    await dispatcher.enqueue(LLMRequest("n", None, Priority.NORMAL, TokenInfo(900)))
    clock.advance(2.0)
    assert await dispatcher.dequeue(limiter) is not None  # URGENT, 2 s: misses its 1 s target
    assert await dispatcher.dequeue(limiter) is None  # NORMAL: 100 tokens left

    await collector.refresh()
    samples = _samples(generate_latest(registry))
    assert _value(samples, "llmqd_slo_attainment_ratio", queue="chat", priority="URGENT") == 0.0
    assert _value(samples, "llmqd_slo_target_seconds", queue="chat", priority="URGENT") == 1.0
    assert _value(samples, "llmqd_slo_target_seconds", queue="chat", priority="LOW") == 1800.0
    assert _value(samples, "llmqd_window_dispatches", queue="chat", priority="URGENT") == 1
    assert _value(samples, "llmqd_window_dispatches_within_slo", queue="chat", priority="URGENT") == 0
    # No NORMAL dispatch yet: no ratio rather than a made-up one.
    assert ("llmqd_slo_attainment_ratio", (("priority", "NORMAL"), ("queue", "chat"))) not in samples
    binding = {limit: _value(samples, "llmqd_binding_limit", queue="chat", limit=limit) for limit in _LIMITS}
    assert binding == {**dict.fromkeys(_LIMITS, 0.0), "tpm": 1.0}
    assert _value(samples, "llmqd_binding_limit", queue="chat", limit="none") == 0.0

    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is not None  # NORMAL, after waiting for TPM
    await collector.refresh()
    samples = _samples(generate_latest(registry))
    assert _value(samples, "llmqd_slo_attainment_ratio", queue="chat", priority="NORMAL") == 1.0
    assert _value(samples, "llmqd_window_limited_dispatches", queue="chat", limit="tpm") == 1
    assert _value(samples, "llmqd_window_limited_dispatches", queue="chat", limit="rpm") == 0
    assert _value(samples, "llmqd_binding_limit", queue="chat", limit="tpm") == 1.0


async def test_no_binding_limit_is_exported_as_none() -> None:
    collector = QueueCollector()
    collector.watch(create_in_memory_queue(), queue="q")
    samples = _samples((await collector.render())[0])
    assert _value(samples, "llmqd_binding_limit", queue="q", limit="none") == 1.0
    assert {_value(samples, "llmqd_binding_limit", queue="q", limit=limit) for limit in _LIMITS} == {0.0}


class _OutOfRangeSource:
    """A dispatcher stand-in whose scheduling figures are out of range."""

    async def get_queue_metrics(self) -> QueueMetrics:
        return QueueMetrics(
            queue=QueueMetricsReport(),
            processing=ProcessingMetrics(),
            performance=PerformanceMetrics(),
            scheduling=SchedulingMetrics(
                slo_attainment={
                    "URGENT": SloAttainment(target=-1.0, dispatched=-2, met=-3, attainment=-0.5),
                    "HIGH": SloAttainment(target=30.0, dispatched=1, met=2, attainment=2.0),
                },
                waited_by_limit={"TPM": -1},
            ),
        )


async def test_slo_figures_are_never_shown_out_of_range() -> None:
    collector = QueueCollector()
    collector.watch(_OutOfRangeSource(), queue="q")
    samples = _samples((await collector.render())[0])
    assert _value(samples, "llmqd_slo_attainment_ratio", queue="q", priority="URGENT") == 0.0
    assert _value(samples, "llmqd_slo_attainment_ratio", queue="q", priority="HIGH") == 1.0
    assert _value(samples, "llmqd_slo_target_seconds", queue="q", priority="URGENT") == 0.0
    assert _value(samples, "llmqd_window_dispatches", queue="q", priority="URGENT") == 0
    assert _value(samples, "llmqd_window_dispatches_within_slo", queue="q", priority="URGENT") == 0
    assert _value(samples, "llmqd_window_limited_dispatches", queue="q", limit="tpm") == 0


async def test_each_limit_the_limiter_keeps_reports_its_capacity_and_what_it_admits_now() -> None:
    clock = ManualClock()
    limiter = LLMThrottle(
        60, 40_000, itpm=30_000, otpm=8_000, rpd=1_000, tpd=2_000_000, max_concurrent=4, clock=clock
    )
    assert limiter.consume("a", 1_200, input_tokens=1_000, output_tokens=200)
    collector = QueueCollector()
    collector.watch(create_in_memory_queue(clock=clock), limiter, queue="q")
    samples = _samples((await collector.render())[0])
    expected = {
        "rpm": (60, 59),
        "tpm": (40_000, 38_800),
        "itpm": (30_000, 29_000),
        "otpm": (8_000, 7_800),
        "rpd": (1_000, 999),
        "tpd": (2_000_000, 1_998_800),
        "concurrency": (4, 3),
    }
    for limit, (capacity, available) in expected.items():
        assert _value(samples, "llmqd_limiter_limit_capacity", queue="q", limit=limit) == capacity
        assert _value(samples, "llmqd_limiter_limit_available", queue="q", limit=limit) == available


async def test_every_family_labelled_limit_names_a_limit_the_same_way() -> None:
    clock = ManualClock()
    limiter = LLMThrottle(
        60, 1_000, itpm=5_000, otpm=4_000, rpd=1_000, tpd=10_000, max_concurrent=4, clock=clock
    )
    dispatcher = create_in_memory_queue(clock=clock)
    await dispatcher.enqueue(LLMRequest("a", None, token_info=TokenInfo(900)))
    await dispatcher.enqueue(LLMRequest("b", None, token_info=TokenInfo(900)))
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None  # waits for tpm
    collector = QueueCollector()
    collector.watch(dispatcher, limiter, queue="q")
    samples = _samples((await collector.render())[0])
    by_family: dict[str, set[str]] = {}
    for name, labels in samples:
        if "limit" in dict(labels):
            by_family.setdefault(name, set()).add(dict(labels)["limit"])
    kept = by_family["llmqd_limiter_limit_capacity"]
    assert kept == {"rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency"}
    assert by_family["llmqd_binding_limit"] == kept | {"none"}
    assert by_family["llmqd_window_limited_dispatches"] == kept
    binding = [
        dict(labels)["limit"]
        for name, labels in samples
        if name == "llmqd_binding_limit" and samples[(name, labels)] == 1.0
    ]
    assert binding == ["tpm"]


async def test_only_the_limits_a_limiter_keeps_are_reported() -> None:
    collector = QueueCollector()
    collector.watch(create_in_memory_queue(), LLMThrottle(30, 5_000), queue="q")
    samples = _samples((await collector.render())[0])
    reported = {dict(labels)["limit"] for name, labels in samples if name == "llmqd_limiter_limit_capacity"}
    assert reported == {"rpm", "tpm"}
