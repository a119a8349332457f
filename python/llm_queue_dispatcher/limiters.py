"""Calling a rate limiter whether its methods are plain (`RateLimiter`, e.g. `LLMThrottle`) or
coroutines (`AsyncRateLimiter`, e.g. `redis.RedisThrottle`), under a delivery's reservation key."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
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


async def reserve(
    limiter: Any, key: str, tokens: int, run_to_end: Callable[[Awaitable[None]], Awaitable[None]]
) -> bool:
    """``limiter.consume(key, tokens)``. Cancelled while an asynchronous consume is on its way (a
    round trip to a shared limiter), the call still completes, and a reservation it made is given
    back by ``run_to_end`` (the dispatcher's, so `close` waits for it): a cancelled dequeue leaves
    nothing taken."""
    result = limiter.consume(key, tokens)
    if not inspect.isawaitable(result):
        return bool(result)
    consumed = asyncio.ensure_future(result)
    try:
        return bool(await asyncio.shield(consumed))
    except asyncio.CancelledError:
        run_to_end(_give_back_if_granted(limiter, key, consumed))
        raise


async def _give_back_if_granted(limiter: Any, key: str, consumed: asyncio.Future[Any]) -> None:
    try:
        granted = await asyncio.shield(consumed)
    except Exception:
        return  # refused with an error: nothing was taken
    if granted:
        try:
            await release_reservation(limiter, key)
        except Exception as error:
            _LOGGER.warning("could not give back the reservation %r of a cancelled dequeue: %r", key, error)


async def release_reservation(limiter: Any, key: str) -> None:
    """Gives an unused reservation back whole: ``release`` where the limiter has it, else
    ``adjust_consumption(key, 0)`` (which refunds the tokens but not the request). A reservation
    the limiter no longer knows has nothing left to give back."""
    method = "release" if callable(getattr(limiter, "release", None)) else "adjust_consumption"
    args = (key,) if method == "release" else (key, 0)
    with contextlib.suppress(UnknownRequestError):
        await call_limiter(limiter, method, *args)
