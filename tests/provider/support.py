"""Limiters the provider tests share: an asynchronous one, as a shared (Redis) limiter looks, and
one whose store is unreachable."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llm_queue_dispatcher import LLMThrottle


class AsyncLimiter:
    """An AsyncRateLimiter over LLMThrottle, as a shared (Redis) limiter would look."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.awaited: Counter[str] = Counter()

    async def can_process(self, estimated_tokens: int) -> Any:
        return self.inner.can_process(estimated_tokens)

    async def get_metrics(self) -> Any:
        return self.inner.get_metrics()

    async def consume(
        self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None
    ) -> bool:
        return self.inner.consume(request_id, estimated_tokens, metadata)

    async def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.inner.adjust_consumption(request_id, actual_tokens)

    async def penalize(self, seconds: float) -> None:
        self.awaited["penalize"] += 1
        self.inner.penalize(seconds)

    async def sync_from_headers(self, headers: Any) -> Any:
        self.awaited["sync_from_headers"] += 1
        return self.inner.sync_from_headers(headers)


class BrokenSyncLimiter(AsyncLimiter):
    """A shared limiter whose server went away between the call and the header sync."""

    async def sync_from_headers(self, headers: Any) -> Any:
        raise ConnectionError("limiter store unreachable")

    async def penalize(self, seconds: float) -> None:
        raise ConnectionError("limiter store unreachable")
