"""A plain-Python storage adapter with the same semantics as `InMemoryStorage`: a dict and heaps.

It is the second implementation the conformance suite runs against (proving the suite tests the
contract, not one implementation), the baseline of the storage benchmarks, and an external-store
stand-in for the dispatcher's prefetch tests (`RecordingStorage`, the same adapter with a log of
calls). Import it as ``tests.reference.storage``.
"""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from llm_queue_dispatcher.errors import (
    DuplicateRequestError,
    InvalidConfigError,
    InvalidRequestError,
    ReceiptHandleError,
)
from llm_queue_dispatcher.storage.base import (
    QueueAttributes,
    QueueStorageAdapter,
    check_batch,
    check_visibility_timeout,
)
from llm_queue_dispatcher.types import LLMRequest, MessageAttributes, QueueMessage

__all__ = ["RecordingStorage", "ReferenceStorage"]

T = TypeVar("T")


@dataclass(eq=False)
class _Entry(Generic[T]):
    request: LLMRequest[T]
    message_id: str
    seq: int
    enqueued_at: float
    receive_count: int = 0
    first_received_at: float | None = None
    handle: str | None = None
    deadline: float | None = None  # None while visible
    version: int = 0  # bumped on every state change; heap items carry it (lazy deletion)


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be an int >= 0, got {value!r}")
    return value


