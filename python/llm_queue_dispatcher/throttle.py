"""The rate limiter: `LLMThrottle` (Rust), its factory, and the `RateLimiter` protocols.

Any object with the `RateLimiter` protocol's four methods can gate a dispatcher; `LLMThrottle`
additionally takes a native fast path in which selection and budget reservation happen in one
Rust call. A limiter whose methods are coroutines (`AsyncRateLimiter`, such as
`llm_queue_dispatcher.redis.RedisThrottle`) works too. Both may offer ``release(request_id)``,
which gives a reservation back whole (its tokens and its request); without it the dispatcher
falls back to ``adjust_consumption(request_id, 0)``, which refunds the tokens only.

`MAX_PROVIDER_WAIT` (one day) bounds every wait a provider can impose on `LLMThrottle`:
``penalize(seconds)`` and the ``Retry-After`` read by ``sync_from_headers`` (a reset beyond it,
a malformed header, is logged; resets hold no bucket down: a header lowers a bucket, which
refills at its own rate).

Besides ``rpm`` and ``tpm``, `LLMThrottle` (and ``RedisThrottle``) take the other limits
providers publish: ``itpm`` and ``otpm`` (input and output tokens per minute), ``rpd`` and
``tpd`` (per day) and ``max_concurrent`` (requests in flight). `can_process`, `consume` and
`adjust_consumption` then take the request's ``input_tokens`` and ``output_tokens`` as keyword
arguments; the four-method protocols below stay what a dispatcher needs of any limiter.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol, runtime_checkable

from ._checks import shown
from ._core import (
    MAX_PROVIDER_WAIT,
    BucketMetrics,
    BucketState,
    CompensationMetrics,
    ConsumptionRecord,
    ConsumptionStatistics,
    LLMThrottle,
    MemoryMetrics,
    RateLimitCheckResult,
    RateLimitMetrics,
    StateSnapshot,
)
from .errors import InvalidRequestError

__all__ = [
    "MAX_PROVIDER_WAIT",
    "AdjustmentFailureStrategy",
    "AsyncRateLimiter",
    "BucketMetrics",
    "BucketState",
    "CompensationMetrics",
    "ConsumptionRecord",
    "ConsumptionStatistics",
    "LLMThrottle",
    "MemoryMetrics",
    "RateLimitCheckResult",
    "RateLimitMetrics",
    "RateLimiter",
    "StateSnapshot",
    "create_llm_throttle",
]

AdjustmentFailureStrategy = Literal["strict", "warn", "compensate"]


@runtime_checkable
class RateLimiter(Protocol):
    """What a dispatcher needs from a rate limiter (`LLMThrottle` is one)."""

    def can_process(self, estimated_tokens: int) -> RateLimitCheckResult:
        """Whether a request of ``estimated_tokens`` would be admitted now, and if not, when."""
        ...

    def get_metrics(self) -> RateLimitMetrics:
        """Current use; the dispatcher reads ``.tpm.available`` and ``.tpm.limit``."""
        ...

    def consume(self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None) -> bool:
        """Takes one request and ``estimated_tokens``, all or nothing."""
        ...

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        """Corrects the tokens taken for ``request_id`` to ``actual_tokens``."""
        ...


@runtime_checkable
class AsyncRateLimiter(Protocol):
    """The `RateLimiter` protocol with coroutine methods: a limiter shared through a server."""

    async def can_process(self, estimated_tokens: int) -> Any:
        """Like `RateLimiter.can_process`: ``.allowed``, ``.reason``, ``.available_in``."""
        ...

    async def get_metrics(self) -> Any:
        """Like `RateLimiter.get_metrics`: ``.tpm.available``, ``.tpm.limit``, ``.rpm``."""
        ...

    async def consume(
        self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None
    ) -> bool:
        """Takes one request and ``estimated_tokens``, all or nothing."""
        ...

    async def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        """Corrects the tokens taken for ``request_id`` to ``actual_tokens``."""
        ...


_LIMITER_METHODS = ("can_process", "get_metrics", "consume", "adjust_consumption")


def check_rate_limiter(limiter: object, name: str = "rate_limiter") -> None:
    """Raises `InvalidRequestError` naming ``name`` unless ``limiter`` has the four methods of
    the `RateLimiter` protocol, plain or coroutines (`AsyncRateLimiter`): checked at the door, so
    a wrong object (a limiter class instead of a limiter, for one) fails before anything is
    selected or taken, not with an `AttributeError` or a `TypeError` half-way."""
    if type(limiter) is LLMThrottle:
        return
    # A class (``LLMThrottle`` itself, not one built from it) has the four methods too, unbound:
    # the first call would raise `TypeError` half-way through a dispatch.
    if isinstance(limiter, type) or not all(
        callable(getattr(limiter, method, None)) for method in _LIMITER_METHODS
    ):
        raise InvalidRequestError(
            f"{name} must be a RateLimiter or an AsyncRateLimiter (can_process, get_metrics, consume "
            f"and adjust_consumption), got {shown(limiter)}"
        )


def create_llm_throttle(
    *,
    rpm: float,
    tpm: float,
    burst_rpm: float | None = None,
    burst_tpm: float | None = None,
    itpm: float | None = None,
    otpm: float | None = None,
    burst_itpm: float | None = None,
    burst_otpm: float | None = None,
    rpd: float | None = None,
    tpd: float | None = None,
    max_concurrent: int | None = None,
    clock: Any = None,
    adjustment_failure_strategy: AdjustmentFailureStrategy = "compensate",
    max_history_records: int = 10_000,
    history_retention: float = 60.0,
    efficiency_window_size: int = 50,
    logger: logging.Logger | None = None,
) -> LLMThrottle:
    """An `LLMThrottle` from keyword arguments (the same defaults and checks).

    >>> from llm_queue_dispatcher import ManualClock, create_llm_throttle
    >>> throttle = create_llm_throttle(rpm=60, tpm=10_000, clock=ManualClock())
    >>> throttle.consume("req-1", 4_000)
    True
    >>> throttle.can_process(7_000).available_in   # 1,000 tokens short at 10,000 / 60 per second
    6.0

    Anthropic's limits, input and output tokens apart:

    >>> claude = create_llm_throttle(rpm=50, tpm=36_000, itpm=30_000, otpm=6_000, clock=ManualClock())
    >>> claude.consume("req-2", 7_000, input_tokens=3_000, output_tokens=4_000)
    True
    >>> check = claude.can_process(6_000, input_tokens=1_000, output_tokens=5_000)
    >>> check.reason, check.available_in   # 3,000 output tokens short at 6,000 / 60 per second
    ('otpm_limit', 30.0)
    """
    return LLMThrottle(
        rpm,
        tpm,
        burst_rpm=burst_rpm,
        burst_tpm=burst_tpm,
        itpm=itpm,
        otpm=otpm,
        burst_itpm=burst_itpm,
        burst_otpm=burst_otpm,
        rpd=rpd,
        tpd=tpd,
        max_concurrent=max_concurrent,
        clock=clock,
        adjustment_failure_strategy=adjustment_failure_strategy,
        max_history_records=max_history_records,
        history_retention=history_retention,
        efficiency_window_size=efficiency_window_size,
        logger=logger,
    )
