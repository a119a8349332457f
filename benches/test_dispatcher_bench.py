"""Dispatcher benchmarks: the round trip a worker makes, the synchronous core under it, enqueue,
custom scorers, and the Rust scoring engine's throughput.

Run as smoke tests by default (timing disabled, small depths); ``make bench`` turns timing on and
runs the depths 1k, 100k and 1M. The workload mixes priorities and token estimates of 50-4,000;
a quarter of the requests carry an explicit expected processing time.

The in-memory path never suspends, so the coroutines are driven with `send(None)` (as the
conformance suite does, which also proves they do not suspend) rather than through an event
loop's `run_until_complete`, whose own cost per call would swamp what is measured.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    QueueMessage,
    ScoringConfig,
    ScoringContext,
    TokenInfo,
    create_in_memory_queue,
)
from tests.conformance.support import run

ROUNDS = 2_000
WARMUP = 100


def depths(config: pytest.Config) -> list[int]:
    # `make bench` passes --benchmark-enable on top of the --benchmark-disable of addopts.
    timing = config.getoption("benchmark_enable", default=False) or not config.getoption(
        "benchmark_disable", default=True
    )
    return [1_000, 100_000, 1_000_000] if timing else [1_000]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "depth" in metafunc.fixturenames:
        metafunc.parametrize("depth", depths(metafunc.config))


def workload(prefix: str, seed: int = 7) -> Iterator[LLMRequest[int]]:
    rng = random.Random(seed)
    for i in itertools.count():
        explicit = rng.random() < 0.25
        yield LLMRequest(
            id=f"{prefix}{i}",
            payload=i,
            priority=rng.choice((0, 1, 2, 2, 2, 2, 2, 3, 3)),
            token_info=TokenInfo(rng.randint(50, 4_000)),
            expected_processing_time=rng.uniform(0.5, 40.0) if explicit else None,
        )


def filled(depth: int, config: LLMQueueDispatcherConfig | None = None) -> tuple[LLMQueueDispatcher[int], Any]:
    """A dispatcher holding ``depth`` requests, a limiter that never refuses, and a clock."""
    clock = ManualClock(1_700_000_000.0)
    dispatcher = create_in_memory_queue(config, clock=clock)
    source = workload("w")
    run(dispatcher.batch_enqueue([next(source) for _ in range(depth)]))
    limiter = LLMThrottle(1e12, 1e15, clock=clock, max_history_records=1_000)
    return dispatcher, (limiter, clock, source)


def round_trip(dispatcher: LLMQueueDispatcher[int], state: Any) -> Callable[[], None]:
    """One worker round: dequeue, acknowledge, and enqueue a new request to keep the depth."""
    limiter, clock, source = state
    # Built ahead: making an LLMRequest (a validating dataclass) is not what is measured.
    ahead = iter([next(source) for _ in range(ROUNDS + WARMUP)])

    async def one() -> None:
        clock.advance(0.001)
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed()
        await dispatcher.enqueue(next(ahead))

    return lambda: run(one())


@pytest.mark.benchmark(group="dispatcher: async dequeue + ack round trip")
def test_async_round_trip(benchmark: Any, depth: int) -> None:
    dispatcher, state = filled(depth)
    benchmark.pedantic(round_trip(dispatcher, state), rounds=ROUNDS, warmup_rounds=WARMUP)
    assert run(dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == depth


@pytest.mark.benchmark(group="dispatcher: sync core dispatch + ack")
def test_sync_core_round_trip(benchmark: Any, depth: int) -> None:
    """The core's calls without the coroutines around them: a dispatch, its mark (done when
    called with the in-memory store and an `LLMThrottle`), an enqueue."""
    dispatcher, (limiter, clock, source) = filled(depth)
    core, store = dispatcher._core, dispatcher._storage.core  # type: ignore[attr-defined]
    ahead = iter([next(source) for _ in range(ROUNDS + WARMUP)])

    def one() -> None:
        clock.advance(0.001)
        job = core.dispatch(limiter)
        assert job is not None
        job.mark_as_processed()
        store.enqueue(next(ahead))

    benchmark.pedantic(one, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.benchmark(group="dispatcher: enqueue")
def test_single_enqueue(benchmark: Any) -> None:
    dispatcher, (_, _, source) = filled(1_000)
    benchmark.pedantic(
        lambda request: run(dispatcher.enqueue(request)), setup=lambda: ((next(source),), {}), rounds=5_000
    )


@pytest.mark.benchmark(group="dispatcher: enqueue")
def test_batch_enqueue_1000(benchmark: Any) -> None:
    dispatcher, (_, _, source) = filled(0)

    def setup() -> tuple[tuple[list[LLMRequest[int]]], dict[str, Any]]:
        return ([next(source) for _ in range(1_000)],), {}

    benchmark.pedantic(lambda batch: run(dispatcher.batch_enqueue(batch)), setup=setup, rounds=50)


def _scorer(name: str) -> CustomScorer:
    def calculate(message: QueueMessage[Any], context: ScoringContext) -> float:
        return (message.payload.payload % 97) / 96

    return CustomScorer(name, 0.1, calculate)


@pytest.mark.benchmark(group="dispatcher: custom scorers")
@pytest.mark.parametrize("scorers", [1, 3])
def test_custom_scorers(benchmark: Any, scorers: int) -> None:
    config = LLMQueueDispatcherConfig(
        scoring=ScoringConfig(custom_scorers=[_scorer(f"s{i}") for i in range(scorers)])
    )
    dispatcher, state = filled(10_000, config)
    benchmark.pedantic(round_trip(dispatcher, state), rounds=500, warmup_rounds=20)


@pytest.mark.benchmark(group="scoring engine: score every buffered message")
@pytest.mark.parametrize("size", [200, 2_000])
def test_scoring_throughput(benchmark: Any, size: int) -> None:
    """The prefetch buffer's search scores every buffered message in Rust (here through
    `time_until_score`, whose first look is one such search): messages scored per second =
    size / time per call."""
    clock = ManualClock(1_700_000_000.0)
    memory = create_in_memory_queue(clock=clock)
    source = workload("s")
    run(memory.batch_enqueue([next(source) for _ in range(size)]))
    leased = run(memory._storage.dequeue(size, 3_600.0))  # type: ignore[attr-defined]
    external = LLMQueueDispatcher(ExternalStore(clock=clock), LLMQueueDispatcherConfig(clock=clock))
    core = external._core
    core.buffer_insert(leased, 1e12)
    crossing = benchmark(lambda: core.time_until_score(1e6))
    assert crossing == 0.0
    assert core.buffered == size


class ExternalStore(InMemoryStorage[Any]):
    """A store the dispatcher treats as external (leased into a prefetch buffer)."""
