"""Helpers of the policy tests: a plain-Python rate limiter, a virtual-time event loop, and
dispatchers over the two kinds of store."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from llm_queue_dispatcher import (
    FairPriorityConfig,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    QueueStorageAdapter,
    TokenInfo,
)
from tests.dispatcher.support import CountingLimiter
from tests.reference.storage import ReferenceStorage

T = TypeVar("T")

Store = Literal["memory", "external"]
Limiter = Literal["native", "python"]

#: The longest visibility: nothing handed out becomes visible again during a test.
LONG_VISIBILITY = 43_200.0


#: A plain-Python `RateLimiter` counting its calls: the dispatcher's non-native path.
PythonLimiter = CountingLimiter


def limiter_for(kind: Limiter, inner: LLMThrottle) -> Any:
    return inner if kind == "native" else PythonLimiter(inner)


def at(seconds: float) -> datetime:
    """The instant ``seconds`` of a `ManualClock` as a `datetime` (seconds since the epoch)."""
    return datetime.fromtimestamp(seconds, timezone.utc)


def request(
    request_id: str,
    *,
    tenant: str | None = None,
    priority: Priority | int = Priority.NORMAL,
    tokens: int = 100,
    deadline: float | None = None,
) -> LLMRequest[str]:
    return LLMRequest(
        id=request_id,
        payload=f"payload of {request_id}",
        priority=priority,
        token_info=TokenInfo(tokens),
        tenant=tenant,
        deadline=None if deadline is None else at(deadline),
    )


def make_store(kind: Store, clock: ManualClock, dead_letter: bool = False) -> QueueStorageAdapter[Any]:
    if kind == "memory":
        return InMemoryStorage(clock=clock, dead_letter=InMemoryStorage(clock=clock) if dead_letter else None)
    return ReferenceStorage(clock=clock, dead_letter=ReferenceStorage(clock=clock) if dead_letter else None)


def make_dispatcher(
    store: QueueStorageAdapter[Any],
    clock: ManualClock,
    *,
    policy: str = "score",
    fair: FairPriorityConfig | None = None,
    **config: Any,
) -> LLMQueueDispatcher[Any]:
    config.setdefault("visibility_timeout", LONG_VISIBILITY)
    config.setdefault("buffer_size", 100)
    return LLMQueueDispatcher(
        store, LLMQueueDispatcherConfig(clock=clock, policy=policy, fair_priority=fair, **config)
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Virtual time.
# ------------------------------------------------------------------------------------------------


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time is a `ManualClock`: with nothing ready to run, it moves the
    clock to its next timer instead of sleeping. Every sleep of a dispatcher under test then
    takes no real time, lands exactly on the instant it asked for, and is counted in `jumps`
    (a poll would show as many jumps)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.jumps: list[float] = []
        selector = self._selector  # type: ignore[attr-defined]
        real_select = selector.select

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            events: list[tuple[selectors.SelectorKey, int]] = real_select(0)
            if events or (timeout is not None and timeout <= 0):
                return events
            pending = [h.when() for h in self._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            if not pending:
                raise RuntimeError("virtual time: the loop would wait forever (nothing scheduled)")
            when = min(pending)
            if when > clock.now():
                self.jumps.append(when - clock.now())
                clock.set(when)
            return []

        selector.select = select

    def time(self) -> float:
        return self.clock.now()


def run_virtual(clock: ManualClock, main: Callable[[VirtualTimeLoop], Awaitable[T]]) -> T:
    """Runs ``main(loop)`` on a `VirtualTimeLoop` over ``clock``."""
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()
