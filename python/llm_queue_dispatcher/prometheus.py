"""Prometheus metrics of dispatchers and rate limiters (extra ``[prometheus]``: prometheus-client).

`QueueCollector` is a prometheus-client collector. Register it once, tell it which dispatchers
(and their limiters) to watch, and keep its snapshot fresh from your event loop::

    from prometheus_client import REGISTRY
    from llm_queue_dispatcher.prometheus import QueueCollector

    collector = QueueCollector()
    REGISTRY.register(collector)
    watched = collector.watch(dispatcher, limiter, queue="chat")   # labels are yours to choose
    collector.start(interval=5.0)       # inside the running loop: refreshes every 5 s

Two kinds of figures, read two ways:

- **State, read on refresh.** `refresh()` awaits each dispatcher's ``get_queue_metrics()`` and
  reads each limiter's ``get_metrics()`` (awaited too for an async limiter such as
  ``RedisThrottle``), then swaps in the new snapshot. ``collect()``, which prometheus-client
  calls on every scrape (possibly from its own HTTP thread), only formats the latest snapshot:
  a scrape never waits on the event loop, never awaits a store, and never calls anything that
  changes a dispatcher. Queue depth by priority, in flight, oldest age, unfittable, the wait
  and dequeue-latency percentiles of the dispatcher's window, throughput, failed and
  dead-lettered totals, the limiter's available tokens and requests and its capacities, its
  debt, each tenant's counts, tokens and waits (``get_queue_metrics().tenants``), and the
  scheduling figures (``get_queue_metrics().scheduling``): SLO attainment per priority
  (``llmqd_slo_attainment_ratio``, with its target and counts) and the binding limit
  (``llmqd_binding_limit{limit="tpm"}`` 1, the other limits and ``none`` 0; the ``limit`` label
  names a limit as ``llmqd_limiter_limit_capacity`` does, in lower case).
- **Events, recorded as they happen.** The dispatcher keeps no cumulative dispatch or completion
  counts and no latency distribution, so the caller that dequeues reports them:
  ``watched.record_dispatch(job, dequeue_seconds)`` after a ``dequeue`` that returned a job and
  ``watched.record_completion(job, tokens)`` after ``mark_as_processed``. They feed the
  ``llmqd_dispatched_total`` and ``llmqd_completed_total`` counters and the wait-time (by
  priority) and dequeue-latency histograms; each is a few additions under a lock.

To serve the text format from an aiohttp app, refresh on each scrape::

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await collector.render(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

From an ASGI app (Starlette, FastAPI) mount prometheus-client's own app and keep the snapshot
fresh with ``collector.start()`` in the app's startup: ``app.mount("/metrics", make_asgi_app())``.
Names follow Prometheus' conventions: every one starts with ``llmqd_``, durations are in
seconds and rates per second (base units), counters end in ``_total``, and the percentiles the
dispatcher computes over its window are plain gauges named after their percentile
(``llmqd_window_wait_p95_seconds``), not gauges with a ``quantile`` label, which Prometheus
keeps for summaries. A wait is never shown below zero (a clock stepped back cannot make one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._checks import finite_float, shown
from .dispatcher import ProcessableMessage
from .errors import InvalidConfigError, InvalidRequestError
from .metrics import LIMITS, QueueMetrics, SchedulingMetrics
from .openai import MAX_TOKEN_COUNT
from .types import Priority

__all__ = [
    "DEQUEUE_LATENCY_BUCKETS",
    "LIMIT_NAMES",
    "WAIT_TIME_BUCKETS",
    "MetricsSource",
    "QueueCollector",
    "WatchedQueue",
]

#: Upper bounds (seconds) of the wait-time histogram: from enqueue to dispatch.
WAIT_TIME_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Upper bounds (seconds) of the dequeue-latency histogram: the wall time of one ``dequeue``.
DEQUEUE_LATENCY_BUCKETS: tuple[float, ...] = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
)

_LOGGER = logging.getLogger("llm_queue_dispatcher")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Label names the collector adds itself.
_RESERVED_LABELS = frozenset({"priority", "tenant", "quantile", "state", "le", "limit"})
_PRIORITY_NAMES = tuple(p.name for p in Priority)
# The percentiles of the dispatcher's reports, each exported as its own gauge.
_PERCENTILES = ("p50", "p95", "p99")
_LATENCY_PERCENTILES = ("p50", "p99")


class MetricsSource(Protocol):
    """What the collector reads from a dispatcher: `LLMQueueDispatcher` is one."""

    async def get_queue_metrics(self) -> QueueMetrics:
        """Queue, processing, performance and tenant metrics now."""
        ...


class _Histogram:
    """Cumulative bucket counts and a sum, exported as a Prometheus histogram."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out = [(_format_bound(bound), float(n)) for bound, n in zip(self.bounds, self.counts, strict=True)]
        out.append(("+Inf", float(self.count)))
        return out


