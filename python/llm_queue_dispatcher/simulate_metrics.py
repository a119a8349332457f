"""The scheduling metrics `llmqd simulate` reports, as plain functions and small accumulators,
each tested on hand-made inputs whose answer is known.

* `slo_attainment`: the share of a class's requests sent within its wait target.
* `light_tenants`: who offers less than its max-min fair share of the tokens.
* `window_fairness`: Jain's index of token service among backlogged tenants, and the largest
  service difference between them, over fixed windows (60 s).
* `InversionCounter`: priority inversions, counted as dispatches happen.
* `BlockedTime`: which limit (RPM, TPM, ITPM, OTPM, RPD, TPD, concurrency) held requests back,
  and for how long.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_SLO",
    "LIMITS",
    "BlockedTime",
    "InversionCounter",
    "WindowFairness",
    "jain_index",
    "light_tenants",
    "slo_attainment",
    "window_fairness",
]

#: The wait targets (seconds from arrival to dispatch) SLO attainment is measured against by
#: default: URGENT within 1 s, HIGH within 30 s, NORMAL within 5 minutes, LOW within 30 minutes.
DEFAULT_SLO: Mapping[str, float] = {"URGENT": 1.0, "HIGH": 30.0, "NORMAL": 300.0, "LOW": 1800.0}

#: The limits a request can wait on, as `BlockedTime` names them.
LIMITS = ("RPM", "TPM", "ITPM", "OTPM", "RPD", "TPD", "concurrency")

# The request limits, and the token limits, by the limiter's metrics names.
_REQUEST_LIMITS = ("rpm", "rpd")
_TOKEN_LIMITS = ("tpm", "itpm", "otpm", "tpd")


def slo_attainment(sorted_waits: Sequence[float], target: float, requests: int) -> float | None:
    """The share of ``requests`` (those of one class that arrived) whose wait, among
    ``sorted_waits`` (the waits of those sent, ascending), is at most ``target``; a request never
    sent misses. None when no request arrived."""
    if requests <= 0:
        return None
    return bisect_right(sorted_waits, target) / requests


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2): 1 when all are equal, 1/n when one
    gets everything. None for no values; 1 when all are 0 (equal)."""
    if not values:
        return None
    squares = sum(value * value for value in values)
    if squares == 0:
        return 1.0
    total = sum(values)
    return total * total / (len(values) * squares)


def light_tenants(demands: Mapping[str, float], capacity: float) -> set[str]:
    """The tenants whose demand is at most their max-min fair share of ``capacity``: filling
    the smallest demands first, each tenant's share is an equal part of what the others left;
    a tenant that asks no more than that is light, the others heavy. Everyone is light when the
    demands fit in the capacity."""
    remaining = capacity
    ordered = sorted(demands.items(), key=lambda item: item[1])
    light: set[str] = set()
    for position, (name, demand) in enumerate(ordered):
        share = remaining / (len(ordered) - position)
        if demand > share:
            break
        light.add(name)
        remaining -= demand
    return light


@dataclass(frozen=True)
class WindowFairness:
    """Token service among backlogged tenants over fixed windows (see `window_fairness`)."""

    windows: int  # windows with at least two backlogged tenants
    jain_mean: float | None  # the mean of their Jain's indexes
    jain_min: float | None
    max_gap: float | None  # the largest difference of tokens served between two of them
    gap_window: float | None  # the start of the window where it happened

    def to_dict(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "jain_mean": self.jain_mean,
            "jain_min": self.jain_min,
            "max_gap_tokens": self.max_gap,
            "max_gap_window_s": self.gap_window,
        }


