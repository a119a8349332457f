"""Typed errors at the door. Every public entry point, given a hostile value
(an int too large for a float, a wrong type, None, NaN, infinities, a lone surrogate, a bool,
negative zero, a list, a bare object), either accepts it (where the value is valid there) or
raises a subclass of `LLMQueueDispatcherError` — never an `OverflowError`, `TypeError`,
`AttributeError`, `ValueError` or `UnicodeEncodeError` of its own — and changes nothing.

`ENTRY_POINTS` lists each entry point with the hostile values that are valid for it. The sweep
tries every other value on a fresh world and compares the world's state before and after.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    FairPriorityConfig,
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMQueueDispatcherError,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
    RateLimitError,
    ScoringConfig,
    ScoringWeights,
    TokenInfo,
    create_in_memory_queue,
    create_llm_throttle,
)
from llm_queue_dispatcher._core import BucketState, StateSnapshot
from llm_queue_dispatcher.provider_limits import ProviderLimits, parse_rate_limit_headers
from tests.dispatcher.books import request
from tests.reference.storage import ReferenceStorage

HOSTILE: dict[str, Any] = {
    "huge": 10**400,
    "-huge": -(10**400),
    "str": "x",
    "none": None,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "surrogate": "\ud800",
    "bool": True,
    "-0.0": -0.0,
    "list": [],
    "object": object(),
}


class World:
    """A small, fully populated world on manual clocks: a throttle with one reservation, a store
    with a visible and an in-flight message, a dispatcher with a job out, a reference store."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(1_000.0)
        self.throttle = LLMThrottle(600, 100_000, clock=ManualClock(), adjustment_failure_strategy="strict")
        assert self.throttle.consume("held", 1_000)
        self.storage: InMemoryStorage[Any] = InMemoryStorage(clock=self.clock)
        self.run(self.storage.batch_enqueue([request("visible"), request("leased")]))
        [self.leased] = self.run(self.storage.dequeue(1, 30.0))
        self.reference: ReferenceStorage[Any] = ReferenceStorage(clock=self.clock)
        self.run(self.reference.batch_enqueue([request("visible"), request("leased")]))
        [self.reference_leased] = self.run(self.reference.dequeue(1, 30.0))
        self.dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue(clock=self.clock)
        self.run(self.dispatcher.batch_enqueue([request("job"), request("waiting", tokens=10)]))
        job = self.run(self.dispatcher.dequeue(self.throttle))
        assert job is not None
        self.job: ProcessableMessage[Any] = job

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def close(self) -> None:
        self.loop.close()

    def state(self) -> Any:
        """Everything a bad call must leave as it was."""
        metrics = self.throttle.get_metrics().to_dict()
        history = [(r.request_id, r.tokens, r.actual_tokens) for r in self.throttle.get_consumption_history()]

        def store_state(storage: Any) -> Any:
            attributes = self.run(storage.get_queue_attributes())
            peeked = [
                (m.payload.id, m.attributes.receive_count)
                for p in range(4)
                for m in self.run(storage.peek_messages_by_priority(p, 100))
            ]
            return (
                attributes.approximate_number_of_messages,
                attributes.approximate_number_of_messages_in_flight,
                attributes.dead_lettered,
                peeked,
            )

        queue = self.run(self.dispatcher.get_queue_metrics())
        return (
            self.clock.now(),
            metrics,
            history,
            store_state(self.storage),
            store_state(self.reference),
            queue.queue.total_messages,
            queue.processing.active_requests,
            self.job.settled,
        )


@dataclass(frozen=True)
class EntryPoint:
    name: str
    call: Callable[[World, Any], Any]
    valid: frozenset[str] = field(default_factory=frozenset)

    def cases(self) -> list[Any]:
        return [pytest.param(self, key, id=f"{self.name}-{key}") for key in HOSTILE if key not in self.valid]


