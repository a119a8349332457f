"""Waking waiting dequeues when something changes, without polling."""

from __future__ import annotations

import asyncio

from ._core import DispatchCore

__all__ = ["Wakeup"]

# Longest single sleep while waiting with nothing scheduled to change: a guard against a clock
# that differs from the event loop's (a wall clock stepped back), never a polling interval.
_MAX_SLEEP = 3600.0


class Wakeup:
    """Wakes waiting dequeues when something changes (an enqueue, a mark, a purge).

    The dispatcher's core counts changes (its ``version``, moved by every transition of its
    books) and calls `wake` when it has waiters to wake; an enqueue `notify`s here. The version
    closes the race between looking and sleeping: a wait that starts after a change it has not
    seen returns at once. Futures are made in the running loop at each wait, so one dispatcher
    can serve several event loops one after the other.
    """

    def __init__(self, core: DispatchCore) -> None:
        self._core = core
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def version(self) -> int:
        return self._core.version

    def notify(self) -> None:
        """A change made outside the core (an enqueue)."""
        self._core.bump()
        if self._waiters:
            self.wake()

    def wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
        self._waiters.clear()
        self._core.waiting = 0

    async def wait(self, seen: int, timeout: float) -> None:
        """Sleeps until a change after version ``seen``, or ``timeout`` seconds. A cancellation
        propagates at once and changes nothing."""
        if self._core.version != seen or timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.add(waiter)
        self._core.waiting = len(self._waiters)
        timer = loop.call_later(min(timeout, _MAX_SLEEP), _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)
            self._core.waiting = len(self._waiters)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
