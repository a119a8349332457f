"""Helpers of the tests of the dispatcher's books: a plain-Python rate limiter that keeps exact
books, a bookkeeping snapshot of a dispatcher, a clock that fails on demand, external stores
with only the required methods, and a runner for scenarios that could hang."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    QueueMessage,
    QueueStorageAdapter,
    StorageError,
    TokenInfo,
    UnknownRequestError,
)

#: Seconds a child interpreter may take before its scenario counts as hung.
HANG_TIMEOUT = 30.0


def run_isolated(code: str, timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a child interpreter. A deadlock hangs an interpreter for good (Ctrl-C
    does nothing), so a scenario that could hang runs here: a hang fails the test after
    ``timeout`` seconds instead of hanging the run."""
    try:
        return subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        # subprocess.run kills the child before raising: nothing is left running.
        raise AssertionError(f"the scenario hung (no exit within {timeout} s)") from expired


def request(
    request_id: str, tokens: int = 100, priority: Priority = Priority.NORMAL, payload: Any = None
) -> LLMRequest[Any]:
    return LLMRequest(
        request_id,
        f"payload of {request_id}" if payload is None else payload,
        priority,
        TokenInfo(tokens),
    )


@dataclass
class _Check:
    allowed: bool
    reason: str | None
    available_in: float


@dataclass
class _Bucket:
    used: float
    available: float
    limit: float
    percentage: float


@dataclass
class _Metrics:
    rpm: _Bucket
    tpm: _Bucket


