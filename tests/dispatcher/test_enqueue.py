"""Enqueue and batch_enqueue: the stored message, validation at the door, duplicate ids."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InvalidRequestError,
    LLMRequest,
    ManualClock,
    Priority,
    QueueMessage,
    TokenInfo,
)
from tests.dispatcher.support import counts, queue, request, throttle


async def test_enqueue_returns_the_stored_message(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    payload = object()
    message = await dispatcher.enqueue(LLMRequest("a", payload, Priority.HIGH, TokenInfo(42)))
    assert isinstance(message, QueueMessage)
    assert message.payload.id == "a"
    assert message.payload.payload is payload  # kept by reference
    assert message.payload.priority is Priority.HIGH
    assert message.id == message.attributes.message_id
    assert message.attributes.receive_count == 0
    assert message.attributes.first_received_at is None
    assert message.attributes.enqueued_at == datetime.fromtimestamp(clock.now(), timezone.utc)
    assert await counts(dispatcher) == (1, 0, 1)


def _empty_id(r: LLMRequest[Any]) -> None:
    r.id = ""


def _bad_priority(r: LLMRequest[Any]) -> None:
    r.priority = 7  # type: ignore[assignment]


def _negative_processing_time(r: LLMRequest[Any]) -> None:
    r.expected_processing_time = -1.0


def _negative_tokens(r: LLMRequest[Any]) -> None:
    object.__setattr__(r.token_info, "estimated", -5)


def _not_token_info(r: LLMRequest[Any]) -> None:
    r.token_info = "lots"  # type: ignore[assignment]


BAD_MUTATIONS = [_empty_id, _bad_priority, _negative_processing_time, _negative_tokens, _not_token_info]


@pytest.mark.parametrize("mutate", BAD_MUTATIONS, ids=lambda f: f.__name__)
async def test_enqueue_revalidates_and_stores_nothing_on_bad_input(clock: ManualClock, mutate: Any) -> None:
    dispatcher = queue(clock)
    bad = request("a")
    mutate(bad)
    with pytest.raises(InvalidRequestError):
        await dispatcher.enqueue(bad)
    assert await counts(dispatcher) == (0, 0, 0)
    # Nothing was stored, so the id is free.
    await dispatcher.enqueue(request("a"))
    assert await counts(dispatcher) == (1, 0, 1)


async def test_enqueue_of_something_not_a_request_is_a_typed_error(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    with pytest.raises(InvalidRequestError):
        await dispatcher.enqueue({"id": "a", "payload": "hi"})  # type: ignore[arg-type]
    assert await counts(dispatcher) == (0, 0, 0)


async def test_duplicate_id_is_refused_until_the_first_is_deleted(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    await dispatcher.enqueue(request("a"))
    with pytest.raises(DuplicateRequestError):
        await dispatcher.enqueue(request("a", Priority.URGENT))
    metrics = (await dispatcher.get_queue_metrics()).queue
    assert metrics.total_messages == 1
    assert metrics.messages_by_priority["URGENT"] == 0
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    with pytest.raises(DuplicateRequestError):  # in flight is not deleted
        await dispatcher.enqueue(request("a"))
    await job.mark_as_processed()
    await dispatcher.enqueue(request("a"))
    assert await counts(dispatcher) == (1, 0, 1)


async def test_batch_enqueue_stores_all_in_order(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    messages = await dispatcher.batch_enqueue([request(f"r{i}") for i in range(5)])
    assert [m.payload.id for m in messages] == [f"r{i}" for i in range(5)]
    assert await counts(dispatcher) == (5, 0, 5)
    assert await dispatcher.batch_enqueue([]) == []


async def test_batch_enqueue_is_validated_whole(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("existing"))
    bad = request("bad")
    bad.priority = 9  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError):
        await dispatcher.batch_enqueue([request("x1"), bad, request("x2")])
    with pytest.raises(DuplicateRequestError):
        await dispatcher.batch_enqueue([request("y1"), request("y2"), request("y1")])
    with pytest.raises(DuplicateRequestError):
        await dispatcher.batch_enqueue([request("z1"), request("existing")])
    assert await counts(dispatcher) == (1, 0, 1)
    # None of the refused batches left anything behind: all their ids are free.
    await dispatcher.batch_enqueue([request(i) for i in ("x1", "x2", "y1", "y2", "z1")])
    assert await counts(dispatcher) == (6, 0, 6)
