"""The engine of ``llmqd demo``: real dispatchers, limiters and stores on one workload, in real time.

Each strategy is a *lane*: its own `InMemoryStorage`, `LLMQueueDispatcher` (built by the
strategy's factory) and `LLMThrottle`, dispatching to its own simulated provider (a fixed
concurrency; latency grows with the tokens of a request; an attempt fails with the failure
rate). Every lane receives the very same requests at the same instants, and a request's
outcome (its actual tokens, whether an attempt fails) is drawn from its id and attempt number,
so lanes differ only by their strategy.

Time: one `ManualClock` is shared by every store, dispatcher configuration and limiter, and
`DemoEngine.step` sets it to the event loop's elapsed time times ``speed``. Nothing reads the
wall clock, so ``speed=10`` runs ten simulated seconds per second, consistently everywhere.

What the page charts against the TPM limit is what each lane's limiter took from its token
bucket over the last minute (`_Lane.granted`): a request's estimate at its dispatch, the
correction to its actual count when it completes (a refund when it used less), the whole
estimate back when it fails, each when the limiter books it. A token bucket refills at
the TPM and saves up to its capacity of unused budget, so one minute may take up to capacity +
TPM: in the first minute (the bucket starts full) and after a time when fewer tokens were asked
for than refilled (the RPM limit was the one binding). A call that used more tokens than its
estimate counts at its actual size, and the limiter charges the difference to the next
requests. The page draws both lines and says so, so none of it reads as the limiter failing.

A limit that could never admit one request (``rpm < 1``, or ``tpm`` below the largest request
the workload generates, `ProviderModel.token_max`) is refused at the door, naming the control.

Changing the limits: an `LLMThrottle` cannot be reconfigured in place, so each lane gets a new
one with the new limits on the same clock, and what the old one had used carries over: each
bucket starts at ``new capacity - (old capacity - old available)``, clamped to the new capacity,
and the compensation debt moves along (`LLMThrottle.restore_from_snapshot`). Requests in flight
at that moment were reserved on the old limiter and settle against it, so the correction of
their estimate to their actual count (a few percent here) does not reach the new one.

About 720 lines for one concept, a lane and the run that drives the lanes together; the
server and the page live in ``server.py`` and ``static/``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import random
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .. import (
    BucketState,
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
    StateSnapshot,
    TokenInfo,
    create_fair_priority_queue,
    create_fair_queue,
    create_llm_queue_dispatcher,
    create_simple_priority_queue,
    create_throughput_optimized_queue,
)
from .._checks import finite_float, shown

__all__ = [
    "DEFAULT_STRATEGIES",
    "STRATEGIES",
    "Controls",
    "DemoEngine",
    "ProviderModel",
    "Strategy",
    "encode",
]

Factory = Callable[[InMemoryStorage[Any], LLMQueueDispatcherConfig], LLMQueueDispatcher[Any]]


@dataclass(frozen=True)
class Strategy:
    """A column of the demo: a name, a one-line description and the factory that builds it."""

    name: str
    description: str
    factory: Factory


#: The strategies the demo can run, by name. One line adds one.
STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy("default", "create_llm_queue_dispatcher: the default weights", create_llm_queue_dispatcher),
        Strategy(
            "simple_priority", "create_simple_priority_queue: priority first", create_simple_priority_queue
        ),
        Strategy("fair", "create_fair_queue: waiting time first", create_fair_queue),
        Strategy(
            "throughput",
            "create_throughput_optimized_queue: budget use first",
            create_throughput_optimized_queue,
        ),
        Strategy(
            "fair_priority",
            "create_fair_priority_queue: URGENT first, then the tenant with the least recent use",
            create_fair_priority_queue,
        ),
    )
}

#: The columns shown when none are chosen.
DEFAULT_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)

TENANT_NAMES: tuple[str, ...] = tuple(f"tenant-{letter}" for letter in "abcdefghijkl")
#: Largest burst one request may inject.
MAX_BURST = 20_000
#: Messages waiting per lane above which arrivals are shed (counted) and bursts refused.
MAX_PENDING = 100_000
#: Largest limits the controls take.
MAX_RPM = 1_000_000.0
MAX_TPM = 1_000_000_000.0
# Chips shown per section of a lane: the page shows counts and the head, never every element.
_HEAD = 12
# Completed and failed requests kept per lane for the detail view.
_RECENT = 500
# Seconds of simulated time the per-priority wait percentiles and the granted tokens cover.
_WAIT_WINDOW = 60.0
_GRANT_WINDOW = 60.0
# Longest repr of a refused value quoted in an error (a hostile body may send a 4,000-digit int).
_SHOWN = 40
_MAX_RECEIVES = 5


def _shown(value: object) -> str:
    """``value`` for an error message, cut short: the page shows it in one line."""
    text = shown(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float within [low, high] (or (low, high]); else `InvalidConfigError`."""
    number = finite_float(value)
    if number is None:
        raise InvalidConfigError(f"{name} must be a finite number, got {_shown(value)}")
    if number < low or number > high or (low_open and number == low):
        opening = "(" if low_open else "["
        raise InvalidConfigError(f"{name} must be within {opening}{low:g}, {high:g}], got {_shown(value)}")
    return number


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfigError(f"{name} must be an integer within [{low}, {high}], got {_shown(value)}")
    return value