def entry(name: str, call: Callable[[World, Any], Any], *valid: str) -> EntryPoint:
    assert set(valid) <= set(HOSTILE), valid
    return EntryPoint(name, call, frozenset(valid))


class _Pairs(Mapping[Any, Any]):
    """A mapping over a list of pairs, so that a hostile value can be a key even when it is not
    hashable (a list)."""

    def __init__(self, *pairs: tuple[Any, Any]) -> None:
        self._pairs = list(pairs)

    def __getitem__(self, key: Any) -> Any:
        for k, v in self._pairs:
            if k is key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return iter([k for k, _ in self._pairs])

    def __len__(self) -> int:
        return len(self._pairs)


_GOOD_RPM = BucketState(1, 600, 0)


def _snapshot(
    timestamp: Any = 0.0, rpm: Any = _GOOD_RPM, history_count: Any = 0, compensation_debt: Any = 0.0
) -> StateSnapshot:
    """A snapshot the world's throttle (600 rpm, 100,000 tpm) accepts, but for the value given."""
    return StateSnapshot(timestamp, rpm, BucketState(1, 100_000, 0), history_count, compensation_debt)


def _fair_queue(w: World, **fields: Any) -> LLMQueueDispatcher[Any]:
    """A fair_priority dispatcher: a bad field must fail at the config, not when it is used."""
    return create_in_memory_queue(
        clock=w.clock, policy="fair_priority", fair_priority=FairPriorityConfig(**fields)
    )


