"""`RedisRelay`: the outcome of a submitted request reaches the process that submitted it,
whichever process handled it.

Keys (``ns`` = namespace, ``q`` = queue), under the queue's hash tag ``{ns}``::

    {ns}:q:{q}:waiting        hash: request id -> the inbox of the process waiting for it, or
                              "withdrawn"; its TTL (the queue's message retention) is renewed at
                              each submit
    {ns}:q:{q}:inbox:<token>  list: the outcomes for one process, each ``<len(id)>:<id><JSON>``;
                              a TTL of ``RESULT_TTL`` after each push

Whoever ends a request (a `Worker`'s mark, an expiry, a purge) runs one script that takes the
request's entry out of ``waiting`` and pushes the outcome to that inbox. The submitting process
waits on its inbox with one blocking ``BLPOP`` (one connection per process however many submits
wait), and stops listening when nobody waits. After delivery nothing is left: the entry is gone
and the inbox is empty (so Redis deletes it); an outcome nobody reads (its process died) expires
with its inbox.

Results travel as JSON: a handler's value must be JSON-serialisable when another process may
have submitted its request; one that is not reaches the submitter as `RequestFailedError` with an
`InvalidRequestError` saying so (the request itself was processed). Errors travel as their type
name, message and, for a provider's HTTP error, its status, headers and body: the submitter gets
the library's own error class back where the type is one of them, else a `RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import errors as _errors
from ..errors import DuplicateRequestError, RemoteError
from ..outcomes import Outcome
from ._connection import Script

if TYPE_CHECKING:
    from .storage import RedisStorage

__all__ = ["RESULT_TTL", "RedisRelay"]

_LOGGER = logging.getLogger("llm_queue_dispatcher")

#: Seconds an outcome waits in an inbox for its process to read it.
RESULT_TTL = 300
# How long one BLPOP blocks (below the 5 s command timeout of a client built from a URL).
_LISTEN_BLOCK = 1
_WITHDRAWN = "withdrawn"

_EXPECT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Only our own entry: another process may have taken the id since.
_FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""
_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) == 'withdrawn' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
return 1
"""
_REPORT = """
local inbox = redis.call('HGET', KEYS[1], ARGV[1])
if not inbox then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if inbox == 'withdrawn' then return 0 end
redis.call('RPUSH', inbox, string.len(ARGV[1]) .. ':' .. ARGV[1] .. ARGV[2])
redis.call('EXPIRE', inbox, ARGV[3])
return 1
"""
# The claims and reports made together (`_Batched`): the same, for each id of the call in turn.
_CLAIM_MANY = """
local out = {}
-- Bounded by the call's arguments (at most _MOST_PER_CALL ids).
for i = 1, #ARGV do
  out[i] = 1
  if redis.call('HGET', KEYS[1], ARGV[i]) == 'withdrawn' then
    redis.call('HDEL', KEYS[1], ARGV[i])
    out[i] = 0
  end
end
return out
"""
_REPORT_MANY = """
local out = {}
-- Bounded by the call's arguments (at most _MOST_PER_CALL id, body pairs).
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local inbox = redis.call('HGET', KEYS[1], id)
  local pushed = 0
  if inbox then
    redis.call('HDEL', KEYS[1], id)
    if inbox ~= 'withdrawn' then
      redis.call('RPUSH', inbox, string.len(id) .. ':' .. id .. ARGV[i + 1])
      redis.call('EXPIRE', inbox, ARGV[1])
      pushed = 1
    end
  end
  out[#out + 1] = pushed
end
return out
"""
_WITHDRAW = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], 'withdrawn') end
return 1
"""
_PURGED = """
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local id, inbox = entries[i], entries[i + 1]
  if inbox ~= 'withdrawn' then
    redis.call('RPUSH', inbox, string.len(id) .. ':' .. id .. ARGV[1])
    redis.call('EXPIRE', inbox, ARGV[2])
  end
end
redis.call('DEL', KEYS[1])
return #entries / 2
"""


class _RelayScript(Script):
    """One of the relay's scripts, run through the storage's connection (its auto-pipelining)."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


_SCRIPTS = {
    name: _RelayScript(name, source)
    for name, source in (
        ("expect", _EXPECT),
        ("forget", _FORGET),
        ("claim", _CLAIM),
        ("report", _REPORT),
        ("claim_many", _CLAIM_MANY),
        ("report_many", _REPORT_MANY),
        ("withdraw", _WITHDRAW),
        ("purged", _PURGED),
    )
}

