"""A small plain-Python `QueueStorageAdapter` with the contract's SQS semantics, for the prefetch
tests: a dict of records plus a heap of visibility deadlines, a caller-supplied clock, and a log of
every call so tests can see what the dispatcher asked of its store."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InvalidRequestError,
    LLMRequest,
    MessageAttributes,
    QueueAttributes,
    QueueMessage,
    QueueStorageAdapter,
    ReceiptHandleError,
)

T = TypeVar("T")


@dataclass
class _Record(Generic[T]):
    request: LLMRequest[T]
    seq: int
    enqueued_at: float
    receive_count: int = 0
    first_received_at: float | None = None
    handle: str = ""
    visible_at: float = float("-inf")  # visible when visible_at <= now


class PlainAdapter(QueueStorageAdapter[T]):
    """Dict + heap; not thread-safe, one event loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.records: dict[str, _Record[T]] = {}
        self.by_handle: dict[str, str] = {}
        self.deadlines: list[tuple[float, int, str]] = []  # (visible_at, seq, id), lazily cleaned
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._handles = itertools.count(1)

    # -- helpers ---------------------------------------------------------------------------
    def _stamp(self, seconds: float | None) -> datetime | None:
        return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)

    def _message(self, record: _Record[T]) -> QueueMessage[T]:
        attributes = MessageAttributes(
            message_id=record.request.id,
            receipt_handle=record.handle,
            enqueued_at=self._stamp(record.enqueued_at),  # type: ignore[arg-type]
            receive_count=record.receive_count,
            first_received_at=self._stamp(record.first_received_at),
        )
        return QueueMessage(id=record.request.id, payload=record.request, attributes=attributes)

    def _visible(self, now: float) -> list[_Record[T]]:
        # The heap only says when something may have become visible; the record is the truth.
        while self.deadlines and self.deadlines[0][0] <= now:
            heapq.heappop(self.deadlines)
        return [r for r in self.records.values() if r.visible_at <= now]

    @staticmethod
    def _check_timeout(visibility_timeout: float) -> None:
        if (
            isinstance(visibility_timeout, bool)
            or not isinstance(visibility_timeout, (int, float))
            or not 0 <= visibility_timeout <= 43_200
        ):
            raise InvalidRequestError(f"visibility_timeout must be in [0, 43200], got {visibility_timeout!r}")

    def _record_of(self, receipt_handle: str) -> _Record[T]:
        message_id = self.by_handle.get(receipt_handle)
        record = self.records.get(message_id) if message_id is not None else None
        if record is None or record.handle != receipt_handle:
            raise ReceiptHandleError(f"stale or unknown receipt handle {receipt_handle!r}")
        return record

    def current_handle(self, message_id: str) -> str | None:
        record = self.records.get(message_id)
        return None if record is None else record.handle

    def is_visible(self, message_id: str) -> bool:
        record = self.records.get(message_id)
        return record is not None and record.visible_at <= self.clock()

    # -- the adapter -----------------------------------------------------------------------
    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        self.calls.append(("enqueue", (request.id,)))
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"request must be an LLMRequest, got {request!r}")
        request.validate()
        if request.id in self.records:
            raise DuplicateRequestError(f"id {request.id!r} is already queued")
        record = _Record(request=request, seq=next(self._seq), enqueued_at=self.clock())
        self.records[request.id] = record
        return self._message(record)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        self.calls.append(("dequeue", (limit, visibility_timeout)))
        self._check_timeout(visibility_timeout)
        now = self.clock()
        visible = sorted(self._visible(now), key=lambda r: (int(r.request.priority), r.enqueued_at, r.seq))
        out = []
        for record in visible[:limit]:
            if record.handle:
                del self.by_handle[record.handle]
            record.handle = f"h{next(self._handles)}"
            self.by_handle[record.handle] = record.request.id
            record.receive_count += 1
            if record.first_received_at is None:
                record.first_received_at = now
            record.visible_at = now + visibility_timeout
            heapq.heappush(self.deadlines, (record.visible_at, record.seq, record.request.id))
            out.append(self._message(record))
        return out

    async def delete_message(self, receipt_handle: str) -> None:
        self.calls.append(("delete_message", (receipt_handle,)))
        record = self._record_of(receipt_handle)
        del self.by_handle[receipt_handle]
        del self.records[record.request.id]

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        self.calls.append(("update_visibility_timeout", (receipt_handle, visibility_timeout)))
        self._check_timeout(visibility_timeout)
        record = self._record_of(receipt_handle)
        record.visible_at = self.clock() + visibility_timeout
        heapq.heappush(self.deadlines, (record.visible_at, record.seq, record.request.id))

    async def get_approximate_message_count(self) -> int:
        return len(self._visible(self.clock()))

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[T]]:
        visible = [r for r in self._visible(self.clock()) if int(r.request.priority) == priority]
        visible.sort(key=lambda r: (r.enqueued_at, r.seq))
        return [self._message(r) for r in visible[:limit]]

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        ids = [r.id for r in requests]
        for r in requests:
            r.validate()
        if len(set(ids)) != len(ids) or any(i in self.records for i in ids):
            raise DuplicateRequestError("duplicate id in batch")
        return [await self.enqueue(r) for r in requests]

    async def get_queue_attributes(self) -> QueueAttributes:
        now = self.clock()
        visible = len(self._visible(now))
        return QueueAttributes(
            approximate_number_of_messages=visible,
            approximate_number_of_messages_in_flight=len(self.records) - visible,
            approximate_number_of_messages_delayed=0,
            created_timestamp=None,
            last_modified_timestamp=None,
            visibility_timeout=None,
            message_retention_period=None,
            dead_lettered=0,
        )

    async def purge(self) -> None:
        self.records.clear()
        self.by_handle.clear()
        self.deadlines.clear()

    def calls_named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]
