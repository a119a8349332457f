"""Storage benchmarks: the Rust-core `InMemoryStorage` beside the plain-Python reference adapter.

Run as smoke tests by default (timing disabled, small depths); ``make bench`` turns timing on and
adds the 1M depth. The sync core calls are what the dispatcher makes per message; the async
adapter calls add one coroutine per operation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llm_queue_dispatcher import InMemoryStorage, LLMRequest, ManualClock, Priority, TokenInfo
from tests.conformance.support import run
from tests.reference.storage import ReferenceStorage

BATCH = 1_000
ADAPTERS: dict[str, Callable[[ManualClock], Any]] = {
    "rust": lambda clock: InMemoryStorage(clock=clock, message_retention=float("inf")),
    "python": lambda clock: ReferenceStorage(clock=clock, message_retention=float("inf")),
}


def requests(prefix: str, n: int) -> list[LLMRequest[int]]:
    return [
        LLMRequest(
            id=f"{prefix}{i}", payload=i, priority=Priority(i % 4), token_info=TokenInfo(50 + i % 3000)
        )
        for i in range(n)
    ]


def stream(prefix: str) -> Iterator[LLMRequest[int]]:
    """Requests made on demand, for pools of unknown size."""
    for i in itertools.count():
        yield LLMRequest(
            id=f"{prefix}{i}", payload=i, priority=Priority(i % 4), token_info=TokenInfo(50 + i % 3000)
        )


def depths(config: pytest.Config) -> list[int]:
    # `make bench` passes --benchmark-enable on top of the --benchmark-disable of addopts.
    timing = config.getoption("benchmark_enable", default=False) or not config.getoption(
        "benchmark_disable", default=True
    )
    return [1_000, 100_000, 1_000_000] if timing else [1_000, 10_000]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "depth" in metafunc.fixturenames:
        metafunc.parametrize("depth", depths(metafunc.config))


@pytest.mark.benchmark(group="store-batch-enqueue-1000")
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_batch_enqueue(benchmark: Any, kind: str) -> None:
    counter = itertools.count()

    def setup() -> tuple[tuple[Any, list[LLMRequest[int]]], dict[str, Any]]:
        storage = ADAPTERS[kind](ManualClock())
        return (storage, requests(f"b{next(counter)}-", BATCH)), {}

    def batch(storage: Any, batch: list[LLMRequest[int]]) -> None:
        assert len(run(storage.batch_enqueue(batch))) == BATCH

    benchmark.pedantic(batch, setup=setup, rounds=20)


@pytest.mark.benchmark(group="store-enqueue-single")
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_single_enqueue(benchmark: Any, kind: str) -> None:
    storage = ADAPTERS[kind](ManualClock())
    pool = stream("s")

    def enqueue() -> None:
        run(storage.enqueue(next(pool)))

    benchmark(enqueue)


@pytest.mark.benchmark(group="store-dequeue-delete")
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_dequeue_delete(benchmark: Any, kind: str, depth: int) -> None:
    benchmark.group = f"store-dequeue1-delete-depth-{depth}"
    storage = ADAPTERS[kind](ManualClock())
    run(storage.batch_enqueue(requests("d", depth)))
    fresh = stream("f")

    def dequeue_delete() -> None:
        [message] = run(storage.dequeue(1, 30.0))
        run(storage.delete_message(message.attributes.receipt_handle))
        run(storage.enqueue(next(fresh)))  # keep the depth constant

    benchmark(dequeue_delete)
    assert run(storage.get_approximate_message_count()) == depth
