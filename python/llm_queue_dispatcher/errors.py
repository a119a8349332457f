"""The exception hierarchy. Defined once here; the Rust core raises these very classes."""

from __future__ import annotations

__all__ = [
    "DuplicateRequestError",
    "ExpiredError",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMQueueDispatcherError",
    "LimiterUnavailableError",
    "MessageStateError",
    "PayloadTooLargeError",
    "PermanentError",
    "PurgedError",
    "RateLimitError",
    "ReceiptHandleError",
    "RemoteError",
    "RequestFailedError",
    "RetryableError",
    "StorageError",
    "UnknownRequestError",
]


class LLMQueueDispatcherError(Exception):
    """Base class of every error this package raises."""


class InvalidConfigError(LLMQueueDispatcherError):
    """A configuration value is out of range or inconsistent (rpm <= 0, unknown strategy, …)."""


class InvalidRequestError(LLMQueueDispatcherError, ValueError):
    """An argument is malformed: empty id, negative or non-integral token count, bad timeout, …."""


class DuplicateRequestError(LLMQueueDispatcherError):
    """A request with this id is already queued and not yet deleted; nothing was enqueued."""


class ReceiptHandleError(LLMQueueDispatcherError):
    """The receipt handle is unknown or stale (the message was received again, deleted, …)."""


class MessageStateError(LLMQueueDispatcherError):
    """A message was marked processed or failed twice."""


class UnknownRequestError(LLMQueueDispatcherError):
    """The rate limiter has no record of this request id (never consumed, or past retention)."""


class RateLimitError(LLMQueueDispatcherError):
    """The rate limiter refused a request.

    ``reason`` is ``"rpm_limit"`` or ``"tpm_limit"``; ``available_in`` is the exact number of
    seconds until the request would be allowed, ``math.inf`` when it can never fit.
    """

    def __init__(self, reason: str, available_in: float, message: str | None = None) -> None:
        self.reason = reason
        self.available_in = available_in
        if not message:
            # Raised by user limiters too: whatever they pass, building the error must not fail.
            try:
                shown = f"{available_in:.3f}"
            except (TypeError, ValueError, OverflowError):
                shown = repr(available_in)
            message = f"rate limited ({reason}); available in {shown} s"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[RateLimitError], tuple[str, float, str]]:
        return (type(self), (self.reason, self.available_in, str(self)))


class StorageError(LLMQueueDispatcherError):
    """A storage backend failed. The message is not lost: it stays where it was."""


class LimiterUnavailableError(StorageError):
    """A shared rate limiter could not be reached. It fails closed: nothing was granted."""


class PayloadTooLargeError(InvalidRequestError):
    """A serialised payload is larger than the store accepts; nothing was sent or stored."""


class RetryableError(LLMQueueDispatcherError):
    """Raised by a handler: the call failed but may succeed later.

    ``retry_after`` (seconds, e.g. a provider's ``Retry-After``) overrides the worker's backoff.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_retryable, (type(self), str(self), self.retry_after))


def _rebuild_retryable(cls: type[RetryableError], message: str, retry_after: float | None) -> RetryableError:
    return cls(message, retry_after=retry_after)


class PermanentError(LLMQueueDispatcherError):
    """Raised by a handler: the request can never succeed; it is dead-lettered at once."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)


class RequestFailedError(LLMQueueDispatcherError):
    """Raised by ``submit`` for a request that ended without being processed.

    ``request_id`` names it; ``error`` is the last error it met: the handler's exception when it
    was dead-lettered (a `PermanentError`, or the last failure before ``max_receive_count`` ran
    out), else an `LLMQueueDispatcherError` saying why it ended (expired, purged, the dispatcher
    closed). When the request was handled in another process, ``error`` is a `RemoteError`
    carrying the original's type name, message and, for a provider's HTTP error, its status,
    headers and body.
    """

    def __init__(self, request_id: str, error: BaseException) -> None:
        super().__init__(f"request {request_id!r} failed: {error!r}")
        self.request_id = request_id
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.request_id, self.error))


class RemoteError(LLMQueueDispatcherError):
    """An error raised in another process, as it reached this one (through a shared store).

    ``type_name`` is the qualified name of the original exception's class; ``status_code``,
    ``headers`` and ``body`` are set when it came from a provider's HTTP response (an SDK's
    ``APIStatusError``), else None.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        *,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        body: object = None,
    ) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.status_code = status_code
        self.headers = headers
        self.body = body

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_remote, (self.type_name, self.message, self.status_code, self.headers, self.body))


def _rebuild_remote(
    type_name: str, message: str, status_code: int | None, headers: dict[str, str] | None, body: object
) -> RemoteError:
    return RemoteError(type_name, message, status_code=status_code, headers=headers, body=body)


class ExpiredError(LLMQueueDispatcherError):
    """The ``error`` of a submitted request removed unsent because its deadline passed
    (``drop_expired``)."""


class PurgedError(LLMQueueDispatcherError):
    """The ``error`` of a submitted request removed by a purge of its queue."""
