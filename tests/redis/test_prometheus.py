"""`llm_queue_dispatcher.prometheus` over a shared `RedisThrottle`: each limit it keeps is
reported as an `LLMThrottle` with the same limits reports it."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llm_queue_dispatcher import LLMThrottle, ManualClock, create_in_memory_queue
from llm_queue_dispatcher.prometheus import QueueCollector
from tests.redis.conftest import START, fresh_name
from tests.redis.support import ClockedRedisThrottle, RedisServer

LIMITS: dict[str, Any] = {"itpm": 30_000, "otpm": 8_000, "rpd": 1_000, "tpd": 2_000_000, "max_concurrent": 4}


def limit_samples(body: bytes) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("llmqd_limiter_limit_"):
                out[(sample.name, sample.labels["limit"])] = sample.value
    return out


async def test_a_shared_limiter_reports_each_limit_as_the_local_one(shared_server: RedisServer) -> None:
    clock = ManualClock(START)
    local = LLMThrottle(60, 40_000, clock=clock, logger=logging.getLogger("quiet"), **LIMITS)
    shared = ClockedRedisThrottle(
        shared_server.url, fresh_name("prometheus-limits"), rpm=60, tpm=40_000, clock=clock, **LIMITS
    )
    try:
        assert local.consume("a", 1_200, input_tokens=1_000, output_tokens=200)
        assert await shared.consume("a", 1_200, input_tokens=1_000, output_tokens=200)
        bodies = []
        for limiter in (local, shared):
            collector = QueueCollector()
            collector.watch(create_in_memory_queue(clock=clock), limiter, queue="q")
            bodies.append((await collector.render())[0])
        want, got = (limit_samples(body) for body in bodies)
        assert {limit for _, limit in want} == {"rpm", "tpm", "itpm", "otpm", "rpd", "tpd", "concurrency"}
        assert got == want
        assert want[("llmqd_limiter_limit_available", "otpm")] == 7_800
        assert want[("llmqd_limiter_limit_available", "concurrency")] == 3
    finally:
        await shared.aclose()
