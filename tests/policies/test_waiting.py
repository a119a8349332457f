"""``dequeue(timeout=...)`` while the budget is held for a winner, on virtual time.

The event loop runs on the dispatcher's `ManualClock` (`VirtualTimeLoop`): a sleep moves the
clock straight to its timer, so each wait lands on exactly the instant the dispatcher asked for
and every sleep is visible in ``loop.jumps``. A dequeue that holds for a winner must sleep once,
until the winner fits, and hand nothing ranked below it out meanwhile; a newly visible message
that outranks the winner is handed out at once. Polling would show as more sleeps and as limiter
and store calls growing with the length of the wait: the tests compare two waits of different
length and require the same number of calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from llm_queue_dispatcher import LLMQueueDispatcher, LLMThrottle, ManualClock, Priority, ProcessableMessage
from tests.policies.support import (
    Limiter,
    PythonLimiter,
    Store,
    VirtualTimeLoop,
    limiter_for,
    make_dispatcher,
    make_store,
    request,
    run_virtual,
)
from tests.reference.storage import RecordingStorage

POLICIES = ["score", "fair_priority"]
COMBINATIONS = [
    pytest.param(policy, store, limiter, id=f"{policy}-{store}-{limiter}")
    for policy in POLICIES
    for store in ("memory", "external")
    for limiter in ("native", "python")
]
T = TypeVar("T")
START = 10_000.0
TPM = 60_000.0  # 1,000 tokens per second


@dataclass
class Setup:
    clock: ManualClock
    inner: LLMThrottle
    limiter: Any
    dispatcher: LLMQueueDispatcher[str]
    store: Any


def setup(policy: str, store: Store, limiter: Limiter, **config: Any) -> Setup:
    clock = ManualClock(START)
    inner = LLMThrottle(6_000, TPM, clock=clock)
    assert inner.consume("other traffic", int(TPM))  # the bucket is empty
    storage = RecordingStorage(clock) if store == "external" else make_store("memory", clock)
    if store == "external":
        # A held dequeue over an external store also looks at the store every prefetch_interval
        # (other producers' messages reach the buffer only when it is filled): set beyond these
        # waits, so that what is measured is the wait for the winner (see
        # test_a_held_dequeue_sees_messages_other_producers_put_into_the_store).
        config.setdefault("prefetch_interval", 10_000.0)
    # These tests time the wait for a winner; the URGENT reserve would add to it
    # (tests/policies/test_urgent.py times that).
    config.setdefault("urgent_reserve", 0)
    dispatcher = make_dispatcher(storage, clock, policy=policy, min_score_threshold=0.0, **config)
    return Setup(clock, inner, limiter_for(limiter, inner), dispatcher, storage)


def run(s: Setup, main: Callable[[VirtualTimeLoop], Awaitable[T]]) -> T:
    """Runs ``main`` on virtual time, then closes the dispatcher on the same loop (its prefetch
    tasks end with it, not with the loop)."""

    async def and_close(loop: VirtualTimeLoop) -> T:
        try:
            return await main(loop)
        finally:
            await s.dispatcher.close()

    return run_virtual(s.clock, and_close)


async def enqueue_big_and_small(s: Setup, big_tokens: int) -> None:
    """The winner ("big", LOW, of tenant a) first, then a small LOW request of tenant b that the
    budget would admit long before it: under both policies "big" ranks first."""
    await s.dispatcher.enqueue(request("big", tenant="a", priority=Priority.LOW, tokens=big_tokens))
    await s.dispatcher.enqueue(request("small", tenant="b", priority=Priority.LOW, tokens=10))


def calls(s: Setup) -> int:
    """Calls into the plain-Python limiter and the external store: what polling would grow."""
    limiter_calls = sum(s.limiter.calls.values()) if isinstance(s.limiter, PythonLimiter) else 0
    store_calls = len(s.store.calls) if isinstance(s.store, RecordingStorage) else 0
    return limiter_calls + store_calls


def held_run(
    policy: str, store: Store, limiter: Limiter, seconds: float
) -> tuple[str, float, list[float], int]:
    """A dequeue with a timeout holding for a winner that fits after ``seconds``: what it
    handed out, when, the loop's sleeps, and the limiter and store calls it made."""
    s = setup(policy, store, limiter)

    async def main(loop: VirtualTimeLoop) -> tuple[str, float, list[float], int]:
        await enqueue_big_and_small(s, int(seconds * 1_000))
        before = calls(s)
        job = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        assert job is not None
        return job.message.payload.id, s.clock.now() - START, loop.jumps, calls(s) - before

    return run(s, main)


@pytest.mark.parametrize(("policy", "store", "limiter"), COMBINATIONS)
def test_a_held_dequeue_sleeps_once_until_the_winner_fits(
    policy: str, store: Store, limiter: Limiter
) -> None:
    short = held_run(policy, store, limiter, 30.0)
    long = held_run(policy, store, limiter, 59.0)
    for (winner, elapsed, jumps, _), seconds in ((short, 30.0), (long, 59.0)):
        assert winner == "big"  # "small" fitted all along; nothing below the winner went
        assert elapsed == pytest.approx(seconds, abs=1e-6)
        assert len(jumps) == 1
    # No polling: a wait twice as long costs no more calls.
    assert short[3] == long[3], (short, long)