def window_fairness(
    requests: Iterable[tuple[str, float, float, float]], end: float, window: float = 60.0
) -> WindowFairness:
    """Fairness of token service among backlogged tenants over the windows ``[k * window,
    (k + 1) * window)`` that end by ``end``.

    ``requests`` are ``(tenant, arrival, dispatched, tokens)`` of the requests sent (and of
    those never sent: ``dispatched`` the instant they stopped waiting, no tokens). A tenant is
    backlogged in a window when at every instant of it one of its requests had arrived and was
    not yet sent; its service is the tokens of its requests sent in the window. Over the windows
    with two backlogged tenants or more: Jain's index of their services (mean and minimum), and
    the largest difference between the most and the least served.
    """
    count = int(end // window) if window > 0 and math.isfinite(end) else 0
    waiting: dict[str, list[tuple[float, float]]] = defaultdict(list)
    served: dict[tuple[int, str], float] = defaultdict(float)
    for tenant, arrival, dispatched, tokens in requests:
        if dispatched > arrival:
            waiting[tenant].append((arrival, dispatched))
        slot = int(dispatched // window) if window > 0 else 0
        if slot < count:
            served[slot, tenant] += tokens
    backlogged: dict[int, list[str]] = defaultdict(list)
    for tenant, intervals in waiting.items():
        for start, stop in _merged(intervals):
            first = math.ceil(start / window)
            last = min(int(stop // window), count)  # windows [k, k + 1) inside [start, stop]
            for slot in range(first, last):
                backlogged[slot].append(tenant)
    indexes: list[float] = []
    max_gap: float | None = None
    gap_window: float | None = None
    for slot in sorted(backlogged):
        tenants = backlogged[slot]
        if len(tenants) < 2:
            continue
        services = [served.get((slot, tenant), 0.0) for tenant in tenants]
        index = jain_index(services)
        assert index is not None
        indexes.append(index)
        gap = max(services) - min(services)
        if max_gap is None or gap > max_gap:
            max_gap, gap_window = gap, slot * window
    return WindowFairness(
        len(indexes),
        sum(indexes) / len(indexes) if indexes else None,
        min(indexes) if indexes else None,
        max_gap,
        gap_window,
    )


def _merged(intervals: list[tuple[float, float]]) -> Iterable[tuple[float, float]]:
    """The union of ``intervals`` as disjoint ``(start, stop)`` pairs, in order."""
    intervals.sort()
    start, stop = intervals[0]
    for low, high in intervals[1:]:
        if low <= stop:
            stop = max(stop, high)
        else:
            yield start, stop
            start, stop = low, high
    yield start, stop


class InversionCounter:
    """Counts priority inversions as a run dispatches.

    An inversion is a dispatch of a request while a request of a higher class (URGENT above
    HIGH above NORMAL above LOW) was waiting whose estimate fitted in the tokens the limiter
    had just before that dispatch: it could have gone instead (one request each, so the request
    budget and the concurrency do not tell them apart). ``inversions`` counts them across
    tenants; ``within_tenant`` those where the higher-class request was the same tenant's.
    A request waits from `arrive` (or `requeue`, after a failed attempt) until `dispatch` or
    `drop`, or until ``retention`` seconds after its arrival (the store drops it then).
    """

    def __init__(
        self,
        estimates: Sequence[int],
        classes: Sequence[int],
        tenants: Sequence[str | None],
        arrivals: Sequence[float],
        retention: float = math.inf,
    ) -> None:
        self._estimates = estimates
        self._classes = classes
        self._tenants = tenants
        self._arrivals = arrivals
        self._retention = retention
        self._waiting = bytearray(len(estimates))
        self._by_class: list[list[tuple[int, int]]] = [[] for _ in range(4)]
        self._by_tenant: dict[tuple[str | None, int], list[tuple[int, int]]] = defaultdict(list)
        self.inversions = 0
        self.within_tenant = 0

    def arrive(self, index: int) -> None:
        """Request ``index`` is waiting."""
        self._waiting[index] = 1
        entry = (self._estimates[index], index)
        klass = self._classes[index]
        heapq.heappush(self._by_class[klass], entry)
        heapq.heappush(self._by_tenant[self._tenants[index], klass], entry)

    requeue = arrive

    def drop(self, index: int) -> None:
        """Request ``index`` waits no more (dead-lettered, expired, taken out)."""
        self._waiting[index] = 0

    def dispatch(self, index: int, available_tokens: float, now: float) -> None:
        """Request ``index`` was dispatched at ``now``, with ``available_tokens`` in the budget
        just before."""
        self._waiting[index] = 0
        klass = self._classes[index]
        if klass == 0:
            return
        tenant = self._tenants[index]
        if any(self._fits(self._by_class[higher], available_tokens, now) for higher in range(klass)):
            self.inversions += 1
            if any(
                self._fits(self._by_tenant[tenant, higher], available_tokens, now)
                for higher in range(klass)
                if (tenant, higher) in self._by_tenant
            ):
                self.within_tenant += 1

    def _fits(self, heap: list[tuple[int, int]], available: float, now: float) -> bool:
        """Whether the smallest request still waiting in ``heap`` fits ``available`` (entries of
        requests no longer waiting are dropped on the way; a request older than the retention
        is, as the store drops it)."""
        waiting, arrivals, retention = self._waiting, self._arrivals, self._retention
        while heap:
            estimate, index = heap[0]
            if waiting[index] and now - arrivals[index] <= retention:
                return estimate <= available
            heapq.heappop(heap)
        return False


@dataclass
class BlockedTime:
    """Seconds during which requests were waiting and none could be dispatched, by the limit
    that held them: ``concurrency`` when every call slot was busy (the provider's, or the
    limiter's ``max_concurrent``), else ``RPM`` (or ``RPD``) when the request budget was short
    for at least as long as the wait, else the token limit the next request waited for
    (``TPM``, or ``ITPM``, ``OTPM``, ``TPD`` where set; `classify_limits`). ``seconds`` holds
    RPM, TPM and concurrency always, the other limits once they held anything."""

    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("RPM", "TPM", "concurrency"), 0.0)
    )

    def add(self, limit: str, seconds: float) -> None:
        self.seconds[limit] = self.seconds.get(limit, 0.0) + seconds

    @staticmethod
    def classify(in_flight: int, concurrency: int, requests_left: float, rpm: float, wait: float) -> str:
        """The limit holding a dispatch back: ``requests_left`` in the request bucket (refilling
        at ``rpm`` a minute), ``wait`` the seconds until the budget admits the next request
        (``inf`` when unknown)."""
        if in_flight >= concurrency:
            return "concurrency"
        if requests_left < 1.0:
            request_wait = (1.0 - requests_left) * 60.0 / rpm
            if request_wait >= wait - 1e-9 or math.isinf(wait):
                return "RPM"
        return "TPM"

    @staticmethod
    def classify_limits(
        levels: Mapping[str, tuple[float, float]], rates: Mapping[str, float], wait: float
    ) -> str:
        """The limit holding a dispatch back when the provider has a free call slot, from each
        limit's ``(available, capacity)`` in ``levels`` and its refill a second in ``rates``
        (by the limiter's names: ``rpm``, ``tpm``, ``itpm``, ``otpm``, ``rpd``, ``tpd``, and
        ``concurrency``, whose level is its free slots); ``wait`` is the seconds until the
        budget admits the next request (``inf`` when unknown).

        ``concurrency`` when no slot of ``max_concurrent`` is free; else the request limit
        (RPM, RPD) short of a request for at least as long as the wait, the longer first; else
        the token limit (TPM, ITPM, OTPM, TPD) whose bucket holds the smallest share of its
        capacity, the one the next request waits for."""
        slots = levels.get("concurrency")
        if slots is not None and slots[0] < 1.0:
            return "concurrency"
        request_waits = [
            ((1.0 - levels[name][0]) / rates[name], name)
            for name in _REQUEST_LIMITS
            if name in levels and levels[name][0] < 1.0 and rates.get(name, 0.0) > 0
        ]
        if request_waits:
            longest, name = max(request_waits)
            if longest >= wait - 1e-9 or math.isinf(wait):
                return name.upper()
        shares = [
            (levels[name][0] / levels[name][1], position, name)
            for position, name in enumerate(_TOKEN_LIMITS)
            if name in levels and levels[name][1] > 0
        ]
        return min(shares)[2].upper() if shares else "TPM"

    def binding(self) -> str | None:
        """The limit that held requests back longest; None when nothing was ever held."""
        limit = max(LIMITS, key=lambda name: self.seconds.get(name, 0.0))
        return limit if self.seconds.get(limit, 0.0) > 0 else None

    def shares(self) -> dict[str, float]:
        """Each limit's share of the time requests were held (all 0 when never)."""
        total = sum(self.seconds.values())
        return {name: (value / total if total > 0 else 0.0) for name, value in self.seconds.items()}
