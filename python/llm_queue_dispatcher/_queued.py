"""What `QueuedAsyncOpenAI` and `QueuedAsyncAnthropic` share: an SDK client whose ``create``
call is queued, dispatched in turn through `LLMQueueDispatcher.submit` and answered with the
SDK's own response object or error.

Each call becomes an `LLMRequest` (its keyword arguments the payload, its estimate from the
provider module's estimator, ``priority``, ``tenant`` and ``deadline`` from the call) submitted
with a handler that sends it through the provider module's ``create_*`` function: so 429s,
``retry-after`` and the rate-limit headers are handled exactly as `Worker`'s provider handlers
handle them (the limiter synced and paused, the request retried under it). The dispatcher's own
pool runs the handlers (``concurrency`` at once, under ``limiter``).

A request that ends unprocessed raises the SDK's own error when a provider's answer ended it
(``openai.BadRequestError``, ``anthropic.RateLimitError`` after the last retry, ...), also when
another process sharing a Redis queue handled it (rebuilt from its status, headers and body);
`RequestFailedError` otherwise (expired, purged, the dispatcher closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import os
import secrets
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from ._checks import finite_float, shown
from .errors import (
    InvalidRequestError,
    MessageStateError,
    PermanentError,
    RemoteError,
    RequestFailedError,
    RetryableError,
)
from .outcomes import DEFAULT_SUBMIT_CONCURRENCY, HandlerResult, _concurrency
from .throttle import AsyncRateLimiter, RateLimiter
from .types import LLMRequest, Priority, TokenInfo, TokenUsage, _validate_priority, validate_request_id

if TYPE_CHECKING:
    from ._core import ProcessableMessage
    from .dispatcher import LLMQueueDispatcher

__all__ = ["DEFAULT_MAX_RATE_LIMITED", "CountedStream", "QueuedClient", "StreamCounter", "Tokenizer"]

#: text -> token count.
Tokenizer = Callable[[str], int]

_ids = itertools.count()

_Queued = TypeVar("_Queued", bound="QueuedClient")
_T = TypeVar("_T")

#: 429 answers to one queued call before it is given up (the limiter paces them; a request the
#: provider never admits, one larger than its limit, must not be retried for ever).
DEFAULT_MAX_RATE_LIMITED = 20


def default_tokenizer() -> Tokenizer | None:
    """tiktoken's ``o200k_base`` when tiktoken is installed and its file is already cached
    locally (never downloaded at run time), else None (the documented heuristic)."""
    import importlib

    try:
        tiktoken: Any = importlib.import_module("tiktoken")
    except ImportError:
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache or not os.path.isdir(cache) or not os.listdir(cache):
        return None  # tiktoken would download its file
    try:
        encoding = tiktoken.get_encoding("o200k_base")
    except Exception:
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def deadline_of(value: object) -> datetime | None:
    """``deadline=``: a timezone-aware `datetime`, a number of seconds from now, or None. A
    number whose instant a `datetime` cannot hold (past the year 9999) is refused too."""
    if value is None or isinstance(value, datetime):
        return value
    seconds = finite_float(value)
    if seconds is not None:
        try:
            return datetime.now(timezone.utc) + timedelta(seconds=seconds)
        except OverflowError:
            pass
    raise InvalidRequestError(
        f"deadline must be a datetime, a number of seconds from now (within the years 1 to 9999) "
        f"or None, got {shown(value)}"
    )


def _count(value: object, name: str, minimum: int) -> int:
    """An int option >= ``minimum`` (not a bool), else `InvalidRequestError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{name} must be an int >= {minimum}, got {shown(value)}")
    return value


def _seen(task: asyncio.Future[Any]) -> None:
    """Marks a task's exception as retrieved (it stays there for whoever asks for it)."""
    if not task.cancelled():
        task.exception()


class StreamCounter:
    """Counts a stream's tokens as its items go by; `total` at its end: a `TokenUsage` (input and
    output apart, each limit corrected with its own), a total, or None (keep the estimate)."""

    def see(self, item: Any) -> None:
        raise NotImplementedError

    def total(self) -> TokenUsage | int | None:
        raise NotImplementedError


def _finish(counter: StreamCounter, finished: asyncio.Future[TokenUsage | int | None]) -> None:
    """Ends a counted stream's call with what its counter saw (once)."""
    if not finished.done():
        try:
            total = counter.total()
        except Exception:
            total = None
        finished.set_result(total)


def _finish_soon(
    loop: asyncio.AbstractEventLoop, counter: StreamCounter, finished: asyncio.Future[TokenUsage | int | None]
) -> None:
    """`_finish` in the stream's event loop (a finalizer may run anywhere)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
        loop.call_soon_threadsafe(_finish, counter, finished)


class CountedStream:
    """The SDK's stream, passed through item by item (``async for``, ``async with``, its other
    attributes), its tokens counted; its end (exhausted, failed or closed) ends the call's
    handler, which corrects the limiter with the count. Read it to its end or close it: the
    call holds its place in the pool until then."""

    def __init__(
        self, stream: Any, counter: StreamCounter, finished: asyncio.Future[TokenUsage | int | None]
    ) -> None:
        self._stream = stream
        self._iterator = stream.__aiter__()
        self._counter = counter
        self._finished = finished
        self._submitted: asyncio.Future[Any] | None = None
        # Dropped unread and unclosed, it still ends its call (which would hold its place in the
        # pool, its message leased, until the dispatcher closes).
        weakref.finalize(self, _finish_soon, asyncio.get_running_loop(), counter, finished)

    def _finish(self) -> None:
        _finish(self._counter, self._finished)

    def __aiter__(self) -> CountedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._iterator.__anext__()
        except BaseException:  # StopAsyncIteration included: the stream ended
            self._finish()
            raise
        with contextlib.suppress(Exception):
            self._counter.see(item)
        return item

    async def close(self) -> None:
        try:
            closing = getattr(self._stream, "close", None)
            if closing is not None:
                await closing()
        finally:
            self._finish()

    async def __aenter__(self) -> CountedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._stream, name)


class QueuedClient:
    """The shared machinery: one dispatcher, one limiter, one handler for the pool."""

    #: The SDK's module name ("openai", "anthropic").
    _sdk: str

    def __init__(
        self,
        client: Any,
        dispatcher: LLMQueueDispatcher[Any],
        limiter: Any,
        *,
        tokenizer: Tokenizer | None = None,
        concurrency: int = DEFAULT_SUBMIT_CONCURRENCY,
        priority: Priority | int = Priority.NORMAL,
        id_prefix: str | None = None,
        max_retries: int | None = None,
        max_rate_limited: int = DEFAULT_MAX_RATE_LIMITED,
    ) -> None:
        from .dispatcher import LLMQueueDispatcher

        if not isinstance(dispatcher, LLMQueueDispatcher):
            raise InvalidRequestError(f"dispatcher must be an LLMQueueDispatcher, got {shown(dispatcher)}")
        if tokenizer is not None and not callable(tokenizer):
            raise InvalidRequestError(
                f"tokenizer must be a callable str -> int or None, got {shown(tokenizer)}"
            )
        # Every option is checked here, where it was given, not at the first call.
        if not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
            raise InvalidRequestError(
                f"limiter must have can_process, get_metrics, consume and adjust_consumption, "
                f"got {shown(limiter)}"
            )
        if id_prefix is not None:
            validate_request_id(id_prefix, "id_prefix")
        self._max_retries = None if max_retries is None else _count(max_retries, "max_retries", 0)
        self._max_rate_limited = _count(max_rate_limited, "max_rate_limited", 1)
        # Failed attempts of each request handled here, by kind: the retry budgets. A request's
        # entries go when it ends here (answered, given up) or its call in this process returns.
        self._failures: Counter[str] = Counter()
        self._rate_limited: Counter[str] = Counter()
        # Requests with an attempt running here, and those of them whose call here has returned
        # (its caller cancelled): such an attempt's end forgets its counts, as nothing will.
        self._running: set[str] = set()
        self._call_ended: set[str] = set()
        self._set_client(client)
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self._concurrency = _concurrency(concurrency)
        self._priority = _validate_priority(priority)
        self._prefix = id_prefix or f"{self._sdk}-{secrets.token_hex(4)}"
        self._streams: dict[str, asyncio.Future[CountedStream]] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        # Everything but the queued call is the wrapped client's (models, files, close...).
        return getattr(self._client, name)

    def _set_client(self, client: Any) -> None:
        """Wraps ``client``: a provider's class sets its queued resources (``chat``,
        ``messages``) over it too."""
        self._client = client
        # The SDK's own retry count (its default 2), kept for queued calls: their retries go
        # through the queue, not the SDK, but as many.
        retries = getattr(client, "max_retries", None)
        self._client_max_retries = (
            retries if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0 else 2
        )

    def with_options(self: _Queued, **options: Any) -> _Queued:
        """The SDK's ``with_options`` (and ``copy``): a client with these options (``timeout``,
        ``default_headers``, ...) whose calls are queued as this one's are, on the same
        dispatcher under the same limiter, with the same defaults."""
        other = copy.copy(self)
        other._set_client(self._client.with_options(**options))
        return other

    copy = with_options

    async def __aenter__(self: _Queued) -> _Queued:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # As the SDK's client does: its HTTP connections closed. The dispatcher is left open
        # (other clients may share it; close it with its own ``async with``).
        await self._client.close()

    # -- what a provider's class fills in -------------------------------------------------------
    def _estimate(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        """The estimate's parts, ``(input, max_output)``: the prompt's tokens and the most the
        reply may use, so that a limiter with input and output limits (``itpm``, ``otpm``)
        reserves each against its own limit."""
        raise NotImplementedError

    async def _call(
        self, payload: Mapping[str, Any], reserved: TokenInfo | None
    ) -> tuple[Any, TokenUsage | int | None]:
        """One call through the provider module (SDK retries off): (the response, its tokens).
        ``reserved``: what the call's reservation holds, which its mark corrects (the limiter is
        synced as it will stand then)."""
        raise NotImplementedError

    def _rebuild(self, value: object) -> Any:
        """The SDK's response object from what travelled back (itself, or its JSON)."""
        raise NotImplementedError

    # -- the queued call ------------------------------------------------------------------------
    async def _create(
        self,
        payload: dict[str, Any],
        *,
        priority: Priority | int | None,
        tenant: str | None,
        deadline: object,
    ) -> Any:
        prompt, max_output = self._estimate(payload)
        model = payload.get("model")
        request = LLMRequest(
            f"{self._prefix}-{next(_ids)}",
            payload,
            self._priority if priority is None else priority,  # type: ignore[arg-type]
            TokenInfo(model=model if isinstance(model, str) else None, input=prompt, max_output=max_output),
            tenant=tenant,
            deadline=deadline_of(deadline),
        )
        try:
            if payload.get("stream"):
                return await self._create_stream(request)
            try:
                value = await self._dispatcher.submit(
                    request, self._handle, rate_limiter=self._limiter, concurrency=self._concurrency
                )
            except RequestFailedError as failure:
                raise self._sdk_error(failure) from failure
            return self._rebuild(value)
        finally:
            if request.id in self._running:
                self._call_ended.add(request.id)
            self._forget(request.id)

    async def _create_stream(self, request: LLMRequest[Any]) -> CountedStream:
        """A streamed call: queued like any; once its turn came and the provider answered, the
        open stream comes back here while the handler waits for its end (the tokens counted
        from it then correct the limiter)."""
        opened: asyncio.Future[CountedStream] = asyncio.get_running_loop().create_future()
        self._streams[request.id] = opened
        submitted = asyncio.ensure_future(
            self._dispatcher.submit(
                request, self._handle, rate_limiter=self._limiter, concurrency=self._concurrency
            )
        )
        try:
            await asyncio.wait({opened, submitted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._streams.pop(request.id, None)
            opened.cancel()
            submitted.cancel()  # withdraws it, or discards the stream the handler opens
            with contextlib.suppress(BaseException):
                await submitted
            raise
        self._streams.pop(request.id, None)
        if opened.done() and not opened.cancelled():
            stream = opened.result()
            stream._submitted = submitted  # its outcome, once the stream ended
            # Nobody need await that outcome (the stream is the answer): a failure of it (the
            # dispatcher closed or purged under the open stream) is not an error to report.
            submitted.add_done_callback(_seen)
            return stream
        try:
            submitted.result()
        except RequestFailedError as failure:
            raise self._sdk_error(failure) from failure
        raise MessageStateError(f"request {request.id!r} ended without opening its stream")

    async def _handle(self, job: ProcessableMessage[Any]) -> HandlerResult[Any]:
        payload = job.message.payload.payload
        if payload.get("stream"):
            return await self._handle_stream(job, payload)
        response, tokens = await self._attempt(job, self._call(payload, job.message.payload.token_info))
        return HandlerResult(response, actual_tokens=tokens)

    async def _attempt(self, job: ProcessableMessage[Any], call: Awaitable[_T]) -> _T:
        """One attempt of a request's call, within its retry budgets: a transient failure
        (`RetryableError`: a 5xx, a timeout, a connection error) past ``max_retries`` retries,
        or a 429 past ``max_rate_limited``, becomes a `PermanentError` chained to it, so the
        request ends (dead-lettered) and its caller gets the SDK's error, as the SDK would
        raise it after its own last retry."""
        request_id = job.message.payload.id
        self._running.add(request_id)
        try:
            return await self._counted(request_id, call)
        finally:
            self._running.discard(request_id)
            if request_id in self._call_ended:
                # Its caller gave up while this attempt ran: a failure leaves it to be withdrawn
                # at its next turn, which never reaches here to forget its counts.
                self._call_ended.discard(request_id)
                self._forget(request_id)

    async def _counted(self, request_id: str, call: Awaitable[_T]) -> _T:
        try:
            result = await call
        except RetryableError as error:
            cause = error.__cause__
            if getattr(cause, "status_code", None) == 429:
                self._rate_limited[request_id] += 1
                count, budget = self._rate_limited[request_id], self._max_rate_limited
                what = "rate-limited (429) answers"
            else:
                self._failures[request_id] += 1
                count = self._failures[request_id]
                retries = self._client_max_retries if self._max_retries is None else self._max_retries
                budget, what = retries + 1, "failed attempts"
            if count >= budget:
                self._forget(request_id)
                raise PermanentError(f"gave up after {count} {what}: {error}") from error
            raise
        except PermanentError:
            self._forget(request_id)
            raise
        self._forget(request_id)
        return result

    def _forget(self, request_id: str) -> None:
        self._failures.pop(request_id, None)
        self._rate_limited.pop(request_id, None)

    async def _handle_stream(
        self, job: ProcessableMessage[Any], payload: Mapping[str, Any]
    ) -> HandlerResult[Any]:
        opened = self._streams.get(job.message.payload.id)
        if opened is None:
            # Made in another process sharing the queue: only that process can read the stream.
            raise RetryableError("a streamed call is sent by the process that made it", retry_after=1.0)
        sdk_stream = await self._attempt(job, self._open_stream(payload))
        finished: asyncio.Future[TokenUsage | int | None] = asyncio.get_running_loop().create_future()
        counted = CountedStream(sdk_stream, self._stream_counter(payload), finished)
        if opened.done():  # its caller gave up meanwhile: nobody reads it
            await counted.close()
        else:
            opened.set_result(counted)
        # Only its caller holds it now: dropped unclosed, its finalizer ends the call.
        del opened, counted
        return HandlerResult(None, actual_tokens=await self._stream_end(finished))

    async def _stream_end(self, finished: asyncio.Future[TokenUsage | int | None]) -> TokenUsage | int | None:
        """The count of an open stream once its caller ends it; or None (the estimate stands:
        the prompt and the most the reply may use) as soon as the dispatcher starts closing. The
        provider has answered by then: the call's work is done, and its reader may take its
        time (the stream stays open for it), so a close does not wait out its pool's grace for
        it, nor give the answered request back to be sent again."""
        book = self._dispatcher._submissions
        if book is None or finished.done():
            return await finished
        closing: asyncio.Future[Any] = asyncio.ensure_future(book.closing.wait())
        waited: set[asyncio.Future[Any]] = {finished, closing}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        return finished.result() if finished.done() else None

    # -- streaming, what a provider's class fills in ---------------------------------------------
    async def _open_stream(self, payload: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def _stream_counter(self, payload: Mapping[str, Any]) -> StreamCounter:
        raise NotImplementedError

    def _sdk_error(self, failure: RequestFailedError) -> BaseException:
        """The SDK's own error behind a failure, else the failure itself."""
        import importlib

        sdk = importlib.import_module(self._sdk)
        error: BaseException | None = failure.error
        for _ in range(8):
            if error is None:
                break
            if isinstance(error, sdk.APIError):
                found: BaseException = error
                return found
            if isinstance(error, RemoteError) and error.status_code is not None:
                return self._status_error(error)
            error = error.__cause__
        return failure

    def _status_error(self, error: RemoteError) -> BaseException:
        import importlib

        httpx: Any = None
        for transport in ("httpx2", "httpx"):  # the SDKs' HTTP library, by their versions
            try:
                httpx = importlib.import_module(transport)
                break
            except ImportError:
                continue
        make: Callable[..., BaseException] = self._client._make_status_error
        request = httpx.Request("POST", str(getattr(self._client, "base_url", "http://localhost")))
        status = error.status_code or 500
        response = httpx.Response(status, headers=error.headers or {}, request=request)
        return make(error.message, body=error.body, response=response)
