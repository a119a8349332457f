"""What `RedisStorage` and `RedisThrottle` share: names, the client, the scripts, the errors.

* Names (queues, limiters, namespaces) match ``[A-Za-z0-9_.-]{1,80}``: no braces (they would
  break the hash tag), no colon (the key separator), no whitespace; else `InvalidConfigError`.
* Every key of a namespace carries the hash tag ``{namespace}``: a queue, its dead-letter queue
  and the limiters of one namespace live in one Redis Cluster slot, so one script can move a
  message between two queues atomically. Spread load over a cluster with several namespaces.
* A URL is turned into a client with bounded timeouts and one immediate retry on a broken
  connection (so a pooled connection that a Redis restart cut is replaced without the caller
  seeing it); a timeout is not retried, so a slow or paused server surfaces within the socket
  timeout. The call resent may have run before the connection broke: every call that changes
  something carries a reply key named after a random token drawn for that call, and the script
  answers a resend from the reply its first run kept there (``lua/common.lua``). The password of
  a URL appears nowhere: not in ``repr``, not in errors, not in logs.
* Each operation is one Lua script, sent by its SHA1 (``EVALSHA``) and loaded (``SCRIPT LOAD``)
  only when the server answers ``NOSCRIPT``: after a restart, a ``SCRIPT FLUSH`` or on a new
  server, invisibly to the caller.

About 770 lines for one concept, how a script call reaches Redis: the client's making, the
scripts, and the two batchers that carry every call (`Batcher`'s pipelining shares the
client's pool, timeouts, retry policy and scripts with all of it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE

from ..errors import InvalidConfigError

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _pack = None

__all__ = [
    "CLIENT_ERRORS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "ClockOffset",
    "Connection",
    "Script",
    "check_name",
    "host_microseconds",
    "redact_url",
    "script",
]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")

#: Seconds a command may take before it fails with `StorageError` (clients built from a URL;
#: ``?socket_timeout=`` in the URL overrides it).
DEFAULT_SOCKET_TIMEOUT = 5.0
#: Seconds to establish a connection (``?socket_connect_timeout=`` overrides it).
DEFAULT_CONNECT_TIMEOUT = 2.0


def check_name(value: object, what: str) -> str:
    """Returns ``value`` if it is a valid queue, limiter or namespace name, else raises
    `InvalidConfigError` naming ``what``."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise InvalidConfigError(f"{what} must match [A-Za-z0-9_.-]{{1,80}}, got {value!r}")
    return value


