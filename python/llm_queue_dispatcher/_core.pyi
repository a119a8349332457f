"""Stubs of the compiled module ``llm_queue_dispatcher._core``."""

from collections.abc import Iterable
from typing import Any, final

from .types import LLMRequest, QueueMessage

__all__ = ["ManualClock", "StoreCore", "__version__"]

__version__: str

@final
class ManualClock:
    """A clock that only moves when told to; Rust code reads it without calling Python."""

    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def now(self) -> float:
        """The current reading in seconds."""
    def advance(self, seconds: float) -> float:
        """Moves the clock forward by ``seconds`` (finite, >= 0); returns the new reading."""
    def set(self, seconds: float) -> None:
        """Sets the clock to ``seconds``, which must not be earlier than the current reading."""
    def __call__(self) -> float:
        """The current reading: a ManualClock is also a plain callable clock."""

@final
class StoreCore:
    """The in-memory store's Rust core: SQS semantics over ``LLMRequest`` objects kept by reference.

    Every method reads the clock once, first releases messages whose visibility ran out (moving
    those received ``max_receive_count`` times to ``dead_letter``, or dropping them, and dropping
    messages older than ``message_retention``), then does its work. ``InMemoryStorage`` wraps it.
    """

    def __new__(
        cls,
        *,
        clock: Any = None,
        max_receive_count: int | None = None,
        dead_letter: StoreCore | None = None,
        message_retention: float = 345600.0,
    ) -> StoreCore: ...
    def enqueue(self, request: LLMRequest[Any]) -> QueueMessage[Any]:
        """Validates and enqueues one request; its ``receipt_handle`` is "" until received."""
    def enqueue_batch(self, requests: Iterable[LLMRequest[Any]]) -> list[QueueMessage[Any]]:
        """Validates the whole batch (fields, duplicates), then enqueues it; all or nothing."""
    def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        """Receives up to ``limit`` visible messages, priority then oldest first."""
    def delete(self, handle: str) -> None:
        """Deletes the message a current receipt handle names; ``ReceiptHandleError`` otherwise."""
    def change_visibility(self, handle: str, visibility_timeout: float) -> None:
        """Makes the message invisible for ``visibility_timeout`` seconds from now (0: visible)."""
    def peek(self, priority: int, limit: int) -> list[QueueMessage[Any]]:
        """Up to ``limit`` visible messages of ``priority``, oldest first, not received."""
    def purge(self) -> None:
        """Removes every message; every receipt handle becomes invalid."""
    def attributes(self) -> dict[str, Any]:
        """The fields of ``QueueAttributes``, plus ``expired`` (dropped by retention)."""
    def visible_count(self) -> int:
        """Visible messages."""
    def in_flight_count(self) -> int:
        """Received messages whose visibility has not run out."""
    def next_visibility_change(self) -> float | None:
        """Clock reading at which the next in-flight message's visibility ends."""
    def counts_by_priority(self) -> list[int]:
        """Visible messages per priority, URGENT first."""
    def oldest_enqueued_at(self) -> float | None:
        """Clock reading at which the oldest visible message was enqueued."""
    def now(self) -> float:
        """The current reading of this store's clock in seconds."""
    @property
    def clock(self) -> Any:
        """The clock given at construction (None for the wall clock)."""
    @property
    def max_receive_count(self) -> int | None: ...
    @property
    def message_retention(self) -> float: ...
    @property
    def dead_letter(self) -> StoreCore | None: ...
    def _check_invariants(self) -> None:
        """Checks the structural invariants by a full scan; raises AssertionError."""
