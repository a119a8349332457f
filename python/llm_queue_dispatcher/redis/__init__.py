"""One queue and one RPM/TPM budget shared by many processes and hosts, through Redis.

``pip install 'llm-queue-dispatcher[redis]'``, then::

    from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

    storage = RedisStorage("redis://localhost:6379/0", "chat", max_receive_count=5, dead_letter="chat-dead")
    limiter = RedisThrottle("redis://localhost:6379/0", "openai-gpt-4o", rpm=500, tpm=200_000)

Both run each operation as one Lua script on the server's clock; see `RedisStorage` and
`RedisThrottle`, and the README's "Many processes and hosts: Redis".
"""

from __future__ import annotations

try:
    import redis as _redis  # noqa: F401  (the optional dependency: fail early with a clear message)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llm_queue_dispatcher.redis needs the redis package: pip install 'llm-queue-dispatcher[redis]'"
    ) from exc

from .storage import RedisStorage
from .throttle import (
    MAX_PROVIDER_WAIT,
    BucketUsage,
    CompensationUsage,
    HistoryUsage,
    RateLimitCheck,
    RedisThrottle,
    SharedRateLimitMetrics,
)

__all__ = [
    "MAX_PROVIDER_WAIT",
    "BucketUsage",
    "CompensationUsage",
    "HistoryUsage",
    "RateLimitCheck",
    "RedisStorage",
    "RedisThrottle",
    "SharedRateLimitMetrics",
]
