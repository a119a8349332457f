"""The factories: aliases, preset weights and settings, overrides, the in-memory store's clock."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    Priority,
    ScoringConfig,
    ScoringWeights,
    create_fair_llm_queue_dispatcher,
    create_fair_queue,
    create_in_memory_llm_queue_dispatcher,
    create_in_memory_queue,
    create_llm_queue_dispatcher,
    create_prefetching_llm_queue_dispatcher,
    create_prefetching_queue,
    create_simple_priority_llm_queue_dispatcher,
    create_simple_priority_queue,
    create_throughput_optimized_llm_queue_dispatcher,
    create_throughput_optimized_queue,
)
from llm_queue_dispatcher.config import DEFAULT_SLO_TARGETS
from tests.dispatcher.support import request, throttle


def test_factory_aliases_are_the_same_functions() -> None:
    assert create_in_memory_queue is create_in_memory_llm_queue_dispatcher
    assert create_prefetching_llm_queue_dispatcher is create_prefetching_queue
    assert create_simple_priority_llm_queue_dispatcher is create_simple_priority_queue
    assert create_throughput_optimized_llm_queue_dispatcher is create_throughput_optimized_queue
    assert create_fair_llm_queue_dispatcher is create_fair_queue


async def observed_weights(dispatcher: LLMQueueDispatcher[Any], clock: ManualClock) -> tuple[float, ...]:
    """The six weights, read back from the breakdown of a probe message whose factors are all
    exactly 1 except token fit (0.88 at u = 0.8)."""
    await dispatcher.enqueue(request("probe", Priority.URGENT, tokens=8_000, ept=0.5))
    clock.advance(10.0)  # URGENT waits at most 10 s: wait factor 1
    job = await dispatcher.dequeue(throttle(clock, tpm=10_000))
    assert job is not None
    b = job.score.breakdown
    return (
        b["priority"],
        b["efficiency"],
        b["wait_time"],
        b["retry"],
        b["token_fit"] / 0.88,
        b["processing_time"],
    )


PRESETS = [
    (create_llm_queue_dispatcher, (0.25, 0.20, 0.20, 0.10, 0.15, 0.10)),
    (create_prefetching_queue, (0.25, 0.20, 0.20, 0.10, 0.15, 0.10)),
    (create_simple_priority_queue, (0.8, 0.05, 0.1, 0.05, 0.0, 0.0)),
    (create_throughput_optimized_queue, (0.15, 0.35, 0.1, 0.05, 0.25, 0.1)),
    (create_fair_queue, (0.2, 0.1, 0.5, 0.15, 0.05, 0.0)),
]


@pytest.mark.parametrize(("factory", "weights"), PRESETS, ids=[f.__name__ for f, _ in PRESETS])
async def test_factory_preset_weights(clock: ManualClock, factory: Any, weights: tuple[float, ...]) -> None:
    dispatcher = factory(InMemoryStorage(clock=clock), clock=clock)
    assert await observed_weights(dispatcher, clock) == pytest.approx(weights, abs=1e-12)


async def test_in_memory_factory_uses_default_weights(clock: ManualClock) -> None:
    observed = await observed_weights(create_in_memory_queue(clock=clock), clock)
    assert observed == pytest.approx((0.25, 0.20, 0.20, 0.10, 0.15, 0.10), abs=1e-12)


def test_factory_preset_settings(clock: ManualClock) -> None:
    prefetching = create_prefetching_queue(InMemoryStorage(clock=clock), clock=clock).config
    assert (prefetching.enable_prefetch, prefetching.buffer_size, prefetching.prefetch_interval) == (
        True,
        100,
        5.0,
    )
    throughput = create_throughput_optimized_queue(InMemoryStorage(clock=clock), clock=clock).config
    assert (throughput.enable_prefetch, throughput.buffer_size, throughput.max_candidates_to_evaluate) == (
        True,
        200,
        50,
    )
    plain = create_llm_queue_dispatcher(InMemoryStorage(clock=clock)).config
    assert (plain.enable_prefetch, plain.buffer_size, plain.max_candidates_to_evaluate) == (False, 50, 20)


async def test_explicit_config_and_overrides_win_over_presets(clock: ManualClock) -> None:
    mine = ScoringWeights(0.1, 0.2, 0.3, 0.1, 0.2, 0.1)
    dispatcher = create_simple_priority_queue(
        InMemoryStorage(clock=clock),
        LLMQueueDispatcherConfig(clock=clock, scoring=ScoringConfig(weights=mine)),
    )
    assert await observed_weights(dispatcher, clock) == pytest.approx(mine.as_tuple(), abs=1e-12)
    prefetching = create_prefetching_queue(InMemoryStorage(clock=clock), clock=clock, buffer_size=7)
    assert (prefetching.config.buffer_size, prefetching.config.enable_prefetch) == (7, True)
    throughput = create_throughput_optimized_queue(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock, max_candidates_to_evaluate=5)
    )
    assert throughput.config.max_candidates_to_evaluate == 5


def test_overrides_win_over_config_and_leave_it_untouched(clock: ManualClock) -> None:
    config = LLMQueueDispatcherConfig(clock=clock, buffer_size=10, visibility_timeout=60.0)
    dispatcher = create_llm_queue_dispatcher(InMemoryStorage(clock=clock), config, buffer_size=20)
    assert dispatcher.config.buffer_size == 20
    assert dispatcher.config.visibility_timeout == 60.0
    assert config.buffer_size == 10
    in_memory = create_in_memory_queue(config, min_score_threshold=0.0)
    assert in_memory.config.min_score_threshold == 0.0
    assert in_memory.config.buffer_size == 10


async def test_a_change_to_one_dispatchers_config_never_reaches_a_dispatcher_built_later(
    clock: ManualClock,
) -> None:
    """Each factory call builds its dispatcher from fresh defaults: the SLO targets dict of one
    dispatcher's config is its own, so changing it cannot change another's targets."""
    first = create_in_memory_queue(clock=clock)
    first.config.slo_targets["URGENT"] = 99.0
    later = create_in_memory_queue(clock=clock, visibility_timeout=3_600.0)
    assert later.config.slo_targets == DEFAULT_SLO_TARGETS
    await later.enqueue(request("u", Priority.URGENT))
    clock.advance(5.0)  # past URGENT's default target of 1 s, within 99 s
    assert await later.dequeue(throttle(clock)) is not None
    urgent = (await later.get_queue_metrics()).scheduling.slo_attainment["URGENT"]
    assert (urgent.target, urgent.dispatched, urgent.met) == (1.0, 1, 0)
    assert LLMQueueDispatcherConfig().slo_targets == DEFAULT_SLO_TARGETS


async def test_in_memory_factory_store_shares_the_config_clock(clock: ManualClock) -> None:
    dispatcher = create_in_memory_queue(LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0))
    message = await dispatcher.enqueue(request("a"))
    assert message.attributes.enqueued_at.timestamp() == clock.now()
    limiter = throttle(clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.attributes.first_received_at == datetime.fromtimestamp(clock.now(), timezone.utc)
    clock.advance(29.5)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(1.0)  # only the manual clock moved: the lease ran out on it
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.attributes.receive_count == 2


async def test_in_memory_factory_accepts_a_plain_callable_clock() -> None:
    now = [1_700_000_000.0]
    dispatcher = create_in_memory_queue(clock=lambda: now[0])
    message = await dispatcher.enqueue(request("a"))
    assert message.attributes.enqueued_at.timestamp() == 1_700_000_000.0
    now[0] += 42.0
    q = (await dispatcher.get_queue_metrics()).queue
    assert q.oldest_message_age == pytest.approx(42.0)