ENTRY_POINTS = [
    # ----- the message types
    entry("TokenInfo.estimated", lambda w, v: TokenInfo(v), "huge", "-0.0"),
    entry("TokenInfo.actual", lambda w, v: TokenInfo(1, actual=v), "huge", "none", "-0.0"),
    entry("TokenInfo.model", lambda w, v: TokenInfo(1, model=v), "str", "none"),
    entry("LLMRequest.id", lambda w, v: LLMRequest(v, None), "str"),
    entry("LLMRequest.payload", lambda w, v: LLMRequest("a", v), *HOSTILE),
    entry("LLMRequest.priority", lambda w, v: LLMRequest("a", None, priority=v)),
    entry("LLMRequest.token_info", lambda w, v: LLMRequest("a", None, token_info=v)),
    entry(
        "LLMRequest.expected_processing_time",
        lambda w, v: LLMRequest("a", None, expected_processing_time=v),
        "none",
        "-0.0",
    ),
    entry("LLMRequest.metadata", lambda w, v: LLMRequest("a", None, metadata=v)),
    entry("LLMRequest.created_at", lambda w, v: LLMRequest("a", None, created_at=v)),
    entry("LLMRequest.tenant", lambda w, v: LLMRequest("a", None, tenant=v), "str", "none"),
    entry("LLMRequest.deadline", lambda w, v: LLMRequest("a", None, deadline=v), "none"),
    entry("RateLimitError.available_in", lambda w, v: str(RateLimitError("tpm_limit", v)), *HOSTILE),
    # ----- the limiter's methods
    entry("LLMThrottle.can_process", lambda w, v: w.throttle.can_process(v), "huge", "-0.0"),
    entry("LLMThrottle.consume.request_id", lambda w, v: w.throttle.consume(v, 1), "str"),
    entry("LLMThrottle.consume.estimated_tokens", lambda w, v: w.throttle.consume("b", v), "huge", "-0.0"),
    # A mapping or None (a dict, as the contract types it; any read-only mapping too).
    entry("LLMThrottle.consume.metadata", lambda w, v: w.throttle.consume("b", 1, v), "none"),
    entry(
        "LLMThrottle.consume_or_raise.metadata", lambda w, v: w.throttle.consume_or_raise("b", 1, v), "none"
    ),
    entry(
        "LLMThrottle.consume_or_raise.estimated_tokens",
        lambda w, v: w.throttle.consume_or_raise("b", v),
        "-0.0",
    ),
    entry("LLMThrottle.adjust_consumption.request_id", lambda w, v: w.throttle.adjust_consumption(v, 1)),
    entry(
        "LLMThrottle.adjust_consumption.actual_tokens",
        lambda w, v: w.throttle.adjust_consumption("held", v),
        "-0.0",
    ),
    entry("LLMThrottle.release", lambda w, v: w.throttle.release(v)),
    # Any wait >= 0 is valid: one too long (an int too large for a float, inf) is clamped to a day.
    entry("LLMThrottle.penalize", lambda w, v: w.throttle.penalize(v), "-0.0", "huge", "inf"),
    entry("LLMThrottle.restore_from_snapshot", lambda w, v: w.throttle.restore_from_snapshot(v)),
    entry("LLMThrottle.sync_from_headers", lambda w, v: w.throttle.sync_from_headers(v), "list"),
    entry("LLMThrottle.sync_from_headers.pair", lambda w, v: w.throttle.sync_from_headers([v])),
    entry(
        "LLMThrottle.sync_from_headers.value",
        # A provider's malformed header value is ignored, never an error.
        lambda w, v: w.throttle.sync_from_headers({"x-ratelimit-remaining-tokens": v}),
        *HOSTILE,
    ),
    entry("LLMThrottle.apply_provider_limits", lambda w, v: w.throttle.apply_provider_limits(v)),
    entry(
        "ProviderLimits.tokens_remaining",
        lambda w, v: w.throttle.apply_provider_limits(ProviderLimits(tokens_remaining=v)),
        "none",
        "-0.0",
    ),
    entry(
        "ProviderLimits.retry_after",
        lambda w, v: w.throttle.apply_provider_limits(ProviderLimits(tokens_remaining=5, retry_after=v)),
        "none",
        "-0.0",
    ),
    entry("parse_rate_limit_headers.now", lambda w, v: parse_rate_limit_headers({}, now=v), "none", "-0.0"),
    # ----- the limiter's construction and snapshots
    entry("LLMThrottle.rpm", lambda w, v: LLMThrottle(v, 100)),
    entry("LLMThrottle.tpm", lambda w, v: LLMThrottle(60, v)),
    entry("LLMThrottle.burst_rpm", lambda w, v: LLMThrottle(60, 100, burst_rpm=v), "none"),
    entry("LLMThrottle.burst_tpm", lambda w, v: LLMThrottle(60, 100, burst_tpm=v), "none"),
    entry("LLMThrottle.clock", lambda w, v: LLMThrottle(60, 100, clock=v), "none"),
    entry(
        "LLMThrottle.adjustment_failure_strategy",
        lambda w, v: LLMThrottle(60, 100, adjustment_failure_strategy=v),
    ),
    entry(
        "LLMThrottle.max_history_records", lambda w, v: LLMThrottle(60, 100, max_history_records=v), "none"
    ),
    entry("LLMThrottle.history_retention", lambda w, v: LLMThrottle(60, 100, history_retention=v), "none"),
    entry(
        "LLMThrottle.efficiency_window_size",
        lambda w, v: LLMThrottle(60, 100, efficiency_window_size=v),
        "none",
    ),
    entry("LLMThrottle.logger", lambda w, v: LLMThrottle(60, 100, logger=v), "none"),
    entry("create_llm_throttle.rpm", lambda w, v: create_llm_throttle(rpm=v, tpm=100)),
    entry(
        "StateSnapshot.timestamp",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(timestamp=v)),
        "-0.0",
    ),
    entry("StateSnapshot.rpm_bucket_state", lambda w, v: w.throttle.restore_from_snapshot(_snapshot(rpm=v))),
    entry(
        "StateSnapshot.history_count",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(history_count=v)),
        "huge",
    ),
    entry(
        "StateSnapshot.compensation_debt",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(compensation_debt=v)),
        "-0.0",
    ),
    entry(
        "BucketState.available",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(rpm=BucketState(v, 600, 0))),
        "-0.0",
    ),
    entry(
        "BucketState.capacity",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(rpm=BucketState(1, v, 0))),
    ),
    entry(
        "BucketState.last_refill",
        lambda w, v: w.throttle.restore_from_snapshot(_snapshot(rpm=BucketState(1, 600, v))),
        "-0.0",
    ),
    # ----- the manual clock
    entry("ManualClock.start", lambda w, v: ManualClock(v), "-0.0"),
    entry("ManualClock.advance", lambda w, v: w.clock.advance(v), "-0.0"),
    entry("ManualClock.set", lambda w, v: w.clock.set(v)),
    # ----- the in-memory store
    entry("InMemoryStorage.clock", lambda w, v: InMemoryStorage(clock=v), "none"),
    entry(
        "InMemoryStorage.max_receive_count", lambda w, v: InMemoryStorage(max_receive_count=v), "huge", "none"
    ),
    entry("InMemoryStorage.dead_letter", lambda w, v: InMemoryStorage(dead_letter=v), "none"),
    entry(
        "InMemoryStorage.message_retention", lambda w, v: InMemoryStorage(message_retention=v), "none", "inf"
    ),
    entry("InMemoryStorage.enqueue", lambda w, v: w.run(w.storage.enqueue(v))),
    entry("InMemoryStorage.dequeue.limit", lambda w, v: w.run(w.storage.dequeue(v, 30.0)), "huge"),
    entry("InMemoryStorage.dequeue.visibility_timeout", lambda w, v: w.run(w.storage.dequeue(1, v)), "-0.0"),
    entry("InMemoryStorage.delete_message", lambda w, v: w.run(w.storage.delete_message(v))),
    entry(
        "InMemoryStorage.update_visibility_timeout.receipt_handle",
        lambda w, v: w.run(w.storage.update_visibility_timeout(v, 1.0)),
    ),
    entry(
        "InMemoryStorage.update_visibility_timeout.visibility_timeout",
        lambda w, v: w.run(w.storage.update_visibility_timeout(w.leased.attributes.receipt_handle, v)),
        "-0.0",
    ),
    entry("InMemoryStorage.peek.priority", lambda w, v: w.run(w.storage.peek_messages_by_priority(v, 1))),
    entry(
        "InMemoryStorage.peek.limit", lambda w, v: w.run(w.storage.peek_messages_by_priority(2, v)), "huge"
    ),
    entry("InMemoryStorage.batch_delete", lambda w, v: w.run(w.storage.batch_delete(v)), "list"),
    entry("InMemoryStorage.batch_enqueue", lambda w, v: w.run(w.storage.batch_enqueue(v)), "list"),
    entry("InMemoryStorage.dead_letter_message", lambda w, v: w.run(w.storage.dead_letter_message(v))),
    # ----- the storage ABC's defaults and the reference adapter
    entry("ReferenceStorage.enqueue", lambda w, v: w.run(w.reference.enqueue(v))),
    entry("ReferenceStorage.batch_enqueue", lambda w, v: w.run(w.reference.batch_enqueue(v)), "list"),
    entry("ReferenceStorage.dequeue.limit", lambda w, v: w.run(w.reference.dequeue(v, 30.0)), "huge"),
    entry(
        "ReferenceStorage.dequeue.visibility_timeout", lambda w, v: w.run(w.reference.dequeue(1, v)), "-0.0"
    ),
    entry("ReferenceStorage.delete_message", lambda w, v: w.run(w.reference.delete_message(v))),
    entry(
        "ReferenceStorage.update_visibility_timeout.visibility_timeout",
        lambda w, v: w.run(
            w.reference.update_visibility_timeout(w.reference_leased.attributes.receipt_handle, v)
        ),
        "-0.0",
    ),
    entry("ReferenceStorage.peek.priority", lambda w, v: w.run(w.reference.peek_messages_by_priority(v, 1))),
    entry("ReferenceStorage.batch_delete", lambda w, v: w.run(w.reference.batch_delete(v)), "list"),
    entry("ReferenceStorage.dead_letter_message", lambda w, v: w.run(w.reference.dead_letter_message(v))),
    # ----- the dispatcher and its configuration
    entry("LLMQueueDispatcherConfig.buffer_size", lambda w, v: LLMQueueDispatcherConfig(buffer_size=v)),
    entry(
        "LLMQueueDispatcherConfig.enable_prefetch",
        lambda w, v: LLMQueueDispatcherConfig(enable_prefetch=v),
        "bool",
    ),
    entry(
        "LLMQueueDispatcherConfig.max_candidates_to_evaluate",
        lambda w, v: LLMQueueDispatcherConfig(max_candidates_to_evaluate=v),
    ),
    entry("LLMQueueDispatcherConfig.scoring", lambda w, v: LLMQueueDispatcherConfig(scoring=v), "none"),
    entry("LLMQueueDispatcherConfig.logger", lambda w, v: LLMQueueDispatcherConfig(logger=v), "none"),
    entry(
        "LLMQueueDispatcherConfig.reserve_budget",
        lambda w, v: LLMQueueDispatcherConfig(reserve_budget=v),
        "bool",
    ),
    entry("LLMQueueDispatcherConfig.clock", lambda w, v: LLMQueueDispatcherConfig(clock=v), "none"),
    entry(
        "LLMQueueDispatcherConfig.prefetch_interval",
        lambda w, v: LLMQueueDispatcherConfig(prefetch_interval=v),
    ),
    entry(
        "LLMQueueDispatcherConfig.min_score_threshold",
        lambda w, v: LLMQueueDispatcherConfig(min_score_threshold=v),
        "-0.0",
    ),
    entry(
        "LLMQueueDispatcherConfig.metrics_retention",
        lambda w, v: LLMQueueDispatcherConfig(metrics_retention=v),
    ),
    entry(
        "LLMQueueDispatcherConfig.visibility_timeout",
        lambda w, v: LLMQueueDispatcherConfig(visibility_timeout=v),
        "-0.0",
    ),
    entry("LLMQueueDispatcherConfig.policy", lambda w, v: LLMQueueDispatcherConfig(policy=v)),
    entry(
        "LLMQueueDispatcherConfig.hold_budget", lambda w, v: LLMQueueDispatcherConfig(hold_budget=v), "bool"
    ),
    entry(
        "LLMQueueDispatcherConfig.drop_expired", lambda w, v: LLMQueueDispatcherConfig(drop_expired=v), "bool"
    ),
    entry(
        "LLMQueueDispatcherConfig.fair_priority",
        lambda w, v: LLMQueueDispatcherConfig(fair_priority=v),
        "none",
    ),
    entry(
        "create_in_memory_queue.visibility_timeout",
        lambda w, v: create_in_memory_queue(visibility_timeout=v),
        "-0.0",
    ),
    entry("FairPriorityConfig.tenant_weights", lambda w, v: _fair_queue(w, tenant_weights=v)),
    entry(
        "FairPriorityConfig.tenant_weights.key",
        lambda w, v: _fair_queue(w, tenant_weights=_Pairs((v, 1.0))),
        "str",
    ),
    entry("FairPriorityConfig.tenant_weights.value", lambda w, v: _fair_queue(w, tenant_weights={"a": v})),
    entry("FairPriorityConfig.fairness_window", lambda w, v: _fair_queue(w, fairness_window=v)),
    entry("FairPriorityConfig.reserve_tokens", lambda w, v: _fair_queue(w, reserve_tokens=v), "none"),
    entry("FairPriorityConfig.urgent_first", lambda w, v: _fair_queue(w, urgent_first=v), "bool"),
    entry("FairPriorityConfig.max_wait", lambda w, v: _fair_queue(w, max_wait=v)),
    entry("FairPriorityConfig.max_wait.key", lambda w, v: _fair_queue(w, max_wait=_Pairs((v, 1.0)))),
    entry(
        "FairPriorityConfig.max_wait.value",
        lambda w, v: _fair_queue(w, max_wait={Priority.HIGH: v}),
        "-0.0",
        "inf",
    ),
    entry("ScoringConfig.weights", lambda w, v: ScoringConfig(weights=v), "none"),
    entry("ScoringConfig.custom_scorers", lambda w, v: ScoringConfig(custom_scorers=v), "list"),
    entry("ScoringWeights.priority", lambda w, v: ScoringWeights(priority=v), "-0.0"),
    entry("CustomScorer.name", lambda w, v: CustomScorer(v, 0.1, lambda m, c: 0.5), "str"),
    entry("CustomScorer.weight", lambda w, v: CustomScorer("c", v, lambda m, c: 0.5), "-0.0"),
    entry("CustomScorer.calculate", lambda w, v: CustomScorer("c", 0.1, v)),
    entry("LLMQueueDispatcher.storage", lambda w, v: LLMQueueDispatcher(v)),
    entry("LLMQueueDispatcher.config", lambda w, v: LLMQueueDispatcher(w.storage, v), "none"),
    entry("LLMQueueDispatcher.enqueue", lambda w, v: w.run(w.dispatcher.enqueue(v))),
    entry("LLMQueueDispatcher.batch_enqueue", lambda w, v: w.run(w.dispatcher.batch_enqueue(v)), "list"),
    entry("LLMQueueDispatcher.dequeue.rate_limiter", lambda w, v: w.run(w.dispatcher.dequeue(v))),
    entry(
        "LLMQueueDispatcher.dequeue.timeout",
        lambda w, v: w.run(w.dispatcher.dequeue(w.throttle, timeout=v)),
        "none",
        "-0.0",
        "huge",
        "inf",
    ),
    entry("LLMQueueDispatcher.take_unfittable", lambda w, v: w.run(w.dispatcher.take_unfittable(v))),
    # ----- marks
    entry(
        "mark_as_processed.actual_tokens",
        lambda w, v: w.run(w.job.mark_as_processed(actual_tokens=v)),
        "huge",
        "none",
        "-0.0",
    ),
    entry("mark_as_failed.error", lambda w, v: w.run(w.job.mark_as_failed(v)), *HOSTILE),
    entry(
        "mark_as_failed.retry_after",
        lambda w, v: w.run(w.job.mark_as_failed(RuntimeError(), retry_after=v)),
        "none",
        "-0.0",
    ),
    entry("update_visibility", lambda w, v: w.run(w.job.update_visibility(v)), "-0.0"),
]


