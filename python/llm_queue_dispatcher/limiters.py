"""Calling a rate limiter whether its methods are plain (`RateLimiter`, e.g. `LLMThrottle`) or
coroutines (`AsyncRateLimiter`, e.g. `redis.RedisThrottle`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any

from .errors import UnknownRequestError

_LOGGER = logging.getLogger("llm_queue_dispatcher")

__all__ = ["call_limiter", "release_reservation", "reserve"]


async def call_limiter(limiter: Any, method: str, *args: Any) -> Any:
    """``limiter.method(*args)``, awaited when the limiter's method is a coroutine."""
    result = getattr(limiter, method)(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def reserve(limiter: Any, request_id: str, tokens: int) -> bool:
    """``limiter.consume(request_id, tokens)``. Cancelled while an asynchronous consume is on
    its way (a round trip to a shared limiter), the call still completes, in the background,
    and a reservation it made is given back: a cancelled dequeue leaves nothing taken."""
    result = limiter.consume(request_id, tokens)
    if not inspect.isawaitable(result):
        return bool(result)
    consumed = asyncio.ensure_future(result)
    try:
        return bool(await asyncio.shield(consumed))
    except asyncio.CancelledError:
        consumed.add_done_callback(lambda done: _release_if_granted(limiter, request_id, done))
        raise


#: Releases started from callbacks, referenced until they finish.
_RELEASES: set[asyncio.Task[None]] = set()


def _release_if_granted(limiter: Any, request_id: str, consumed: asyncio.Future[Any]) -> None:
    if consumed.cancelled() or consumed.exception() is not None or not consumed.result():
        return
    release = asyncio.ensure_future(release_reservation(limiter, request_id))
    _RELEASES.add(release)

    def finished(task: asyncio.Task[None]) -> None:
        _RELEASES.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.warning(
                "could not give back the reservation of cancelled request %r: %r",
                request_id,
                task.exception(),
            )

    release.add_done_callback(finished)


async def release_reservation(limiter: Any, request_id: str) -> None:
    """Gives an unused reservation back whole: ``release`` where the limiter has it, else
    ``adjust_consumption(request_id, 0)`` (which refunds the tokens but not the request). A
    reservation the limiter no longer knows has nothing left to give back."""
    method = "release" if callable(getattr(limiter, "release", None)) else "adjust_consumption"
    args = (request_id,) if method == "release" else (request_id, 0)
    with contextlib.suppress(UnknownRequestError):
        await call_limiter(limiter, method, *args)
