"""Dispatcher metrics: the report types `get_queue_metrics()` returns, built from the figures of
the dispatcher's Rust core (which keeps the books) and the store's counts.

Everything is measured on the dispatcher's clock, so a simulation on a `ManualClock` reports
simulated throughput and wait times. Samples older than ``metrics_retention`` are dropped. Waits
and ages are never negative: a clock that moves backwards (a wall clock stepped back, a callable
clock of another process) reports 0, not a negative wait.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .types import Priority

if TYPE_CHECKING:
    from ._core import CoreReport, DispatchCore
    from .config import LLMQueueDispatcherConfig
    from .storage.base import QueueAttributes

__all__ = [
    "InFlightDetail",
    "LatencyPercentiles",
    "PerformanceMetrics",
    "ProcessingMetrics",
    "QueueMetrics",
    "QueueMetricsReport",
    "SchedulingMetrics",
    "SloAttainment",
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

    def __post_init__(self) -> None:
        for name in ("oldest_message_age", "average_wait_time"):
            if not getattr(self, name) >= 0.0:  # a clock stepped back: 0, never negative
                object.__setattr__(self, name, 0.0)


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

    def __post_init__(self) -> None:
        # A clock read earlier than the dispatch (stepped back) must not report a negative age.
        if not self.age >= 0.0:
            object.__setattr__(self, "age", 0.0)


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


#: The limits a dispatch can wait for, as `SchedulingMetrics` names them.
LIMITS = ("RPM", "TPM", "ITPM", "OTPM", "RPD", "TPD", "concurrency")


@dataclass(frozen=True)
class SloAttainment(_Report):
    """One priority's dispatches over the metrics window against its wait target."""

    #: The wait target, seconds from enqueue to dispatch (``slo_targets``).
    target: float = 0.0
    #: Messages of the priority dispatched within the window.
    dispatched: int = 0
    #: Those that waited at most the target.
    met: int = 0
    #: ``met / dispatched``. When none was dispatched: 0.0 if a message of the priority is
    #: waiting longer than the target (a starved class reads as missing its target, not as
    #: unknown), else None.
    attainment: float | None = None
    #: Seconds the oldest waiting message of the priority has waited; None when none waits.
    oldest_wait: float | None = None


@dataclass(frozen=True)
class SchedulingMetrics(_Report):
    """How the scheduling keeps its promises, over the window of the wait percentiles (the
    dispatches of the last ``metrics_retention`` seconds, at most the last 10,000)."""

    #: Per priority name (URGENT first): dispatches within the window that met the wait target.
    slo_attainment: dict[str, SloAttainment] = field(default_factory=dict)
    #: The limit that made requests wait (one of ``"RPM"``, ``"TPM"``, ``"ITPM"``, ``"OTPM"``,
    #: ``"RPD"``, ``"TPD"``, ``"concurrency"``), as the limiter named it when it refused a
    #: waiting request: the one refusing now while nothing has been dispatched since its
    #: latest refusal, else the one most of the window's dispatches waited for; ``"none"``
    #: when no dispatch of the window waited for a limit.
    binding_limit: str = "none"
    #: Dispatches within the window that waited for each limit (the limiter refused while
    #: their message was waiting; the latest refusal names the limit).
    waited_by_limit: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))


@dataclass(frozen=True)
class QueueMetrics(_Report):
    """Everything `LLMQueueDispatcher.get_queue_metrics()` reports."""

    queue: QueueMetricsReport
    processing: ProcessingMetrics
    performance: PerformanceMetrics
    tenants: dict[str, TenantMetrics] = field(default_factory=dict)
    scheduling: SchedulingMetrics = field(default_factory=SchedulingMetrics)


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, linearly interpolated; 0 when empty."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def queue_report(r: CoreReport) -> QueueMetricsReport:
    """The queue report from the core's figures alone (what custom scorers read as
    ``queue_metrics``): no store round trip, so no dead-letter count."""
    by_priority = dict(zip([p.name for p in Priority], r.counts_by_priority, strict=True))
    selectable = sum(by_priority.values())
    oldest = r.oldest_enqueued_at
    return QueueMetricsReport(
        approximate_number_of_messages=selectable,
        approximate_number_of_messages_in_flight=r.in_flight,
        buffered_messages=r.buffered,
        total_messages=selectable + r.in_flight,
        messages_by_priority=by_priority,
        oldest_message_age=0.0 if oldest is None else max(0.0, r.now - oldest),
        average_wait_time=r.average_wait,
        wait_time_percentiles=WaitTimePercentiles(r.wait_p50, r.wait_p95, r.wait_p99),
        throughput=Throughput(r.messages_per_minute, r.tokens_per_minute),
        failed=r.failed,
        unfittable_messages=r.unfittable,
        expired_deadlines=r.expired_deadlines,
    )


def queue_metrics(
    core: DispatchCore,
    attributes: QueueAttributes,
    config: LLMQueueDispatcherConfig,
    *,
    buffered_in_store: bool,
) -> QueueMetrics:
    """`LLMQueueDispatcher.get_queue_metrics()`: the core's figures with the store's
    ``attributes``. ``buffered_in_store``: the store counts the prefetch buffer's messages as in
    flight (the buffer leased them); the report counts them once, as waiting."""
    report, now = core.report(), core.now()
    fields = dict(queue_report(report).__dict__, dead_lettered=attributes.dead_lettered)
    if buffered_in_store:
        visible = attributes.approximate_number_of_messages + report.buffered
        in_flight = max(0, attributes.approximate_number_of_messages_in_flight - report.buffered)
        fields.update(
            approximate_number_of_messages=visible,
            approximate_number_of_messages_in_flight=in_flight,
            total_messages=visible + in_flight,
        )
    details = [
        InFlightDetail(
            d.request_id,
            d.message_id,
            d.priority,
            d.estimated_tokens,
            d.score,
            d.started_at,
            now - d.started_at,
        )
        for d in core.in_flight()
    ]
    tenants = {
        t.name: TenantMetrics(
            t.visible,
            t.in_flight,
            t.tokens_in_window,
            t.tokens_served,
            WaitTimePercentiles(t.wait_p50, t.wait_p95, t.wait_p99),
        )
        for t in core.tenants()
    }
    return QueueMetrics(
        queue=QueueMetricsReport(**fields),
        processing=ProcessingMetrics(active_requests=len(details), in_flight_details=details),
        performance=PerformanceMetrics(
            prefetch_enabled=config.enable_prefetch,
            buffer_utilization=report.buffered / config.buffer_size,
            dequeue_latency=LatencyPercentiles(report.latency_p50, report.latency_p99),
        ),
        tenants=tenants,
        scheduling=scheduling(report),
    )


def scheduling(report: CoreReport) -> SchedulingMetrics:
    """The scheduling part of a metrics report, from the core's figures."""
    slo = {}
    for priority, target, dispatched, met, oldest in zip(
        Priority,
        report.slo_targets,
        report.slo_dispatched,
        report.slo_met,
        report.oldest_by_priority,
        strict=True,
    ):
        oldest_wait = None if oldest is None else max(0.0, report.now - oldest)
        if dispatched:
            attainment: float | None = met / dispatched
        else:
            attainment = 0.0 if oldest_wait is not None and oldest_wait > target else None
        slo[priority.name] = SloAttainment(target, dispatched, met, attainment, oldest_wait)
    return SchedulingMetrics(
        slo_attainment=slo,
        binding_limit=report.binding_limit or "none",
        waited_by_limit=dict(report.waited_by_limit),
    )