def sweep(entry_point: EntryPoint, key: str) -> None:
    world = World()
    try:
        before = world.state()
        with pytest.raises(LLMQueueDispatcherError):
            entry_point.call(world, HOSTILE[key])
        assert world.state() == before, "the refused call changed something"
    finally:
        world.close()


@pytest.mark.parametrize(("entry_point", "key"), [case for e in ENTRY_POINTS for case in e.cases()])
def test_a_hostile_value_raises_a_typed_error_and_changes_nothing(entry_point: EntryPoint, key: str) -> None:
    """The sweep over the public entry points."""
    sweep(entry_point, key)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS, ids=[e.name for e in ENTRY_POINTS])
def test_the_values_called_valid_are_accepted(entry_point: EntryPoint) -> None:
    """The other side: the sweep's notion of a valid value is the package's (the
    values listed as valid are accepted), so the sweep tests what it claims."""
    for key in sorted(entry_point.valid):
        world = World()
        try:
            entry_point.call(world, HOSTILE[key])
        finally:
            world.close()


async def test_a_batch_given_as_a_generator_is_enqueued_whole() -> None:
    """Found by the sweep: the storage ABC's default `batch_enqueue` validated a
    generator by reading it, then enqueued what was left of it: nothing."""
    storage: ReferenceStorage[Any] = ReferenceStorage(clock=ManualClock(1_000.0))
    messages = await storage.batch_enqueue(request(f"r{i}") for i in range(3))  # type: ignore[arg-type]
    assert [m.payload.id for m in messages] == ["r0", "r1", "r2"]
    assert await storage.get_approximate_message_count() == 3


