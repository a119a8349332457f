"""The storage adapter ABC: what a queue backend must provide to the dispatcher.

Semantics every adapter honours (SQS-like, at-least-once delivery):

* ``enqueue`` stores a validated `LLMRequest` and returns its `QueueMessage`, whose ``id`` (equal to
  ``attributes.message_id``) the store assigns. A request whose ``id`` equals the id of a message
  not yet deleted (visible or in flight) is refused with `DuplicateRequestError`; a deleted or
  dead-lettered message's id may be reused.
* ``dequeue(limit, visibility_timeout)`` receives up to ``limit`` *visible* messages in order of
  priority (0 = URGENT first), then oldest ``enqueued_at``, then enqueue order. Each received
  message becomes invisible ("in flight") for ``visibility_timeout`` seconds, its
  ``receive_count`` grows by one, ``first_received_at`` is set on its first receive, and it gets a
  fresh ``receipt_handle``. When the visibility runs out without a delete, the message becomes
  visible again, unchanged but for those attributes: a consumer that crashes loses nothing.
* A receipt handle is valid from its receive until the message is received again, deleted,
  dead-lettered or purged. A handle whose visibility ran out still deletes (and still changes
  visibility) until someone else receives the message, as in SQS. ``delete_message`` and
  ``update_visibility_timeout`` with a stale or unknown handle raise `ReceiptHandleError` and
  change nothing. A visibility change counts from now; 0 makes the message visible at once.
* ``visibility_timeout`` must lie within [0, 43200] seconds, else `InvalidRequestError` (nothing
  changes).
* With ``max_receive_count`` configured, a message received that many times and not deleted is,
  when its visibility runs out, moved to the dead-letter store (or dropped, and counted, without
  one) instead of becoming visible.
* Messages older than the retention period are dropped (counted).
* Bad input raises at the call that received it, with a typed error naming the field and the bad
  value, and changes nothing. A backend failure raises `StorageError`; the message is not lost.

Writing an adapter (Redis, SQS, Postgres, ...): subclass `QueueStorageAdapter`, implement the six
abstract coroutines, and override the four defaults where the backend can do better (a batch
enqueue in one transaction, a server-side purge, real attribute counts). Run the conformance suite
(``tests/conformance``) against it by adding a factory to its ``conftest.py``. Receive, delete and
visibility changes must each be atomic in the backend (a Lua script, a conditional update, a
``SELECT ... FOR UPDATE SKIP LOCKED``), since many workers may share one queue.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from .. import _core
from .._checks import real_number, shown
from ..errors import DuplicateRequestError, InvalidRequestError, ReceiptHandleError
from ..types import LLMRequest, QueueMessage

__all__ = ["MAX_VISIBILITY_TIMEOUT", "QueueAttributes", "QueueStorageAdapter"]

T = TypeVar("T")

#: The longest visibility timeout in seconds (12 hours, as in SQS), defined in the Rust core.
MAX_VISIBILITY_TIMEOUT: float = _core.MAX_VISIBILITY_TIMEOUT

_PURGE_BATCH = 100

# Seconds the default dead-letter move holds a message invisible while it copies it to the target:
# longer than a backend call takes, short enough that a process dying mid-move leaves the message
# to be received again soon.
_DEAD_LETTER_HOLD = 60.0

_LOGGER = logging.getLogger("llm_queue_dispatcher")


@dataclass(frozen=True)
class QueueAttributes:
    """A snapshot of a queue's counters, named after SQS's queue attributes.

    ``visibility_timeout`` is the timeout of the latest ``dequeue`` (None before the first, or when
    the backend does not know it); ``message_retention_period`` is in seconds (None if unknown);
    ``dead_lettered`` counts messages moved to a dead-letter store or dropped by the
    ``max_receive_count`` rule; ``expired`` counts messages dropped by retention.
    """

    approximate_number_of_messages: int
    approximate_number_of_messages_in_flight: int
    approximate_number_of_messages_delayed: int
    created_timestamp: datetime | None
    last_modified_timestamp: datetime | None
    visibility_timeout: float | None
    message_retention_period: float | None
    dead_lettered: int
    expired: int = 0


def check_visibility_timeout(visibility_timeout: float) -> float:
    """Returns ``visibility_timeout`` (an int, a float or an integer-like, not a bool) as a
    float, or raises `InvalidRequestError`."""
    seconds = real_number(visibility_timeout)
    if seconds is None or not 0.0 <= seconds <= MAX_VISIBILITY_TIMEOUT:
        raise InvalidRequestError(
            f"visibility_timeout must be within [0, 43200] seconds, got {shown(visibility_timeout)}"
        )
    return seconds


def _as_list(items: object, name: str) -> list[Any]:
    """``items`` as a list, read once (a generator is consumed here, not twice); a str or
    anything not iterable is an `InvalidRequestError`."""
    if isinstance(items, (str, bytes)):
        raise InvalidRequestError(f"{name} must be a sequence, got {items!r}")
    try:
        iterator = iter(items)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidRequestError(f"{name} must be a sequence, got {items!r}") from None
    return list(iterator)


def check_batch(requests: Sequence[LLMRequest[T]]) -> list[LLMRequest[T]]:
    """Validates every request of a batch and refuses ids repeated within it; returns the batch
    as a list (so an iterator is read once).

    Raises `InvalidRequestError` (not a sequence, a malformed request) or `DuplicateRequestError`
    before anything is stored, as the batch contract requires. Adapters can call it from their
    own ``batch_enqueue``.
    """
    batch: list[LLMRequest[T]] = _as_list(requests, "requests")
    seen: set[str] = set()
    for request in batch:
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"request must be an LLMRequest, got {request!r}")
        request.validate()
        if request.id in seen:
            raise DuplicateRequestError(f"id {request.id!r} appears more than once in the batch")
        seen.add(request.id)
    return batch


def _raise_stale(failed: list[str], count: int) -> None:
    """`ReceiptHandleError` naming the stale or unknown handles of a batch call, if any."""
    if failed:
        raise ReceiptHandleError(
            f"{len(failed)} of {count} receipt handles are unknown or no longer current: {failed!r}"
        )


class QueueStorageAdapter(ABC, Generic[T]):
    """A queue backend with SQS-like, at-least-once semantics (see the module docstring).

    Six coroutines are abstract; ``batch_enqueue``, ``batch_delete``, ``release_message``,
    ``batch_release``, ``dead_letter_message``, ``get_queue_attributes`` and ``purge`` have
    working defaults built on them, which a backend may replace with faster or
    atomic versions. Instances are used from one event loop; a backend shared between processes
    makes each step atomic on its side.
    """

    @abstractmethod
    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        """Validates ``request`` again (its fields may have changed since construction) and stores
        it as a visible message.

        Returns the `QueueMessage` with a storage-assigned ``id``, ``receive_count`` 0,
        ``first_received_at`` None and an empty ``receipt_handle`` (it has not been received).
        Raises `InvalidRequestError` for a malformed request and `DuplicateRequestError` when a
        message with the same ``request.id`` is stored and not yet deleted; nothing is stored then.
        """

    @abstractmethod
    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        """Receives up to ``limit`` visible messages, priority first, then oldest.

        Each returned message is invisible for ``visibility_timeout`` seconds (within
        [0, 43200], else `InvalidRequestError`), has ``receive_count`` one higher, a
        ``first_received_at`` set on its first receive, and a fresh ``receipt_handle`` that
        replaces any earlier one. Returns ``[]`` when nothing is visible; ``limit`` 0 receives
        nothing. Must not wait for messages to arrive.
        """

    @abstractmethod
    async def delete_message(self, receipt_handle: str) -> None:
        """Deletes the message ``receipt_handle`` names, acknowledging it for good.

        Works while the handle is current, even after its visibility ran out, until the message
        is received again. A stale or unknown handle raises `ReceiptHandleError`, nothing changes.
        """

    @abstractmethod
    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        """Makes the message invisible for ``visibility_timeout`` seconds counted from now.

        0 makes it visible at once (a retry without waiting); the receive count is kept. Raises
        `InvalidRequestError` for a timeout outside [0, 43200] and `ReceiptHandleError` for a
        stale or unknown handle; nothing changes then.
        """

    @abstractmethod
    async def get_approximate_message_count(self) -> int:
        """The number of visible messages (in-flight ones excluded)."""

    @abstractmethod
    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[T]]:
        """Up to ``limit`` visible messages of ``priority`` (0..3), oldest first, without receiving
        them: nothing changes, and their ``receipt_handle`` is "" (a peek grants no handle)."""

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        """Enqueues ``requests`` in order and returns their messages.

        The default validates every request and refuses ids repeated within the batch before
        storing anything, then calls ``enqueue`` one by one. It cannot check the backend for ids
        already stored in advance, so a `DuplicateRequestError` found there leaves the earlier
        requests enqueued; backends that can should override this to be all-or-nothing (the
        in-memory store does).
        """
        batch = check_batch(requests)
        return [await self.enqueue(request) for request in batch]

    async def batch_delete(self, receipt_handles: Sequence[str]) -> None:
        """Deletes the messages of every current handle, then raises `ReceiptHandleError` naming
        the stale or unknown ones (as SQS's DeleteMessageBatch reports per-entry failures)."""
        handles: list[str] = _as_list(receipt_handles, "receipt_handles")
        failed: list[str] = []
        for handle in handles:
            try:
                await self.delete_message(handle)
            except ReceiptHandleError:
                failed.append(handle)
        _raise_stale(failed, len(handles))

    async def release_message(self, receipt_handle: str) -> None:
        """Gives a received message back unprocessed, as if that receive had not happened: it
        is visible at once, its ``receive_count`` is back to its value before that receive, its
        ``first_received_at`` back to None when that receive was the first, and the handle
        becomes stale. A dispatcher or a `Worker` that stops gives back what no handler saw this
        way, so a stop never uses up a receive toward ``max_receive_count``.

        A stale or unknown handle raises `ReceiptHandleError` and changes nothing.

        The default cannot undo a receive: it makes the message visible at once with
        ``update_visibility_timeout(receipt_handle, 0)``, its receive still counted (and the
        handle current until the next receive, as after any visibility change). Adapters whose
        backend can restore the count override it, as the in-memory store does.
        """
        await self.update_visibility_timeout(receipt_handle, 0.0)

    async def batch_release(self, receipt_handles: Sequence[str]) -> None:
        """Releases the messages of every current handle (`release_message`), then raises
        `ReceiptHandleError` naming the stale or unknown ones, as `batch_delete` does."""
        handles: list[str] = _as_list(receipt_handles, "receipt_handles")
        failed: list[str] = []
        for handle in handles:
            try:
                await self.release_message(handle)
            except ReceiptHandleError:
                failed.append(handle)
        _raise_stale(failed, len(handles))

    async def dead_letter_message(self, message: QueueMessage[T]) -> None:
        """Moves a received message to the dead-letter target now, without waiting for its
        receives to run out (a handler raised `PermanentError`).

        ``message.attributes.receipt_handle`` must be current (else `ReceiptHandleError`, and
        nothing changes). The message counts in ``QueueAttributes.dead_lettered``; without a
        dead-letter target it is dropped and counted, as the ``max_receive_count`` rule does.

        The default, for an adapter whose backend cannot move a message atomically, takes three
        steps in an order that loses nothing and copies nothing twice:

        1. it holds the message with ``update_visibility_timeout(receipt_handle, 60)``: a stale
           handle raises `ReceiptHandleError` here, before anything is copied, and while the copy
           is made no other consumer can receive the message (so its handle stays current);
        2. it enqueues the request into ``self.dead_letter`` when the adapter has such an
           attribute holding another `QueueStorageAdapter` (a failure there, such as
           `DuplicateRequestError` or `StorageError`, propagates and leaves the message here,
           held, so nothing is lost);
        3. it deletes the message here. Should that fail after the copy was made (a `StorageError`),
           the adapter remembers the copy, and dead-lettering the same message again (it keeps
           its ``id`` across receives) only deletes it: a retry moves one copy, never two.

        Without a dead-letter target the message is deleted, and logged as dropped. Adapters
        override it to do the move in one atomic step, to keep a copy whose id the target
        already holds, and to count it in ``dead_lettered``.
        """
        if not isinstance(message, QueueMessage):
            raise InvalidRequestError(f"message must be a QueueMessage, got {shown(message)}")
        handle = message.attributes.receipt_handle
        target = getattr(self, "dead_letter", None)
        if not isinstance(target, QueueStorageAdapter):
            await self.delete_message(handle)
            _LOGGER.error(
                "request %r dead-lettered with no dead-letter store configured: dropped",
                message.payload.id,
            )
            return
        await self.update_visibility_timeout(handle, _DEAD_LETTER_HOLD)
        copied = self._dead_letter_copies()
        if message.id not in copied:
            await target.enqueue(message.payload)
            copied.add(message.id)
        await self.delete_message(handle)
        copied.discard(message.id)

    def _dead_letter_copies(self) -> set[str]:
        """The store ids of the messages the default `dead_letter_message` copied to the target
        and has not deleted here yet (kept on the instance; an adapter with ``__slots__`` and no
        ``__dict__`` gets no memory of them)."""
        try:
            copies: set[str] = self.__dict__.setdefault("_dead_letter_copied", set())
        except AttributeError:
            return set()
        return copies

    async def get_queue_attributes(self) -> QueueAttributes:
        """Queue counters. The default knows only the visible count; backends should override."""
        return QueueAttributes(
            approximate_number_of_messages=await self.get_approximate_message_count(),
            approximate_number_of_messages_in_flight=0,
            approximate_number_of_messages_delayed=0,
            created_timestamp=None,
            last_modified_timestamp=None,
            visibility_timeout=None,
            message_retention_period=None,
            dead_lettered=0,
        )

    async def purge(self) -> None:
        """Removes the messages. The default receives and deletes every visible message (each
        receive counts); in-flight ones stay until their visibility ends, so backends should
        override it with a real purge that also invalidates every receipt handle."""
        while batch := await self.dequeue(_PURGE_BATCH, MAX_VISIBILITY_TIMEOUT):
            for message in batch:
                await self.delete_message(message.attributes.receipt_handle)