class ReferenceStorage(QueueStorageAdapter[T]):
    """SQS-like in-memory queue in plain Python; same constructor as `InMemoryStorage`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        max_receive_count: int | None = None,
        dead_letter: ReferenceStorage[Any] | None = None,
        message_retention: float = 345_600.0,
    ) -> None:
        if max_receive_count is not None and (
            isinstance(max_receive_count, bool)
            or not isinstance(max_receive_count, int)
            or max_receive_count < 1
        ):
            raise InvalidConfigError(
                f"max_receive_count must be None or an int >= 1, got {max_receive_count!r}"
            )
        if (
            isinstance(message_retention, bool)
            or not isinstance(message_retention, (int, float))
            or math.isnan(message_retention)
            or message_retention <= 0
        ):
            raise InvalidConfigError(
                f"message_retention must be a number of seconds > 0, got {message_retention!r}"
            )
        if clock is not None and not callable(clock):
            raise InvalidConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self.max_receive_count = max_receive_count
        self.dead_letter = dead_letter
        self.message_retention = float(message_retention)
        # Keyed by enqueue sequence number, not request id: a dead-letter store keeps every copy
        # of a request it is sent, so one id may have several entries here.
        self._entries: dict[int, _Entry[T]] = {}
        self._id_counts: dict[str, int] = {}  # entries per request id (duplicate check)
        self._by_handle: dict[str, _Entry[T]] = {}
        self._visible: list[tuple[int, float, int, int]] = []  # priority, at, seq, version
        self._ages: list[tuple[float, int, int]] = []  # at, seq, version (visible only)
        self._in_flight: list[tuple[float, int, int]] = []  # deadline, seq, version
        self._visible_count = 0
        self._in_flight_count = 0
        self._seq = 0
        self._dead_lettered = 0
        self._expired = 0
        self._last_visibility_timeout: float | None = None
        self._created_at = self._clock()
        self._last_modified_at = self._created_at

    # ----- internals ----------------------------------------------------------------------

    def _live(self, seq: int, version: int) -> _Entry[T] | None:
        entry = self._entries.get(seq)
        if entry is None or entry.version != version:
            return None
        return entry

    def _holds(self, request_id: str) -> bool:
        return self._id_counts.get(request_id, 0) > 0

    def _make_visible(self, entry: _Entry[T]) -> None:
        entry.deadline = None
        entry.version += 1
        self._visible_count += 1
        heapq.heappush(
            self._visible, (int(entry.request.priority), entry.enqueued_at, entry.seq, entry.version)
        )
        heapq.heappush(self._ages, (entry.enqueued_at, entry.seq, entry.version))

    def _make_in_flight(self, entry: _Entry[T], deadline: float) -> None:
        entry.deadline = deadline
        entry.version += 1
        self._in_flight_count += 1
        heapq.heappush(self._in_flight, (deadline, entry.seq, entry.version))

    def _leave_state(self, entry: _Entry[T]) -> None:
        if entry.deadline is None:
            self._visible_count -= 1
        else:
            self._in_flight_count -= 1
        entry.version += 1  # every heap item of the old state is now stale

    def _remove(self, entry: _Entry[T]) -> None:
        del self._entries[entry.seq]
        rid = entry.request.id
        self._id_counts[rid] -= 1
        if not self._id_counts[rid]:
            del self._id_counts[rid]
        if entry.handle is not None:
            del self._by_handle[entry.handle]

    def _maintain(self, now: float) -> None:
        while self._in_flight and self._in_flight[0][0] <= now:
            _, seq, version = heapq.heappop(self._in_flight)
            entry = self._live(seq, version)
            if entry is None:
                continue
            self._leave_state(entry)
            self._last_modified_at = now
            if now - entry.enqueued_at > self.message_retention:
                self._expired += 1
                self._remove(entry)
            elif self.max_receive_count is not None and entry.receive_count >= self.max_receive_count:
                self._dead_lettered += 1
                self._remove(entry)
                if self.dead_letter is not None:
                    self.dead_letter._accept_dead_letter(entry.request)
            else:
                self._make_visible(entry)
        while self._ages:
            at, seq, version = self._ages[0]
            entry = self._live(seq, version)
            if entry is not None and now - at <= self.message_retention:
                break
            heapq.heappop(self._ages)
            if entry is not None:
                self._leave_state(entry)
                self._expired += 1
                self._remove(entry)
                self._last_modified_at = now

    def _accept_dead_letter(self, request: LLMRequest[T]) -> None:
        now = self._clock()
        self._maintain(now)
        # Unlike enqueue, an id already here is no obstacle: a dead-letter store keeps every
        # copy (dropping one would lose a request).
        self._insert(request, now)

    def _insert(self, request: LLMRequest[T], now: float) -> _Entry[T]:
        entry = _Entry(request, str(uuid.uuid4()), self._seq, now)
        self._seq += 1
        self._entries[entry.seq] = entry
        self._id_counts[request.id] = self._id_counts.get(request.id, 0) + 1
        self._make_visible(entry)
        self._last_modified_at = now
        return entry

    def _message(self, entry: _Entry[T], handle: str = "") -> QueueMessage[T]:
        first = entry.first_received_at
        return QueueMessage(
            id=entry.message_id,
            payload=entry.request,
            attributes=MessageAttributes(
                message_id=entry.message_id,
                receipt_handle=handle,
                enqueued_at=_utc(entry.enqueued_at),
                receive_count=entry.receive_count,
                first_received_at=None if first is None else _utc(first),
            ),
        )

    def _check_request(self, request: LLMRequest[T]) -> None:
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"request must be an LLMRequest, got {request!r}")
        request.validate()

    def _resolve(self, receipt_handle: object) -> _Entry[T]:
        entry = self._by_handle.get(receipt_handle) if isinstance(receipt_handle, str) else None
        if entry is None:
            raise ReceiptHandleError(f"receipt handle {receipt_handle!r} is unknown or no longer current")
        return entry

    # ----- the adapter --------------------------------------------------------------------

    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        self._check_request(request)
        now = self._clock()
        self._maintain(now)
        if self._holds(request.id):
            raise DuplicateRequestError(f"id {request.id!r} is already in the queue and not yet deleted")
        return self._message(self._insert(request, now))

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        batch = check_batch(requests)
        now = self._clock()
        self._maintain(now)
        for request in batch:
            if self._holds(request.id):
                raise DuplicateRequestError(f"id {request.id!r} is already in the queue and not yet deleted")
        return [self._message(self._insert(request, now)) for request in batch]

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        limit = _count(limit, "limit")
        timeout = check_visibility_timeout(visibility_timeout)
        now = self._clock()
        self._maintain(now)
        self._last_visibility_timeout = timeout
        out: list[QueueMessage[T]] = []
        while len(out) < limit and self._visible:
            _, _, seq, version = heapq.heappop(self._visible)
            entry = self._live(seq, version)
            if entry is None:
                continue
            self._leave_state(entry)
            entry.receive_count += 1
            if entry.first_received_at is None:
                entry.first_received_at = now
            if entry.handle is not None:
                del self._by_handle[entry.handle]
            entry.handle = uuid.uuid4().hex
            self._by_handle[entry.handle] = entry
            self._make_in_flight(entry, now + timeout)
            self._last_modified_at = now
            out.append(self._message(entry, entry.handle))
        return out

    async def delete_message(self, receipt_handle: str) -> None:
        now = self._clock()
        self._maintain(now)
        entry = self._resolve(receipt_handle)
        self._leave_state(entry)
        self._remove(entry)
        self._last_modified_at = now

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        timeout = check_visibility_timeout(visibility_timeout)
        now = self._clock()
        self._maintain(now)
        entry = self._resolve(receipt_handle)
        self._leave_state(entry)
        self._make_in_flight(entry, now + timeout)
        self._last_modified_at = now
        self._maintain(now)  # a zero timeout makes the message visible at once

    async def release_message(self, receipt_handle: str) -> None:
        """Gives the message back as if that receive had not happened: visible at once, its
        receive count one lower (its first receive forgotten at 0), the handle stale."""
        now = self._clock()
        self._maintain(now)
        entry = self._resolve(receipt_handle)
        self._leave_state(entry)
        del self._by_handle[receipt_handle]
        entry.handle = None
        entry.receive_count -= 1
        if entry.receive_count == 0:
            entry.first_received_at = None
        self._make_visible(entry)
        self._last_modified_at = now

    async def dead_letter_message(self, message: QueueMessage[T]) -> None:
        """Moves the message to ``dead_letter`` at once (or drops it without one), counted in
        ``dead_lettered``: one step, as `InMemoryStorage` does."""
        if not isinstance(message, QueueMessage):
            raise InvalidRequestError(f"message must be a QueueMessage, got {message!r}")
        now = self._clock()
        self._maintain(now)
        entry = self._resolve(message.attributes.receipt_handle)
        self._leave_state(entry)
        self._remove(entry)
        self._dead_lettered += 1
        self._last_modified_at = now
        if self.dead_letter is not None:
            self.dead_letter._accept_dead_letter(entry.request)

    async def get_approximate_message_count(self) -> int:
        self._maintain(self._clock())
        return self._visible_count

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[T]]:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 3:
            raise InvalidRequestError(f"priority must be within 0..3, got {priority!r}")
        limit = _count(limit, "limit")
        self._maintain(self._clock())
        entries = sorted(
            (e for e in self._entries.values() if e.deadline is None and int(e.request.priority) == priority),
            key=lambda e: (e.enqueued_at, e.seq),
        )
        return [self._message(e) for e in entries[:limit]]

    async def get_queue_attributes(self) -> QueueAttributes:
        self._maintain(self._clock())
        return QueueAttributes(
            approximate_number_of_messages=self._visible_count,
            approximate_number_of_messages_in_flight=self._in_flight_count,
            approximate_number_of_messages_delayed=0,
            created_timestamp=_utc(self._created_at),
            last_modified_timestamp=_utc(self._last_modified_at),
            visibility_timeout=self._last_visibility_timeout,
            message_retention_period=self.message_retention,
            dead_lettered=self._dead_lettered,
            expired=self._expired,
        )

    async def purge(self) -> None:
        now = self._clock()
        self._maintain(now)
        self._entries.clear()
        self._id_counts.clear()
        self._by_handle.clear()
        self._visible.clear()
        self._ages.clear()
        self._in_flight.clear()
        self._visible_count = self._in_flight_count = 0
        self._last_modified_at = now


class RecordingStorage(ReferenceStorage[T]):
    """`ReferenceStorage` on ``clock`` with a log of calls and two peeks for assertions: what a
    dispatcher asks of an external store (the prefetch tests)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    @property
    def records(self) -> dict[str, Any]:
        """Every stored message by request id (visible or in flight; the latest copy of an id)."""
        return {entry.request.id: entry for entry in self._entries.values()}

    def calls_named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]

    def current_handle(self, request_id: str) -> str | None:
        """The receipt handle of the latest receive of ``request_id``'s message, if stored."""
        entry = self.records.get(request_id)
        return None if entry is None else entry.handle

    def is_visible(self, request_id: str) -> bool:
        """Whether ``request_id``'s message is stored and visible now."""
        entry = self.records.get(request_id)
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

    async def release_message(self, receipt_handle: str) -> None:
        self.calls.append(("release_message", (receipt_handle,)))
        await super().release_message(receipt_handle)
