"""The brute-force reference scorer: the contract's scoring written out in plain Python.

Source: /work/shared/API.md, "Scoring" (the six factor functions, `A` = the limiter's available
tokens, custom scores clamped to [0, 1] with NaN as 0) and "Dispatcher" (the highest total among
the admissible messages wins, ties go to the older message, then to the earlier enqueue; nothing
below ``min_score_threshold``), and "Scheduling under overload" for ``hold_budget``
(`reference_hold_select`: every message that fits the token capacity is ranked with `A` = the
capacity; the best one goes when the limiter admits it now, else the dispatcher holds for it).
"Scheduling that holds on real traffic" for URGENT first (``urgent_first``: every URGENT
message ranks above every other whatever the scores) and its reserve (`UrgentHistory`, the rule
written out in the README's "How a request is chosen"). Every formula is the contract's,
verbatim, so the dispatcher's exact selection can be checked against it
(tests/test_dispatcher_exact.py, tests/test_prefetch.py, tests/policies/) and the benchmarks'
plain-Python brute force dispatches with it (benches/compare.py).

It imports nothing from ``llm_queue_dispatcher``: the brute force must run even where the package
cannot be imported, and a reference should not borrow the values it checks (the default weights
below are the contract's, written out again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llm_queue_dispatcher import QueueMessage

__all__ = [
    "FACTOR_NAMES",
    "MAX_WAIT_SECONDS",
    "PRIORITY_FACTOR",
    "ContractWeights",
    "UrgentHistory",
    "Weights",
    "clamp_custom",
    "efficiency_factor",
    "priority_factor",
    "processing_time_factor",
    "reference_breakdown",
    "reference_hold_select",
    "reference_ranking",
    "reference_select",
    "reference_total",
    "retry_factor",
    "selection_key",
    "token_fit_factor",
    "total_score",
    "urgent_margin",
    "wait_time_factor",
    "weighted_factors",
]


FACTOR_NAMES = ("priority", "efficiency", "wait_time", "retry", "token_fit", "processing_time")
PRIORITY_FACTOR = {0: 1.0, 1: 0.7, 2: 0.4, 3: 0.1}  # URGENT, HIGH, NORMAL, LOW
MAX_WAIT_SECONDS = {0: 10.0, 1: 30.0, 2: 60.0, 3: 300.0}
URGENT = 0

# A custom part: (scorer name, its weight, the raw score it returned).
CustomPart = tuple[str, float, float]


class Weights(Protocol):
    """Anything with the six weights: `ContractWeights` or the package's `ScoringWeights`."""

    @property
    def priority(self) -> float: ...
    @property
    def efficiency(self) -> float: ...
    @property
    def wait_time(self) -> float: ...
    @property
    def retry(self) -> float: ...
    @property
    def token_fit(self) -> float: ...
    @property
    def processing_time(self) -> float: ...


@dataclass(frozen=True)
class ContractWeights:
    """The contract's default `ScoringWeights`."""

    priority: float = 0.25
    efficiency: float = 0.20
    wait_time: float = 0.20
    retry: float = 0.10
    token_fit: float = 0.15
    processing_time: float = 0.10


# ---------------------------------------------------------------------------------------------
# The six factor functions, each in [0, 1] before weighting.
# ---------------------------------------------------------------------------------------------


def priority_factor(priority: int) -> float:
    return PRIORITY_FACTOR[priority]


def efficiency_factor(tokens: int, available: float) -> float:
    if available <= 0:
        return 0.0
    u = tokens / available
    if u > 1:
        return 0.0
    if 0.7 <= u <= 0.9:
        return 1.0
    if 0.9 < u <= 1:
        return 0.9
    return u / 0.7


def wait_time_factor(age: float, priority: int) -> float:
    share = min(age / MAX_WAIT_SECONDS[priority], 1.0)
    return math.sqrt(share) if priority == URGENT else share


def retry_factor(receive_count: int) -> float:
    if receive_count == 0:
        return 1.0
    return max(0.1, 0.7**receive_count)


def token_fit_factor(tokens: int, available: float) -> float:
    if available <= 0:
        return 0.0
    u = tokens / available
    if u > 1:
        return 0.0
    if u < 0.1:
        return 10 * u
    if u <= 0.5:
        return 1.0
    return 1 - (u - 0.5) * 0.4


def processing_time_factor(expected_processing_time: float | None, tokens: int) -> float:
    seconds = tokens * 0.01 if expected_processing_time is None else expected_processing_time
    x = seconds * 1000
    if x <= 1000:
        return 1.0
    if x <= 5000:
        return 1 - (x - 1000) / 4000 * 0.3
    if x <= 30000:
        return 0.7 - (x - 5000) / 25000 * 0.6
    return 0.1


