"""``fair_priority`` at scale: the cost of a dispatch with one tenant and with 100,000.

The worker's round trip (dequeue, acknowledge with the actual count, enqueue a new request) over
an in-memory queue of 200,000 requests spread over ``tenants`` tenants, each with its token use
in the window: every dispatch charges a tenant (it moves behind the others), every mark corrects
a charge, and charges leave the window as the clock advances. The target: with 100,000 tenants
within 3x of one tenant's cost (`make bench`; smoke runs use 1,000 tenants and a shallow queue).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest

from llm_queue_dispatcher import (
    FairPriorityConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    TokenInfo,
    create_fair_priority_queue,
)
from tests.conformance.support import run

ROUNDS = 5_000
WARMUP = 500


def timing(config: pytest.Config) -> bool:
    # `make bench` passes --benchmark-enable on top of the --benchmark-disable of addopts.
    return bool(
        config.getoption("benchmark_enable", default=False)
        or not config.getoption("benchmark_disable", default=True)
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tenants" in metafunc.fixturenames:
        full = timing(metafunc.config)
        metafunc.parametrize("tenants", [1, 100_000] if full else [1, 1_000])
        metafunc.parametrize("depth", [200_000] if full else [2_000])


def workload(tenants: int, seed: int = 7) -> Iterator[LLMRequest[int]]:
    rng = random.Random(seed)
    for i in itertools.count():
        yield LLMRequest(
            id=f"r{i}",
            payload=i,
            priority=rng.choice((0, 1, 1, 2, 2, 2, 3, 3)),
            token_info=TokenInfo(rng.randint(50, 4_000)),
            tenant=f"t{i % tenants}",
        )


@pytest.mark.benchmark(group="fair_priority: dequeue + ack + enqueue, by tenants")
def test_fair_round_trip(benchmark: Any, tenants: int, depth: int) -> None:
    clock = ManualClock(1_700_000_000.0)
    dispatcher = create_fair_priority_queue(
        clock=clock, fair_priority=FairPriorityConfig(fairness_window=60.0)
    )
    source = workload(tenants)
    run(dispatcher.batch_enqueue([next(source) for _ in range(depth)]))
    limiter = LLMThrottle(1e12, 1e15, clock=clock, max_history_records=1_000)
    ahead = iter([next(source) for _ in range(ROUNDS + WARMUP)])

    async def one() -> None:
        clock.advance(0.01)
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed(actual_tokens=job.message.payload.token_info.estimated // 2)
        await dispatcher.enqueue(next(ahead))

    benchmark.pedantic(lambda: run(one()), rounds=ROUNDS, warmup_rounds=WARMUP)
    metrics = run(dispatcher.get_queue_metrics())
    assert metrics.queue.approximate_number_of_messages == depth
