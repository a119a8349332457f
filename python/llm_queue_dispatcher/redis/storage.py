"""`RedisStorage`: one SQS-like queue shared by every process and host that names it.

Each operation is one Lua script (``lua/common.lua`` + ``lua/queue_common.lua`` + the operation's
file), atomic on the server. Every instant is taken from the server's ``TIME``: visibility expiry,
dead-lettering and retention are applied by whichever script runs next (no background task, no
lost update between processes), at most 1,000 messages per script (``MAINTAIN_BATCH``: the rest
in the next ones, a message past the retention period skipped by every reader meanwhile), and no
host's clock decides any of them.

Instants handed back (``enqueued_at``, ``first_received_at``, the queue's timestamps) are the
server's, translated to this host's clock by how far it is from the server's (learned from the
replies, see `ClockOffset`): so ``now - enqueued_at`` on this host, which is how a dispatcher
computes a message's age, its wait and the wait factor of its score, is the age on the server's
clock, whatever this host's clock says. On hosts whose clock agrees with the server's (NTP) the
instants are the server's own.

A call that changes a message runs with a reply key of its own (see ``lua/common.lua``): if the
connection breaks after the script ran and the call is resent (redis-py does so by itself), the
resend answers as the first run did: a delete that landed is not reported stale, a receive hands
back the messages it leased, a release is not refused.

Keys (``ns`` = namespace, ``q`` = queue), all under the hash tag ``{ns}``::

    {ns}:q:{q}:meta       hash: created, modified, visibility_timeout, dead, expired, indexed
                          (every message is in the ranking index), waiting, arrival
    {ns}:q:{q}:seq        counter: the next message's sequence number
    {ns}:q:{q}:ids        hash: request id -> member (messages not yet deleted)
    {ns}:q:{q}:body       hash: member -> the serialised request (see _codec)
    {ns}:q:{q}:state      hash: member -> msgpack of priority, enqueued_at, receive count,
                          first_received_at, current receipt token, message id, request id,
                          then tenant, estimate, deadline, input and output tokens (the index's)
    {ns}:q:{q}:vis:0..3   zsets per priority, score enqueued_at (us): the visible messages
    {ns}:q:{q}:inflight   zset, score visibility deadline (us): the messages in flight
    {ns}:q:{q}:copies     hash: request id -> live copies beyond the first (a dead-letter queue
                          keeps every copy it is sent, as InMemoryStorage does)
    {ns}:q:{q}:reply:<t>  a resendable call's reply, for a minute (t: the call's random token)
    {ns}:q:{q}:lanes ...  the ranking index of the global choice (lua/queue_common.lua)

A member is the sequence number zero-padded to 15 digits; a receipt handle is
``<member>.<receive count>.<128-bit token>``. The token is replaced on every receive, so the
handle of a consumer whose lease ran out and whose message someone else received is refused.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn, TypeVar

import redis.asyncio

from .._checks import finite_float, integer, shown
from ..errors import (
    DuplicateRequestError,
    InvalidConfigError,
    InvalidRequestError,
    ReceiptHandleError,
    StorageError,
)
from ..storage.base import (
    QueueAttributes,
    QueueStorageAdapter,
    _as_list,
    check_batch,
    check_visibility_timeout,
)
from ..types import LLMRequest, MessageAttributes, Priority, QueueMessage
from ._codec import Serializer, decode_request, encode_request, request_id_bytes
from ._connection import (
    CLIENT_ERRORS,
    ClockOffset,
    Connection,
    ScriptClient,
    check_name,
    host_microseconds,
    script,
)

__all__ = ["RedisStorage"]

T = TypeVar("T")

_LOGGER = logging.getLogger("llm_queue_dispatcher")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HANDLE = re.compile(r"(\d{15})\.\d{1,10}\.([0-9a-f]{32})")
_KEY_PARTS = (
    "meta",
    "seq",
    "ids",
    "body",
    "state",
    "vis:0",
    "vis:1",
    "vis:2",
    "vis:3",
    "inflight",
    "copies",
    # The ranking index of the global choice (lua/queue_common.lua, redis/global_choice.py).
    "lanes",
    "tenants",
    "aging:2",
    "aging:3",
    "urgent",
    "usage",
    "charges",
    "charge",
    "recent-urgent",
    "recent",
)
# Deadlines are kept to 16 digits of microseconds (the index's sort key): up to the year 2286.
_DEADLINE_MAX_US = 9_999_999_999_999_998


def _index_fields(request: LLMRequest[Any]) -> tuple[bytes, int, int, int, int, str]:
    """What the ranking indexes keep beside a message's body: tenant, estimated tokens, deadline
    (us, -1: none), input and output tokens (-1 each: not given; the limiter's ITPM and OTPM
    reserve these parts), expected processing time in seconds (-1: not given; the score
    policy's processing-time factor)."""
    tenant = (request.tenant or "").encode("utf-8", "surrogatepass")
    deadline = request.deadline
    deadline_us = (
        -1 if deadline is None else max(0, min(_DEADLINE_MAX_US, round(deadline.timestamp() * 1_000_000)))
    )
    info = request.token_info
    return (
        tenant,
        int(info.estimated),
        deadline_us,
        -1 if info.input is None else int(info.input),
        -1 if info.max_output is None else int(info.max_output),
        "-1" if request.expected_processing_time is None else repr(float(request.expected_processing_time)),
    )


# A request as the enqueue script takes it: id, priority, body, tenant, estimate, deadline (us),
# input and output tokens, expected processing time.
_Encoded = tuple[bytes, int, bytes, bytes, int, int, int, int, str]
# Retention beyond this many microseconds (about 285 years) is forever.
_FOREVER_US = 2**53


# An instance without its __init__ (`RedisStorage._message`).
_new = object.__new__
_set = object.__setattr__  # past the frozen dataclasses' own __setattr__


def _utc(microseconds: int) -> datetime:
    return _EPOCH + timedelta(microseconds=microseconds)


def _stale(handles: Sequence[str], total: int) -> ReceiptHandleError:
    return ReceiptHandleError(
        f"{len(handles)} of {total} receipt handles are unknown or no longer current: {list(handles)!r}"
    )


def _microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _queue_keys(namespace: str, queue: str) -> list[bytes]:
    # Encoded once: every call sends them, and redis-py passes bytes through untouched.
    prefix = f"{{{namespace}}}:q:{queue}:"
    return [(prefix + part).encode() for part in _KEY_PARTS]


# Lua numbers are doubles: a count past 2**53 would not arrive intact. No queue holds more.
_MAX_COUNT = 2**31


def _count(value: object, name: str) -> int:
    count = integer(value)  # an int or an integer-like (numpy's), not a bool
    if count is None or count < 0:
        raise InvalidRequestError(f"{name} must be an int >= 0, got {shown(value)}")
    return min(count, _MAX_COUNT)


class RedisStorage(ScriptClient, QueueStorageAdapter[T]):
    """A queue in Redis with the semantics of the storage contract, shared by many processes.

    Args:
        redis: a `redis.asyncio.Redis` client (used as given; you close it), or a URL such as
            ``"redis://:password@host:6379/0"`` (a client with a 5 s command timeout and a 2 s
            connect timeout is built, owned and closed by `aclose`).
        queue: the queue's name, ``[A-Za-z0-9_.-]{1,80}``.
        namespace: the key prefix and hash tag shared with the dead-letter queue and limiters.
        max_receive_count: after this many receives without a delete, a message whose
            visibility runs out is dead-lettered. None: never.
        dead_letter: the name of another queue of the same namespace that receives
            dead-lettered messages (with their original enqueue time); None drops and counts them.
        message_retention: seconds after enqueue after which a message is dropped (counted); inf,
            or anything past 2**53 microseconds (about 285 years), keeps messages forever.
        max_payload_bytes: the most bytes one serialised request may take.
        serializer: ``(dumps, loads)`` for payloads that are not JSON: ``dumps(payload)`` returns
            bytes. None: JSON (the payload must read back equal). Never pickle.

    Every process using one queue should pass the same settings: each call applies the settings
    of the process that makes it. A payload read back is equal to the one enqueued, not the same
    object. Redis unreachable or too slow: `StorageError` within the client's timeout.

    Example::

        storage = RedisStorage("redis://localhost:6379/0", "chat", max_receive_count=5,
                               dead_letter="chat-dead")
        await storage.enqueue(LLMRequest(id="r1", payload={"messages": [...]}))
        [message] = await storage.dequeue(1, visibility_timeout=30.0)
        await storage.delete_message(message.attributes.receipt_handle)
        await storage.aclose()
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis | str,
        queue: str,
        *,
        namespace: str = "lqd",
        max_receive_count: int | None = None,
        dead_letter: str | None = None,
        message_retention: float = 345_600.0,
        max_payload_bytes: int = 1_048_576,
        serializer: Serializer | None = None,
    ) -> None:
        self.queue = check_name(queue, "queue")
        self.namespace = check_name(namespace, "namespace")
        if max_receive_count is not None:
            receives = integer(max_receive_count)  # an int or an integer-like, not a bool
            if receives is None or receives < 1:
                raise InvalidConfigError(
                    f"max_receive_count must be None or an int >= 1, got {shown(max_receive_count)}"
                )
            max_receive_count = receives
        if dead_letter is not None:
            check_name(dead_letter, "dead_letter")
            if dead_letter == queue:
                raise InvalidConfigError(f"dead_letter must name another queue than {queue!r}")
        # Any number > 0 (inf: forever), as InMemoryStorage takes it; an int too large for a
        # float is refused (there too), never read as an OverflowError.
        retention = finite_float(message_retention)
        if retention is None and isinstance(message_retention, float) and message_retention == math.inf:
            retention = math.inf
        if retention is None or not retention > 0:
            raise InvalidConfigError(
                "message_retention must be a number of seconds > 0 (inf: forever), "
                f"got {shown(message_retention)}"
            )
        payload_bytes = integer(max_payload_bytes)  # an int or an integer-like, not a bool
        if payload_bytes is None or payload_bytes < 1:
            raise InvalidConfigError(f"max_payload_bytes must be an int >= 1, got {shown(max_payload_bytes)}")
        max_payload_bytes = payload_bytes
        if serializer is not None and not (
            isinstance(serializer, tuple) and len(serializer) == 2 and all(callable(f) for f in serializer)
        ):
            raise InvalidConfigError(f"serializer must be None or a (dumps, loads) pair, got {serializer!r}")
        self.max_receive_count = max_receive_count
        self.dead_letter = dead_letter
        self.message_retention = retention
        self.max_payload_bytes = max_payload_bytes
        self.serializer = serializer
        self._connection = Connection(redis)
        self._clock_offset = ClockOffset()
        self._reply_prefix = f"{{{namespace}}}:q:{queue}:reply:"
        self._keys = _queue_keys(namespace, queue)
        if dead_letter is not None:
            self._keys += _queue_keys(namespace, dead_letter)
        # Compared before rounding: 1e308 s in microseconds is inf, which round() refuses.
        retention_us = self.message_retention * 1_000_000
        self._settings = (
            str(max_receive_count or 0).encode(),
            str(0 if retention_us > _FOREVER_US else round(retention_us)).encode(),
        )

    # ----- plumbing ------------------------------------------------------------------------------

    async def _run(self, name: str, *args: Any, resendable: bool = False, now_at: int | None = None) -> Any:
        """Runs operation ``name`` with a random token of its own (the seed of its receipt tokens
        and message ids). ``resendable``: the call changes a message, so the script keeps its
        reply under a key named after that token, and a resend of this very call is answered
        from it. ``now_at``: where the reply holds the server's instant, to learn this host's
        clock offset from."""
        token = secrets.token_hex(16)
        keys = self._keys
        if resendable:
            keys = [*keys, f"{self._reply_prefix}{token}".encode()]
        arguments = (self._time_argument(), token, *self._settings, *args)
        sent = host_microseconds(self._host_time())
        try:
            reply = await self._connection.run(script("queue_common", name), keys, arguments)
        except CLIENT_ERRORS as exc:
            self._fail(name, exc)
        if now_at is not None:
            self._clock_offset.observe(sent, host_microseconds(self._host_time()), int(reply[now_at]))
        return reply

    def _instant(self, server_us: int) -> datetime:
        """A server instant on this host's clock (see the module docstring)."""
        return _utc(int(server_us) + self._clock_offset.microseconds)

    def _fail(self, operation: str, exc: BaseException) -> NoReturn:
        message = f"Redis {operation} on queue {self.queue!r} failed: {self._connection.describe_error(exc)}"
        _LOGGER.warning("%s", message)
        if self._connection.scrub(str(exc)) != str(exc):
            raise StorageError(message) from None
        raise StorageError(message) from exc

    def _handle(self, receipt_handle: object) -> tuple[str, str]:
        match = _HANDLE.fullmatch(receipt_handle) if isinstance(receipt_handle, str) else None
        if match is None:
            raise ReceiptHandleError(f"receipt handle {receipt_handle!r} is unknown or no longer current")
        return match.group(1), match.group(2)

    def _message(
        self,
        request: LLMRequest[T],
        message_id: bytes,
        receive_count: int,
        enqueued_us: int,
        first_us: int,
        handle: str,
    ) -> QueueMessage[T]:
        mid = message_id.decode()
        # Made as their frozen dataclasses' __init__ would (they check nothing), each field set
        # through its slot, without the __init__ call: one of each per message received.
        attributes: MessageAttributes = _new(MessageAttributes)
        _set(attributes, "message_id", mid)
        _set(attributes, "receipt_handle", handle)
        _set(attributes, "enqueued_at", self._instant(enqueued_us))
        _set(attributes, "receive_count", receive_count)
        _set(attributes, "first_received_at", None if first_us < 0 else self._instant(first_us))
        message: QueueMessage[T] = _new(QueueMessage)
        _set(message, "id", mid)
        _set(message, "payload", request)
        _set(message, "attributes", attributes)
        return message

    def _encode(self, request: LLMRequest[T]) -> _Encoded:
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"request must be an LLMRequest, got {request!r}")
        request.validate()
        rid = request_id_bytes(request.id)
        body = encode_request(request, self.serializer, self.max_payload_bytes)
        return rid, int(request.priority), body, *_index_fields(request)

    async def _enqueue(
        self, requests: Sequence[LLMRequest[T]], encoded: list[_Encoded]
    ) -> list[QueueMessage[T]]:
        args: list[Any] = []
        for encoded_request in encoded:
            args += encoded_request
        reply = await self._run("enqueue", *args, now_at=0)
        if reply[1] == b"dup":
            raise DuplicateRequestError(
                f"id {reply[2].decode()!r} is already in the queue and not yet deleted"
            )
        return [
            self._message(request, reply[2 + 2 * i], 0, int(reply[3 + 2 * i]), -1, "")
            for i, request in enumerate(requests)
        ]

    # ----- the adapter ---------------------------------------------------------------------------

    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        """Stores ``request`` (validated and serialised before any network call)."""
        encoded = self._encode(request)
        [message] = await self._enqueue([request], [encoded])
        return message

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        """All or nothing, in one script: a duplicate anywhere stores none of the batch."""
        check_batch(requests)
        encoded = [self._encode(request) for request in requests]
        if not encoded:
            return []
        return await self._enqueue(requests, encoded)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[T]]:
        limit = _count(limit, "limit")
        timeout = check_visibility_timeout(visibility_timeout)
        reply = await self._run(
            "dequeue", limit, _microseconds(timeout), repr(timeout), resendable=True, now_at=0
        )
        messages: list[QueueMessage[T]] = []
        unreadable: list[tuple[str, str, StorageError]] = []
        for i in range(1, len(reply), 7):
            member, mid, count, enqueued, first, token, body = reply[i : i + 7]
            handle = f"{member.decode()}.{count}.{token.decode()}"
            try:
                request = self._decode(body)
            except StorageError as unread:
                # One unreadable message must not strand the readable ones received with it.
                unreadable.append((member.decode(), token.decode(), unread))
                continue
            messages.append(self._message(request, mid, count, enqueued, first, handle))
        for member_id, token_id, problem in unreadable:
            await self._set_aside(member_id, token_id, problem)
        if unreadable and not messages:
            raise unreadable[0][2]
        return messages

    async def _set_aside(self, member: str, token: str, error: StorageError) -> None:
        """An unreadable message goes to the dead-letter queue as it is stored, to be read with
        the right serializer; without one it stays leased and comes back after its visibility
        timeout (``max_receive_count`` then dead-letters it), never dropped here."""
        try:
            moved = self.dead_letter is not None and await self._run(
                "dead_letter", member, token, resendable=True
            )
        except StorageError:
            moved = False  # the readable messages received with it are handed out all the same
        if moved:
            _LOGGER.error("%s; moved to dead-letter queue %r unread", error, self.dead_letter)
        else:
            _LOGGER.error("%s; it is received again after its visibility timeout", error)

    def _decode(self, body: bytes) -> LLMRequest[T]:
        try:
            return decode_request(body, self.serializer)
        except Exception as exc:
            raise StorageError(
                f"a message of queue {self.queue!r} cannot be read back ({type(exc).__name__}: {exc}); "
                "were its writers using another serializer?"
            ) from exc

    async def delete_message(self, receipt_handle: str) -> None:
        member, token = self._handle(receipt_handle)
        if not await self._run("delete", member, token, resendable=True):
            raise ReceiptHandleError(f"receipt handle {receipt_handle!r} is unknown or no longer current")

    async def batch_delete(self, receipt_handles: Sequence[str]) -> None:
        """Deletes every current handle in one script, then names the stale or unknown ones."""
        await self._batch("delete_batch", receipt_handles)

    async def _batch(self, operation: str, receipt_handles: Sequence[str]) -> None:
        """Runs ``operation`` on every current handle in one script, then raises
        `ReceiptHandleError` naming the stale or unknown ones (malformed ones are never sent)."""
        handles = _as_list(receipt_handles, "receipt_handles")
        failed: list[str] = []
        args: list[str] = []
        sent: list[str] = []
        for handle in handles:
            try:
                member, token = self._handle(handle)
            except ReceiptHandleError:
                failed.append(handle)
                continue
            args += (member, token)
            sent.append(handle)
        if sent:
            stale = await self._run(operation, *args, resendable=True)
            failed += [sent[int(index)] for index in stale]
        if failed:
            raise _stale(failed, len(handles))

    async def release_message(self, receipt_handle: str) -> None:
        """Gives a received message back unprocessed, as if that receive had not happened:
        visible at once, ``receive_count`` back to its value before it, ``first_received_at``
        back to None when it was the first; the handle becomes stale. It never dead-letters (a
        worker that stops does not use up a receive). A stale or unknown handle raises
        `ReceiptHandleError` and changes nothing."""
        member, token = self._handle(receipt_handle)
        stale = await self._run("release", member, token, resendable=True)
        if stale:
            raise ReceiptHandleError(f"receipt handle {receipt_handle!r} is unknown or no longer current")

    async def batch_release(self, receipt_handles: Sequence[str]) -> None:
        """`release_message` for every current handle, in one script; then raises
        `ReceiptHandleError` naming the stale or unknown ones (the others are released)."""
        await self._batch("release", receipt_handles)

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        timeout = check_visibility_timeout(visibility_timeout)
        member, token = self._handle(receipt_handle)
        if not await self._run("change_visibility", member, token, _microseconds(timeout), resendable=True):
            raise ReceiptHandleError(f"receipt handle {receipt_handle!r} is unknown or no longer current")

    async def dead_letter_message(self, message: QueueMessage[T]) -> None:
        """Moves a received message to the dead-letter queue now, atomically (one script): the
        stored request, with its original enqueue time; without a dead-letter queue it is dropped.
        Counted in ``dead_lettered``. A stale handle raises `ReceiptHandleError`, nothing changes."""
        if not isinstance(message, QueueMessage):
            raise InvalidRequestError(f"message must be a QueueMessage, got {message!r}")
        handle = message.attributes.receipt_handle
        member, token = self._handle(handle)
        if not await self._run("dead_letter", member, token, resendable=True):
            raise ReceiptHandleError(f"receipt handle {handle!r} is unknown or no longer current")
        if self.dead_letter is None:
            _LOGGER.error(
                "request %r dead-lettered from queue %r with no dead-letter queue configured: dropped",
                message.payload.id,
                self.queue,
            )

    async def get_approximate_message_count(self) -> int:
        return int(await self._run("count"))

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[T]]:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 3:
            raise InvalidRequestError(f"priority must be within 0..3, got {priority!r}")
        limit = _count(limit, "limit")
        reply = await self._run("peek", int(Priority(priority)), limit, now_at=0)
        return [
            self._message(self._decode(reply[i + 4]), reply[i], reply[i + 1], reply[i + 2], reply[i + 3], "")
            for i in range(1, len(reply), 5)
        ]

    async def get_queue_attributes(self) -> QueueAttributes:
        reply = await self._run("attributes", now_at=0)
        visible, in_flight, created, modified, timeout, dead, expired = reply[1:8]
        return QueueAttributes(
            approximate_number_of_messages=int(visible),
            approximate_number_of_messages_in_flight=int(in_flight),
            approximate_number_of_messages_delayed=0,
            created_timestamp=self._instant(int(created)),
            last_modified_timestamp=self._instant(int(modified)),
            visibility_timeout=float(timeout) if timeout else None,
            message_retention_period=self.message_retention,
            dead_lettered=int(dead),
            expired=int(expired),
        )

    async def purge(self) -> None:
        """Removes every message, visible and in flight; every receipt handle becomes stale."""
        await self._run("purge")

    def _global_choice(self, config: Any, core: Any, custom_scorers: bool) -> Any:
        """How `LLMQueueDispatcher` ranks this queue: one script over every process's messages
        (`GlobalChoice`) where its config allows, else None (its prefetch buffer)."""
        from .global_choice import GlobalChoice

        return GlobalChoice.for_dispatcher(self, config, core, custom_scorers)

    # ----- lifecycle -----------------------------------------------------------------------------

    def _outcome_relay(self, deliver: Any) -> Any:
        """How `LLMQueueDispatcher.submit` hears of outcomes over this queue: `RedisRelay`."""
        from .outcomes import RedisRelay

        return RedisRelay(self, deliver)

    async def __aenter__(self) -> RedisStorage[T]:
        return self

    def __repr__(self) -> str:
        return (
            f"RedisStorage(queue={self.queue!r}, namespace={self.namespace!r}, "
            f"redis={self._connection.description}, max_receive_count={self.max_receive_count!r}, "
            f"dead_letter={self.dead_letter!r}, message_retention={self.message_retention!r})"
        )
