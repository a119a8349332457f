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
from .storage import InMemoryStorage, QueueAttributes, QueueStorageAdapter
from .types import LLMRequest, MessageAttributes, Priority, QueueMessage, TokenInfo

__all__ = [
    "DuplicateRequestError",
    "InMemoryStorage",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMQueueDispatcherError",
    "LLMRequest",
    "ManualClock",
    "MessageAttributes",
    "MessageStateError",
    "Priority",
    "QueueAttributes",
    "QueueMessage",
    "QueueStorageAdapter",
    "RateLimitError",
    "ReceiptHandleError",
    "StorageError",
    "TokenInfo",
    "UnknownRequestError",
    "__version__",
]
