"""The compiled dispatch core directly: its parameters, the prefetch buffer it selects from, its
jobs, and the cycles through Python objects it holds."""

from __future__ import annotations

import gc
import weakref
from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidConfigError,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageAttributes,
    MessageStateError,
    Priority,
    ProcessableMessage,
    QueueMessage,
    TokenInfo,
)
from llm_queue_dispatcher._core import DispatchCore, StoreCore

WEIGHTS = (0.25, 0.2, 0.2, 0.1, 0.15, 0.1)


class Runner:
    """What a core calls back: nothing to run here (every path below is synchronous)."""

    woken = 0

    def wake(self) -> None:
        self.woken += 1


def core(pool: StoreCore | None = None, **overrides: Any) -> DispatchCore:
    import logging

    options: dict[str, Any] = {
        "clock": ManualClock(110.0),
        "weights": WEIGHTS,
        "custom_weights": [],
        "custom_names": [],
        "max_candidates": 20,
        "policy": "score",
        "tenant_weights": [],
        "fairness_window": 60.0,
        "urgent_first": True,
        "max_wait": [float("inf"), 60.0, 300.0, 900.0],
        "reserve_tokens": None,
        "visibility_timeout": 30.0,
        "min_score": 0.0,
        "reserve": True,
        "hold": False,
        "metrics_retention": 300.0,
        "runner": Runner(),
        "logger": logging.getLogger("test"),
    }
    options.update(overrides)
    return DispatchCore(pool, **options)


def leased(
    request_id: str, priority: Priority, tokens: int, *, received: int = 1, payload: object = None
) -> QueueMessage[object]:
    attributes = MessageAttributes(
        message_id=f"m-{request_id}",
        receipt_handle=f"h-{request_id}",
        enqueued_at=datetime.fromtimestamp(100.0, timezone.utc),
        receive_count=received,
        first_received_at=datetime.fromtimestamp(100.0, timezone.utc),
    )
    return QueueMessage(
        f"m-{request_id}", LLMRequest(request_id, payload, priority, TokenInfo(tokens)), attributes
    )


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"weights": (-0.1, 0, 0, 0, 0, 0)}, "priority"),
        ({"weights": (float("nan"), 0, 0, 0, 0, 0)}, "priority"),
        ({"custom_weights": [-1.0], "custom_names": ["mine"]}, "mine"),
        ({"max_candidates": 0}, "max_candidates_to_evaluate"),
        ({"policy": "fifo"}, "policy"),
        ({"slo_targets": [1.0, -1.0, 300.0, 1800.0]}, "slo_targets"),
        ({"slo_targets": [float("nan"), 30.0, 300.0, 1800.0]}, "slo_targets"),
    ],
)
def test_bad_parameters_are_refused_naming_them(overrides: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidConfigError, match=names):
        core(**overrides)


def test_the_buffer_picks_the_best_admissible_and_hands_it_out_once() -> None:
    clock = ManualClock(110.0)
    buffered = core(clock=clock)
    buffered.buffer_insert(
        [
            leased("low", Priority.LOW, 100),
            leased("urgent", Priority.URGENT, 100),
            leased("big", Priority.URGENT, 5_000),
        ],
        1e9,
    )
    throttle = LLMThrottle(60, 1_000, clock=clock)
    job = buffered.dispatch(throttle)
    assert isinstance(job, ProcessableMessage)
    assert job.message.payload.id == "urgent"  # "big" exceeds the budget
    assert throttle.get_metrics().tpm.available == pytest.approx(900.0)
    # Taken out of the buffer, reserved, not handed out until its lease is confirmed.
    assert buffered.active == 0
    assert buffered.hand_out(job)
    assert buffered.active == 1
    assert len(job.score.breakdown) == 6
    assert job.score.total == pytest.approx(sum(job.score.breakdown.values()))
    assert sorted(m.payload.id for m in buffered.buffer_drain()) == ["big", "low"]
    assert buffered.buffered == 0


