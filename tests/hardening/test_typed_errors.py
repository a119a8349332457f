"""Issue 9, defect 12: typed errors at the door. Every public entry point, given a hostile value
(an int too large for a float, a wrong type, None, NaN, infinities, a lone surrogate, a bool,
negative zero, a list, a bare object), either accepts it (where the value is valid there) or
raises a subclass of `LLMQueueDispatcherError` — never an `OverflowError`, `TypeError`,
`AttributeError`, `ValueError` or `UnicodeEncodeError` of its own — and changes nothing.

`ENTRY_POINTS` lists each entry point with the hostile values that are valid for it. The sweep
tries every other value on a fresh world and compares the world's state before and after.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMQueueDispatcherError,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    ProcessableMessage,
    RateLimitError,
    ScoringConfig,
    TokenInfo,
    create_in_memory_queue,
)
from tests.hardening.support import request
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
    entry("LLMThrottle.consume.metadata", lambda w, v: w.throttle.consume("b", 1, v), *HOSTILE),
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
    entry("LLMThrottle.penalize", lambda w, v: w.throttle.penalize(v), "-0.0"),
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
    entry(
        "LLMQueueDispatcherConfig.buffer_size", lambda w, v: LLMQueueDispatcherConfig(buffer_size=v), "huge"
    ),
    entry(
        "LLMQueueDispatcherConfig.enable_prefetch",
        lambda w, v: LLMQueueDispatcherConfig(enable_prefetch=v),
        "bool",
    ),
    entry(
        "LLMQueueDispatcherConfig.max_candidates_to_evaluate",
        lambda w, v: LLMQueueDispatcherConfig(max_candidates_to_evaluate=v),
        "huge",
    ),
    entry("LLMQueueDispatcherConfig.scoring", lambda w, v: LLMQueueDispatcherConfig(scoring=v), "none"),
    entry("LLMQueueDispatcherConfig.logger", lambda w, v: LLMQueueDispatcherConfig(logger=v), "none"),
    entry(
        "LLMQueueDispatcherConfig.reserve_budget",
        lambda w, v: LLMQueueDispatcherConfig(reserve_budget=v),
        "bool",
    ),
    entry("LLMQueueDispatcherConfig.clock", lambda w, v: LLMQueueDispatcherConfig(clock=v), "none"),
    entry("ScoringConfig.weights", lambda w, v: ScoringConfig(weights=v), "none"),
    entry("CustomScorer.calculate", lambda w, v: CustomScorer("c", 0.1, v)),
    entry("LLMQueueDispatcher.storage", lambda w, v: LLMQueueDispatcher(v)),
    entry("LLMQueueDispatcher.config", lambda w, v: LLMQueueDispatcher(w.storage, v), "none"),
    entry("LLMQueueDispatcher.enqueue", lambda w, v: w.run(w.dispatcher.enqueue(v))),
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
    """Defect 12: the sweep over the public entry points."""
    sweep(entry_point, key)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS, ids=[e.name for e in ENTRY_POINTS])
def test_the_values_called_valid_are_accepted(entry_point: EntryPoint) -> None:
    """Defect 12, the other side: the sweep's notion of a valid value is the package's (the
    values listed as valid are accepted), so the sweep tests what it claims."""
    for key in sorted(entry_point.valid):
        world = World()
        try:
            entry_point.call(world, HOSTILE[key])
        finally:
            world.close()


async def test_a_batch_given_as_a_generator_is_enqueued_whole() -> None:
    """Defect 12, found by the sweep: the storage ABC's default `batch_enqueue` validated a
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
