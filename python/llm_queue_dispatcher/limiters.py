"""Calling a rate limiter whether its methods are plain (`RateLimiter`, e.g. `LLMThrottle`) or
coroutines (`AsyncRateLimiter`, e.g. `redis.RedisThrottle`)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from .errors import UnknownRequestError

__all__ = ["call_limiter", "release_reservation"]


async def call_limiter(limiter: Any, method: str, *args: Any) -> Any:
    """``limiter.method(*args)``, awaited when the limiter's method is a coroutine."""
    result = getattr(limiter, method)(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def release_reservation(limiter: Any, request_id: str) -> None:
    """Gives an unused reservation back whole: ``release`` where the limiter has it, else
    ``adjust_consumption(request_id, 0)`` (which refunds the tokens but not the request). A
    reservation the limiter no longer knows has nothing left to give back."""
    method = "release" if callable(getattr(limiter, "release", None)) else "adjust_consumption"
    args = (request_id,) if method == "release" else (request_id, 0)
    with contextlib.suppress(UnknownRequestError):
        await call_limiter(limiter, method, *args)
