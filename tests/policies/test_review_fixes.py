"""Defects found while testing issue 10 exactly, each with its test (each in-memory variant is
a control): fair_priority over an external store ranks by age; a held dequeue over an external
store sees what other producers put into the store; tenant token use without reservations;
waiting tenants reported over an external store; an URGENT request exempt from the reserve with
or without ``urgent_first``."""

from __future__ import annotations

import asyncio

import pytest

from llm_queue_dispatcher import FairPriorityConfig, LLMThrottle, ManualClock, Priority
from tests.policies.support import (
    Store,
    VirtualTimeLoop,
    make_dispatcher,
    make_store,
    request,
    run_virtual,
)
from tests.policies.test_waiting import START, enqueue_big_and_small, setup

# ------------------------------------------------------------------------------------------------
# 1. fair_priority over an external store: "oldest" is the age, not the buffer's arrival order.
# ------------------------------------------------------------------------------------------------


def fair(store: Store, **settings: object):  # type: ignore[no-untyped-def]
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(
        make_store(store, clock),
        clock,
        policy="fair_priority",
        fair=FairPriorityConfig(reserve_tokens=0, **settings),  # type: ignore[arg-type]
    )
    return clock, dispatcher, LLMThrottle(6_000, 1_000_000, clock=clock)


@pytest.mark.parametrize("store", ["memory", "external"])
async def test_tenant_ties_go_to_the_head_of_the_higher_class_then_the_older(store: Store) -> None:
    clock, dispatcher, limiter = fair(store)
    await dispatcher.enqueue(request("x-normal", tenant="x"))  # older
    clock.advance(1.0)
    await dispatcher.enqueue(request("y-high", tenant="y", priority=Priority.HIGH))
    clock.advance(1.0)
    await dispatcher.enqueue(request("z-normal", tenant="z"))
    order = []
    for _ in range(3):
        job = await dispatcher.dequeue(limiter)
        for _ in range(3):
            await asyncio.sleep(0)  # the external store's background fill lands
        assert job is not None
        order.append(job.message.payload.id)
    # All used nothing: the head in the higher class first, then the older head ("y" has used
    # tokens by then and ranks last, with nothing left anyway).
    assert order == ["y-high", "x-normal", "z-normal"]


@pytest.mark.parametrize("store", ["memory", "external"])
async def test_an_aged_message_ranks_behind_native_high_ones_and_ahead_of_normal_ones(store: Store) -> None:
    clock, dispatcher, limiter = fair(store, max_wait={Priority.NORMAL: 5.0})
    await dispatcher.enqueue(request("old-normal", tenant="x"))
    clock.advance(1.0)
    await dispatcher.enqueue(request("young-high", tenant="x", priority=Priority.HIGH))
    clock.advance(10.0)  # old-normal has aged: it ranks as HIGH, behind native HIGH
    await dispatcher.enqueue(request("fresh-normal", tenant="x"))
    order = []
    for _ in range(3):
        job = await dispatcher.dequeue(limiter)
        for _ in range(3):
            await asyncio.sleep(0)
        assert job is not None
        order.append(job.message.payload.id)
    assert order == ["young-high", "old-normal", "fresh-normal"]


@pytest.mark.parametrize("store", ["memory", "external"])
async def test_a_failed_message_keeps_its_age(store: Store) -> None:
    clock, dispatcher, limiter = fair(store)

    async def dequeue():  # type: ignore[no-untyped-def]
        job = await dispatcher.dequeue(limiter)
        for _ in range(3):
            await asyncio.sleep(0)  # the external store's background fill lands
        return job

    await dispatcher.enqueue(request("a1", tenant="a"))
    clock.advance(1.0)
    await dispatcher.enqueue(request("b1", tenant="b"))
    clock.advance(1.0)
    await dispatcher.enqueue(request("b2", tenant="b"))
    first = await dequeue()
    assert first.message.payload.id == "a1"
    await first.mark_as_failed(RuntimeError("retry"))  # "a" charged 0; a1 visible in the store
    second = await dequeue()  # external: from the buffer as it was (b1, b2): b1
    await second.mark_as_failed(RuntimeError("retry"))  # "b" charged 0: a tie again
    ids = {first.message.payload.id, second.message.payload.id}
    third = await dequeue()
    # Tie at 0: the tenant whose head is older goes. "a"'s head a1 (t0) is older than anything
    # of "b"'s; external: the buffer ranks a1, fetched again last, as the youngest.
    assert third.message.payload.id == "a1", (ids, third.message.payload.id)


