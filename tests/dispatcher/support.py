"""Helpers shared by the dispatcher tests (the `clock` fixture is in conftest.py)."""

from __future__ import annotations

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


async def counts(dispatcher: LLMQueueDispatcher[Any]) -> tuple[int, int, int]:
    """(visible, in flight, total) as the dispatcher reports them."""
    q = (await dispatcher.get_queue_metrics()).queue
    return q.approximate_number_of_messages, q.approximate_number_of_messages_in_flight, q.total_messages


def scored_queue(clock: ManualClock, *scorers: CustomScorer, **overrides: Any) -> LLMQueueDispatcher[Any]:
    return queue(clock, scoring=ScoringConfig(custom_scorers=list(scorers)), **overrides)
