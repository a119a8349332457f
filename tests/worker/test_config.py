"""Worker: its constructor refuses bad arguments, each named."""

from __future__ import annotations

import math

import pytest

from llm_queue_dispatcher import (
    InvalidConfigError,
    LLMThrottle,
    Worker,
    create_in_memory_queue,
)
from tests.integer_like import int_likes
from tests.worker.support import noop, roomy_limiter


def test_constructor_validates_every_argument() -> None:
    dispatcher = create_in_memory_queue()
    limiter = roomy_limiter()
    with pytest.raises(InvalidConfigError, match="dispatcher"):
        Worker(object(), limiter, noop)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="limiter"):
        Worker(dispatcher, object(), noop)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="limiter"):
        Worker(dispatcher, LLMThrottle, noop)  # type: ignore[arg-type]  # the class, not a limiter
    with pytest.raises(InvalidConfigError, match="handler"):
        Worker(dispatcher, limiter, 3)  # type: ignore[arg-type]
    for bad in (0, -1, True, 2.0, "4"):
        with pytest.raises(InvalidConfigError, match="concurrency"):
            Worker(dispatcher, limiter, noop, concurrency=bad)  # type: ignore[arg-type]
    for bad in (-1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(InvalidConfigError, match="shutdown_grace"):
            Worker(dispatcher, limiter, noop, shutdown_grace=bad)  # type: ignore[arg-type]
    for bad in (-1.0, math.inf, 43_201.0):
        with pytest.raises(InvalidConfigError, match="max_retry_delay"):
            Worker(dispatcher, limiter, noop, max_retry_delay=bad)
    with pytest.raises(InvalidConfigError, match="retry_base_delay"):
        Worker(dispatcher, limiter, noop, retry_base_delay=0.0)
    with pytest.raises(InvalidConfigError, match="rng"):
        Worker(dispatcher, limiter, noop, rng=7)  # type: ignore[arg-type]
    worker = Worker(dispatcher, limiter, noop, concurrency=1, shutdown_grace=0, max_retry_delay=0)
    assert worker.concurrency == 1
    assert worker.stats.processed == 0


@pytest.mark.parametrize("number", int_likes(3), ids=lambda v: type(v).__name__)
def test_integer_like_numbers_are_valid_worker_arguments(number: object) -> None:
    worker = Worker(
        create_in_memory_queue(),
        roomy_limiter(),
        noop,
        concurrency=number,  # type: ignore[arg-type]
        shutdown_grace=number,  # type: ignore[arg-type]
        max_retry_delay=number,  # type: ignore[arg-type]
        retry_base_delay=number,  # type: ignore[arg-type]
    )
    assert (worker.concurrency, worker.shutdown_grace, worker.max_retry_delay) == (3, 3.0, 3.0)
