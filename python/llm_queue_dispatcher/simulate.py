"""`llmqd simulate`: dispatch a synthetic workload under RPM/TPM limits on a virtual clock.

A workload of requests (priority mix, heavy-tailed token estimates, Poisson or burst arrivals,
optional failures) is dispatched by the real dispatcher and the real `LLMThrottle` to a simulated
provider whose latency grows with the tokens of a request. Everything runs on one `ManualClock`,
advanced from event to event, so 100k requests take seconds and a run is deterministic for a seed.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._core import LLMThrottle, ManualClock
from .config import LLMQueueDispatcherConfig
from .dispatcher import LLMQueueDispatcher, ProcessableMessage
from .factories import (
    create_fair_queue,
    create_llm_queue_dispatcher,
    create_simple_priority_queue,
    create_throughput_optimized_queue,
)
from .metrics import percentile
from .storage import InMemoryStorage
from .types import LLMRequest, Priority, TokenInfo

__all__ = ["STRATEGIES", "ProviderModel", "SimulationResult", "Workload", "run_simulation"]

#: Strategy names accepted by `run_simulation`: each factory, plus plain FIFO as a baseline.
STRATEGIES = ("default", "simple_priority", "throughput", "fair", "fifo")

# Deliveries before a failing request is dead-lettered.
_MAX_RECEIVES = 5

_FACTORIES: dict[str, Callable[..., LLMQueueDispatcher[Any]]] = {
    "default": create_llm_queue_dispatcher,
    "simple_priority": create_simple_priority_queue,
    "throughput": create_throughput_optimized_queue,
    "fair": create_fair_queue,
}


class SimulatedProviderError(Exception):
    """A request the simulated provider failed; the dispatcher retries it."""


@dataclass(frozen=True)
class Workload:
    """The requests of one simulation; the same seed gives the same requests."""

    requests: int = 10_000
    priority_mix: tuple[float, float, float, float] = (0.1, 0.2, 0.5, 0.2)
    token_median: float = 800.0
    token_sigma: float = 1.0  # log-normal: heavy right tail
    token_min: int = 20
    token_max: int = 200_000
    arrival: str = "poisson"  # or "burst": everything at t = 0
    arrival_rate: float = 2.2  # requests per second, for Poisson arrivals
    failure_rate: float = 0.0
    seed: int = 7

    def generate(self) -> list[tuple[float, LLMRequest[int]]]:
        """(arrival time, request) pairs in arrival order."""
        rng = random.Random(self.seed)
        priorities = list(Priority)
        now = 0.0
        out: list[tuple[float, LLMRequest[int]]] = []
        for index in range(self.requests):
            if self.arrival == "poisson":
                now += rng.expovariate(self.arrival_rate)
            tokens = int(
                min(
                    self.token_max,
                    max(self.token_min, rng.lognormvariate(math.log(self.token_median), self.token_sigma)),
                )
            )
            priority = rng.choices(priorities, weights=self.priority_mix)[0]
            request = LLMRequest(
                id=f"r{index}", payload=index, priority=priority, token_info=TokenInfo(tokens)
            )
            out.append((now, request))
        return out


@dataclass(frozen=True)
class ProviderModel:
    """A provider whose latency is ``base_latency + tokens / 1000 · seconds_per_1k_tokens``."""

    base_latency: float = 0.4
    seconds_per_1k_tokens: float = 1.5
    concurrency: int = 64
    actual_token_ratio: float = 1.0  # actual tokens used = estimate · ratio

    def latency(self, tokens: int) -> float:
        return self.base_latency + tokens / 1000.0 * self.seconds_per_1k_tokens


@dataclass
class SimulationResult:
    """What one strategy achieved on one workload."""

    strategy: str
    requests: int
    completed: int = 0
    dead_lettered: int = 0
    unfittable: int = 0
    retries: int = 0
    makespan: float = 0.0
    tokens_used: int = 0
    wait_by_priority: dict[str, list[float]] = field(default_factory=dict)
    tpm_limit: float = 0.0

    @property
    def throughput_per_minute(self) -> float:
        return self.completed / self.makespan * 60.0 if self.makespan > 0 else 0.0

    @property
    def tpm_utilisation(self) -> float:
        capacity = self.tpm_limit * self.makespan / 60.0
        return self.tokens_used / capacity if capacity > 0 else 0.0

    def wait_percentiles(self) -> dict[str, dict[str, float]]:
        """p50/p95/p99 of the wait from arrival to the dispatch that completed, per priority."""
        out: dict[str, dict[str, float]] = {}
        for name in [p.name for p in Priority]:
            waits = sorted(self.wait_by_priority.get(name, []))
            out[name] = {q: percentile(waits, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "completed": self.completed,
            "dead_lettered": self.dead_lettered,
            "unfittable": self.unfittable,
            "retries": self.retries,
            "makespan_s": self.makespan,
            "throughput_per_min": self.throughput_per_minute,
            "tpm_utilisation": self.tpm_utilisation,
            "wait_s": self.wait_percentiles(),
        }


class _Run:
    """Shared event bookkeeping of one simulated run."""

    def __init__(
        self, strategy: str, workload: Workload, provider: ProviderModel, rpm: float, tpm: float
    ) -> None:
        self.clock = ManualClock(0.0)
        # Keep consumption records as long as the slowest request can take, so every completion
        # can still adjust its reservation.
        self.limiter = LLMThrottle(
            rpm, tpm, clock=self.clock, history_retention=86_400.0, max_history_records=1_000_000
        )
        self.provider = provider
        self.arrivals = deque(workload.generate())
        self.arrived_at = {request.id: at for at, request in self.arrivals}
        self.fail_rng = random.Random(workload.seed + 1)
        self.failure_rate = workload.failure_rate
        self.result = SimulationResult(strategy, workload.requests, tpm_limit=tpm)
        self.result.wait_by_priority = {p.name: [] for p in Priority}
        self.completions: list[tuple[float, int, Any]] = []  # (time, seq, handle)
        self._seq = 0
        self.last_completion = 0.0

    def due_arrivals(self) -> list[LLMRequest[int]]:
        now = self.clock.now()
        due = []
        while self.arrivals and self.arrivals[0][0] <= now:
            due.append(self.arrivals.popleft()[1])
        return due

    def start(self, request: LLMRequest[int], handle: Any) -> None:
        """Sends ``request`` to the provider; ``handle`` comes back when it completes."""
        self._seq += 1
        done_at = self.clock.now() + self.provider.latency(request.token_info.estimated)
        heapq.heappush(self.completions, (done_at, self._seq, handle))

    def due_completions(self) -> list[Any]:
        now = self.clock.now()
        due = []
        while self.completions and self.completions[0][0] <= now:
            due.append(heapq.heappop(self.completions)[2])
        return due

    def fails(self) -> bool:
        return self.failure_rate > 0 and self.fail_rng.random() < self.failure_rate

    def record_success(self, request: LLMRequest[int], dispatched_at: float, tokens: int) -> None:
        self.result.completed += 1
        self.result.tokens_used += tokens
        self.result.wait_by_priority[request.priority.name].append(
            dispatched_at - self.arrived_at[request.id]
        )
        self.last_completion = self.clock.now()

    def advance(self, wait_for_budget: float | None) -> bool:
        """Moves the clock to the next event; False when nothing can happen any more."""
        candidates = []
        if self.arrivals:
            candidates.append(self.arrivals[0][0])
        if self.completions:
            candidates.append(self.completions[0][0])
        if wait_for_budget is not None and math.isfinite(wait_for_budget):
            candidates.append(self.clock.now() + max(wait_for_budget, 1e-6))
        if not candidates:
            return False
        self.clock.set(max(self.clock.now(), min(candidates)))
        return True

    def finish(self) -> SimulationResult:
        self.result.makespan = self.last_completion
        return self.result


async def _drop_unfittable(
    run: _Run, dispatcher: LLMQueueDispatcher[int], storage: InMemoryStorage[int]
) -> set[str]:
    """Takes out and counts the queued requests above the TPM capacity, which can never be sent.

    Done as they arrive, as the dispatcher advises an application to: left in the queue, they
    would not block the others, but every empty dequeue would report them (a warning per request,
    thousands with ``llmqd simulate --tpm 100``); the CLI reports the count once instead.
    """
    taken = await dispatcher.take_unfittable(run.limiter)
    for message in taken:
        await storage.delete_message(message.attributes.receipt_handle)
    run.result.unfittable += len(taken)
    return {message.payload.id for message in taken}


async def _run_dispatcher(
    strategy: str, workload: Workload, provider: ProviderModel, rpm: float, tpm: float
) -> SimulationResult:
    run = _Run(strategy, workload, provider, rpm, tpm)
    storage: InMemoryStorage[int] = InMemoryStorage(clock=run.clock, max_receive_count=_MAX_RECEIVES)
    config = LLMQueueDispatcherConfig(clock=run.clock, visibility_timeout=3600.0, min_score_threshold=0.0)
    dispatcher = _FACTORIES[strategy](storage, config)
    visible: set[str] = set()
    in_flight = 0
    async with dispatcher:
        while True:
            due = run.due_arrivals()
            if due:
                await dispatcher.batch_enqueue(due)
                dropped: set[str] = set()
                if any(request.token_info.estimated > tpm for request in due):
                    dropped = await _drop_unfittable(run, dispatcher, storage)
                visible.update(request.id for request in due if request.id not in dropped)
            for processable, dispatched_at in run.due_completions():
                in_flight -= 1
                request = processable.message.payload
                if run.fails():
                    run.result.retries += 1
                    await processable.mark_as_failed(SimulatedProviderError(request.id))
                    if processable.message.attributes.receive_count < _MAX_RECEIVES:
                        visible.add(request.id)
                else:
                    tokens = int(request.token_info.estimated * provider.actual_token_ratio)
                    await processable.mark_as_processed(actual_tokens=tokens)
                    run.record_success(request, dispatched_at, tokens)
            while in_flight < provider.concurrency:
                got: ProcessableMessage[int] | None = await dispatcher.dequeue(run.limiter)
                if got is None:
                    break
                visible.discard(got.message.payload.id)
                in_flight += 1
                run.start(got.message.payload, (got, run.clock.now()))
            wait = None
            if visible and in_flight < provider.concurrency:
                # The last dequeue found nothing: the dispatcher knows when one next could.
                wait = dispatcher.time_until_ready()
            if not run.advance(wait):
                break
        await _drop_unfittable(run, dispatcher, storage)  # none is left; a safety net
        attributes = await storage.get_queue_attributes()
        run.result.dead_lettered = attributes.dead_lettered
    return run.finish()


def _run_fifo(workload: Workload, provider: ProviderModel, rpm: float, tpm: float) -> SimulationResult:
    """Plain FIFO: the oldest request goes next, and waits for the budget however long it takes."""
    run = _Run("fifo", workload, provider, rpm, tpm)
    queue: deque[LLMRequest[int]] = deque()
    in_flight = 0
    while True:
        queue.extend(run.due_arrivals())
        for request, dispatched_at in run.due_completions():
            in_flight -= 1
            if run.fails():
                run.result.retries += 1
                queue.appendleft(request)  # back to its place by age, as a store would
            else:
                tokens = int(request.token_info.estimated * provider.actual_token_ratio)
                run.limiter.adjust_consumption(request.id, tokens)
                run.record_success(request, dispatched_at, tokens)
        wait = None
        while queue and in_flight < provider.concurrency:
            head = queue[0]
            check = run.limiter.can_process(head.token_info.estimated)
            if math.isinf(check.available_in):
                queue.popleft()  # can never fit: a FIFO would block forever; count it apart
                run.result.unfittable += 1
                continue
            if not run.limiter.consume(head.id, head.token_info.estimated):
                wait = check.available_in
                break
            queue.popleft()
            in_flight += 1
            run.start(head, (head, run.clock.now()))
        if not run.advance(wait):
            break
    return run.finish()


def run_simulation(
    strategy: str,
    workload: Workload,
    provider: ProviderModel | None = None,
    *,
    rpm: float = 120.0,
    tpm: float = 500_000.0,
) -> SimulationResult:
    """Runs ``workload`` through ``strategy`` (one of `STRATEGIES`) and returns what it achieved."""
    provider = provider or ProviderModel()
    if strategy == "fifo":
        return _run_fifo(workload, provider, rpm, tpm)
    if strategy not in _FACTORIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return asyncio.run(_run_dispatcher(strategy, workload, provider, rpm, tpm))


def format_table(results: Sequence[SimulationResult]) -> str:
    """Strategies side by side, one row per figure."""
    rows: list[tuple[str, list[str]]] = [
        ("completed", [f"{r.completed}/{r.requests}" for r in results]),
        ("makespan (s)", [f"{r.makespan:.1f}" for r in results]),
        ("throughput (req/min)", [f"{r.throughput_per_minute:.1f}" for r in results]),
        ("TPM utilisation", [f"{r.tpm_utilisation:.1%}" for r in results]),
    ]
    for priority in Priority:
        for q in ("p50", "p95", "p99"):
            rows.append(
                (
                    f"wait {q} {priority.name} (s)",
                    [f"{r.wait_percentiles()[priority.name][q]:.1f}" for r in results],
                )
            )
    rows.append(("retries", [str(r.retries) for r in results]))
    rows.append(("dead-lettered", [str(r.dead_lettered) for r in results]))
    rows.append(("unfittable (> TPM)", [str(r.unfittable) for r in results]))
    header = ["", *[r.strategy for r in results]]
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(header[i + 1]), *(len(values[i]) for _, values in rows)) for i in range(len(results))]
    lines = ["  ".join([" " * width0, *(h.rjust(w) for h, w in zip(header[1:], widths, strict=True))])]
    for name, values in rows:
        lines.append(
            "  ".join([name.ljust(width0), *(v.rjust(w) for v, w in zip(values, widths, strict=True))])
        )
    return "\n".join(lines)
