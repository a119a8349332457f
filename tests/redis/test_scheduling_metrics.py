"""`get_queue_metrics().scheduling` over `RedisStorage`: each process measures its own dispatches
(SLO attainment and the binding limit are per dispatcher), with `LLMThrottle` and `RedisThrottle`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
)
from tests.redis.support import ClockedRedisStorage, ClockedRedisThrottle


def request(name: str, priority: Priority = Priority.NORMAL, tokens: int = 100) -> LLMRequest[Any]:
    return LLMRequest(name, name, priority, TokenInfo(tokens))


async def test_slo_attainment_and_the_binding_limit_over_redis_storage(
    clocked_storage: Callable[..., ClockedRedisStorage[Any]], clock: ManualClock
) -> None:
    config = LLMQueueDispatcherConfig(clock=clock, slo_targets={"URGENT": 1.0}, visibility_timeout=3_600.0)
    limiter = LLMThrottle(600, 1_000, clock=clock)
    async with LLMQueueDispatcher(clocked_storage(), config) as dispatcher:
        await dispatcher.batch_enqueue([request("u", Priority.URGENT, 900), request("n", tokens=900)])
        clock.advance(0.5)
        urgent = await dispatcher.dequeue(limiter)
        assert urgent is not None
        assert urgent.message.payload.id == "u"
        assert await dispatcher.dequeue(limiter) is None  # 100 tokens left
        assert (await dispatcher.get_queue_metrics()).scheduling.binding_limit == "TPM"
        clock.advance(60.0)
        normal = await dispatcher.dequeue(limiter)
        assert normal is not None
        scheduling = (await dispatcher.get_queue_metrics()).scheduling
        assert scheduling.slo_attainment["URGENT"].attainment == 1.0
        assert (scheduling.slo_attainment["NORMAL"].dispatched, scheduling.slo_attainment["NORMAL"].met) == (
            1,
            1,
        )
        assert scheduling.waited_by_limit["TPM"] == 1
        await urgent.mark_as_processed()
        await normal.mark_as_processed()


async def test_a_redis_throttles_refusal_names_the_binding_limit(
    clocked_storage: Callable[..., ClockedRedisStorage[Any]],
    clocked_throttle: Callable[..., ClockedRedisThrottle],
    clock: ManualClock,
) -> None:
    config = LLMQueueDispatcherConfig(clock=clock, visibility_timeout=3_600.0)
    limiter = clocked_throttle(rpm=1, tpm=100_000)
    async with LLMQueueDispatcher(clocked_storage(), config) as dispatcher:
        await dispatcher.batch_enqueue([request("a"), request("b")])
        first = await dispatcher.dequeue(limiter)
        assert first is not None
        assert await dispatcher.dequeue(limiter) is None
        assert (await dispatcher.get_queue_metrics()).scheduling.binding_limit == "RPM"
        clock.advance(60.0)
        second = await dispatcher.dequeue(limiter)
        assert second is not None
        scheduling = (await dispatcher.get_queue_metrics()).scheduling
        assert (scheduling.binding_limit, scheduling.waited_by_limit["RPM"]) == ("RPM", 1)
        await first.mark_as_processed()
        await second.mark_as_processed()
