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

import itertools
import os
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ._checks import finite_float, shown
from .errors import InvalidRequestError, RemoteError, RequestFailedError
from .outcomes import DEFAULT_SUBMIT_CONCURRENCY, HandlerResult
from .types import LLMRequest, Priority, TokenInfo

if TYPE_CHECKING:
    from ._core import ProcessableMessage
    from .dispatcher import LLMQueueDispatcher

__all__ = ["QueuedClient", "Tokenizer"]

#: text -> token count.
Tokenizer = Callable[[str], int]

_ids = itertools.count()


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
    """``deadline=``: a timezone-aware `datetime`, a number of seconds from now, or None."""
    if value is None or isinstance(value, datetime):
        return value
    seconds = finite_float(value)
    if seconds is None:
        raise InvalidRequestError(
            f"deadline must be a datetime, a number of seconds from now or None, got {shown(value)}"
        )
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


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
    ) -> None:
        from .dispatcher import LLMQueueDispatcher

        if not isinstance(dispatcher, LLMQueueDispatcher):
            raise InvalidRequestError(f"dispatcher must be an LLMQueueDispatcher, got {shown(dispatcher)}")
        if tokenizer is not None and not callable(tokenizer):
            raise InvalidRequestError(
                f"tokenizer must be a callable str -> int or None, got {shown(tokenizer)}"
            )
        self._client = client
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self._concurrency = concurrency
        self._priority = Priority(priority)
        self._prefix = id_prefix or f"{self._sdk}-{secrets.token_hex(4)}"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        # Everything but the queued call is the wrapped client's (models, files, with_options...).
        return getattr(self._client, name)

    # -- what a provider's class fills in -------------------------------------------------------
    def _estimate(self, payload: Mapping[str, Any]) -> int:
        raise NotImplementedError

    async def _call(self, payload: Mapping[str, Any]) -> tuple[Any, int | None]:
        """One call through the provider module (SDK retries off): (the response, its tokens)."""
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
        if payload.get("stream"):
            raise InvalidRequestError(
                "stream=True is not queued by this client: call the wrapped client for streams"
            )
        estimate = self._estimate(payload)
        model = payload.get("model")
        request = LLMRequest(
            f"{self._prefix}-{next(_ids)}",
            payload,
            self._priority if priority is None else priority,  # type: ignore[arg-type]
            TokenInfo(estimate, model=model if isinstance(model, str) else None),
            tenant=tenant,
            deadline=deadline_of(deadline),
        )
        try:
            value = await self._dispatcher.submit(
                request, self._handle, rate_limiter=self._limiter, concurrency=self._concurrency
            )
        except RequestFailedError as failure:
            raise self._sdk_error(failure) from failure
        return self._rebuild(value)

    async def _handle(self, job: ProcessableMessage[Any]) -> HandlerResult[Any]:
        response, tokens = await self._call(job.message.payload.payload)
        return HandlerResult(response, actual_tokens=tokens)

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
