"""The storage contract, dead-lettering (API.md, "Storage"): a dead-letter
store that already holds a message with the same request id keeps the new copy too. Dropping it
would lose a request that was counted as dead-lettered and stored nowhere."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InMemoryStorage,
    LLMRequest,
    ManualClock,
    QueueMessage,
    QueueStorageAdapter,
    ReceiptHandleError,
    StorageError,
)
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


# -- the base class's default, which a custom adapter without an atomic move keeps ----------------


class DefaultDeadLetter(QueueStorageAdapter[Any]):
    """A custom adapter over an `InMemoryStorage` with only the six required methods, so its
    ``dead_letter_message`` is the base class's default; ``failing_deletes`` deletes raise
    `StorageError` (a backend that failed) before doing anything."""

    def __init__(self, inner: InMemoryStorage[Any], dead_letter: QueueStorageAdapter[Any]) -> None:
        self.inner = inner
        self.dead_letter = dead_letter
        self.failing_deletes = 0

    async def enqueue(self, request: LLMRequest[Any]) -> QueueMessage[Any]:
        return await self.inner.enqueue(request)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        return await self.inner.dequeue(limit, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        if self.failing_deletes:
            self.failing_deletes -= 1
            raise StorageError("injected delete failure")
        await self.inner.delete_message(receipt_handle)

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        await self.inner.update_visibility_timeout(receipt_handle, visibility_timeout)

    async def get_approximate_message_count(self) -> int:
        return await self.inner.get_approximate_message_count()

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[Any]]:
        return await self.inner.peek_messages_by_priority(priority, limit)


def default_adapter(clock: ManualClock) -> tuple[DefaultDeadLetter, InMemoryStorage[Any]]:
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    return DefaultDeadLetter(InMemoryStorage(clock=clock), dead), dead


async def test_the_default_dead_letter_with_a_stale_handle_copies_nothing(clock: ManualClock) -> None:
    storage, dead = default_adapter(clock)
    await storage.enqueue(req("a"))
    [first] = await storage.dequeue(1, 5.0)
    clock.advance(5)
    [second] = await storage.dequeue(1, 30.0)  # another consumer holds it now
    with pytest.raises(ReceiptHandleError):
        await storage.dead_letter_message(first)
    assert await dead.get_approximate_message_count() == 0
    assert (await storage.get_queue_attributes()).approximate_number_of_messages == 0
    # The current holder dead-letters it: exactly one copy, none left behind.
    await storage.dead_letter_message(second)
    assert await drain(dead) == ["a"]
    assert await drain(storage) == []
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(second.attributes.receipt_handle)


async def test_the_default_dead_letter_retried_after_a_failed_delete_moves_one_copy(
    clock: ManualClock,
) -> None:
    storage, dead = default_adapter(clock)
    await storage.enqueue(req("a"))
    [message] = await storage.dequeue(1, 30.0)
    storage.failing_deletes = 1
    with pytest.raises(StorageError):
        await storage.dead_letter_message(message)
    await storage.dead_letter_message(message)  # the retry finishes the move
    assert await drain(dead) == ["a"]
    assert await drain(storage) == []