def clamp_custom(score: float) -> float:
    """A custom score as the contract counts it: clamped to [0, 1], NaN as 0."""
    if math.isnan(score):
        return 0.0
    return min(1.0, max(0.0, score))


# ---------------------------------------------------------------------------------------------
# Totals.
# ---------------------------------------------------------------------------------------------


def weighted_factors(
    *,
    priority: int,
    tokens: int,
    expected_processing_time: float | None,
    age: float,
    receive_count: int,
    available: float,
    weights: Weights,
    custom: Sequence[CustomPart] = (),
) -> dict[str, float]:
    """The breakdown: each factor times its weight, in `FACTOR_NAMES` order, then one entry per
    custom scorer (its weight times its clamped score)."""
    parts = {
        "priority": weights.priority * priority_factor(priority),
        "efficiency": weights.efficiency * efficiency_factor(tokens, available),
        "wait_time": weights.wait_time * wait_time_factor(age, priority),
        "retry": weights.retry * retry_factor(receive_count),
        "token_fit": weights.token_fit * token_fit_factor(tokens, available),
        "processing_time": weights.processing_time * processing_time_factor(expected_processing_time, tokens),
    }
    for name, weight, raw in custom:
        parts[name] = weight * clamp_custom(raw)
    return parts


def total_score(
    *,
    priority: int,
    tokens: int,
    expected_processing_time: float | None,
    age: float,
    receive_count: int,
    available: float,
    weights: Weights,
    custom: Sequence[CustomPart] = (),
) -> float:
    """Σ weightᵢ · factorᵢ + Σ custom.weight · clamp(custom score): the sum of `weighted_factors`,
    written as one expression because the benchmarks' brute force calls it per message."""
    total = (
        weights.priority * priority_factor(priority)
        + weights.efficiency * efficiency_factor(tokens, available)
        + weights.wait_time * wait_time_factor(age, priority)
        + weights.retry * retry_factor(receive_count)
        + weights.token_fit * token_fit_factor(tokens, available)
        + weights.processing_time * processing_time_factor(expected_processing_time, tokens)
    )
    for _, weight, raw in custom:
        total += weight * clamp_custom(raw)
    return total


def reference_breakdown(
    message: QueueMessage[Any],
    *,
    now: float,
    available: float,
    weights: Weights,
    custom: Sequence[CustomPart] = (),
) -> dict[str, float]:
    """The weighted factors of a stored ``message`` at ``now`` (and of ``custom`` scores)."""
    request = message.payload
    return weighted_factors(
        priority=int(request.priority),
        tokens=request.token_info.estimated,
        expected_processing_time=request.expected_processing_time,
        age=now - message.attributes.enqueued_at.timestamp(),
        receive_count=message.attributes.receive_count,
        available=available,
        weights=weights,
        custom=custom,
    )


def reference_total(
    message: QueueMessage[Any],
    *,
    now: float,
    available: float,
    weights: Weights,
    custom: Sequence[CustomPart] = (),
) -> float:
    return sum(
        reference_breakdown(message, now=now, available=available, weights=weights, custom=custom).values()
    )


# ---------------------------------------------------------------------------------------------
# Selection.
# ---------------------------------------------------------------------------------------------


def selection_key(total: float, enqueued_at: float, enqueue_order: int) -> tuple[float, float, int]:
    """Orders candidates so that the winner is the maximum: the highest total, then the older
    message, then the one enqueued first."""
    return (total, -enqueued_at, -enqueue_order)


def tier(priority: int, urgent_first: bool) -> int:
    """1 for an URGENT message when URGENT goes first (it ranks above every score), else 0."""
    return int(urgent_first and priority == URGENT)


RECENT_URGENT = 64
URGENT_RESERVE_SHARE = 0.25