def redact_url(url: str) -> str:
    """``url`` with its password (and any ``password=`` query value) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if colon else f"{user}@{host}" if user else f"***@{host}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable Redis URL>"


def _secrets_of(url: str) -> list[str]:
    """The password in ``url`` as written and percent-decoded, for scrubbing messages."""
    from urllib.parse import parse_qs, unquote

    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for value in parse_qs(parts.query).get("password", []):
        found += [value, unquote(value)]
    return [secret for secret in found if secret]


class Connection:
    """A client and how to describe it without leaking a password.

    ``redis`` is a `redis.asyncio.Redis` (used as given, never closed here) or a URL string (a
    client is built with bounded timeouts, owned and closed by `aclose`).
    """

    def __init__(self, redis_or_url: object) -> None:
        self._secrets: list[str] = []
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher | CommandBatcher] = (
            weakref.WeakKeyDictionary()
        )
        if isinstance(redis_or_url, str):
            self.description = redact_url(redis_or_url)
            self._secrets = _secrets_of(redis_or_url)
            try:
                self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
                    redis_or_url,
                    socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                    socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
                )
            except Exception as exc:  # a malformed URL: say so without echoing it
                raise InvalidConfigError(
                    f"redis URL {self.description} is not usable: {self.scrub(str(exc))}"
                ) from None
            self.owned = True
        elif isinstance(redis_or_url, redis.asyncio.Redis):
            self.client = redis_or_url
            self.description = repr(redis_or_url)
            self.owned = False
        else:
            raise InvalidConfigError(
                "redis must be a redis.asyncio.Redis client or a URL string, "
                f"got {type(redis_or_url).__name__}"
            )

    def scrub(self, text: str) -> str:
        """``text`` with the URL's password (if any) replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe_error(self, exc: BaseException) -> str:
        """A one-line account of a client error, safe to log."""
        detail = self.scrub(str(exc)) or type(exc).__name__
        return f"{type(exc).__name__}: {detail}"

    def run(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> Awaitable[Any]:
        """Runs ``script`` through this event loop's `Batcher` (auto-pipelining): awaited, its
        reply."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = (
                Batcher(self.client) if _direct(self.client) else CommandBatcher(self.client)
            )
        return batcher.call(script, keys, args)

    async def aclose(self) -> None:
        """Gives back the connection this event loop's calls hold; closes the client if it was
        built here from a URL."""
        batcher = self._batchers.get(asyncio.get_running_loop())
        if batcher is not None:
            await batcher.aclose()
        if self.owned:
            await self.client.aclose()


class ClockOffset:
    """How far this host's clock is ahead of the Redis server's, in whole microseconds, learned
    from replies that carry the server's instant.

    A call sent at host instant ``sent`` and answered at ``received`` ran on the server at some
    instant ``server`` in between, so the offset lies within ``[sent - server, received -
    server]``. The estimate starts at 0 and moves only when a reply proves it outside that span
    (widened by `SLACK_US` for the clocks' granularity): hosts whose clock agrees with the
    server's (one machine, or NTP) keep exactly 0, and a clock an hour off is known from its
    first reply.
    """

    #: Microseconds of measurement slack on each side of a reply's span.
    SLACK_US = 1_000

    def __init__(self) -> None:
        self.microseconds = 0
        self.observed = False

    def observe(self, sent_us: int, received_us: int, server_us: int) -> None:
        low = sent_us - server_us - self.SLACK_US
        high = received_us - server_us + self.SLACK_US
        self.microseconds = min(max(self.microseconds, low), high)
        self.observed = True


def host_microseconds(seconds: float) -> int:
    """A host clock reading (seconds) in whole microseconds."""
    return round(seconds * 1_000_000)


class ScriptClient:
    """What `RedisStorage` and `RedisThrottle` share: the `Connection` their scripts run
    through, the scripts' time source and this host's clock."""

    _connection: Connection

    @property
    def redis(self) -> redis.asyncio.Redis:
        """The client this object talks through."""
        return self._connection.client

    def _time_argument(self) -> str:
        """The scripts' time source: "" makes them read the server's ``TIME``. Always "" here;
        only the test suite's private subclasses pass a manual clock's readings."""
        return ""

    def _host_time(self) -> float:
        """This host's clock (``time.time()``: the wall clock a dispatcher reads by default),
        used only to translate between the server's instants and this host's. The test suite's
        private subclasses read their manual clock instead."""
        return time.time()

    async def aclose(self) -> None:
        """Closes the client if this object built it from a URL (a client you passed stays open)."""
        await self._connection.aclose()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@functools.cache
def _source(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def prelude(name: str) -> str:
    """The source of prelude ``name``: the queue's starts with the score policy's index
    (``score_index.lua``), which its index functions call."""
    if name == "queue_common":
        return f"{_source('score_index')}\n{_source(name)}"
    return _source(name)


class Script:
    """One operation: the helpers of every script (``common.lua``), a prelude (the queue's or
    the limiter's) and the operation's file, as one Lua script."""

    def __init__(self, prelude_name: str, name: str) -> None:
        self.name = name
        self.source = f"{_source('common')}\n{prelude(prelude_name)}\n{_source(name)}"
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def command(self, keys: Sequence[bytes], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run(self, client: redis.asyncio.Redis, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """``EVALSHA``, loading the script first when the server does not know it (``NOSCRIPT``).
        Replies are never decoded, whatever the client's ``decode_responses``."""
        execute: Callable[..., Awaitable[Any]] = client.execute_command  # untyped in redis-py
        try:
            return await execute(*self.command(keys, args), **_RAW)
        except redis.exceptions.NoScriptError:
            await execute("SCRIPT LOAD", self.source)
            return await execute(*self.command(keys, args), **_RAW)


def _direct(client: redis.asyncio.Redis) -> bool:
    """Whether calls may skip redis-py's command layer (`Batcher`): hiredis is there, the client
    draws its connections from its pool (not one connection of its own) and runs commands as
    redis-py does (no subclass of its own)."""
    return (
        _pack is not None
        and not client.single_connection_client
        and client.connection is None
        and type(client).execute_command is redis.asyncio.Redis.execute_command
    )


async def _acquire(pool: Any) -> Any:
    """A connection of ``pool``, connected."""
    try:
        acquiring = pool.get_connection()
    except TypeError:  # redis-py before 5.3 names the command
        acquiring = pool.get_connection("EVALSHA")
    return await acquiring


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    """Fails a call still waiting for its batch (`CommandBatcher.call`): left out of it, if not
    sent yet. (A timer: `asyncio.wait_for` adds a future and callbacks of its own to every
    queued call.)"""
    if not future.done():
        future.set_exception(redis.exceptions.TimeoutError(f"no reply within {timeout} s"))


#: Seconds a `Batcher` keeps its pooled connection after its last call: a dispatcher's calls
#: follow each other a few milliseconds apart, and taking a connection from redis-py's pool and
#: giving it back costs more than a script's packing.
_HOLD_SECONDS = 0.05


def _holdable(pool: Any) -> bool:
    """Whether a `Batcher` may keep a connection of ``pool`` between calls: when the pool has at
    least `_HOLD_MIN_POOL` connections (redis-py's default pool has 100 or more). A small
    one may be shared by several `Batcher` (a storage and a limiter on one client) or by its
    owner's commands, which must not wait for a connection a busy one keeps."""
    return int(getattr(pool, "max_connections", 0) or 0) >= _HOLD_MIN_POOL


#: The fewest connections a pool has for a `Batcher` to keep one of them (`_holdable`).
_HOLD_MIN_POOL = 16

#: The most exchanges a `Batcher` has on the wire at once. Two let the server run one while the
#: client handles the replies of the other; more only lengthen the queue in the socket.
_DEPTH = 3


_RAW = {NEVER_DECODE: True}
_Call = tuple[Script, Sequence[bytes], Sequence[Any], "asyncio.Future[Any]"]


class _Exchange:
    """Calls written to the connection in one write: their replies come back in this order.
    ``calls`` holds None for a ``SCRIPT LOAD`` (its reply is read and dropped); ``reloaded``:
    these calls already met ``NOSCRIPT`` once and had their scripts loaded, so a second
    ``NOSCRIPT`` is their error; ``deadline``: the loop time by which the oldest of them must
    have its reply (None without a socket timeout)."""

    __slots__ = ("calls", "deadline", "packed", "reloaded")

    def __init__(
        self, calls: list[_Call | None], packed: bytes, deadline: float | None, reloaded: bool = False
    ) -> None:
        self.calls = calls
        self.packed = packed
        self.deadline = deadline
        self.reloaded = reloaded


def _pack_calls(calls: Sequence[_Call]) -> bytes:
    assert _pack is not None
    try:
        return b"".join([_pack(script.command(keys, args)) for script, keys, args, _ in calls])
    except TypeError as exc:
        raise redis.exceptions.DataError(str(exc)) from None


def _uncancel(task: asyncio.Task[Any] | None) -> None:
    """Takes back a cancellation this module made and turned into a timeout (Python 3.11+
    counts them: `asyncio.timeout` and task groups rely on the count)."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def _settle(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fails ``future`` with ``error`` (cancels it for a cancellation), unless it is done."""
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)


class Batcher:
    """Auto-pipelining for one client in one event loop, on one connection it holds.

    Calls are written as they are made: those of one turn of the event loop in one write, at
    once, whatever is still on its way (up to `_DEPTH` writes in flight; more wait for the
    first to be answered). One reader reads the replies in order and gives each call its own
    reply or error: while the server runs one write's scripts, the client handles the replies of
    the one before. Each script is its own atomic step (no transaction).

    The guarantees of a single call hold for each:

    * A call's socket timeout counts from the call: a write's replies must come by the time its
      oldest call was made plus the timeout; a call that could not be written by then is never
      sent. A timeout drops the connection and fails every call on it.
    * A broken connection is reconnected and everything on it written again, as the client's
      retry policy says (once, for a client built from a URL): every script that changes
      something answers a resend from the reply its first run kept (its reply key).
    * ``NOSCRIPT`` (a restart, ``SCRIPT FLUSH``): the scripts are loaded and only the calls
      that met it run again, once.
    * A caller cancelled or timed out does not stop the reading: its reply is read and
      dropped, so the replies of the others stay in step.

    Used where `_direct` holds (hiredis, a pooled client of redis-py's own class); else
    `CommandBatcher`.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._timeout: float | None = client.connection_pool.connection_kwargs.get("socket_timeout")
        # Calls made and not written yet, and the loop time the oldest of them was made.
        self._pending: list[_Call] = []
        self._pending_since = 0.0
        self._flush_scheduled = False
        # Written, in order; the task reading their replies and the connection it reads.
        self._inflight: collections.deque[_Exchange] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        # The connection the reader reads; the same once everything in flight is written on it
        # (a write goes out at once then, else when it is: `_receive`); whether the reader was
        # stopped by a call's timeout.
        self._reading: Any = None
        self._wire: Any = None
        self._timed_out = False
        # The pooled connection kept between calls (`_HOLD_SECONDS`), whether a call was made
        # since the timer that gives it back last looked, that timer, the tasks giving
        # connections back.
        self._held: Any = None
        self._used = False
        self._idle: asyncio.TimerHandle | None = None
        self._releases: set[asyncio.Task[None]] = set()

    def call(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> asyncio.Future[Any]:
        """The future of ``script``'s reply (or its error), the call written with the others of
        this turn of the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            self._pending_since = loop.time()
        self._pending.append((script, keys, args, future))
        self._used = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._reader is None:
            held = self._held
            if held is not None and held.is_connected:
                # Written now, not once the reader starts: those made meanwhile go apart.
                self._reading = self._wire = held
                self._write()
            self._reader = asyncio.get_running_loop().create_task(self._read())
        elif len(self._inflight) < _DEPTH:
            self._write()

    def _write(self) -> None:
        """Makes the calls made since the last write (those cancelled or timed out meanwhile
        left out) one exchange, written at once when the reader's connection is ready for it
        (`_wire`), else when it is (`_receive`)."""
        calls = self._pending
        if not calls:
            return
        self._pending = []
        deadline: float | None = None
        if self._timeout is not None:
            deadline = self._pending_since + self._timeout
            if asyncio.get_running_loop().time() >= deadline:  # waited out its timeout unsent: never sent
                error = redis.exceptions.TimeoutError(f"no reply within {self._timeout} s")
                for call in calls:
                    _settle(call[3], error)
                return
        calls = [call for call in calls if not call[3].done()]
        if not calls:
            return
        try:
            packed = _pack_calls(calls)
        except redis.exceptions.DataError as exc:
            for call in calls:
                _settle(call[3], exc)
            return
        self._inflight.append(_Exchange(list(calls), packed, deadline))
        if self._wire is not None:
            self._wire._writer.write(packed)

    async def _read(self) -> None:
        """The reader: takes a connection (the held one, or one of the pool), writes what is
        pending and reads the replies in order, until nothing is pending or in flight. A
        failure fails the calls on the wire; those made meanwhile go on a connection taken
        again."""
        pool = self.client.connection_pool
        try:
            while self._pending or self._inflight:
                # The connection `_flush` wrote on already (kept even if given back meanwhile),
                # else the held one, else one of the pool.
                connection = self._reading or self._held
                if connection is None:
                    try:
                        connection = await _acquire(pool)
                    except BaseException as exc:
                        self._fail_all(exc)
                        if not isinstance(exc, Exception):
                            raise
                        return
                    if _holdable(pool):
                        self._held = connection
                        if self._idle is None:
                            self._idle = asyncio.get_running_loop().call_later(_HOLD_SECONDS, self._on_idle)
                if self._reading is not connection:  # everything in flight written on it first
                    self._reading, self._wire = connection, None
                try:
                    await self._read_on(connection)
                finally:
                    self._wire = None
                    self._reading = None
                    if connection is not self._held:  # not kept, or given back meanwhile
                        await self._release(connection)
        finally:
            self._reader = None

    async def _read_on(self, connection: Any) -> None:
        """Reads the replies of what is in flight on ``connection``, writing what is made
        meanwhile, until nothing is pending or in flight; returns early after a failure (the
        calls on the wire failed with it)."""
        while True:
            if self._pending and len(self._inflight) < _DEPTH:
                self._write()
            if not self._inflight:
                return
            exchange = self._inflight[0]
            deadline = exchange.deadline
            if deadline is not None and len(self._inflight) > 1:
                deadline = min([e.deadline for e in self._inflight if e.deadline is not None])
            timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._time_out)
            receive = functools.partial(self._receive, connection, exchange)
            drop = functools.partial(self._drop, connection)
            try:
                missing = await connection.retry.call_with_retry(receive, drop)
            except BaseException as exc:
                error: BaseException = exc
                if isinstance(exc, asyncio.CancelledError) and self._timed_out:
                    error = redis.exceptions.TimeoutError(f"no reply within {self._timeout} s")
                    _uncancel(asyncio.current_task())
                # The calls on it fail; those made from now on wait for the next connection.
                self._wire = None
                self._fail_inflight(error)
                with contextlib.suppress(Exception):
                    await connection.disconnect()
                if connection is self._held:
                    self._give_back()
                if error is exc and not isinstance(exc, Exception):
                    self._fail_all(exc)
                    raise
                return
            finally:
                if timer is not None:
                    timer.cancel()
                self._timed_out = False
            self._inflight.popleft()
            if missing:
                # A restart or SCRIPT FLUSH: each script loaded once, then those calls again,
                # written behind what is on the wire.
                scripts = list(dict.fromkeys(call[0] for call in missing))
                assert _pack is not None
                packed = b"".join([_pack(("SCRIPT", "LOAD", script.source)) for script in scripts])
                packed += _pack_calls(missing)
                self._inflight.append(
                    _Exchange([*(None for _ in scripts), *missing], packed, exchange.deadline, True)
                )
                if self._wire is not None:
                    self._wire._writer.write(packed)

    def _time_out(self) -> None:
        """The oldest call on the wire waited out its timeout: the reader stops reading."""
        if self._reader is not None:
            self._timed_out = True
            self._reader.cancel()

    async def _drop(self, connection: Any, _error: BaseException | None = None) -> None:
        """Disconnects ``connection``: what was written on it must be written again."""
        self._wire = None
        await connection.disconnect()

    async def _receive(self, connection: Any, exchange: _Exchange) -> list[_Call]:
        """Reads ``exchange``'s replies into its calls' futures (connected first, and everything
        in flight written, when the connection is new or was broken); returns the calls that met
        ``NOSCRIPT`` for the first time."""
        if self._wire is None:
            if not connection.is_connected:
                await connection.connect()
            connection._writer.write(b"".join([e.packed for e in self._inflight]))
            self._wire = connection
        missing: list[_Call] = []
        for call in exchange.calls:
            try:
                reply = await connection.read_response(disable_decoding=True, timeout=math.inf)
            except redis.exceptions.ResponseError as exc:
                reply = exc
            if call is None:
                continue
            future = call[3]
            if future.done():
                continue  # its caller was cancelled or timed out: dropped
            if isinstance(reply, redis.exceptions.NoScriptError) and not exchange.reloaded:
                missing.append(call)
            elif isinstance(reply, redis.exceptions.ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        return missing

    def _fail_inflight(self, error: BaseException) -> None:
        inflight, self._inflight = self._inflight, collections.deque()
        for exchange in inflight:
            for call in exchange.calls:
                if call is not None:
                    _settle(call[3], error)

    def _fail_all(self, error: BaseException) -> None:
        """Fails what is on the wire and what waits to be written (the reader ends)."""
        self._fail_inflight(error)
        pending, self._pending = self._pending, []
        for call in pending:
            _settle(call[3], error)

    def _on_idle(self) -> None:
        """The held connection goes back to its pool once no call used it for `_HOLD_SECONDS`
        (one timer per period, not one per call)."""
        self._idle = None
        if self._held is None:
            return
        if self._reader is not None or self._used:
            self._used = False
            self._idle = asyncio.get_running_loop().call_later(_HOLD_SECONDS, self._on_idle)
            return
        self._give_back()

    def _give_back(self) -> None:
        """Returns the held connection to its pool (in a task: redis-py's release is a coroutine);
        the one the reader reads is returned when it is done with it."""
        connection, self._held = self._held, None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if connection is not None and connection is not self._reading:
            task = asyncio.get_running_loop().create_task(self._release(connection))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, connection: Any) -> None:
        with contextlib.suppress(Exception):  # a pool reset or closed meanwhile: nothing to return
            await self.client.connection_pool.release(connection)

    async def aclose(self) -> None:
        """Returns the held connection to its pool at once (the one calls are on: when they
        have their replies)."""
        self._give_back()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


class CommandBatcher:
    """Auto-pipelining through redis-py's command layer, for a client `Batcher` does not take
    (no hiredis, a client with a connection of its own, a subclass of redis-py's client).

    A call made while nothing is on the wire goes out at once, alone. Calls made while a round
    trip is in flight wait for it and then go out together, as one pipeline (``transaction=False``:
    each script is still its own atomic step, with its own reply or error).
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._busy = False
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append((script, keys, args, future))
            timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
            if timeout is None:
                return await future
            # The client's timeout counts from this call, not from when its batch goes out: a
            # call queued behind one that hangs must not wait that one's timeout and then its
            # own. Timed out before its batch went out, it is never sent.
            expiry = asyncio.get_running_loop().call_later(timeout, _expire, future, timeout)
            try:
                return await future
            finally:
                expiry.cancel()
        self._busy = True
        try:
            return await script.run(self.client, keys, args)
        finally:
            self._next()

    async def aclose(self) -> None:
        """Nothing held."""

    def _next(self) -> None:
        batch = [call for call in self._pending if not call[3].done()]
        self._pending = []
        if not batch:
            self._busy = False
            return
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
            missing = {
                call[0]
                for call, result in zip(batch, results, strict=True)
                if isinstance(result, redis.exceptions.NoScriptError)
            }
            if missing:  # a restart or SCRIPT FLUSH: load each once and run those calls again
                execute: Callable[..., Awaitable[Any]] = self.client.execute_command
                for script in missing:
                    await execute("SCRIPT LOAD", script.source)
                again = [
                    i
                    for i, result in enumerate(results)
                    if isinstance(result, redis.exceptions.NoScriptError)
                ]
                for i, result in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                    results[i] = result
            for (_, _, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except BaseException as exc:  # the whole round trip failed (or was cancelled): every call did
            for _, _, _, future in batch:
                _settle(future, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._next()

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await script.run(self.client, keys, args)]
            except redis.exceptions.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.execute_command(*script.command(keys, args), **_RAW)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


@functools.cache
def script(prelude: str, name: str) -> Script:
    """The script of operation ``name`` (built once per process)."""
    return Script(prelude, name)


#: What a failing client raises: Redis errors, socket errors, asyncio timeouts.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)
