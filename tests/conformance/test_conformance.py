"""The storage contract (API.md, "Storage"), run against every adapter in conftest.FACTORIES."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InvalidConfigError,
    InvalidRequestError,
    ManualClock,
    Priority,
    QueueAttributes,
    QueueMessage,
    QueueStorageAdapter,
    ReceiptHandleError,
    TokenInfo,
)
from tests.conformance.conftest import START, StorageFactory, same_request
from tests.conformance.support import req, run


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


async def counts(storage: QueueStorageAdapter[Any]) -> tuple[int, int]:
    attributes = await storage.get_queue_attributes()
    return (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    )


def ids(messages: list[QueueMessage[Any]]) -> list[str]:
    return [m.payload.id for m in messages]


# ----- enqueue --------------------------------------------------------------------------------


async def test_enqueue_returns_the_stored_message(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock)
    request = req("a", Priority.HIGH)
    message = await storage.enqueue(request)
    assert message.payload is request
    assert message.id == message.attributes.message_id
    assert message.id
    assert message.attributes.receipt_handle == ""
    assert message.attributes.receive_count == 0
    assert message.attributes.first_received_at is None
    assert message.attributes.enqueued_at == utc(START)
    assert message.attributes.enqueued_at.tzinfo is not None
    assert await storage.get_approximate_message_count() == 1


async def test_message_ids_are_unique(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock)
    single = [await storage.enqueue(req(f"s{i}")) for i in range(20)]
    batch = await storage.batch_enqueue([req(f"b{i}") for i in range(20)])
    assert len({m.id for m in single + batch}) == 40


async def test_duplicate_ids_are_refused_until_deleted(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    with pytest.raises(DuplicateRequestError, match="'a'"):
        await storage.enqueue(req("a", Priority.URGENT))
    [message] = await storage.dequeue(1, 30.0)
    with pytest.raises(DuplicateRequestError):
        await storage.enqueue(req("a"))  # in flight is not deleted
    assert await counts(storage) == (0, 1)
    await storage.delete_message(message.attributes.receipt_handle)
    await storage.enqueue(req("a"))
    assert await counts(storage) == (1, 0)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("id", "", "id"),
        ("id", 5, "id"),
        ("priority", 7, "priority"),
        ("priority", -1, "priority"),
        ("priority", True, "priority"),
        ("priority", "high", "priority"),
        ("token_info", "lots", "token_info"),
        ("expected_processing_time", -1.0, "expected_processing_time"),
        ("expected_processing_time", math.nan, "expected_processing_time"),
        ("expected_processing_time", math.inf, "expected_processing_time"),
        ("expected_processing_time", "1s", "expected_processing_time"),
        ("metadata", None, "metadata"),
        ("metadata", [("k", "v")], "metadata"),
        ("created_at", "2026-01-01", "created_at"),
        ("created_at", None, "created_at"),
    ],
)
async def test_enqueue_revalidates_mutated_requests(
    make_storage: StorageFactory, clock: ManualClock, field: str, value: Any, named: str
) -> None:
    storage = make_storage(clock)
    request = req("a")
    setattr(request, field, value)
    with pytest.raises(InvalidRequestError, match=named):
        await storage.enqueue(request)
    with pytest.raises(InvalidRequestError, match=named):
        await storage.batch_enqueue([req("ok"), request])
    assert await counts(storage) == (0, 0)


@pytest.mark.parametrize("estimated", [-1, 1.5, math.nan, math.inf, True, "10"])
async def test_enqueue_revalidates_token_counts(
    make_storage: StorageFactory, clock: ManualClock, estimated: Any
) -> None:
    storage = make_storage(clock)
    request = req("a")
    object.__setattr__(request.token_info, "estimated", estimated)  # bypasses the frozen dataclass
    with pytest.raises(InvalidRequestError, match=r"token_info\.estimated"):
        await storage.enqueue(request)
    assert await counts(storage) == (0, 0)


async def test_enqueue_refuses_what_is_not_a_request(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    with pytest.raises(InvalidRequestError, match="LLMRequest"):
        await storage.enqueue({"id": "a"})  # type: ignore[arg-type]
    assert await counts(storage) == (0, 0)


async def test_batch_is_all_or_nothing(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("stored"))
    with pytest.raises(DuplicateRequestError, match="'x'"):
        await storage.batch_enqueue([req("x"), req("y"), req("x")])
    with pytest.raises(DuplicateRequestError, match="'stored'"):
        await storage.batch_enqueue([req("x"), req("stored")])
    assert await counts(storage) == (1, 0)
    messages = await storage.batch_enqueue([req("x", Priority.LOW), req("y", Priority.URGENT)])
    assert ids(messages) == ["x", "y"]
    assert await storage.batch_enqueue([]) == []
    assert ids(await storage.dequeue(10, 30.0)) == ["y", "stored", "x"]


# ----- dequeue ----------------------------------------------------------------------------------


async def test_receive_order_is_priority_then_oldest_then_enqueue_order(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("low-old", Priority.LOW))
    clock.advance(1)
    await storage.batch_enqueue([req("n1"), req("u1", Priority.URGENT), req("n2")])
    clock.advance(1)
    await storage.enqueue(req("u2", Priority.URGENT))
    await storage.enqueue(req("h1", Priority.HIGH))
    assert ids(await storage.dequeue(0, 30.0)) == []
    assert ids(await storage.dequeue(2, 30.0)) == ["u1", "u2"]
    assert ids(await storage.dequeue(10, 30.0)) == ["h1", "n1", "n2", "low-old"]
    assert await storage.dequeue(5, 30.0) == []


async def test_receive_sets_attributes_and_hides_the_message(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    enqueued = await storage.enqueue(req("a"))
    clock.advance(2)
    [first] = await storage.dequeue(5, 10.0)
    assert first.id == enqueued.id
    assert first.attributes.receive_count == 1
    assert first.attributes.first_received_at == utc(START + 2)
    assert first.attributes.enqueued_at == utc(START)
    assert first.attributes.receipt_handle
    assert await counts(storage) == (0, 1)
    clock.advance(9.5)
    assert await storage.dequeue(5, 10.0) == []
    clock.advance(0.5)  # the deadline itself: visible again
    [second] = await storage.dequeue(5, 10.0)
    assert second.id == first.id
    assert same_request(make_storage, second.payload, first.payload)
    assert second.attributes.receive_count == 2
    assert second.attributes.first_received_at == utc(START + 2)
    assert second.attributes.receipt_handle != first.attributes.receipt_handle


async def test_a_redelivered_message_keeps_its_place_by_age(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("old"))
    await storage.dequeue(1, 5.0)
    clock.advance(1)
    await storage.enqueue(req("new"))
    clock.advance(10)
    assert ids(await storage.dequeue(2, 5.0)) == ["old", "new"]


@pytest.mark.parametrize("timeout", [-0.001, 43_200.001, math.nan, math.inf, -math.inf, "30", None, True])
async def test_bad_visibility_timeouts_are_refused(
    make_storage: StorageFactory, clock: ManualClock, timeout: Any
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    with pytest.raises(InvalidRequestError, match="visibility_timeout"):
        await storage.dequeue(1, timeout)
    assert await counts(storage) == (1, 0)
    [message] = await storage.dequeue(1, 30.0)
    with pytest.raises(InvalidRequestError, match="visibility_timeout"):
        await storage.update_visibility_timeout(message.attributes.receipt_handle, timeout)
    clock.advance(30)
    assert await counts(storage) == (1, 0)  # the original 30 s still applied


async def test_visibility_timeout_bounds_are_accepted(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b")])
    [a] = await storage.dequeue(1, 0)
    assert await counts(storage) == (2, 0)  # 0: visible again at once
    [again] = await storage.dequeue(1, 43_200)
    assert again.id == a.id
    assert again.attributes.receive_count == 2
    clock.advance(43_199)
    assert ids(await storage.dequeue(5, 30.0)) == ["b"]


@pytest.mark.parametrize("limit", [-1, 1.5, "2", None, True])
async def test_bad_limits_are_refused(make_storage: StorageFactory, clock: ManualClock, limit: Any) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    with pytest.raises(InvalidRequestError, match="limit"):
        await storage.dequeue(limit, 30.0)
    assert await counts(storage) == (1, 0)


# ----- receipt handles --------------------------------------------------------------------------


async def test_delete_acknowledges_for_good(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 30.0)
    await storage.delete_message(message.attributes.receipt_handle)
    assert await counts(storage) == (0, 0)
    clock.advance(100)
    assert await storage.dequeue(1, 30.0) == []
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(message.attributes.receipt_handle)


async def test_an_expired_handle_still_works_until_the_next_receive(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b")])
    [a, b] = await storage.dequeue(2, 5.0)
    clock.advance(6)
    assert await counts(storage) == (2, 0)
    await storage.delete_message(a.attributes.receipt_handle)
    await storage.update_visibility_timeout(b.attributes.receipt_handle, 10.0)
    assert await counts(storage) == (0, 1)
    clock.advance(10)
    [b2] = await storage.dequeue(1, 5.0)
    assert b2.attributes.receive_count == 2  # a visibility change is not a receive
    for stale in (a.attributes.receipt_handle, b.attributes.receipt_handle):
        with pytest.raises(ReceiptHandleError):
            await storage.delete_message(stale)
        with pytest.raises(ReceiptHandleError):
            await storage.update_visibility_timeout(stale, 0.0)
    assert await counts(storage) == (0, 1)


@pytest.mark.parametrize("handle", ["", "nonsense", "0" * 32, "f" * 64, 42, None])
async def test_unknown_handles_are_refused_and_change_nothing(
    make_storage: StorageFactory, clock: ManualClock, handle: Any
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b")])
    await storage.dequeue(1, 30.0)
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(handle)
    with pytest.raises(ReceiptHandleError):
        await storage.update_visibility_timeout(handle, 0.0)
    assert await counts(storage) == (1, 1)


async def test_handles_of_another_store_are_refused(make_storage: StorageFactory, clock: ManualClock) -> None:
    one, two = make_storage(clock), make_storage(clock)
    for storage in (one, two):
        await storage.enqueue(req("a"))
    [m1] = await one.dequeue(1, 30.0)
    await two.dequeue(1, 30.0)
    with pytest.raises(ReceiptHandleError):
        await two.delete_message(m1.attributes.receipt_handle)
    assert await counts(two) == (0, 1)


async def test_visibility_changes_count_from_now(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 100.0)
    clock.advance(50)
    await storage.update_visibility_timeout(message.attributes.receipt_handle, 10.0)
    clock.advance(9)
    assert await counts(storage) == (0, 1)
    clock.advance(1)
    assert await counts(storage) == (1, 0)


async def test_zero_visibility_makes_the_message_visible_at_once(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 100.0)
    await storage.update_visibility_timeout(message.attributes.receipt_handle, 0)
    assert await storage.get_approximate_message_count() == 1
    [again] = await storage.dequeue(1, 100.0)
    assert again.attributes.receive_count == 2


async def test_batch_delete_deletes_the_valid_and_names_the_rest(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b"), req("c")])
    messages = await storage.dequeue(3, 30.0)
    await storage.batch_delete([messages[0].attributes.receipt_handle])
    assert await counts(storage) == (0, 2)
    with pytest.raises(ReceiptHandleError, match="bogus"):
        await storage.batch_delete([m.attributes.receipt_handle for m in messages[1:]] + ["bogus"])
    assert await counts(storage) == (0, 0)


# ----- dead-lettering and retention -------------------------------------------------------------


async def test_max_receive_count_moves_to_the_dead_letter_store(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    dead = make_storage(clock)
    storage = make_storage(clock, max_receive_count=2, dead_letter=dead)
    request = req("a", Priority.HIGH)
    await storage.enqueue(request)
    [first] = await storage.dequeue(1, 5.0)
    clock.advance(5)
    [second] = await storage.dequeue(1, 5.0)
    assert second.attributes.receive_count == 2
    clock.advance(4)
    assert await counts(storage) == (0, 1)  # still in flight: deletable
    clock.advance(1)
    assert await counts(storage) == (0, 0)
    assert (await storage.get_queue_attributes()).dead_lettered == 1
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(second.attributes.receipt_handle)
    [moved] = await dead.dequeue(1, 30.0)
    assert same_request(make_storage, moved.payload, request)
    assert moved.attributes.receive_count == 1  # a new message in the dead-letter store
    await storage.enqueue(req("a"))  # the id is free again in the source
    assert first.attributes.receive_count == 1


async def test_max_receive_count_without_a_dead_letter_store_drops_and_counts(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock, max_receive_count=1)
    await storage.batch_enqueue([req("a"), req("b")])
    [a, b] = await storage.dequeue(2, 5.0)
    await storage.delete_message(b.attributes.receipt_handle)  # acknowledged: never dead-lettered
    clock.advance(5)
    attributes = await storage.get_queue_attributes()
    assert (attributes.approximate_number_of_messages, attributes.dead_lettered) == (0, 1)
    assert a.attributes.receive_count == 1


async def test_a_delete_before_expiry_prevents_dead_lettering(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    dead = make_storage(clock)
    storage = make_storage(clock, max_receive_count=1, dead_letter=dead)
    await storage.enqueue(req("a"))
    [a] = await storage.dequeue(1, 5.0)
    await storage.update_visibility_timeout(a.attributes.receipt_handle, 20.0)
    clock.advance(19)
    await storage.delete_message(a.attributes.receipt_handle)
    clock.advance(10)
    assert (await storage.get_queue_attributes()).dead_lettered == 0
    assert await dead.get_approximate_message_count() == 0


async def test_retention_drops_old_messages(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock, message_retention=100.0)
    await storage.enqueue(req("old"))
    clock.advance(50)
    await storage.enqueue(req("young"))
    clock.advance(50)
    assert await storage.get_approximate_message_count() == 2  # exactly the period: kept
    clock.advance(0.5)
    assert ids(await storage.peek_messages_by_priority(Priority.NORMAL, 10)) == ["young"]
    attributes = await storage.get_queue_attributes()
    assert (attributes.expired, attributes.message_retention_period) == (1, 100.0)
    await storage.enqueue(req("old"))  # its id is free again


async def test_retention_applies_to_messages_in_flight_when_they_return(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock, message_retention=100.0)
    await storage.enqueue(req("a"))
    [a] = await storage.dequeue(1, 200.0)
    clock.advance(150)
    await storage.delete_message(a.attributes.receipt_handle)  # still deletable while in flight
    await storage.enqueue(req("b"))
    await storage.dequeue(1, 200.0)
    clock.advance(200)
    assert await counts(storage) == (0, 0)
    assert (await storage.get_queue_attributes()).expired == 1


@pytest.mark.parametrize(
    "options",
    [
        {"max_receive_count": 0},
        {"max_receive_count": -3},
        {"max_receive_count": True},
        {"max_receive_count": 2.5},
        {"message_retention": 0.0},
        {"message_retention": -1.0},
        {"message_retention": math.nan},
        {"message_retention": "long"},
    ],
)
def test_bad_configuration_is_refused(make_storage: StorageFactory, clock: ManualClock, options: Any) -> None:
    with pytest.raises(InvalidConfigError):
        make_storage(clock, **options)


# ----- peek, purge, attributes ------------------------------------------------------------------


async def test_peek_is_by_priority_oldest_first_and_changes_nothing(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    for i, tokens in enumerate([5, 50_000, 1, 700, 0]):
        await storage.enqueue(req(f"n{i}", tokens=tokens))
        clock.advance(1)
    await storage.enqueue(req("u", Priority.URGENT))
    await storage.dequeue(1, 30.0)  # takes "u"
    await storage.enqueue(req("u2", Priority.URGENT))
    peeked = await storage.peek_messages_by_priority(Priority.NORMAL, 3)
    assert ids(peeked) == ["n0", "n1", "n2"]
    assert all(m.attributes.receipt_handle == "" for m in peeked)
    assert ids(await storage.peek_messages_by_priority(0, 10)) == ["u2"]
    assert await storage.peek_messages_by_priority(Priority.LOW, 10) == []
    assert await storage.peek_messages_by_priority(Priority.NORMAL, 0) == []
    assert await counts(storage) == (6, 1)
    for bad in (4, -1, True, "0"):
        with pytest.raises(InvalidRequestError, match="priority"):
            await storage.peek_messages_by_priority(bad, 1)  # type: ignore[arg-type]


async def test_purge_removes_everything_and_invalidates_handles(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b"), req("c")])
    [a] = await storage.dequeue(1, 30.0)
    await storage.purge()
    assert await counts(storage) == (0, 0)
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(a.attributes.receipt_handle)
    await storage.enqueue(req("a"))
    [again] = await storage.dequeue(1, 30.0)
    assert again.attributes.receive_count == 1
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(a.attributes.receipt_handle)
    await storage.delete_message(again.attributes.receipt_handle)


async def test_queue_attributes(make_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_storage(clock, message_retention=1000.0)
    clock.advance(5)
    await storage.batch_enqueue([req("a"), req("b"), req("c")])
    await storage.dequeue(1, 12.5)
    attributes = await storage.get_queue_attributes()
    assert isinstance(attributes, QueueAttributes)
    assert attributes.approximate_number_of_messages == 2
    assert attributes.approximate_number_of_messages_in_flight == 1
    assert attributes.approximate_number_of_messages_delayed == 0
    assert attributes.created_timestamp == utc(START)
    assert attributes.last_modified_timestamp == utc(START + 5)
    assert attributes.visibility_timeout == 12.5
    assert attributes.message_retention_period == 1000.0
    assert (attributes.dead_lettered, attributes.expired) == (0, 0)


async def test_datetimes_follow_the_clock_to_the_microsecond(
    make_storage: StorageFactory,
) -> None:
    for start in (0.0, 0.000001, 951_782_400.5, 1_700_000_000.123456, 4_102_444_800.999999):
        storage = make_storage(ManualClock(start))
        message = await storage.enqueue(req("a"))
        assert message.attributes.enqueued_at == utc(start)


def test_operations_never_suspend(make_in_process_storage: StorageFactory, clock: ManualClock) -> None:
    storage = make_in_process_storage(clock)
    run(storage.enqueue(req("a")))
    run(storage.batch_enqueue([req("b"), req("c", tokens=3)]))
    [message] = run(storage.dequeue(1, 10.0))
    run(storage.update_visibility_timeout(message.attributes.receipt_handle, 5.0))
    run(storage.delete_message(message.attributes.receipt_handle))
    assert run(storage.get_approximate_message_count()) == 2
    assert len(run(storage.peek_messages_by_priority(Priority.NORMAL, 5))) == 2
    run(storage.batch_delete([]))
    run(storage.get_queue_attributes())
    run(storage.purge())


async def test_payloads_are_kept_by_reference(
    make_in_process_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_in_process_storage(clock)
    payload = {"prompt": "hi", "n": [1, 2]}
    request = req("a")
    request.payload = payload  # type: ignore[assignment]
    await storage.enqueue(request)
    [message] = await storage.dequeue(1, 1.0)
    assert message.payload is request
    assert message.payload.payload is payload
    assert message.payload.token_info == TokenInfo(10)
