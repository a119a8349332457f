"""The doors outside the core: an int too large for a float, a bool, a
non-number or a non-finite value gets the library's typed error (never `OverflowError` or
`TypeError`) from the Worker, the Redis limiter, the Prometheus collector and the demo engine.
The Redis limiter checks its arguments before any I/O, so no server is needed."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMThrottle,
    ManualClock,
    Worker,
)
from llm_queue_dispatcher.demo.engine import DemoEngine
from llm_queue_dispatcher.prometheus import QueueCollector
from llm_queue_dispatcher.redis import RedisThrottle

HOSTILE: list[Any] = [10**400, -(10**400), float("nan"), float("inf"), True, "1", None, [1]]


async def _handler(job: Any) -> None:
    return None


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("option", ["shutdown_grace", "max_retry_delay", "retry_base_delay"])
def test_worker_numbers(option: str, value: Any) -> None:
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock()))
    with pytest.raises(InvalidConfigError, match=option):
        Worker(dispatcher, LLMThrottle(60, 1000), _handler, **{option: value})


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("option", ["rpm", "tpm", "burst_rpm", "burst_tpm"])
def test_redis_throttle_numbers(option: str, value: Any) -> None:
    if value is None and option.startswith("burst"):
        return  # None means "no burst above the rate"
    figures: dict[str, Any] = {"rpm": 60, "tpm": 1000, option: value}
    with pytest.raises(InvalidConfigError, match=option):
        RedisThrottle("redis://127.0.0.1:1", "q", **figures)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_concurrent", 2**64),
        ("max_concurrent", 10**400),
        ("max_history_records", 2**64),
        ("max_history_records", 10**400),
        ("logger", 5),
        ("logger", "llm_queue_dispatcher"),
    ],
    ids=repr,
)
def test_redis_throttle_refuses_the_options_llm_throttle_refuses(option: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=option):
        LLMThrottle(60, 1000, **{option: value})
    with pytest.raises(InvalidConfigError, match=option):
        RedisThrottle("redis://127.0.0.1:1", "q", rpm=60, tpm=1000, **{option: value})


# A wait longer than any (10**400, inf) is a day for both limiters (tests/redis/test_throttle.py):
# not an error.
@pytest.mark.parametrize("value", [v for v in [*HOSTILE, -1] if v not in (10**400, float("inf"))], ids=repr)
async def test_redis_throttle_penalize(value: Any) -> None:
    throttle = RedisThrottle("redis://127.0.0.1:1", "q", rpm=60, tpm=1000)
    with pytest.raises(InvalidRequestError, match="seconds"):
        await throttle.penalize(value)


@pytest.mark.parametrize("value", [5, "x", [("a", 1)], True, object(), float("nan")], ids=repr)
@pytest.mark.parametrize("method", ["consume", "consume_or_raise"])
async def test_redis_throttle_metadata_must_be_a_mapping(method: str, value: Any) -> None:
    throttle = RedisThrottle("redis://127.0.0.1:1", "q", rpm=60, tpm=1000)
    with pytest.raises(InvalidRequestError, match="metadata must be None or a mapping"):
        await getattr(throttle, method)("a", 1, value)


@pytest.mark.parametrize("value", [*HOSTILE, 0, -1])
async def test_prometheus_interval(value: Any) -> None:
    with pytest.raises(InvalidConfigError, match="interval"):
        QueueCollector().start(value)


@pytest.mark.parametrize("value", [*HOSTILE, 0, 101])
def test_demo_speed(value: Any) -> None:
    with pytest.raises(InvalidConfigError, match="speed"):
        DemoEngine(speed=value)
