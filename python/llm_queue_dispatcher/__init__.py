"""llm-queue-dispatcher: exact, rate-limit-aware scheduling of LLM API requests, with a Rust core."""

from ._core import ManualClock, __version__
from .errors import (
    DuplicateRequestError,
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcherError,
    MessageStateError,
    RateLimitError,
    ReceiptHandleError,
    StorageError,
    UnknownRequestError,
)
from .types import LLMRequest, MessageAttributes, Priority, QueueMessage, TokenInfo

__all__ = [
    "DuplicateRequestError",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMQueueDispatcherError",
    "LLMRequest",
    "ManualClock",
    "MessageAttributes",
    "MessageStateError",
    "Priority",
    "QueueMessage",
    "RateLimitError",
    "ReceiptHandleError",
    "StorageError",
    "TokenInfo",
    "UnknownRequestError",
    "__version__",
]
