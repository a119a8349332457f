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


class MetricsRecorder:
    """Keeps timestamped samples for the retention window; O(1) per record, work on report."""

    # Dequeue latency samples kept regardless of the clock (a ManualClock may never advance).
    _LATENCY_SAMPLES = 10_000

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self._waits: deque[tuple[float, float]] = deque()  # (dispatched_at, wait seconds)
        self._completions: deque[tuple[float, int]] = deque()  # (completed_at, tokens)
        self._latencies: deque[float] = deque(maxlen=self._LATENCY_SAMPLES)
        self.failed = 0
        self.completed = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.retention
        while self._waits and self._waits[0][0] < horizon:
            self._waits.popleft()
        while self._completions and self._completions[0][0] < horizon:
            self._completions.popleft()

    def record_dispatch(self, now: float, wait: float, latency: float) -> None:
        """A message was handed out after waiting ``wait`` s; selecting it took ``latency`` s."""
        self._waits.append((now, wait))
        self._latencies.append(latency)
        if len(self._waits) > 4 * self._LATENCY_SAMPLES:
            self._expire(now)

    def record_completion(self, now: float, tokens: int) -> None:
        """A message was marked processed having used ``tokens`` tokens."""
        self.completed += 1
        self._completions.append((now, tokens))
        if len(self._completions) > 4 * self._LATENCY_SAMPLES:
            self._expire(now)

    def record_failure(self) -> None:
        """A message was marked failed."""
        self.failed += 1

    def wait_times(self, now: float) -> tuple[float, WaitTimePercentiles]:
        """Average wait and its percentiles over the retention window."""
        self._expire(now)
        waits = sorted(wait for _, wait in self._waits)
        if not waits:
            return 0.0, WaitTimePercentiles()
        average = sum(waits) / len(waits)
        return average, WaitTimePercentiles(
            p50=percentile(waits, 0.5), p95=percentile(waits, 0.95), p99=percentile(waits, 0.99)
        )

    def throughput(self, now: float) -> Throughput:
        """Completions and tokens over the last 60 s of the clock (or the retention, if shorter)."""
        self._expire(now)
        window = min(60.0, self.retention)
        horizon = now - window
        messages = 0
        tokens = 0
        for completed_at, used in reversed(self._completions):
            if completed_at < horizon:
                break
            messages += 1
            tokens += used
        scale = 60.0 / window
        return Throughput(messages_per_minute=messages * scale, tokens_per_minute=tokens * scale)

    def dequeue_latency(self) -> LatencyPercentiles:
        """Percentiles of the time spent selecting, over the last samples."""
        latencies = sorted(self._latencies)
        return LatencyPercentiles(p50=percentile(latencies, 0.5), p99=percentile(latencies, 0.99))