# ------------------------------------------------------------------------------------------------
# 2. Holding over an external store: a message another producer puts into the store is seen
#    within prefetch_interval, as without hold.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("hold", [True, False])
def test_a_held_dequeue_sees_messages_other_producers_put_into_the_store(policy: str, hold: bool) -> None:
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

    run_virtual(s.clock, main)


# ------------------------------------------------------------------------------------------------
# 3. Score policy with reserve_budget=False: tokens_in_window counts the estimate and the actual
#    count, and never takes a failed request back.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("reserve", [True, False])
async def test_tokens_in_window_without_a_reservation(policy: str, reserve: bool) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(make_store("memory", clock), clock, policy=policy, reserve_budget=reserve)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher.enqueue(request("a1", tenant="a", tokens=100))
    await dispatcher.enqueue(request("a2", tenant="a", tokens=100))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    await first.mark_as_processed(actual_tokens=80)
    assert (await dispatcher.get_queue_metrics()).tenants[
        "a"
    ].tokens_in_window == 80  # (was 180 without a reservation)
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    await second.mark_as_failed(RuntimeError("retry"))
    assert (await dispatcher.get_queue_metrics()).tenants["a"].tokens_in_window == 80  # (was 280)


# ------------------------------------------------------------------------------------------------
# 4. External store: tenants with waiting (buffered) messages are in the metrics.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("store", ["memory", "external"])
async def test_waiting_tenants_are_reported(policy: str, store: Store) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(make_store(store, clock), clock, policy=policy)
    await dispatcher.enqueue(request("a1", tenant="a", priority=Priority.URGENT))
    await dispatcher.enqueue(request("a2", tenant="a"))
    await dispatcher.enqueue(request("b1", tenant="b"))
    job = await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock))
    assert job is not None
    assert job.message.payload.id == "a1"
    tenants = (await dispatcher.get_queue_metrics()).tenants
    assert {n: (t.visible, t.in_flight) for n, t in tenants.items()} == {"a": (1, 1), "b": (1, 0)}


# ------------------------------------------------------------------------------------------------
# 5. With urgent_first=False an URGENT request of a backlogged tenant is still exempt from the
#    reserve: "a lone request of a light tenant, or an URGENT one, finds budget at once".
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("urgent_first", [True, False])
async def test_an_urgent_request_is_exempt_from_the_reserve(urgent_first: bool) -> None:
    clock = ManualClock(1_000.0)
    fair = FairPriorityConfig(urgent_first=urgent_first, reserve_tokens=500, tenant_weights={"z": 1_000.0})
    dispatcher = make_dispatcher(make_store("memory", clock), clock, policy="fair_priority", fair=fair)
    limiter = LLMThrottle(6_000, 6_000, clock=clock)
    await dispatcher.enqueue(request("never", tenant="z", tokens=10_000))  # waits; weighs 1,000
    await dispatcher.enqueue(request("a0", tenant="a", tokens=10))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert first.message.payload.id == "a0"  # "a" has now used more than its share (~6 tokens)
    await dispatcher.enqueue(request("a-urgent", tenant="a", priority=Priority.URGENT, tokens=100))
    await dispatcher.enqueue(request("a2", tenant="a", tokens=100))
    assert limiter.consume("other traffic", int(limiter.get_metrics().tpm.available) - 300)
    job = await dispatcher.dequeue(limiter)
    assert job is not None  # (it was held for 100 + 500 tokens)
    assert job.message.payload.id == "a-urgent"