class UrgentHistory:
    """What the automatic URGENT reserve is sized from, told of every message that becomes
    visible (enqueued, or visible again after a failure; over an external store, taken into the
    prefetch buffer), in that order.

    The automatic reserve is twice the largest of the last 64 URGENT estimates, at most a
    quarter of the token capacity; none until an URGENT message has been seen. A fixed reserve
    replaces it; without URGENT first there is none. The reserves are not kept while a backlog
    clears (`kept`): the limiter admits, now, one request as large as every visible message
    together, and no message has arrived (latest enqueue instant among those observed) for as
    long as the bucket takes to refill the reserves."""

    def __init__(self) -> None:
        self.urgent: list[int] = []
        self.last_arrival = -math.inf

    def observe(self, priority: int, tokens: int, enqueued_at: float) -> None:
        if priority == URGENT:
            self.urgent.append(tokens)
        self.last_arrival = max(self.last_arrival, enqueued_at)

    def kept(self, reserve: float, *, now: float, refill_rate: float, admits_waiting: bool) -> bool:
        """Whether reserves totalling ``reserve`` are kept at ``now`` (``admits_waiting``: the
        limiter admits one request of every visible message's tokens together)."""
        if reserve <= 0:
            return True
        quiet = now - self.last_arrival >= reserve / refill_rate
        return not (quiet and admits_waiting)

    def automatic(self, capacity: float) -> float:
        if not self.urgent:
            return 0.0
        return min(2.0 * max(self.urgent[-RECENT_URGENT:]), URGENT_RESERVE_SHARE * capacity)

    def reserve(self, capacity: float, *, fixed: float | None, urgent_first: bool) -> float:
        if not urgent_first:
            return 0.0
        return float(fixed) if fixed is not None else self.automatic(capacity)


def urgent_margin(priority: int, tokens: int, reserve: float, capacity: float) -> float:
    """What a message must leave in the bucket on top of its own estimate: the URGENT reserve
    unless it is URGENT, its need at most a full bucket."""
    if priority == URGENT:
        return 0.0
    return min(reserve, max(capacity - tokens, 0.0))


def reference_select(
    messages: Iterable[QueueMessage[Any]],
    *,
    now: float,
    available: float,
    weights: Weights,
    can_process: Callable[[int], bool],
    custom: Callable[[QueueMessage[Any]], Sequence[CustomPart]] = lambda message: (),
    min_score_threshold: float = 0.0,
) -> QueueMessage[Any] | None:
    """The message a dispatch must hand out: among ``messages`` (the visible ones, in enqueue
    order) whose estimate ``can_process`` admits, the best by `selection_key`; None when none is
    admissible or the best total is below ``min_score_threshold``."""
    best: tuple[tuple[float, float, int], QueueMessage[Any]] | None = None
    for order, message in enumerate(messages):
        if not can_process(message.payload.token_info.estimated):
            continue
        total = reference_total(
            message, now=now, available=available, weights=weights, custom=custom(message)
        )
        key = selection_key(total, message.attributes.enqueued_at.timestamp(), order)
        if best is None or key > best[0]:
            best = (key, message)
    if best is None or best[0][0] < min_score_threshold:
        return None
    return best[1]


def reference_ranking(
    messages: Iterable[QueueMessage[Any]],
    *,
    now: float,
    available: float,
    weights: Weights,
    eligible: Callable[[QueueMessage[Any]], bool] | Callable[[int], bool],
    custom: Callable[[QueueMessage[Any]], Sequence[CustomPart]] = lambda message: (),
    urgent_first: bool = False,
    by_message: bool = False,
) -> list[tuple[float, QueueMessage[Any]]]:
    """``(total, message)`` of every message whose estimate is ``eligible`` (with
    ``by_message``, every message ``eligible`` accepts), best first: with ``urgent_first``
    every URGENT message ahead of every other, then by `selection_key` (``messages`` in enqueue
    order)."""
    keyed = []
    for order, message in enumerate(messages):
        accepted = eligible(message) if by_message else eligible(message.payload.token_info.estimated)  # type: ignore[arg-type]
        if not accepted:
            continue
        total = reference_total(
            message, now=now, available=available, weights=weights, custom=custom(message)
        )
        key = selection_key(total, message.attributes.enqueued_at.timestamp(), order)
        keyed.append(((tier(int(message.payload.priority), urgent_first), *key), message))
    keyed.sort(key=lambda item: item[0], reverse=True)
    return [(key[1], message) for key, message in keyed]


def reference_hold_select(
    messages: Iterable[QueueMessage[Any]],
    *,
    now: float,
    capacity: float,
    weights: Weights,
    can_process: Callable[[int], bool],
    custom: Callable[[QueueMessage[Any]], Sequence[CustomPart]] = lambda message: (),
    min_score_threshold: float = 0.0,
) -> tuple[QueueMessage[Any], bool] | None:
    """The decision with ``hold_budget=True``: among ``messages`` whose estimate fits the token
    ``capacity``, scored with `A` = ``capacity``, the best by `selection_key`; returned with
    whether ``can_process`` admits it now (False: the dispatcher holds for it and hands out
    nothing). None when no message fits the capacity or the best total is below
    ``min_score_threshold``."""
    winner = reference_select(
        messages,
        now=now,
        available=capacity,
        weights=weights,
        can_process=lambda tokens: tokens <= capacity,
        custom=custom,
        min_score_threshold=min_score_threshold,
    )
    if winner is None:
        return None
    return winner, can_process(winner.payload.token_info.estimated)