def _validated_controls(fields: Mapping[str, object]) -> dict[str, object]:
    mix = fields["priority_mix"]
    if not isinstance(mix, (list, tuple)) or len(mix) != 4:
        raise InvalidConfigError(
            f"priority_mix must be 4 numbers (URGENT, HIGH, NORMAL, LOW), got {_shown(mix)}"
        )
    weights = tuple(_number(f"priority_mix[{i}]", w, 0.0, 1e6) for i, w in enumerate(mix))
    if sum(weights) <= 0:
        raise InvalidConfigError(f"priority_mix must have a positive sum, got {_shown(mix)}")
    # Below one request per minute (or one token) the buckets could never hold a request.
    return {
        "rpm": _number("rpm", fields["rpm"], 1.0, MAX_RPM),
        "tpm": _number("tpm", fields["tpm"], 1.0, MAX_TPM),
        "arrival_rate": _number("arrival_rate", fields["arrival_rate"], 0.0, 50.0),
        "priority_mix": weights,
        "tenants": _integer("tenants", fields["tenants"], 1, len(TENANT_NAMES)),
        "failure_rate": _number("failure_rate", fields["failure_rate"], 0.0, 0.9),
    }


@dataclass(frozen=True)
class Controls:
    """What the page can change live. `updated` validates a change as a whole."""

    rpm: float = 90.0
    tpm: float = 60_000.0
    arrival_rate: float = 1.4  # requests per simulated second (Poisson); 0 stops arrivals
    priority_mix: tuple[float, float, float, float] = (0.1, 0.2, 0.5, 0.2)  # URGENT..LOW
    tenants: int = 3
    failure_rate: float = 0.02

    def __post_init__(self) -> None:
        for name, value in _validated_controls(self.__dict__).items():
            object.__setattr__(self, name, value)

    def updated(self, changes: Mapping[str, object]) -> Controls:
        """A copy with ``changes`` applied; raises `InvalidConfigError` naming the first bad
        field (and then nothing changes)."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise InvalidConfigError(f"unknown control(s): {', '.join(unknown)}")
        merged: dict[str, Any] = {**self.__dict__, **changes}
        return Controls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "arrival_rate": self.arrival_rate,
            "priority_mix": list(self.priority_mix),
            "tenants": self.tenants,
            "failure_rate": self.failure_rate,
        }


@dataclass(frozen=True)
class ProviderModel:
    """The simulated provider behind every lane (each lane has its own instance of it)."""

    concurrency: int = 16
    base_latency: float = 0.6  # seconds
    seconds_per_1k_tokens: float = 1.5
    token_median: float = 500.0  # estimates are log-normal around this
    token_sigma: float = 0.8
    token_max: int = 16_000

    def latency(self, tokens: int) -> float:
        return self.base_latency + tokens / 1000.0 * self.seconds_per_1k_tokens


class SimulatedProviderError(Exception):
    """An attempt the simulated provider failed; the dispatcher retries it."""


@dataclass
class _Flight:
    job: ProcessableMessage[Any]
    done_at: float
    fails: bool
    actual_tokens: int


def _percentiles(values: list[float]) -> list[float]:
    """p50, p95, p99 (nearest rank) of ``values``; zeros when empty."""
    if not values:
        return [0.0, 0.0, 0.0]
    ordered = sorted(values)
    last = len(ordered) - 1
    return [ordered[min(last, math.ceil(q * len(ordered)) - 1)] for q in (0.5, 0.95, 0.99)]


def _rebuilt_limiter(old: LLMThrottle, rpm: float, tpm: float, clock: ManualClock) -> LLMThrottle:
    """A new limiter with the new limits that keeps what ``old`` had used (see the module doc)."""
    new = _limiter(rpm, tpm, clock)
    before = old.create_snapshot()
    fresh = new.create_snapshot()

    def carried(old_bucket: BucketState, new_bucket: BucketState) -> BucketState:
        used = old_bucket.capacity - old_bucket.available
        available = min(new_bucket.capacity, max(0.0, new_bucket.capacity - used))
        return BucketState(available, new_bucket.capacity, new_bucket.last_refill)

    new.restore_from_snapshot(
        StateSnapshot(
            fresh.timestamp,
            carried(before.rpm_bucket_state, fresh.rpm_bucket_state),
            carried(before.tpm_bucket_state, fresh.tpm_bucket_state),
            0,
            before.compensation_debt,
        )
    )
    return new


def _limiter(rpm: float, tpm: float, clock: ManualClock) -> LLMThrottle:
    # "compensate": an actual count above the estimate becomes a debt the next consume pays,
    # rather than a warning per request; history long enough for the slowest request.
    return LLMThrottle(
        rpm, tpm, clock=clock, adjustment_failure_strategy="compensate", history_retention=600.0
    )


@dataclass
class _Lane:
    """One strategy: its store, dispatcher, limiter and simulated provider."""

    strategy: Strategy
    storage: InMemoryStorage[Any]
    dispatcher: LLMQueueDispatcher[Any]
    limiter: LLMThrottle
    provider: ProviderModel
    in_flight: dict[str, _Flight] = field(default_factory=dict)
    completions: list[tuple[float, int, str]] = field(default_factory=list)  # (done_at, seq, id)
    recent: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    waits: dict[int, deque[tuple[float, float]]] = field(
        default_factory=lambda: {int(p): deque() for p in Priority}
    )
    # What the limiter took from its token bucket in the last minute, as (when, tokens): an
    # estimate at dispatch, the correction to the actual count at completion (negative: a
    # refund), the whole estimate back when an attempt fails.
    taken: deque[tuple[float, int]] = field(default_factory=deque)
    # Calls completed in the last minute, as (when, estimated, actual): the estimation error.
    estimates: deque[tuple[float, int, int]] = field(default_factory=deque)
    completed: int = 0
    failed_attempts: int = 0
    shed: int = 0
    pending_estimate: int = 0  # visible messages: measured at each snapshot, tracked in between
    observer: Any = None  # a prometheus WatchedQueue, when /metrics is served
    _seq: int = 0

    def chip(self, request: LLMRequest[Any], score: float | None = None) -> dict[str, Any]:
        tenant = request.tenant or ""
        return {
            "id": request.id,
            "p": int(request.priority),
            "t": TENANT_NAMES.index(tenant) if tenant in TENANT_NAMES else -1,
            "k": request.token_info.estimated,
            "s": None if score is None else round(score, 4),
        }

    def remember(self, request_id: str, detail: dict[str, Any]) -> None:
        self.recent[request_id] = detail
        self.recent.move_to_end(request_id)
        while len(self.recent) > _RECENT:
            self.recent.popitem(last=False)

    def granted(self, now: float) -> tuple[int, float]:
        """Tokens the limiter took from its bucket over the last minute (net of refunds), and
        the actual count of the calls completed in it as a share of their estimates (1.0: none)."""
        since = now - _GRANT_WINDOW
        while self.taken and self.taken[0][0] <= since:
            self.taken.popleft()
        while self.estimates and self.estimates[0][0] <= since:
            self.estimates.popleft()
        estimated = sum(estimate for _, estimate, _ in self.estimates)
        actual = sum(count for _, _, count in self.estimates)
        return sum(tokens for _, tokens in self.taken), (actual / estimated if estimated else 1.0)

    def wait_percentiles(self, now: float) -> dict[str, list[float]]:
        out = {}
        for priority in Priority:
            window = self.waits[int(priority)]
            while window and window[0][0] < now - _WAIT_WINDOW:
                window.popleft()
            out[priority.name] = [round(v, 3) for v in _percentiles([w for _, w in window])]
        return out


def _detail(
    lane: _Lane, flight: _Flight, state: str, now: float, *, tokens: int | None = None
) -> dict[str, Any]:
    job = flight.job
    request = job.message.payload
    enqueued = job.message.attributes.enqueued_at.timestamp()
    return {
        "id": request.id,
        "lane": lane.strategy.name,
        "state": state,
        "priority": Priority(request.priority).name,
        "tenant": request.tenant,
        "estimated_tokens": request.token_info.estimated,
        "actual_tokens": tokens,
        "attempt": job.message.attributes.receive_count,
        "wait": round(max(0.0, job.dispatched_at - enqueued), 3),
        "in_provider": round(max(0.0, now - job.dispatched_at), 3),
        "score": {"total": job.score.total, "breakdown": dict(job.score.breakdown)},
        "reason": job.reason,
    }


class DemoEngine:
    """Drives one lane per strategy on a shared workload; see the module docstring.

    Args:
        strategies: names from `STRATEGIES`, at least one, no repeats.
        speed: simulated seconds per second of the event loop, in (0, 100].
        controls: the starting limits, arrival rate, priority mix, tenants and failure rate.
        seed: fixes the workload and the provider's outcomes.
    """

    def __init__(
        self,
        strategies: Sequence[str] = DEFAULT_STRATEGIES,
        *,
        speed: float = 1.0,
        controls: Controls | None = None,
        provider: ProviderModel | None = None,
        seed: int = 7,
    ) -> None:
        names = list(strategies)
        if not names:
            raise InvalidConfigError("strategies must name at least one strategy")
        for name in names:
            if name not in STRATEGIES:
                raise InvalidConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"strategies must not repeat, got {names}")
        self.speed = _number("speed", speed, 0.0, 100.0, low_open=True)
        self.provider = provider or ProviderModel()
        self.controls = self._admissible(controls or Controls())
        self.seed = seed
        self._rng = random.Random(seed)
        self.clock = ManualClock(time.time())
        self.origin = self.clock.now()
        self._loop_origin: float | None = None
        self.lanes = [self._new_lane(STRATEGIES[name]) for name in names]
        self._request_seq = 0
        self._next_arrival = math.inf
        self._schedule_next_arrival(self.origin)
        self.arrived = 0

    def _new_lane(self, strategy: Strategy) -> _Lane:
        storage: InMemoryStorage[Any] = InMemoryStorage(clock=self.clock, max_receive_count=_MAX_RECEIVES)
        config = LLMQueueDispatcherConfig(clock=self.clock, visibility_timeout=600.0, min_score_threshold=0.0)
        dispatcher = strategy.factory(storage, config)
        limiter = _limiter(self.controls.rpm, self.controls.tpm, self.clock)
        return _Lane(strategy, storage, dispatcher, limiter, self.provider)

    # -- time --------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Simulated seconds since the start."""
        return self.clock.now() - self.origin

    def _advance_clock(self, at: float | None = None) -> float:
        """Moves the clock forward to ``at`` simulated seconds since the start, or by default to
        the event loop's elapsed time times the speed; never backwards."""
        if at is None:
            loop_now = asyncio.get_running_loop().time()
            if self._loop_origin is None:
                self._loop_origin = loop_now
            at = (loop_now - self._loop_origin) * self.speed
        target = self.origin + at
        if target > self.clock.now():
            self.clock.set(target)
        return self.clock.now()

    # -- the workload ------------------------------------------------------------------------
    def _schedule_next_arrival(self, now: float) -> None:
        rate = self.controls.arrival_rate
        self._next_arrival = now + self._rng.expovariate(rate) if rate > 0 else math.inf

    def _new_request(self, now: float, priority: Priority | None = None) -> LLMRequest[Any]:
        controls = self.controls
        rng = self._rng
        if priority is None:
            priority = Priority(rng.choices(range(4), weights=controls.priority_mix)[0])
        # Zipf-like tenant shares: tenant-a sends the most, so fairness has something to do.
        tenant_weights = [1.0 / (index + 1) for index in range(controls.tenants)]
        tenant = TENANT_NAMES[rng.choices(range(controls.tenants), weights=tenant_weights)[0]]
        provider = self.provider
        tokens = int(
            min(
                provider.token_max,
                max(20, rng.lognormvariate(math.log(provider.token_median), provider.token_sigma)),
            )
        )
        self._request_seq += 1
        return LLMRequest(
            id=f"r{self._request_seq}",
            payload={"prompt_tokens": tokens},
            priority=priority,
            token_info=TokenInfo(tokens),
            expected_processing_time=provider.latency(tokens),
            created_at=datetime.fromtimestamp(now, timezone.utc),
            tenant=tenant,
        )

    def _outcome(self, request: LLMRequest[Any], attempt: int) -> tuple[bool, int]:
        """Whether this attempt fails and the tokens it uses: the same in every lane."""
        rng = random.Random(zlib.crc32(f"{self.seed}:{request.id}:{attempt}".encode()))
        fails = rng.random() < self.controls.failure_rate
        actual = max(1, round(request.token_info.estimated * rng.uniform(0.75, 1.1)))
        return fails, actual

    async def _enqueue(self, requests: list[LLMRequest[Any]]) -> None:
        for lane in self.lanes:
            room = MAX_PENDING - lane.pending_estimate
            accepted = requests if room >= len(requests) else requests[: max(0, room)]
            lane.shed += len(requests) - len(accepted)
            if accepted:
                await lane.dispatcher.batch_enqueue(accepted)
                lane.pending_estimate += len(accepted)
        self.arrived += len(requests)

    # -- controls ----------------------------------------------------------------------------
    def _admissible(self, controls: Controls) -> Controls:
        """``controls``, unless its TPM could never admit the largest request of the workload
        (the token bucket holds at most ``tpm`` tokens): then `InvalidConfigError`."""
        largest = self.provider.token_max
        if controls.tpm < largest:
            raise InvalidConfigError(
                f"tpm must be at least {largest:,} (the largest request this demo sends): "
                f"a request that size could never be admitted, got {controls.tpm:g}"
            )
        return controls

    def set_controls(self, changes: Mapping[str, object]) -> Controls:
        """Applies ``changes`` (validated whole first: a bad one raises and changes nothing)."""
        new = self._admissible(self.controls.updated(changes))
        old = self.controls
        self.controls = new
        if (new.rpm, new.tpm) != (old.rpm, old.tpm):
            for lane in self.lanes:
                lane.limiter = _rebuilt_limiter(lane.limiter, new.rpm, new.tpm, self.clock)
                if lane.observer is not None:
                    lane.observer.limiter = lane.limiter
        if new.arrival_rate != old.arrival_rate:
            self._schedule_next_arrival(self.clock.now())
        return new

    async def burst(self, size: object, priority: object = None) -> int:
        """Enqueues ``size`` requests at once in every lane (the current mix, or ``priority``)."""
        count = _integer("size", size, 1, MAX_BURST)
        chosen: Priority | None = None
        if priority is not None:
            if isinstance(priority, str) and priority.upper() in Priority.__members__:
                chosen = Priority[priority.upper()]
            else:
                chosen = Priority(_integer("priority", priority, 0, 3))
        fullest = max(lane.pending_estimate for lane in self.lanes)
        if fullest + count > MAX_PENDING:
            raise InvalidConfigError(
                f"a burst of {count} would exceed {MAX_PENDING} waiting requests (now {fullest})"
            )
        now = self.clock.now()
        await self._enqueue([self._new_request(now, chosen) for _ in range(count)])
        return count

    # -- the loop ----------------------------------------------------------------------------
    async def step(self, at: float | None = None) -> None:
        """Moves the clock (to ``at`` simulated seconds since the start, default: the loop's
        elapsed time times the speed), enqueues due arrivals, settles due completions and
        dispatches while each provider has room."""
        now = self._advance_clock(at)
        due: list[LLMRequest[Any]] = []
        while self._next_arrival <= now and len(due) < MAX_BURST:
            due.append(self._new_request(self._next_arrival))
            self._schedule_next_arrival(self._next_arrival)
        if due:
            await self._enqueue(due)
        for lane in self.lanes:
            await self._settle(lane, now)
            await self._dispatch(lane, now)

    async def _settle(self, lane: _Lane, now: float) -> None:
        while lane.completions and lane.completions[0][0] <= now:
            _, _, request_id = heapq.heappop(lane.completions)
            flight = lane.in_flight.pop(request_id)
            job = flight.job
            estimated = job.message.payload.token_info.estimated
            if flight.fails:
                lane.taken.append((now, -estimated))  # the limiter refunds a failed attempt
                lane.failed_attempts += 1
                await job.mark_as_failed(SimulatedProviderError(request_id), retry_after=1.0)
                lane.remember(request_id, _detail(lane, flight, "failed, retried", now))
                if job.message.attributes.receive_count < _MAX_RECEIVES:
                    lane.pending_estimate += 1
            else:
                lane.taken.append((now, flight.actual_tokens - estimated))
                lane.estimates.append((now, estimated, flight.actual_tokens))
                await job.mark_as_processed(actual_tokens=flight.actual_tokens)
                lane.completed += 1
                lane.remember(
                    request_id, _detail(lane, flight, "completed", now, tokens=flight.actual_tokens)
                )
                if lane.observer is not None:
                    lane.observer.record_completion(job, flight.actual_tokens)

    async def _dispatch(self, lane: _Lane, now: float) -> None:
        while len(lane.in_flight) < lane.provider.concurrency:
            started = time.perf_counter()
            job = await lane.dispatcher.dequeue(lane.limiter)
            if job is None:
                return
            latency = time.perf_counter() - started
            request = job.message.payload
            fails, actual = self._outcome(request, job.message.attributes.receive_count)
            done_at = now + self.provider.latency(actual)
            lane.taken.append((now, request.token_info.estimated))
            lane.in_flight[request.id] = _Flight(job, done_at, fails, actual)
            lane._seq += 1
            heapq.heappush(lane.completions, (done_at, lane._seq, request.id))
            waited = max(0.0, job.dispatched_at - job.message.attributes.enqueued_at.timestamp())
            lane.waits[int(request.priority)].append((now, waited))
            lane.pending_estimate -= 1
            if lane.observer is not None:
                lane.observer.record_dispatch(job, latency)

    # -- what the page sees ------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """Counts, the head of each section, statistics and one chart point per lane."""
        now = self.clock.now()
        lanes = []
        for lane in self.lanes:
            metrics = await lane.dispatcher.get_queue_metrics()
            report = metrics.queue
            by_priority = [report.messages_by_priority.get(p.name, 0) for p in Priority]
            lane.pending_estimate = report.approximate_number_of_messages
            head: list[dict[str, Any]] = []
            for priority in Priority:
                if len(head) >= _HEAD:
                    break
                if by_priority[int(priority)]:
                    for message in await lane.storage.peek_messages_by_priority(
                        int(priority), _HEAD - len(head)
                    ):
                        head.append(lane.chip(message.payload))
            flights = sorted(lane.in_flight.values(), key=lambda f: f.job.dispatched_at, reverse=True)[:_HEAD]
            recent = list(itertools.islice(reversed(lane.recent.values()), _HEAD))
            limits = lane.limiter.get_metrics()
            granted, actual_share = lane.granted(now)
            lanes.append(
                {
                    "name": lane.strategy.name,
                    "description": lane.strategy.description,
                    "pending": {"total": sum(by_priority), "by_priority": by_priority, "head": head},
                    "processing": {
                        "total": len(lane.in_flight),
                        "items": [lane.chip(f.job.message.payload, f.job.score.total) for f in flights],
                    },
                    "completed": {
                        "total": lane.completed,
                        "items": [
                            {
                                "id": d["id"],
                                "p": Priority[d["priority"]].value,
                                "t": TENANT_NAMES.index(d["tenant"]) if d["tenant"] in TENANT_NAMES else -1,
                                "k": d["estimated_tokens"],
                                "s": round(d["score"]["total"], 4),
                                "f": d["state"] != "completed",
                            }
                            for d in recent
                        ],
                    },
                    "stats": {
                        "throughput": report.throughput.messages_per_minute,
                        "granted_per_minute": granted,
                        "actual_to_estimate": round(actual_share, 4),
                        "tpm_limit": limits.tpm.limit,
                        "tpm_available": limits.tpm.available,
                        "rpm_limit": limits.rpm.limit,
                        "rpm_available": limits.rpm.available,
                        "failed_attempts": lane.failed_attempts,
                        "dead_lettered": report.dead_lettered,
                        "shed": lane.shed,
                        "waits": lane.wait_percentiles(now),
                    },
                }
            )
        return {
            "t": round(now - self.origin, 3),
            "speed": self.speed,
            "arrived": self.arrived,
            "controls": self.controls.to_dict(),
            "lanes": lanes,
        }

    def chart_point(self, snapshot: Mapping[str, Any]) -> dict[str, Any]:
        """The figures the charts plot, taken from a snapshot. Beside the TPM limit (the rate the
        token bucket refills at), ``tpm_ceiling`` is the most a bucket can grant in one minute:
        its capacity, saved up while fewer tokens were asked for, plus a minute of refill."""
        tpm = snapshot["controls"]["tpm"]
        capacity = max((lane["stats"]["tpm_limit"] for lane in snapshot["lanes"]), default=tpm)
        return {
            "t": snapshot["t"],
            "tpm_limit": tpm,
            "tpm_ceiling": tpm + capacity,
            "lanes": [
                {
                    "throughput": round(lane["stats"]["throughput"], 2),
                    "granted_per_minute": lane["stats"]["granted_per_minute"],
                    "depth": lane["pending"]["total"],
                    "wait_p95": [lane["stats"]["waits"][p.name][1] for p in Priority],
                }
                for lane in snapshot["lanes"]
            ],
        }

    def request_detail(self, lane_name: str, request_id: str) -> dict[str, Any] | None:
        """Score breakdown and reason of a request in flight or recently settled; else None."""
        for lane in self.lanes:
            if lane.strategy.name != lane_name:
                continue
            flight = lane.in_flight.get(request_id)
            if flight is not None:
                return _detail(lane, flight, "processing", self.clock.now())
            return lane.recent.get(request_id)
        return None

    def describe(self) -> dict[str, Any]:
        """Static facts the page needs once: lanes, tenants, priorities, provider, bounds."""
        return {
            "strategies": [
                {"name": lane.strategy.name, "description": lane.strategy.description} for lane in self.lanes
            ],
            "priorities": [p.name for p in Priority],
            "tenants": list(TENANT_NAMES),
            "speed": self.speed,
            "provider": {
                "concurrency": self.provider.concurrency,
                "base_latency": self.provider.base_latency,
                "seconds_per_1k_tokens": self.provider.seconds_per_1k_tokens,
                "largest_request": self.provider.token_max,
            },
            "max_burst": MAX_BURST,
            "controls": self.controls.to_dict(),
        }

    async def close(self) -> None:
        """Closes every dispatcher."""
        for lane in self.lanes:
            await lane.dispatcher.close()


def encode(event: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event (``event:`` and a one-line JSON ``data:``)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