def test_a_job_taken_back_returns_to_the_buffer_with_its_budget() -> None:
    clock = ManualClock(110.0)
    buffered = core(clock=clock)
    buffered.buffer_insert([leased("a", Priority.NORMAL, 100)], 1e9)
    throttle = LLMThrottle(60, 1_000, clock=clock)
    job = buffered.dispatch(throttle)
    assert isinstance(job, ProcessableMessage)
    assert buffered.revoke(job) is None  # an LLMThrottle's reservation is released here
    assert throttle.get_metrics().tpm.available == pytest.approx(1_000.0)
    assert throttle.get_metrics().rpm.available == pytest.approx(60.0)
    assert buffered.buffer_handles() == ["h-a"]
    with pytest.raises(MessageStateError):
        buffered.revoke(job)


async def test_a_job_over_the_in_memory_store_marks_in_one_call() -> None:
    clock = ManualClock(110.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    await storage.enqueue(LLMRequest("a", None, Priority.NORMAL, TokenInfo(100)))
    direct = core(storage.core, clock=clock)
    throttle = LLMThrottle(60, 1_000, clock=clock)
    job = direct.dispatch(throttle)
    assert isinstance(job, ProcessableMessage)
    assert direct.active == 1
    done = job.mark_as_processed(actual_tokens=40)  # done when called: nothing to await
    assert job.settled
    assert throttle.get_metrics().tpm.used == pytest.approx(40.0)
    await done
    with pytest.raises(MessageStateError, match="already marked"):
        await job.mark_as_failed(RuntimeError("x"))


def test_the_core_releases_cycles_through_the_messages_it_holds() -> None:
    class Holder:
        pass

    holder = Holder()
    buffered = core()
    holder.core = buffered  # type: ignore[attr-defined]
    buffered.buffer_insert([leased("a", Priority.NORMAL, 10, payload=holder)], 1e9)
    ref = weakref.ref(holder)
    del holder, buffered
    gc.collect()
    assert ref() is None


def test_a_job_and_its_core_are_collected_together() -> None:
    class Holder:
        pass

    holder = Holder()
    buffered = core()
    buffered.buffer_insert([leased("a", Priority.NORMAL, 10, payload=holder)], 1e9)
    job = buffered.dispatch(LLMThrottle(60, 1_000, clock=ManualClock()))
    assert isinstance(job, ProcessableMessage)
    holder.job = job  # type: ignore[attr-defined]  # payload -> job -> core -> payload
    ref = weakref.ref(holder)
    del holder, buffered, job
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
def test_a_global_winner_is_buffered_taken_and_handed_out_in_one_call(policy: str) -> None:
    """`open_winner` (the Redis global choice's winner, reserved under its delivery's key by the
    script that chose it): the job of that message, handed out, keyed for the limiter, its lease
    ending the given seconds from the core's clock; nothing left in the buffer."""
    clock = ManualClock(110.0)
    books = core(clock=clock, policy=policy)
    limiter = object()
    message = leased("a", Priority.NORMAL, 100, received=2)
    job, handed_out = books.open_winner(message, 30.0, limiter, 1_000.0, 60.0)
    assert handed_out
    assert isinstance(job, ProcessableMessage)
    assert job.message is message
    assert job._key == "a#2"
    assert books.active == 1
    assert books.buffered == 0
    assert job._lease_end == pytest.approx(140.0)


def test_a_global_winner_the_books_rank_below_another_is_not_handed_out() -> None:
    """Something already buffered ranks first: `open_winner` returns that job, taken but not
    handed out (the caller takes it back and gives the winner back), and the winner stays in
    the buffer."""
    clock = ManualClock(110.0)
    books = core(clock=clock)
    books.buffer_insert([leased("urgent", Priority.URGENT, 100)], 1e9)
    job, handed_out = books.open_winner(leased("low", Priority.LOW, 100), 30.0, object(), 1_000.0, 60.0)
    assert not handed_out
    assert isinstance(job, ProcessableMessage)
    assert job.message.payload.id == "urgent"
    assert books.active == 0
    books.revoke(job, False, False)
    assert [m.payload.id for m in books.buffer_drain()] == ["low"]