@pytest.mark.parametrize(("policy", "store", "limiter"), COMBINATIONS)
def test_a_held_dequeue_hands_out_a_newly_enqueued_message_that_outranks_the_winner(
    policy: str, store: Store, limiter: Limiter
) -> None:
    s = setup(policy, store, limiter)

    async def arrive(after: float) -> None:
        await asyncio.sleep(after)
        await s.dispatcher.enqueue(request("vip", tenant="c", priority=Priority.URGENT, tokens=100))

    async def main(loop: VirtualTimeLoop) -> None:
        await enqueue_big_and_small(s, 30_000)
        arrival = asyncio.get_running_loop().create_task(arrive(5.0))
        job = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        await arrival
        assert job is not None
        assert job.message.payload.id == "vip"
        assert s.clock.now() - START == pytest.approx(5.0, abs=1e-9)
        assert loop.jumps == [pytest.approx(5.0)]  # the arrival's own timer: nothing else ran
        # Then the held winner again, now also waiting for the 100 tokens "vip" took.
        big = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        assert big is not None
        assert big.message.payload.id == "big"
        assert s.clock.now() - START == pytest.approx(30.1, abs=1e-6)

    run(s, main)


@pytest.mark.parametrize(("policy", "store", "limiter"), COMBINATIONS)
def test_a_newly_enqueued_message_ranked_below_the_winner_does_not_go_ahead(
    policy: str, store: Store, limiter: Limiter
) -> None:
    s = setup(policy, store, limiter)
    handed: list[ProcessableMessage[str]] = []

    async def arrive(after: float) -> None:
        await asyncio.sleep(after)
        await s.dispatcher.enqueue(request("small2", tenant="b", priority=Priority.LOW, tokens=10))

    async def main(loop: VirtualTimeLoop) -> None:
        await enqueue_big_and_small(s, 30_000)
        arrival = asyncio.get_running_loop().create_task(arrive(5.0))
        job = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        await arrival
        assert job is not None
        handed.append(job)
        assert job.message.payload.id == "big"
        assert s.clock.now() - START == pytest.approx(30.0, abs=1e-6)
        # The arrival's timer, then the rest of the wait for the winner: two sleeps in all.
        assert [round(j, 6) for j in loop.jumps] == [5.0, 25.0]

    run(s, main)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("limiter", ["native", "python"])
def test_a_held_dequeue_hands_out_an_in_flight_message_that_becomes_visible_and_outranks_the_winner(
    policy: str, limiter: Limiter
) -> None:
    """In memory: a visibility expiry is a change the dispatcher knows the instant of."""
    s = setup(policy, "memory", limiter, visibility_timeout=10.0)

    async def main(loop: VirtualTimeLoop) -> None:
        s.inner.reset()
        await s.dispatcher.enqueue(request("vip", tenant="c", priority=Priority.URGENT, tokens=100))
        first = await s.dispatcher.dequeue(s.limiter)
        assert first is not None  # and never marked: visible again after 10 s
        assert s.inner.consume("other traffic", int(s.inner.get_metrics().tpm.available))
        await enqueue_big_and_small(s, 30_000)
        job = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        assert job is not None
        assert job.message.payload.id == "vip"
        assert job.message.attributes.receive_count == 2
        assert s.clock.now() - START == pytest.approx(10.0, abs=1e-9)
        assert len(loop.jumps) == 1

    run(s, main)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("limiter", ["native", "python"])
def test_a_held_dequeue_times_out_with_nothing_and_leaves_the_queue_as_it_was(
    policy: str, limiter: Limiter
) -> None:
    s = setup(policy, "memory", limiter)

    async def main(loop: VirtualTimeLoop) -> None:
        await enqueue_big_and_small(s, 30_000)
        assert await s.dispatcher.dequeue(s.limiter, timeout=12.5) is None
        assert s.clock.now() - START == pytest.approx(12.5)
        assert len(loop.jumps) == 1
        metrics = await s.dispatcher.get_queue_metrics()
        assert metrics.queue.approximate_number_of_messages == 2
        assert s.dispatcher.time_until_ready() == pytest.approx(17.5, abs=1e-6)

    run(s, main)


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("hold", [True, False])
def test_a_held_dequeue_sees_messages_other_producers_put_into_the_store(policy: str, hold: bool) -> None:
    """Over an external store a held dequeue still fills its buffer every ``prefetch_interval``:
    a message another producer puts into the store is seen as soon as without hold."""
    s = setup(policy, "external", "native", hold_budget=hold, prefetch_interval=5.0)

    async def arrive() -> None:
        await asyncio.sleep(5.0)
        await s.store.enqueue(request("vip", tenant="c", priority=Priority.URGENT, tokens=100))

    async def main(loop: VirtualTimeLoop) -> None:
        await enqueue_big_and_small(s, 30_000)  # the winner "big" fits after 30 s
        arrival = asyncio.get_running_loop().create_task(arrive())
        job = await s.dispatcher.dequeue(s.limiter, timeout=1_000.0)
        await arrival
        assert job is not None
        if hold:
            assert job.message.payload.id == "vip"
        # hold: "vip" at 30.0 s; without hold ("small" went at once), "vip" waits at most one
        # prefetch_interval (5 s) after its arrival
        assert s.clock.now() - START <= 5.0 + s.dispatcher.config.prefetch_interval

    run(s, main)