@dataclass
class BookLimiter:
    """A plain-Python `RateLimiter` (not an `LLMThrottle`, so the dispatcher takes its general
    path) whose books are exact: ``tokens[request_id]`` and ``requests[request_id]`` hold what
    the latest reservation of each id holds now. Its clock never moves: nothing refills.

    ``release`` gives a reservation back whole and, as `LLMThrottle.release` does, makes the
    reservation it had superseded under the same id the current one again. ``fail_on`` names
    methods that raise ``RuntimeError`` on their next call (fault injection); ``calls`` counts
    every call by method name.
    """

    token_capacity: float = 1e9
    request_capacity: float = 1e9
    tokens: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    settled_tokens: int = 0
    settled_requests: int = 0
    # id -> the (tokens, requests) of older reservations a newer one under that id superseded
    superseded: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    fail_on: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    # Every key `consume` was called with, failed calls included.
    consume_keys: list[str] = field(default_factory=list)
    strict: bool = False

    def _enter(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method in self.fail_on:
            self.fail_on.discard(method)
            raise RuntimeError(f"injected failure in {method}")

    @property
    def used_tokens(self) -> int:
        return sum(self.tokens.values()) + self.settled_tokens

    @property
    def used_requests(self) -> int:
        return sum(self.requests.values()) + self.settled_requests

    def can_process(self, estimated_tokens: int) -> _Check:
        self._enter("can_process")
        tokens_ok = self.used_tokens + estimated_tokens <= self.token_capacity
        requests_ok = self.used_requests + 1 <= self.request_capacity
        if estimated_tokens > self.token_capacity:
            return _Check(False, "tpm_limit", math.inf)
        if requests_ok and tokens_ok:
            return _Check(True, None, 0.0)
        # Nothing refills: it fits only when a reservation is given back.
        return _Check(False, "rpm_limit" if not requests_ok else "tpm_limit", math.inf)

    def get_metrics(self) -> _Metrics:
        self._enter("get_metrics")
        tokens_left = self.token_capacity - self.used_tokens
        requests_left = self.request_capacity - self.used_requests
        return _Metrics(
            rpm=_Bucket(self.used_requests, requests_left, self.request_capacity, 0.0),
            tpm=_Bucket(self.used_tokens, tokens_left, self.token_capacity, 0.0),
        )

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
        self.consume_keys.append(request_id)
        self._enter("consume")
        if self.used_tokens + estimated_tokens > self.token_capacity:
            return False
        if self.used_requests + 1 > self.request_capacity:
            return False
        # A new reservation under an id already held settles the older one as it stands.
        self._settle(request_id)
        self.tokens[request_id] = estimated_tokens
        self.requests[request_id] = 1
        return True

    def _settle(self, request_id: str) -> None:
        if request_id in self.tokens:
            older = (self.tokens.pop(request_id), self.requests.pop(request_id))
            self.superseded.setdefault(request_id, []).append(older)
            self.settled_tokens += older[0]
            self.settled_requests += older[1]

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self._enter("adjust_consumption")
        if request_id not in self.tokens:
            raise UnknownRequestError(f"no reservation for {request_id!r}")
        if self.strict and actual_tokens > self.tokens[request_id]:
            from llm_queue_dispatcher import RateLimitError

            raise RateLimitError("tpm_limit", 1.0)
        self.tokens[request_id] = actual_tokens

    def release(self, request_id: str) -> None:
        self._enter("release")
        if request_id not in self.tokens:
            raise UnknownRequestError(f"no reservation for {request_id!r}")
        del self.tokens[request_id]
        del self.requests[request_id]
        older = self.superseded.get(request_id)
        if older:
            tokens, requests = older.pop()
            self.settled_tokens -= tokens
            self.settled_requests -= requests
            self.tokens[request_id], self.requests[request_id] = tokens, requests


@dataclass(frozen=True)
class Books:
    """What a limiter, a store and a dispatcher hold at one moment."""

    requests_available: float
    tokens_available: float
    visible: int
    in_flight: int
    active_requests: int


async def books(
    limiter: Any, storage: InMemoryStorage[Any], dispatcher: LLMQueueDispatcher[Any], *, reports: bool = True
) -> Books:
    """The books now; ``reports=False`` reads the counts without the metrics reports (which
    need the store's timestamps to be datetimes)."""
    metrics = limiter.get_metrics()
    if reports:
        attributes = await storage.get_queue_attributes()
        visible = attributes.approximate_number_of_messages
        in_flight = attributes.approximate_number_of_messages_in_flight
        active = (await dispatcher.get_queue_metrics()).processing.active_requests
    else:
        visible, in_flight = storage.core.visible_count(), storage.core.in_flight_count()
        active = dispatcher._core.active
    return Books(
        requests_available=float(metrics.rpm.available),
        tokens_available=float(metrics.tpm.available),
        visible=visible,
        in_flight=in_flight,
        active_requests=active,
    )


def native_limiter(clock: Any, rpm: float = 600.0, tpm: float = 100_000.0, **options: Any) -> LLMThrottle:
    return LLMThrottle(rpm, tpm, clock=clock, **options)


class AsyncThrottle:
    """An `LLMThrottle` behind the four coroutines an `AsyncRateLimiter` must have (no
    `release`), whose consume answers ``consume_latency`` seconds after it took effect (a
    round trip to a shared limiter)."""

    consume_latency = 0.0

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner

    async def can_process(self, tokens: int) -> Any:
        return self.inner.can_process(tokens)

    async def get_metrics(self) -> Any:
        return self.inner.get_metrics()

    async def consume(self, request_id: str, tokens: int, metadata: Any = None) -> bool:
        granted = self.inner.consume(request_id, tokens, metadata)
        await asyncio.sleep(self.consume_latency)
        return granted

    async def adjust_consumption(self, request_id: str, tokens: int) -> None:
        self.inner.adjust_consumption(request_id, tokens)


class AsyncThrottleWithRelease(AsyncThrottle):
    """`AsyncThrottle` with `release`, as `RedisThrottle` has."""

    async def release(self, request_id: str) -> None:
        self.inner.release(request_id)


class FaultyClock:
    """A Python callable clock over a `ManualClock`: ``fail_at(n)`` makes its n-th next reading
    raise (once); ``offset`` shifts every reading; ``on_read`` runs before a chosen reading."""

    def __init__(self, base: ManualClock) -> None:
        self.base = base
        self.reads = 0
        self.offset = 0.0
        self._fail_at: int | None = None
        self._hook_at: int | None = None
        self._hook: Callable[[], None] | None = None

    def fail_at(self, n: int) -> None:
        self._fail_at = self.reads + n

    def disarm(self) -> None:
        self._fail_at = self._hook_at = None

    def hook_at(self, n: int, hook: Callable[[], None]) -> None:
        self._hook_at, self._hook = self.reads + n, hook

    def __call__(self) -> float:
        self.reads += 1
        if self.reads == self._hook_at and self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        if self.reads == self._fail_at:
            self._fail_at = None
            raise OSError("injected clock failure")
        return self.base.now() + self.offset


class Delegating(QueueStorageAdapter[Any]):
    """An external store with only the six required methods (the adapter's defaults for the
    rest: its purge leaves in-flight messages), over an `InMemoryStorage`."""

    def __init__(self, inner: InMemoryStorage[Any]) -> None:
        self.inner = inner

    async def enqueue(self, request: LLMRequest[Any]) -> QueueMessage[Any]:
        return await self.inner.enqueue(request)

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        return await self.inner.dequeue(limit, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        await self.inner.delete_message(receipt_handle)

    async def update_visibility_timeout(self, receipt_handle: str, seconds: float) -> None:
        await self.inner.update_visibility_timeout(receipt_handle, seconds)

    async def get_approximate_message_count(self) -> int:
        return await self.inner.get_approximate_message_count()

    async def peek_messages_by_priority(self, priority: int, limit: int) -> list[QueueMessage[Any]]:
        return await self.inner.peek_messages_by_priority(priority, limit)


class SlowReplyLimiter(AsyncThrottleWithRelease):
    """An asynchronous limiter whose consume takes effect at once and answers 50 ms later (a
    round trip to a shared limiter)."""

    consume_latency = 0.05


class SlowCorrection(SlowReplyLimiter):
    """An asynchronous limiter whose corrections answer 5 ms later."""

    async def consume(self, request_id: str, tokens: int, metadata: Any = None) -> bool:
        return self.inner.consume(request_id, tokens, metadata)

    async def adjust_consumption(self, request_id: str, tokens: int) -> None:
        self.inner.adjust_consumption(request_id, tokens)
        await asyncio.sleep(0.005)


class RenewalFails(Delegating):
    """Renewing the lease of request "stuck" fails with the store's error."""

    def __init__(self, inner: InMemoryStorage[Any]) -> None:
        super().__init__(inner)
        self.stuck: set[str] = set()

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        messages = await super().dequeue(limit, visibility_timeout)
        self.stuck |= {m.attributes.receipt_handle for m in messages if m.payload.id == "stuck"}
        return messages

    async def update_visibility_timeout(self, receipt_handle: str, seconds: float) -> None:
        if receipt_handle in self.stuck and seconds > 0:
            raise StorageError("lease renewal refused")
        await super().update_visibility_timeout(receipt_handle, seconds)