def _format_bound(bound: float) -> str:
    return repr(float(bound))


def _seconds(value: float) -> float:
    """A duration for export: never below zero (nor NaN), whatever the clock did."""
    return float(value) if value > 0 else 0.0


def _check_seconds(name: str, value: object) -> float:
    number = finite_float(value)
    if number is None or number < 0:
        raise InvalidRequestError(f"{name} must be a finite number of seconds >= 0, got {shown(value)}")
    return number


def _check_job(job: object) -> None:
    if not isinstance(job, ProcessableMessage):
        raise InvalidRequestError(f"job must be a ProcessableMessage from dequeue, got {shown(job)}")


def _is_instance_with(value: object, method: str) -> bool:
    """Whether ``value`` has ``method`` to call: an object, not a class (whose method is
    unbound: the first refresh would raise `TypeError`)."""
    return not isinstance(value, type) and callable(getattr(value, method, None))


@dataclass(frozen=True)
class _Snapshot:
    queue: QueueMetrics | None = None
    limiter: Any = None  # RateLimitMetrics (or an async limiter's equivalent)


class WatchedQueue:
    """One dispatcher (and optionally its limiter) watched by a `QueueCollector`.

    ``limiter`` may be reassigned, e.g. after replacing a limiter to change its limits.
    """

    def __init__(self, dispatcher: MetricsSource, limiter: Any, labels: dict[str, str]) -> None:
        self.dispatcher = dispatcher
        self.limiter = limiter
        self.labels = labels
        self._lock = threading.Lock()
        self._dispatched = 0
        self._completed = 0
        self._completed_tokens = 0
        self._waits = {name: _Histogram(WAIT_TIME_BUCKETS) for name in _PRIORITY_NAMES}
        self._latency = _Histogram(DEQUEUE_LATENCY_BUCKETS)
        self._snapshot = _Snapshot()

    def record_dispatch(self, job: ProcessableMessage[Any], dequeue_seconds: float) -> None:
        """Counts a dispatch: ``job`` came out of a ``dequeue`` that took ``dequeue_seconds``.

        Its wait (from enqueue to dispatch, on the dispatcher's clock) goes to the wait-time
        histogram of its priority.
        """
        _check_job(job)
        latency = _check_seconds("dequeue_seconds", dequeue_seconds)
        wait = max(0.0, job.dispatched_at - job.message.attributes.enqueued_at.timestamp())
        priority = Priority(job.message.payload.priority).name
        with self._lock:
            self._dispatched += 1
            self._waits[priority].observe(wait)
            self._latency.observe(latency)

    def record_completion(self, job: ProcessableMessage[Any], tokens: int | None = None) -> None:
        """Counts a completion of ``job`` that used ``tokens`` (default: its estimate)."""
        _check_job(job)
        used = job.message.payload.token_info.estimated if tokens is None else tokens
        # At most MAX_TOKEN_COUNT, the rule of every count a request carries: the total is
        # exported as a float, and one count no float holds made every later scrape raise.
        if isinstance(used, bool) or not isinstance(used, int) or not 0 <= used <= MAX_TOKEN_COUNT:
            given = shown(tokens) if tokens is not None else f"None, and the job's estimate is {shown(used)}"
            raise InvalidRequestError(
                f"tokens must be None or an int within 0..{MAX_TOKEN_COUNT}, got {given}"
            )
        with self._lock:
            self._completed += 1
            self._completed_tokens += used

    async def _read(self) -> _Snapshot:
        queue = await self.dispatcher.get_queue_metrics()
        limiter_metrics = None
        if self.limiter is not None:
            limiter_metrics = self.limiter.get_metrics()
            if inspect.isawaitable(limiter_metrics):
                limiter_metrics = await limiter_metrics
        return _Snapshot(queue=queue, limiter=limiter_metrics)


