"""The conformance suite's plain-Python adapter, recording every call the dispatcher makes, for
the prefetch tests (which check what a dispatcher asks of an external store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from llm_queue_dispatcher import LLMRequest, QueueMessage
from tests.conformance.reference_adapter import ReferenceStorage

T = TypeVar("T")


class PlainAdapter(ReferenceStorage[T]):
    """`ReferenceStorage` on ``clock`` with a log of calls and two peeks for assertions."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    @property
    def records(self) -> dict[str, Any]:
        """Every stored message by request id (visible or in flight)."""
        return self._by_id

    def calls_named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]

    def current_handle(self, request_id: str) -> str | None:
        """The receipt handle of the latest receive of ``request_id``'s message, if stored."""
        entry = self._by_id.get(request_id)
        return None if entry is None else entry.handle

    def is_visible(self, request_id: str) -> bool:
        """Whether ``request_id``'s message is stored and visible now."""
        entry = self._by_id.get(request_id)
        return entry is not None and (entry.deadline is None or entry.deadline <= self._clock())

    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        self.calls.append(("enqueue", (request.id,)))
        return await super().enqueue(request)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        self.calls.append(("dequeue", (limit, visibility_timeout)))
        return await super().dequeue(limit, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        self.calls.append(("delete_message", (receipt_handle,)))
        await super().delete_message(receipt_handle)

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        self.calls.append(("update_visibility_timeout", (receipt_handle, visibility_timeout)))
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)
