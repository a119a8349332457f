"""The exception hierarchy. Defined once here; the Rust core raises these very classes."""

from __future__ import annotations

__all__ = [
    "DuplicateRequestError",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMQueueDispatcherError",
    "LimiterUnavailableError",
    "MessageStateError",
    "PayloadTooLargeError",
    "PermanentError",
    "RateLimitError",
    "ReceiptHandleError",
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
