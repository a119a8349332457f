"""`can_process` + `consume` from Python: LLMThrottle (Rust) against the plain-Python bucket.

Run with timing: ``make bench`` (or ``pytest benches/test_throttle_bench.py --benchmark-enable``).
In the normal test run timing is off and these run once as smoke tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from plain_bucket import PlainThrottle
from pytest_benchmark.fixture import BenchmarkFixture

from llm_queue_dispatcher import LLMThrottle, ManualClock


def _round(throttle: LLMThrottle | PlainThrottle) -> Callable[[], None]:
    ids = (f"req-{i}" for i in itertools.count())

    def one() -> None:
        throttle.can_process(500)
        throttle.consume(next(ids), 500)

    return one


@pytest.mark.benchmark(group="throttle: can_process + consume")
@pytest.mark.parametrize("clock_kind", ["monotonic", "manual"])
def test_llm_throttle(benchmark: BenchmarkFixture, clock_kind: str) -> None:
    clock = ManualClock() if clock_kind == "manual" else None
    throttle = LLMThrottle(1e12, 1e15, clock=clock, max_history_records=10_000)
    benchmark(_round(throttle))
    assert throttle.get_metrics().consumption_history.count > 0


@pytest.mark.benchmark(group="throttle: can_process + consume")
@pytest.mark.parametrize("clock_kind", ["monotonic", "manual"])
def test_plain_python_bucket(benchmark: BenchmarkFixture, clock_kind: str) -> None:
    clock = ManualClock() if clock_kind == "manual" else None
    throttle = PlainThrottle(1e12, 1e15, clock=clock) if clock else PlainThrottle(1e12, 1e15)
    benchmark(_round(throttle))
    assert throttle.history
