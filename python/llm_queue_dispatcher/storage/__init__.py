"""Queue storage: the adapter ABC every backend implements, and the in-memory store (Rust core)."""

from .base import QueueAttributes, QueueStorageAdapter
from .memory import InMemoryStorage

__all__ = ["InMemoryStorage", "QueueAttributes", "QueueStorageAdapter"]
