"""`release_message` and `batch_release`: a message received and given back unprocessed (a
dispatcher or a worker stopping) is as if that receive had not happened: visible at once, its
receive count and first receive as before, its handle stale. A stop never uses up a receive
toward ``max_receive_count``.

An adapter that cannot undo a receive keeps the base class's fallback (documented there): the
message is made visible at once with its receive still counted (and, as after any visibility
change, its handle current until the next receive). Each adapter is held to the promise it
makes: the exact one when it overrides `release_message`, the fallback otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import ManualClock, QueueStorageAdapter, ReceiptHandleError
from tests.conformance.conftest import StorageFactory
from tests.conformance.support import req


def undoes_receives(storage: QueueStorageAdapter[Any]) -> bool:
    return type(storage).release_message is not QueueStorageAdapter.release_message


async def counts(storage: QueueStorageAdapter[Any]) -> tuple[int, int]:
    attributes = await storage.get_queue_attributes()
    return attributes.approximate_number_of_messages, attributes.approximate_number_of_messages_in_flight


async def test_a_released_message_is_visible_at_once_as_before_its_receive(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 300.0)
    assert await counts(storage) == (0, 1)
    await storage.release_message(message.attributes.receipt_handle)
    assert await counts(storage) == (1, 0)
    [visible] = await storage.peek_messages_by_priority(2, 10)
    if undoes_receives(storage):
        assert visible.attributes.receive_count == 0
        assert visible.attributes.first_received_at is None
    else:
        assert visible.attributes.receive_count == 1
    if undoes_receives(storage):
        # The handle is stale: nothing changes with it any more.
        for call in (storage.release_message, storage.delete_message):
            with pytest.raises(ReceiptHandleError):
                await call(message.attributes.receipt_handle)
        assert await counts(storage) == (1, 0)
    [again] = await storage.dequeue(1, 300.0)
    assert again.attributes.receive_count == (1 if undoes_receives(storage) else 2)


async def test_releasing_a_later_receive_keeps_the_first_one(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [first] = await storage.dequeue(1, 5.0)
    clock.advance(6)
    [second] = await storage.dequeue(1, 5.0)
    assert second.attributes.receive_count == 2
    await storage.release_message(second.attributes.receipt_handle)
    [visible] = await storage.peek_messages_by_priority(2, 10)
    assert visible.attributes.receive_count == (1 if undoes_receives(storage) else 2)
    assert visible.attributes.first_received_at == first.attributes.first_received_at


async def test_a_handle_whose_visibility_ran_out_still_releases(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 5.0)
    clock.advance(6)  # visible again, not received by anyone: the handle is still current
    await storage.release_message(message.attributes.receipt_handle)
    assert await counts(storage) == (1, 0)
    [visible] = await storage.peek_messages_by_priority(2, 10)
    assert visible.attributes.receive_count == (0 if undoes_receives(storage) else 1)


async def test_released_receives_never_count_toward_max_receive_count(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    dead = make_storage(clock)
    storage = make_storage(clock, max_receive_count=1, dead_letter=dead)
    if not undoes_receives(storage):
        return  # the fallback counts each receive: the dead-letter rule applies as to any receive
    await storage.enqueue(req("a"))
    for _ in range(5):
        [message] = await storage.dequeue(1, 5.0)
        await storage.release_message(message.attributes.receipt_handle)
        clock.advance(10)  # past any lease: a counted receive would be dead-lettered now
    assert await counts(storage) == (1, 0)
    assert (await storage.get_queue_attributes()).dead_lettered == 0
    assert await dead.get_approximate_message_count() == 0


@pytest.mark.parametrize("handle", ["", "nonsense", "0" * 32, "f" * 64, 42, None])
async def test_releasing_an_unknown_handle_is_refused_and_changes_nothing(
    make_storage: StorageFactory, clock: ManualClock, handle: Any
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b")])
    await storage.dequeue(1, 30.0)
    with pytest.raises(ReceiptHandleError):
        await storage.release_message(handle)
    assert await counts(storage) == (1, 1)


async def test_batch_release_releases_the_current_and_names_the_rest(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    storage = make_storage(clock)
    await storage.batch_enqueue([req("a"), req("b"), req("c")])
    messages = await storage.dequeue(3, 30.0)
    await storage.batch_release([messages[0].attributes.receipt_handle])
    assert await counts(storage) == (1, 2)
    with pytest.raises(ReceiptHandleError, match="bogus"):
        await storage.batch_release([m.attributes.receipt_handle for m in messages] + ["bogus"])
    # The stale first handle and "bogus" named; the other two released all the same.
    assert await counts(storage) == (3, 0)
    counts_now = {
        m.payload.id: m.attributes.receive_count for m in await storage.peek_messages_by_priority(2, 10)
    }
    assert counts_now == dict.fromkeys("abc", 0 if undoes_receives(storage) else 1)