# The library's errors rebuilt by name on the submitter's side (a message is all they take).
_REBUILT = {
    f"llm_queue_dispatcher.errors.{cls.__name__}": cls
    for cls in (
        _errors.PermanentError,
        _errors.RetryableError,
        _errors.ExpiredError,
        _errors.PurgedError,
        _errors.MessageStateError,
        _errors.InvalidRequestError,
        _errors.StorageError,
    )
}


def _http_error(error: BaseException) -> BaseException | None:
    """The provider's HTTP error behind ``error`` (itself or a cause): an SDK ``APIStatusError``."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(getattr(seen, "status_code", None), int) and hasattr(seen, "response"):
            return seen
        seen = seen.__cause__
    return None


def _json_or_text(value: object) -> object:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def encode_error(error: BaseException) -> dict[str, Any]:
    """An error as JSON: its type and message, and the HTTP response of a provider's error."""
    http = _http_error(error)
    source = http if http is not None else error
    kind = type(source)
    encoded: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(source)}
    if isinstance(source, _errors.RateLimitError):
        encoded["reason"] = str(source.reason)
        encoded["available_in"] = str(float(source.available_in))  # 'inf' where it never fits
    if http is not None:
        response = getattr(http, "response", None)
        headers = getattr(response, "headers", None)
        encoded["status_code"] = http.status_code  # type: ignore[attr-defined]
        encoded["headers"] = {str(k): str(v) for k, v in headers.items()} if headers is not None else {}
        encoded["body"] = _json_or_text(getattr(http, "body", None))
        encoded["message"] = str(getattr(http, "message", None) or source)
    return encoded


def decode_error(encoded: dict[str, Any]) -> BaseException:
    """An error back from its JSON (`encode_error`): the library's own class where it is one,
    else a `RemoteError` keeping its type name, message and HTTP response."""
    type_name = str(encoded.get("type", "Exception"))
    message = str(encoded.get("message", ""))
    status = encoded.get("status_code")
    if status is None and type_name == "llm_queue_dispatcher.errors.RateLimitError":
        try:
            available_in = float(encoded.get("available_in", "inf"))
        except (TypeError, ValueError):
            available_in = math.inf
        return _errors.RateLimitError(str(encoded.get("reason", "")), available_in, message)
    if status is None and type_name in _REBUILT:
        return _REBUILT[type_name](message)
    return RemoteError(
        type_name,
        message,
        status_code=status if isinstance(status, int) else None,
        headers=encoded.get("headers"),
        body=encoded.get("body"),
    )