class QueueCollector:
    """A prometheus-client collector of `llmqd_` metrics over the dispatchers it watches.

    ``collect()`` formats the snapshot taken by the last `refresh()` plus the events recorded
    since start; it never awaits and never calls into a dispatcher. Every watched queue must use
    the same label names (Prometheus needs one label set per metric family).

    Args:
        max_tenants: per watched queue, tenants exported at most (those with the most visible
            and in-flight messages first), to bound the series a scrape returns.
    """

    def __init__(self, *, max_tenants: int = 100) -> None:
        if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or max_tenants < 0:
            raise InvalidConfigError(f"max_tenants must be an int >= 0, got {max_tenants!r}")
        self.max_tenants = max_tenants
        self._watched: list[WatchedQueue] = []
        self._label_names: tuple[str, ...] | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self.last_refresh: float | None = None  # time.time() of the last completed refresh

    # -- what to watch ------------------------------------------------------------------------
    def watch(self, dispatcher: MetricsSource, limiter: Any = None, **labels: str) -> WatchedQueue:
        """Starts watching ``dispatcher`` (and ``limiter``, a `RateLimiter` or async limiter).

        ``labels`` (e.g. ``queue="chat"``) tell queues apart; their names must be the same for
        every watched queue and must not be ``priority``, ``tenant``, ``quantile``, ``state``,
        ``le`` or ``limit``.
        """
        if not _is_instance_with(dispatcher, "get_queue_metrics"):
            raise InvalidConfigError(f"dispatcher must have get_queue_metrics(), got {shown(dispatcher)}")
        if limiter is not None and not _is_instance_with(limiter, "get_metrics"):
            raise InvalidConfigError(f"limiter must have get_metrics(), got {shown(limiter)}")
        for name, value in labels.items():
            if not _LABEL_NAME.match(name) or name.startswith("__") or name in _RESERVED_LABELS:
                raise InvalidConfigError(f"label name {name!r} is not allowed")
            if not isinstance(value, str):
                raise InvalidConfigError(f"label {name} must be a str, got {shown(value)}")
            # The text format is UTF-8: a lone surrogate would make every scrape raise.
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidConfigError(
                    f"label {name} must be a str of valid Unicode (no lone surrogates), got {shown(value)}"
                ) from None
        names = tuple(sorted(labels))
        if self._label_names is not None and names != self._label_names:
            raise InvalidConfigError(
                f"every watched queue needs the labels {list(self._label_names)}, got {list(names)}"
            )
        values = tuple(labels[name] for name in names)
        if any(tuple(w.labels[n] for n in names) == values for w in self._watched):
            raise InvalidConfigError(f"a queue with the labels {labels!r} is already watched")
        self._label_names = names
        watched = WatchedQueue(dispatcher, limiter, {name: labels[name] for name in names})
        self._watched.append(watched)
        return watched

    def unwatch(self, watched: WatchedQueue) -> None:
        """Stops exporting ``watched``."""
        self._watched = [w for w in self._watched if w is not watched]

    # -- keeping the snapshot fresh -----------------------------------------------------------
    async def refresh(self) -> None:
        """Reads every watched dispatcher and limiter and swaps in the new snapshot.

        Yields to the event loop between queues, so refreshing many queues does not hold the
        loop for long. Concurrent calls run one at a time.
        """
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            for watched in list(self._watched):
                snapshot = await watched._read()
                watched._snapshot = snapshot  # one reference swap: collect() sees old or new
                await asyncio.sleep(0)
            self.last_refresh = time.time()

    def start(self, interval: float = 5.0) -> asyncio.Task[None]:
        """Refreshes every ``interval`` seconds in the running loop until the task is cancelled.

        A refresh that raises is logged and retried at the next interval.
        """
        seconds = finite_float(interval)
        if seconds is None or not seconds > 0:
            raise InvalidConfigError(
                f"interval must be a finite number of seconds > 0, got {shown(interval)}"
            )

        async def loop() -> None:
            while True:
                try:
                    await self.refresh()
                except Exception:
                    _LOGGER.exception("refreshing the Prometheus metrics failed")
                await asyncio.sleep(seconds)

        return asyncio.get_running_loop().create_task(loop())

    async def render(self, registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
        """Refreshes, then returns the text exposition of ``registry`` (default: only this
        collector) and its content type: the body of a ``/metrics`` response."""
        await self.refresh()
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            try:
                return generate_latest(registry), CONTENT_TYPE_LATEST
            finally:
                registry.unregister(self)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    # -- prometheus-client collector protocol -------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (lets a registry check names without collecting)."""
        return self._families().values()

    def collect(self) -> Iterator[Metric]:
        """The metric families with one sample set per watched queue, from the last snapshot."""
        families = self._families()
        for watched in list(self._watched):
            self._add_samples(families, watched)
        yield from families.values()

    def _families(self) -> dict[str, Metric]:
        base = list(self._label_names or ())
        tenant = [*base, "tenant"]
        gauge = GaugeMetricFamily
        counter = CounterMetricFamily
        specs: list[Metric] = [
            gauge(
                "llmqd_queue_messages", "Visible messages waiting, by priority.", labels=[*base, "priority"]
            ),
            gauge("llmqd_in_flight_messages", "Messages dispatched and not yet marked.", labels=base),
            gauge("llmqd_oldest_message_age_seconds", "Age of the oldest visible message.", labels=base),
            gauge(
                "llmqd_unfittable_messages",
                "Visible messages larger than the limiter's token capacity (never dispatchable).",
                labels=base,
            ),
            *(
                gauge(
                    f"llmqd_window_wait_{name}_seconds",
                    f"{name} of the wait from enqueue to dispatch over the dispatcher's metrics window.",
                    labels=base,
                )
                for name in _PERCENTILES
            ),
            *(
                gauge(
                    f"llmqd_window_dequeue_latency_{name}_seconds",
                    f"{name} of the time the dispatcher spent selecting, over its last samples.",
                    labels=base,
                )
                for name in _LATENCY_PERCENTILES
            ),
            gauge(
                "llmqd_throughput_messages_per_second",
                "Completions per second over the last minute.",
                labels=base,
            ),
            gauge(
                "llmqd_throughput_tokens_per_second",
                "Tokens of the completions per second over the last minute (actual where known).",
                labels=base,
            ),
            counter("llmqd_failed", "Dispatches marked failed.", labels=base),
            counter("llmqd_dead_lettered", "Messages dead-lettered by the store.", labels=base),
            counter("llmqd_expired_deadlines", "Requests removed unsent past their deadline.", labels=base),
            counter("llmqd_dispatched", "Dispatches recorded with record_dispatch().", labels=base),
            counter("llmqd_completed", "Completions recorded with record_completion().", labels=base),
            counter("llmqd_completed_tokens", "Tokens of the recorded completions.", labels=base),
            HistogramMetricFamily(
                "llmqd_wait_time_seconds",
                "Wait from enqueue to dispatch of the recorded dispatches, by priority.",
                labels=[*base, "priority"],
            ),
            HistogramMetricFamily(
                "llmqd_dequeue_latency_seconds",
                "Wall time of the recorded dequeue calls that returned a message.",
                labels=base,
            ),
            gauge("llmqd_limiter_available_tokens", "Tokens in the limiter's token bucket.", labels=base),
            gauge(
                "llmqd_limiter_capacity_tokens",
                "Capacity of the token bucket (burst_tpm, else tpm); it refills at tpm per minute.",
                labels=base,
            ),
            gauge(
                "llmqd_limiter_available_requests", "Requests in the limiter's request bucket.", labels=base
            ),
            gauge(
                "llmqd_limiter_capacity_requests",
                "Capacity of the request bucket (burst_rpm, else rpm); it refills at rpm per minute.",
                labels=base,
            ),
            gauge(
                "llmqd_limiter_debt_tokens",
                "Tokens the limiter's next consume takes on top of its estimate.",
                labels=base,
            ),
            gauge(
                "llmqd_tenant_messages",
                "A tenant's messages, visible or in flight.",
                labels=[*tenant, "state"],
            ),
            gauge(
                "llmqd_tenant_window_tokens",
                "Tokens charged to a tenant over the fairness window.",
                labels=tenant,
            ),
            counter(
                "llmqd_tenant_served_tokens",
                "Tokens of a tenant's requests marked processed.",
                labels=tenant,
            ),
            *(
                gauge(
                    f"llmqd_tenant_wait_{name}_seconds",
                    f"{name} of a tenant's wait from enqueue to dispatch.",
                    labels=tenant,
                )
                for name in _PERCENTILES
            ),
            *_limit_families(base),
        ]
        specs.extend(_scheduling_families(base))
        return {family.name: family for family in specs}

    def _add_samples(self, families: Mapping[str, Metric], watched: WatchedQueue) -> None:
        base = list(watched.labels.values())

        def add(name: str, value: float, *extra: str) -> None:
            family = families[name]
            assert isinstance(family, (GaugeMetricFamily, CounterMetricFamily))
            family.add_metric([*base, *extra], float(value))

        with watched._lock:
            dispatched, completed, tokens = watched._dispatched, watched._completed, watched._completed_tokens
            waits = {name: (h.buckets(), h.total) for name, h in watched._waits.items()}
            latency = (watched._latency.buckets(), watched._latency.total)
        add("llmqd_dispatched", dispatched)
        add("llmqd_completed", completed)
        add("llmqd_completed_tokens", tokens)
        wait_family = families["llmqd_wait_time_seconds"]
        assert isinstance(wait_family, HistogramMetricFamily)
        for name, (buckets, total) in waits.items():
            wait_family.add_metric([*base, name], buckets, total)
        latency_family = families["llmqd_dequeue_latency_seconds"]
        assert isinstance(latency_family, HistogramMetricFamily)
        latency_family.add_metric(base, latency[0], latency[1])

        snapshot = watched._snapshot
        if snapshot.queue is not None:
            report = snapshot.queue.queue
            for name in _PRIORITY_NAMES:
                add("llmqd_queue_messages", report.messages_by_priority.get(name, 0), name)
            add("llmqd_in_flight_messages", report.approximate_number_of_messages_in_flight)
            add("llmqd_oldest_message_age_seconds", _seconds(report.oldest_message_age))
            add("llmqd_unfittable_messages", report.unfittable_messages)
            for name in _PERCENTILES:
                add(
                    f"llmqd_window_wait_{name}_seconds", _seconds(getattr(report.wait_time_percentiles, name))
                )
            dequeue_latency = snapshot.queue.performance.dequeue_latency
            for name in _LATENCY_PERCENTILES:
                add(f"llmqd_window_dequeue_latency_{name}_seconds", _seconds(getattr(dequeue_latency, name)))
            add("llmqd_throughput_messages_per_second", report.throughput.messages_per_minute / 60.0)
            add("llmqd_throughput_tokens_per_second", report.throughput.tokens_per_minute / 60.0)
            add("llmqd_failed", report.failed)
            add("llmqd_dead_lettered", report.dead_lettered)
            add("llmqd_expired_deadlines", report.expired_deadlines)
            _add_scheduling_samples(add, snapshot.queue.scheduling)
            tenants = sorted(
                snapshot.queue.tenants.items(),
                key=lambda item: (-(item[1].visible + item[1].in_flight), item[0]),
            )[: self.max_tenants]
            for tenant, usage in tenants:
                add("llmqd_tenant_messages", usage.visible, tenant, "visible")
                add("llmqd_tenant_messages", usage.in_flight, tenant, "in_flight")
                add("llmqd_tenant_window_tokens", usage.tokens_in_window, tenant)
                add("llmqd_tenant_served_tokens", usage.tokens_served, tenant)
                for name in _PERCENTILES:
                    add(
                        f"llmqd_tenant_wait_{name}_seconds",
                        _seconds(getattr(usage.wait_time_percentiles, name)),
                        tenant,
                    )
        if snapshot.limiter is not None:
            limits = snapshot.limiter
            add("llmqd_limiter_available_tokens", limits.tpm.available)
            add("llmqd_limiter_capacity_tokens", limits.tpm.limit)
            add("llmqd_limiter_available_requests", limits.rpm.available)
            add("llmqd_limiter_capacity_requests", limits.rpm.limit)
            with contextlib.suppress(AttributeError):  # an async limiter may report no debt
                add("llmqd_limiter_debt_tokens", limits.compensation.total_debt)
            _add_limit_samples(add, limits)


# -- scheduling: SLO attainment and the binding limit (``get_queue_metrics().scheduling``) -----
_LIMIT_STATES = (*LIMITS, "none")


def _limit_label(limit: str) -> str:
    """A limit's ``limit`` label value: its name in lower case (``"TPM"`` -> ``"tpm"``), as the
    limiter's own gauges (`LIMIT_NAMES`) label it, so one label value means one limit."""
    return limit.lower()


def _scheduling_families(base: list[str]) -> list[Metric]:
    """The families of the scheduling metrics, over the dispatcher's metrics window."""
    priority, limit = [*base, "priority"], [*base, "limit"]
    return [
        GaugeMetricFamily(
            "llmqd_slo_attainment_ratio",
            "Share of a priority's dispatches over the dispatcher's metrics window that waited at "
            "most its target (absent while none was dispatched).",
            labels=priority,
        ),
        GaugeMetricFamily(
            "llmqd_slo_target_seconds",
            "A priority's wait target, from enqueue to dispatch (slo_targets).",
            labels=priority,
        ),
        GaugeMetricFamily(
            "llmqd_window_dispatches",
            "Dispatches of a priority over the dispatcher's metrics window.",
            labels=priority,
        ),
        GaugeMetricFamily(
            "llmqd_window_dispatches_within_slo",
            "Dispatches of a priority over the dispatcher's metrics window that met its wait target.",
            labels=priority,
        ),
        GaugeMetricFamily(
            "llmqd_binding_limit",
            "1 for the limit that made requests wait (rpm, tpm, itpm, otpm, rpd, tpd, concurrency, "
            "or none), 0 for the others.",
            labels=limit,
        ),
        GaugeMetricFamily(
            "llmqd_window_limited_dispatches",
            "Dispatches over the dispatcher's metrics window that waited for a limit, by limit.",
            labels=limit,
        ),
    ]


# -- every limit of the limiter -------------------------------------------------------------------
#: The limits a limiter may keep, by their metrics names: requests and tokens per minute, input
#: and output tokens per minute, requests and tokens per day, requests in flight.
LIMIT_NAMES = ("rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency")


def _limit_families(base: list[str]) -> list[Metric]:
    """The gauges of each limit the limiter keeps, labelled ``limit`` (one of `LIMIT_NAMES`):
    its capacity and what it holds now, in the limit's own unit (requests, tokens, or slots
    for ``concurrency``)."""
    labels = [*base, "limit"]
    return [
        GaugeMetricFamily(
            "llmqd_limiter_limit_capacity",
            "Capacity of each limit the limiter keeps (rpm, tpm, itpm, otpm, rpd, tpd: its bucket's "
            "burst or limit; concurrency: max_concurrent), in the limit's unit.",
            labels=labels,
        ),
        GaugeMetricFamily(
            "llmqd_limiter_limit_available",
            "What each limit the limiter keeps admits now (its bucket's level; concurrency: free "
            "slots), in the limit's unit.",
            labels=labels,
        ),
    ]


def _add_scheduling_samples(add: Callable[..., None], scheduling: SchedulingMetrics) -> None:
    """One watched queue's samples of `_scheduling_families`; ``add(name, value, *labels)``."""
    for name, slo in scheduling.slo_attainment.items():
        if slo.attainment is not None:
            add("llmqd_slo_attainment_ratio", min(1.0, max(0.0, slo.attainment)), name)
        add("llmqd_slo_target_seconds", _seconds(slo.target), name)
        add("llmqd_window_dispatches", max(0, slo.dispatched), name)
        add("llmqd_window_dispatches_within_slo", max(0, slo.met), name)
    for limit in _LIMIT_STATES:
        add("llmqd_binding_limit", 1.0 if scheduling.binding_limit == limit else 0.0, _limit_label(limit))
    for limit, count in scheduling.waited_by_limit.items():
        add("llmqd_window_limited_dispatches", max(0, count), _limit_label(limit))


def _add_limit_samples(add: Any, limits: Any) -> None:
    """One sample of each `_limit_families` gauge per limit the limiter's metrics report
    (``limits.itpm`` and the other optional limits are None where not configured)."""
    for name in LIMIT_NAMES:
        bucket = getattr(limits, name, None)
        if bucket is None:
            continue
        add("llmqd_limiter_limit_capacity", bucket.limit, name)
        add("llmqd_limiter_limit_available", bucket.available, name)
