"""Building a large batch of messages pauses the cyclic garbage collector,
which is process-wide state. Pauses from several threads overlap safely: the collector ends as
it was before the first began, and a collector the user disabled stays disabled throughout."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llm_queue_dispatcher import InMemoryStorage, LLMRequest, ManualClock, TokenInfo


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Whatever a test does to the collector, the next test finds it as it was."""
    was_enabled = gc.isenabled()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


def build_batches(rounds: int, seen_enabled: list[bool]) -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=ManualClock(1_000.0))
    core = storage.core
    for round_ in range(rounds):
        core.enqueue_batch(
            [LLMRequest(f"{round_}-{i}", None, token_info=TokenInfo(i % 100)) for i in range(5_000)]
        )
        seen_enabled.append(gc.isenabled())
        core.peek(2, 5_000)
        received = core.dequeue(5_000, 30.0)
        seen_enabled.append(gc.isenabled())
        for message in received:
            core.delete(message.attributes.receipt_handle)


def run_threads(rounds: int = 4, threads: int = 3) -> list[bool]:
    seen: list[bool] = []
    workers = [threading.Thread(target=build_batches, args=(rounds, seen)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return seen


@pytest.mark.usefixtures("gc_state")
def test_concurrent_batches_leave_the_collector_enabled() -> None:
    """Threads building large batches at once (enqueue, peek and receive, each
    pausing the collector) leave it enabled when the last one is done. (While one thread builds,
    the others may see it paused: the pause is process-wide.)"""
    gc.enable()
    seen = run_threads()
    assert gc.isenabled()
    assert len(seen) == 2 * 4 * 3


@pytest.mark.usefixtures("gc_state")
def test_a_collector_the_user_disabled_stays_disabled() -> None:
    """With the collector disabled by the user before, no batch turns it on, during
    or after."""
    gc.disable()
    seen = run_threads()
    assert not gc.isenabled()
    assert len(seen) == 2 * 4 * 3
    assert not any(seen)
