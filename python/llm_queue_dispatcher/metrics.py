"""Dispatcher metrics: the report types and the recorder that feeds them.

Everything is measured on the dispatcher's clock, so a simulation on a `ManualClock` reports
simulated throughput and wait times. Samples older than ``metrics_retention`` are dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "InFlightDetail",
    "LatencyPercentiles",
    "MetricsRecorder",
    "PerformanceMetrics",
    "ProcessingMetrics",
    "QueueMetrics",
    "QueueMetricsReport",
    "TenantMetrics",
    "Throughput",
    "WaitTimePercentiles",
]


class _Report:
    def to_dict(self) -> dict[str, Any]:
        """The report as plain dicts, lists and numbers (JSON-ready but for inf/nan)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class WaitTimePercentiles(_Report):
    """Seconds from enqueue to dispatch of the messages dispatched within the retention window."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True)
class Throughput(_Report):
    """Completions over the last minute of the clock; tokens are actual where known."""

    messages_per_minute: float = 0.0
    tokens_per_minute: float = 0.0


@dataclass(frozen=True)
class QueueMetricsReport(_Report):
    """The ``.queue`` part of `QueueMetrics`; also what custom scorers see as ``queue_metrics``."""

    approximate_number_of_messages: int = 0
    approximate_number_of_messages_in_flight: int = 0
    buffered_messages: int = 0
    total_messages: int = 0
    messages_by_priority: dict[str, int] = field(default_factory=dict)
    oldest_message_age: float = 0.0
    average_wait_time: float = 0.0
    wait_time_percentiles: WaitTimePercentiles = field(default_factory=WaitTimePercentiles)
    throughput: Throughput = field(default_factory=Throughput)
    dead_lettered: int = 0
    failed: int = 0
    #: Visible messages whose estimate exceeds the token capacity of the limiter last used:
    #: they can never be dispatched (see `LLMQueueDispatcher.take_unfittable`).
    unfittable_messages: int = 0
    #: Requests removed unsent because their ``deadline`` had passed (``drop_expired``).
    expired_deadlines: int = 0


@dataclass(frozen=True)
class InFlightDetail(_Report):
    """One message handed out and not yet marked."""

    request_id: str
    message_id: str
    priority: int
    estimated_tokens: int
    score: float
    started_at: float
    age: float


@dataclass(frozen=True)
class ProcessingMetrics(_Report):
    """Messages handed out by this dispatcher and not yet marked."""

    active_requests: int = 0
    in_flight_details: list[InFlightDetail] = field(default_factory=list)


@dataclass(frozen=True)
class LatencyPercentiles(_Report):
    """Seconds of wall time spent inside `dequeue` selecting a message."""

    p50: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True)
class PerformanceMetrics(_Report):
    """How the dispatcher itself performs."""

    prefetch_enabled: bool = False
    buffer_utilization: float = 0.0
    dequeue_latency: LatencyPercentiles = field(default_factory=LatencyPercentiles)


@dataclass(frozen=True)
class TenantMetrics(_Report):
    """One tenant's share of the queue (a request's ``tenant``; None is the tenant ``""``)."""

    visible: int = 0
    in_flight: int = 0
    #: Tokens charged to the tenant over the fairness window (estimates, corrected to actual
    #: counts at the marks): what ``fair_priority`` ranks tenants by.
    tokens_in_window: float = 0.0
    #: Tokens of the tenant's requests marked processed (actual where known).
    tokens_served: int = 0
    wait_time_percentiles: WaitTimePercentiles = field(default_factory=WaitTimePercentiles)


@dataclass(frozen=True)
class QueueMetrics(_Report):
    """Everything `LLMQueueDispatcher.get_queue_metrics()` reports."""

    queue: QueueMetricsReport
    processing: ProcessingMetrics
    performance: PerformanceMetrics
    tenants: dict[str, TenantMetrics] = field(default_factory=dict)


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, linearly interpolated; 0 when empty."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


class _Window:
    """Counts per clock second over the last ``span`` seconds: O(span) memory, however many
    events arrive."""

    __slots__ = ("_buckets", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._buckets: deque[list[float]] = deque()  # [second, count, tokens]

    def add(self, now: float, count: float, tokens: float) -> None:
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            bucket = self._buckets[-1]
            bucket[1] += count
            bucket[2] += tokens
        elif self._buckets and self._buckets[-1][0] > second:
            # A clock read before another's later reading: count it in the latest second.
            bucket = self._buckets[-1]
            bucket[1] += count
            bucket[2] += tokens
        else:
            self._buckets.append([second, count, tokens])
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.span
        while self._buckets and self._buckets[0][0] + 1 <= horizon:
            self._buckets.popleft()

    def totals(self, now: float) -> tuple[float, float]:
        """Events and tokens counted in the window ending at ``now``."""
        self._expire(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)


class _TenantRecord:
    __slots__ = ("last_seen", "tokens_served", "usage", "waits")

    def __init__(self, fairness_window: float, samples: int) -> None:
        self.waits: deque[tuple[float, float]] = deque(maxlen=samples)
        self.usage = _Window(fairness_window)
        self.tokens_served = 0
        self.last_seen = -math.inf


def _percentiles(samples: list[float]) -> WaitTimePercentiles:
    samples.sort()
    return WaitTimePercentiles(
        p50=percentile(samples, 0.5), p95=percentile(samples, 0.95), p99=percentile(samples, 0.99)
    )


class MetricsRecorder:
    """Streaming summaries of dispatches and completions, bounded in memory whatever the rate.

    Wait times keep the last ``_WAIT_SAMPLES`` dispatches within the retention window,
    throughput counts completions per clock second over the last minute, and each tenant keeps
    its own last waits and its token use over the fairness window.
    """

    # Samples kept regardless of the clock (a ManualClock may never advance).
    _WAIT_SAMPLES = 10_000
    _LATENCY_SAMPLES = 10_000
    _TENANT_WAIT_SAMPLES = 2_000

    def __init__(self, retention: float, fairness_window: float = 60.0) -> None:
        self.retention = retention
        self.fairness_window = fairness_window
        self._waits: deque[tuple[float, float]] = deque(maxlen=self._WAIT_SAMPLES)
        self._completions = _Window(min(60.0, retention))
        self._latencies: deque[float] = deque(maxlen=self._LATENCY_SAMPLES)
        self._tenants: dict[str, _TenantRecord] = {}
        self.failed = 0
        self.completed = 0
        self.expired_deadlines = 0

    def _tenant(self, tenant: str, now: float) -> _TenantRecord:
        record = self._tenants.get(tenant)
        if record is None:
            record = self._tenants[tenant] = _TenantRecord(self.fairness_window, self._TENANT_WAIT_SAMPLES)
        record.last_seen = max(record.last_seen, now)
        return record

    def record_dispatch(
        self, now: float, wait: float, latency: float, tenant: str = "", charged_tokens: int = 0
    ) -> None:
        """A message was handed out after waiting ``wait`` s; selecting it took ``latency`` s."""
        self._waits.append((now, wait))
        self._latencies.append(latency)
        record = self._tenant(tenant, now)
        record.waits.append((now, wait))
        record.usage.add(now, 1, charged_tokens)

    def record_completion(self, now: float, tokens: int, tenant: str = "", correction: int = 0) -> None:
        """A message was marked processed having used ``tokens`` tokens; ``correction`` is the
        difference from what its dispatch charged the tenant."""
        self.completed += 1
        self._completions.add(now, 1, tokens)
        record = self._tenant(tenant, now)
        record.tokens_served += tokens
        if correction:
            record.usage.add(now, 0, correction)

    def record_failure(self, now: float = 0.0, tenant: str = "", correction: int = 0) -> None:
        """A message was marked failed (or dead-lettered); ``correction`` takes back what its
        dispatch charged the tenant."""
        self.failed += 1
        if correction:
            self._tenant(tenant, now).usage.add(now, 0, correction)

    def wait_times(self, now: float) -> tuple[float, WaitTimePercentiles]:
        """Average wait and its percentiles over the retained dispatches."""
        horizon = now - self.retention
        while self._waits and self._waits[0][0] < horizon:
            self._waits.popleft()
        waits = [wait for _, wait in self._waits]
        if not waits:
            return 0.0, WaitTimePercentiles()
        return sum(waits) / len(waits), _percentiles(waits)

    def throughput(self, now: float) -> Throughput:
        """Completions and tokens over the last 60 s of the clock (or the retention, if shorter)."""
        messages, tokens = self._completions.totals(now)
        scale = 60.0 / self._completions.span
        return Throughput(messages_per_minute=messages * scale, tokens_per_minute=tokens * scale)

    def dequeue_latency(self) -> LatencyPercentiles:
        """Percentiles of the time spent selecting, over the last samples."""
        latencies = sorted(self._latencies)
        return LatencyPercentiles(p50=percentile(latencies, 0.5), p99=percentile(latencies, 0.99))

    def tenant_summaries(
        self, now: float, keep: set[str]
    ) -> dict[str, tuple[float, int, WaitTimePercentiles]]:
        """Per tenant: token use over the fairness window, tokens served, wait percentiles.
        Tenants idle for longer than the retention and not in ``keep`` are forgotten."""
        out: dict[str, tuple[float, int, WaitTimePercentiles]] = {}
        horizon = now - self.retention
        for name in list(self._tenants):
            record = self._tenants[name]
            if record.last_seen < horizon and name not in keep:
                del self._tenants[name]
                continue
            _, used = record.usage.totals(now)
            waits = [wait for at, wait in record.waits if at >= horizon]
            out[name] = (max(0.0, used), record.tokens_served, _percentiles(waits))
        return out
