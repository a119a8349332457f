"""Calling a rate limiter whether its methods are plain (`RateLimiter`, e.g. `LLMThrottle`) or
coroutines (`AsyncRateLimiter`, e.g. `redis.RedisThrottle`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import UnknownRequestError

_LOGGER = logging.getLogger("llm_queue_dispatcher")

__all__ = ["call_limiter", "release_reservation", "reserve", "start_release"]


async def call_limiter(limiter: Any, method: str, *args: Any) -> Any:
    """``limiter.method(*args)``, awaited when the limiter's method is a coroutine."""
    result = getattr(limiter, method)(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def reserve(
    limiter: Any,
    request_id: str,
    tokens: int,
    track: Callable[[asyncio.Future[Any]], None] | None = None,
) -> bool:
    """``limiter.consume(request_id, tokens)``. Cancelled while an asynchronous consume is on
    its way (a round trip to a shared limiter), the call still completes, in the background,
    and a reservation it made is given back: a cancelled dequeue leaves nothing taken. That
    background step is handed to ``track`` (the dispatcher's, so `close` waits for it)."""
    result = limiter.consume(request_id, tokens)
    if not inspect.isawaitable(result):
        return bool(result)
    consumed = asyncio.ensure_future(result)
    try:
        return bool(await asyncio.shield(consumed))
    except asyncio.CancelledError:
        give_back = asyncio.ensure_future(_give_back_if_granted(limiter, request_id, consumed))
        (track or _keep)(give_back)
        raise


#: Background steps nobody tracks, referenced until they finish.
_UNTRACKED: set[asyncio.Future[Any]] = set()


def _keep(task: asyncio.Future[Any]) -> None:
    _UNTRACKED.add(task)
    task.add_done_callback(_UNTRACKED.discard)


async def _give_back_if_granted(limiter: Any, request_id: str, consumed: asyncio.Future[Any]) -> None:
    try:
        granted = await asyncio.shield(consumed)
    except Exception:
        return  # refused with an error: nothing was taken
    if not granted:
        return
    try:
        await release_reservation(limiter, request_id)
    except Exception as error:
        _LOGGER.warning("could not give back the reservation of cancelled request %r: %r", request_id, error)


async def release_reservation(limiter: Any, request_id: str) -> None:
    """Gives an unused reservation back whole: ``release`` where the limiter has it, else
    ``adjust_consumption(request_id, 0)`` (which refunds the tokens but not the request). A
    reservation the limiter no longer knows has nothing left to give back."""
    method = "release" if callable(getattr(limiter, "release", None)) else "adjust_consumption"
    args = (request_id,) if method == "release" else (request_id, 0)
    with contextlib.suppress(UnknownRequestError):
        await call_limiter(limiter, method, *args)


def start_release(limiter: Any, request_id: str) -> Awaitable[None] | None:
    """`release_reservation` begun at once: a plain limiter has given the reservation back when
    this returns (None); an asynchronous one's answer is the awaitable returned (its unknown
    request errors suppressed, as above)."""
    method = "release" if callable(getattr(limiter, "release", None)) else "adjust_consumption"
    args = (request_id,) if method == "release" else (request_id, 0)
    try:
        result = getattr(limiter, method)(*args)
    except UnknownRequestError:
        return None
    if not inspect.isawaitable(result):
        return None
    return _suppress_unknown(result)


async def _suppress_unknown(answer: Awaitable[Any]) -> None:
    with contextlib.suppress(UnknownRequestError):
        await answer
