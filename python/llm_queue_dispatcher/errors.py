"""The exception hierarchy. Defined once here; the Rust core raises these very classes."""

from __future__ import annotations

__all__ = [
    "DuplicateRequestError",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMQueueDispatcherError",
    "MessageStateError",
    "RateLimitError",
    "ReceiptHandleError",
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
        super().__init__(message or f"rate limited ({reason}); available in {available_in:.3f} s")

    def __reduce__(self) -> tuple[type[RateLimitError], tuple[str, float, str]]:
        return (type(self), (self.reason, self.available_in, str(self)))


class StorageError(LLMQueueDispatcherError):
    """A storage backend failed. The message is not lost: it stays where it was."""
