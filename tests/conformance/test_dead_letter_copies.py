"""The storage contract, dead-lettering (API.md, "Storage"): a dead-letter
store that already holds a message with the same request id keeps the new copy too. Dropping it
would lose a request that was counted as dead-lettered and stored nowhere."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import DuplicateRequestError, ManualClock, QueueStorageAdapter
from tests.conformance.conftest import StorageFactory, same_request
from tests.conformance.support import req


async def drain(storage: QueueStorageAdapter[Any]) -> list[str]:
    """Receives and deletes every visible message; returns their request ids."""
    ids = []
    while batch := await storage.dequeue(10, 30.0):
        for message in batch:
            ids.append(message.payload.id)
            await storage.delete_message(message.attributes.receipt_handle)
    return ids


async def test_the_receive_count_rule_keeps_a_copy_whose_id_is_already_dead(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    dead = make_storage(clock)
    storage = make_storage(clock, max_receive_count=1, dead_letter=dead)
    await dead.enqueue(req("a"))  # a copy from earlier, still there
    second = req("a")
    await storage.enqueue(second)
    await storage.dequeue(1, 5.0)
    clock.advance(5)
    assert await storage.get_approximate_message_count() == 0
    assert (await storage.get_queue_attributes()).dead_lettered == 1
    assert await dead.get_approximate_message_count() == 2
    copies = await dead.peek_messages_by_priority(int(second.priority), 10)
    assert [m.payload.id for m in copies] == ["a", "a"]
    assert same_request(make_storage, copies[1].payload, second)
    assert copies[0].id != copies[1].id
    with pytest.raises(DuplicateRequestError):
        await dead.enqueue(req("a"))  # an ordinary enqueue still refuses the id
    assert await drain(dead) == ["a", "a"]
    await dead.enqueue(req("a"))  # both deleted: the id is free


async def test_dead_letter_message_keeps_a_copy_whose_id_is_already_dead(
    make_storage: StorageFactory, clock: ManualClock
) -> None:
    dead = make_storage(clock)
    storage = make_storage(clock, dead_letter=dead)
    for _ in range(3):
        await storage.enqueue(req("a"))
        [message] = await storage.dequeue(1, 30.0)
        await storage.dead_letter_message(message)
    assert await storage.get_approximate_message_count() == 0
    assert (await storage.get_queue_attributes()).dead_lettered == 3
    assert await drain(dead) == ["a", "a", "a"]