def test_the_world_itself_is_sane() -> None:
    """The sweep's fixture: a bad call changes nothing only if a good one changes something."""
    world = World()
    try:
        before = world.state()
        world.run(world.storage.enqueue(request("new")))
        assert world.state() != before
    finally:
        world.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: ManualClock(True), "start must be a finite number, got True"),
        (lambda w: w.clock.advance("1"), "seconds must be a finite number, got '1'"),
        (lambda w: LLMThrottle(10**400, 100), "rpm must be a finite number, got 1000"),
        (
            lambda w: LLMThrottle(60, 100, adjustment_failure_strategy=None),
            "adjustment_failure_strategy must be 'strict', 'warn' or 'compensate', got None",
        ),
        (lambda w: LLMThrottle(60, 100, logger="app"), "logger must be a logging.Logger or None, got 'app'"),
        (lambda w: w.throttle.restore_from_snapshot({}), "snapshot must be a StateSnapshot, got {}"),
        (lambda w: StateSnapshot(None, 1, 2, 3, 4), "timestamp must be a number, got None"),
        (lambda w: w.throttle.apply_provider_limits({}), "limits must be a ProviderLimits, got {}"),
        (
            lambda w: LLMQueueDispatcherConfig(metrics_retention=-(10**400)),
            "metrics_retention must be a finite",
        ),
        (lambda w: CustomScorer("c", 10**400, lambda m, c: 0.5), "weight c must be a finite number >= 0"),
        (
            lambda w: ScoringConfig(custom_scorers=None),
            "custom_scorers must be a list of CustomScorer, got None",
        ),
        (lambda w: w.run(w.dispatcher.dequeue(w.throttle, timeout=-(10**400))), "timeout must be None or"),
        (
            lambda w: w.run(w.dispatcher.dequeue(None)),
            "rate_limiter must be a RateLimiter or an AsyncRateLimiter",
        ),
        (lambda w: w.run(w.storage.dead_letter_message(None)), "message must be a QueueMessage, got None"),
    ],
)
def test_the_error_names_the_field_and_the_bad_value(call: Callable[[World], Any], message: str) -> None:
    """ "Field must be ..., got <repr>", as every door words it."""
    world = World()
    try:
        with pytest.raises(LLMQueueDispatcherError) as raised:
            call(world)
        assert str(raised.value).startswith(message)
    finally:
        world.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda w, v: w.throttle.can_process(v),
        lambda w, v: ManualClock(v),
        lambda w, v: LLMThrottle(v, 100),
        lambda w, v: LLMQueueDispatcherConfig(prefetch_interval=v),
        lambda w, v: ScoringWeights(retry=v),
        lambda w, v: w.run(w.dispatcher.dequeue(w.throttle, timeout=v)),
    ],
    ids=["can_process", "ManualClock", "LLMThrottle.rpm", "prefetch_interval", "weights", "dequeue.timeout"],
)
def test_an_int_without_a_repr_still_gets_a_typed_error(call: Callable[[World, Any], Any]) -> None:
    """Past Python's limit on int digits, ``repr`` raises ValueError; building the
    message must not let that out instead of the typed error."""
    world = World()
    try:
        before = world.state()
        with pytest.raises(LLMQueueDispatcherError, match="int of 16610 bits"):
            call(world, -(10**5000))
        assert world.state() == before
    finally:
        world.close()


