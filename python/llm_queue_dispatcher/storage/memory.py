"""`InMemoryStorage`: the in-process store, a thin asyncio face over the Rust `StoreCore`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from .._checks import shown
from .._core import DEFAULT_MESSAGE_RETENTION, StoreCore
from ..errors import InvalidConfigError, InvalidRequestError, ReceiptHandleError
from ..types import LLMRequest, QueueMessage
from .base import QueueAttributes, QueueStorageAdapter, _as_list

__all__ = ["InMemoryStorage"]

T = TypeVar("T")


class InMemoryStorage(QueueStorageAdapter[T]):
    """An in-memory queue with SQS semantics; requests are kept by reference, not copied.

    Every operation is one synchronous call into Rust: the coroutines never suspend and never
    start threads. Each call first releases messages whose visibility ran out, so no background
    task is needed.

    Args:
        clock: a `ManualClock` (read natively), a callable returning seconds, or None for the wall
            clock. Message datetimes are its readings taken as seconds since the epoch.
        max_receive_count: after this many receives without a delete, an expiring message goes to
            ``dead_letter`` (or is dropped and counted when there is none). None: never.
        dead_letter: another `InMemoryStorage` receiving dead-lettered messages as new messages.
        message_retention: seconds after enqueue after which a message is dropped (default 4 days).

    Example::

        storage = InMemoryStorage(clock=ManualClock(), max_receive_count=3)
        await storage.enqueue(LLMRequest(id="r1", payload={"prompt": "hi"}))
        [message] = await storage.dequeue(1, visibility_timeout=30.0)
        await storage.delete_message(message.attributes.receipt_handle)
    """

    def __init__(
        self,
        *,
        clock: Any = None,
        max_receive_count: int | None = None,
        dead_letter: InMemoryStorage[Any] | None = None,
        message_retention: float = DEFAULT_MESSAGE_RETENTION,
    ) -> None:
        if dead_letter is not None and not isinstance(dead_letter, InMemoryStorage):
            raise InvalidConfigError(f"dead_letter must be an InMemoryStorage or None, got {dead_letter!r}")
        self._dead_letter = dead_letter
        self.core: StoreCore = StoreCore(
            clock=clock,
            max_receive_count=max_receive_count,
            dead_letter=None if dead_letter is None else dead_letter.core,
            message_retention=message_retention,
        )

    @property
    def clock(self) -> Any:
        """The clock given at construction (None for the wall clock)."""
        return self.core.clock

    @property
    def max_receive_count(self) -> int | None:
        return self.core.max_receive_count

    @property
    def dead_letter(self) -> InMemoryStorage[Any] | None:
        return self._dead_letter

    @property
    def message_retention(self) -> float:
        return self.core.message_retention

    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        return self.core.enqueue(request)

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        """All or nothing: the whole batch is validated, duplicates included, before storing."""
        # Read once into a list here: the core checks each request, this the batch's shape. A
        # list goes as it is (the core reads each item once), not copied.
        batch = requests if type(requests) is list else _as_list(requests, "requests")
        return self.core.enqueue_batch(batch)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        return self.core.dequeue(limit, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        self.core.delete(receipt_handle)

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        self.core.change_visibility(receipt_handle, visibility_timeout)

    async def release_message(self, receipt_handle: str) -> None:
        """Gives the message back unprocessed, its receive undone (count and first receive as
        before); one atomic step in the store."""
        self.core.release(receipt_handle)

    async def batch_release(self, receipt_handles: Sequence[str]) -> None:
        """Releases every current handle's message in one step, then raises
        `ReceiptHandleError` naming the stale or unknown ones."""
        handles: list[str] = _as_list(receipt_handles, "receipt_handles")
        failed = self.core.release_batch(handles)
        if failed:
            raise ReceiptHandleError(
                f"{len(failed)} of {len(handles)} receipt handles are unknown or no longer current: "
                f"{failed!r}"
            )

    async def dead_letter_message(self, message: QueueMessage[T]) -> None:
        """Moves the message to ``dead_letter`` at once (or drops it when there is none), counted
        in ``dead_lettered``; one atomic step in the store."""
        if not isinstance(message, QueueMessage):
            raise InvalidRequestError(f"message must be a QueueMessage, got {shown(message)}")
        self.core.dead_letter_now(message.attributes.receipt_handle)

    async def get_approximate_message_count(self) -> int:
        return self.core.visible_count()

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[T]]:
        return self.core.peek(priority, limit)

    async def get_queue_attributes(self) -> QueueAttributes:
        return QueueAttributes(**self.core.attributes())

    async def purge(self) -> None:
        """Removes every message, visible and in flight; every receipt handle becomes invalid."""
        self.core.purge()

    def __repr__(self) -> str:
        return f"InMemoryStorage({self.core!r})"