def _model_json(value: object) -> Any:
    """An SDK's response object (a pydantic model) as its JSON; anything else cannot travel."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_outcome(request_id: str, outcome: Outcome) -> str:
    """An outcome as JSON; a value JSON cannot hold becomes a failure saying so."""
    if outcome.ok:
        value = outcome.value
        try:
            if value is None or type(value) is int:
                # What json.dumps writes for them (a Worker's handlers mostly return a token
                # count), without its encoder's setup at every report.
                return f'{{"ok": true, "value": {"null" if value is None else int.__repr__(value)}}}'
            return json.dumps({"ok": True, "value": value}, ensure_ascii=False, default=_model_json)
        except (TypeError, ValueError, RecursionError) as exc:
            error: BaseException = _errors.InvalidRequestError(
                f"the result of request {request_id!r} was processed but cannot travel to its "
                f"submitter as JSON: {exc}"
            )
    else:
        assert outcome.error is not None
        error = outcome.error
    return json.dumps({"ok": False, "error": encode_error(error)}, ensure_ascii=False)


def decode_item(item: bytes | str) -> tuple[str, Outcome]:
    """One inbox item, ``<len(id)>:<id><JSON>``, as (request id, outcome)."""
    text = item.decode("utf-8") if isinstance(item, bytes) else item
    length, _, rest = text.partition(":")
    # The length Lua counted is in bytes: cut the id by bytes.
    raw = rest.encode("utf-8")
    request_id, body = raw[: int(length)].decode("utf-8"), json.loads(raw[int(length) :])
    if body.get("ok"):
        return request_id, Outcome(True, body.get("value"))
    return request_id, Outcome(False, error=decode_error(body.get("error") or {}))


# The most claims or reports one call carries.
_MOST_PER_CALL = 256


class _Batched:
    """The calls of one relay operation made in the same turn of the event loop, or while its
    previous call was on its way, sent as one script call (``send``: the items in, one result
    per item out); each caller gets its own result, or its own `StorageError` when the call
    fails. A caller cancelled before the call is sent is left out of it."""

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._send = send
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((item, future))
        if self._sender is None:
            self._sender = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # the calls of this turn of the event loop join
            while self._waiting:
                waiting = [(item, future) for item, future in self._waiting if not future.done()]
                self._waiting = []
                await asyncio.gather(
                    *(
                        self._call(waiting[i : i + _MOST_PER_CALL])
                        for i in range(0, len(waiting), _MOST_PER_CALL)
                    )
                )
        finally:
            self._sender = None
            for _, future in self._waiting:  # left by a cancelled sender: nothing sent them
                future.cancel()
            self._waiting = []

    async def _call(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
        except BaseException as error:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    own = _errors.StorageError(str(error))  # each caller its own exception
                    own.__cause__ = error.__cause__
                    future.set_exception(own)
            if not isinstance(error, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


class RedisRelay:
    """Outcomes through Redis for one `RedisStorage` queue (see the module docstring)."""

    def __init__(self, storage: RedisStorage[Any], deliver: Callable[[str, Outcome], None]) -> None:
        self._redis = storage.redis
        self._connection = storage._connection
        tag = f"{{{storage.namespace}}}:q:{storage.queue}"
        self.waiting_key = f"{tag}:waiting"
        self._ids_key = f"{tag}:ids"
        self.inbox = f"{tag}:inbox:{secrets.token_hex(12)}"
        retention = storage.message_retention
        self._ttl = int(min(retention, 10 * 365 * 86_400)) + 60
        self._deliver = deliver
        self._here: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        # A Worker's handlers start and end together: their claims and reports go in one call.
        self._claims = _Batched(self._claim_many)
        self._reports = _Batched(self._report_many)

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._connection.run(_SCRIPTS[name], [k.encode() for k in keys], args)
        except Exception as exc:
            raise _errors.StorageError(f"redis failed the outcome relay's {name}: {exc!r}") from exc

    async def expect(self, request_id: str) -> None:
        ok = await self._run("expect", [self.waiting_key, self._ids_key], [request_id, self.inbox, self._ttl])
        if not int(ok):
            raise DuplicateRequestError(f"request {request_id!r} is already queued and awaited")
        self._here.add(request_id)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="llmqd-outcomes")

    async def enqueued(self, request_id: str) -> None:
        return None

    async def forget(self, request_id: str) -> None:
        self._here.discard(request_id)
        await self._run("forget", [self.waiting_key], [request_id, self.inbox])

    async def claim(self, request_id: str) -> bool:
        return bool(int(await self._claims(request_id)))

    async def _claim_many(self, request_ids: list[str]) -> list[Any]:
        if len(request_ids) == 1:
            return [await self._run("claim", [self.waiting_key], request_ids)]
        result: list[Any] = await self._run("claim_many", [self.waiting_key], request_ids)
        return result

    async def _report_many(self, reports: list[tuple[str, str]]) -> list[Any]:
        if len(reports) == 1:
            request_id, body = reports[0]
            return [await self._run("report", [self.waiting_key], [request_id, body, RESULT_TTL])]
        args: list[Any] = [RESULT_TTL]
        for request_id, body in reports:
            args += (request_id, body)
        result: list[Any] = await self._run("report_many", [self.waiting_key], args)
        return result

    async def report(self, request_id: str, outcome: Outcome, *, here: bool) -> None:
        if here:
            await self.forget(request_id)
            return
        body = encode_outcome(request_id, outcome)
        await self._reports((request_id, body))

    async def withdraw(self, request_id: str) -> None:
        self._here.discard(request_id)
        await self._run("withdraw", [self.waiting_key], [request_id])

    async def purged(self) -> None:
        error = _errors.PurgedError("the request was purged")
        body = json.dumps({"ok": False, "error": encode_error(error)})
        await self._run("purged", [self.waiting_key], [body, RESULT_TTL])

    async def _listen(self) -> None:
        """Delivers the outcomes pushed to this process's inbox while anybody here waits."""
        while self._here:
            try:
                popped = await self._redis.blpop([self.inbox], timeout=_LISTEN_BLOCK)
            except asyncio.CancelledError:
                raise
            except Exception:
                _LOGGER.exception("could not read the outcomes of submitted requests; retrying")
                await asyncio.sleep(_LISTEN_BLOCK)
                continue
            if popped is None:
                continue
            try:
                request_id, outcome = decode_item(popped[1])
            except Exception:
                _LOGGER.exception("an unreadable outcome in %s was dropped", self.inbox)
                continue
            self._here.discard(request_id)
            self._deliver(request_id, outcome)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.done():
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