@pytest.mark.parametrize(
    "headers",
    [[("x-ratelimit-remaining-tokens", "5", "extra")], [("retry-after",)], ["retry-after"], [None], "abc"],
    ids=["triple", "single", "str pair", "None pair", "str"],
)
def test_headers_of_the_wrong_shape_are_refused_whole(headers: Any) -> None:
    """`sync_from_headers` given pairs of the wrong shape raised TypeError or
    ValueError from unpacking. A malformed header value is ignored (a provider's header never
    makes a worker fail); a malformed collection is the caller's mistake."""
    world = World()
    try:
        before = world.state()
        with pytest.raises(LLMQueueDispatcherError, match="headers must"):
            world.throttle.sync_from_headers([("x-ratelimit-remaining-tokens", "0"), *headers])
        assert world.state() == before
    finally:
        world.close()


@pytest.mark.parametrize(
    "value", ["Mon, 01 Jan 99999999999 00:00:00 GMT", "Mon, 32 Jan 2020 00:00:00 GMT", "1e400", "\ud800"]
)
def test_a_malformed_retry_after_is_ignored(value: str) -> None:
    """An HTTP date past datetime's range raised OverflowError out of the header
    parser; a provider's malformed value is ignored, as for every other header."""
    assert parse_rate_limit_headers({"retry-after": value}).retry_after is None


