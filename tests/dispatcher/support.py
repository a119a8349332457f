"""Helpers shared by the dispatcher tests (the `clock` fixture is in conftest.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llm_queue_dispatcher import (
    CustomScorer,
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ScoringConfig,
    TokenInfo,
    create_in_memory_queue,
)

FACTOR_NAMES = ["priority", "efficiency", "wait_time", "retry", "token_fit", "processing_time"]


def request(
    request_id: str,
    priority: Priority = Priority.NORMAL,
    tokens: int = 100,
    ept: float | None = None,
    payload: Any = None,
) -> LLMRequest[Any]:
    return LLMRequest(
        id=request_id,
        payload=f"payload of {request_id}" if payload is None else payload,
        priority=priority,
        token_info=TokenInfo(tokens),
        expected_processing_time=ept,
    )


def queue(clock: ManualClock, **overrides: Any) -> LLMQueueDispatcher[Any]:
    return create_in_memory_queue(clock=clock, **overrides)


def throttle(clock: ManualClock | None, rpm: float = 600.0, tpm: float = 100_000.0) -> LLMThrottle:
    return LLMThrottle(rpm, tpm, clock=clock)


class SteppedClock:
    """A wall clock that an operator (or NTP) steps back: a plain callable clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def counts(dispatcher: LLMQueueDispatcher[Any]) -> tuple[int, int, int]:
    """(visible, in flight, total) as the dispatcher reports them."""
    q = (await dispatcher.get_queue_metrics()).queue
    return q.approximate_number_of_messages, q.approximate_number_of_messages_in_flight, q.total_messages


def scored_queue(clock: ManualClock, *scorers: CustomScorer, **overrides: Any) -> LLMQueueDispatcher[Any]:
    return queue(clock, scoring=ScoringConfig(custom_scorers=list(scorers)), **overrides)


class CountingLimiter:
    """A `RateLimiter` in plain Python (the protocol's four methods only), delegating to an
    `LLMThrottle` and counting calls: the dispatcher's non-native path."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def can_process(self, estimated_tokens: int) -> Any:
        self.calls["can_process"] += 1
        return self.inner.can_process(estimated_tokens)

    def get_metrics(self) -> Any:
        self.calls["get_metrics"] += 1
        return self.inner.get_metrics()

    def consume(self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None) -> bool:
        self.calls["consume"] += 1
        return self.inner.consume(request_id, estimated_tokens, metadata)

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.calls["adjust_consumption"] += 1
        self.inner.adjust_consumption(request_id, actual_tokens)