def test_a_bad_retry_after_leaves_the_buckets_uncut() -> None:
    """`apply_provider_limits` cut the buckets, then refused the penalty; every figure
    is now checked before anything changes."""
    world = World()
    try:
        limits = ProviderLimits(tokens_remaining=0.0)
        object.__setattr__(limits, "retry_after", -1.0)  # past the dataclass's own check
        before = world.state()
        with pytest.raises(LLMQueueDispatcherError, match="retry_after"):
            world.throttle.apply_provider_limits(limits)
        assert world.state() == before
    finally:
        world.close()


def test_the_throttle_takes_a_logger_as_the_dispatcher_does() -> None:
    """The rule chosen: ``logger=`` is None or a `logging.Logger` (a subclass
    included) for `LLMThrottle`, as for `LLMQueueDispatcherConfig` and `Worker`; anything else,
    a `LoggerAdapter` included, is refused at construction rather than failing at the first
    warning."""

    class AppLogger(logging.Logger):
        def __init__(self) -> None:
            super().__init__("app.throttle")
            self.seen: list[str] = []

        def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
            self.seen.append(str(msg))

    logger = AppLogger()
    throttle = LLMThrottle(60, 1_000, clock=ManualClock(), logger=logger, adjustment_failure_strategy="warn")
    assert throttle.consume("a", 1_000)
    throttle.adjust_consumption("a", 1_100)
    assert len(logger.seen) == 1
    with pytest.raises(InvalidConfigError, match=r"logger must be a logging\.Logger"):
        LLMThrottle(60, 1_000, logger=logging.LoggerAdapter(logger, {}))


async def test_an_async_limiter_passes_the_check_at_the_door() -> None:
    """The up-front limiter check of `dequeue` and `take_unfittable` takes a limiter
    whose methods are coroutines (`AsyncRateLimiter`) as well as a plain one."""
    throttle = LLMThrottle(600, 100_000, clock=ManualClock())

    class Async:
        async def can_process(self, estimated_tokens: int) -> Any:
            return throttle.can_process(estimated_tokens)

        async def get_metrics(self) -> Any:
            return throttle.get_metrics()

        async def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
            return throttle.consume(request_id, estimated_tokens, metadata)

        async def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
            throttle.adjust_consumption(request_id, actual_tokens)

    dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue(clock=ManualClock(1_000.0))
    await dispatcher.enqueue(request("r"))
    assert await dispatcher.take_unfittable(Async()) == []
    job = await dispatcher.dequeue(Async())
    assert job is not None
    await job.mark_as_processed()
