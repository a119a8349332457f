"""The ``fair_priority`` ranking by example: charge corrections at the marks change who goes next
(a tenant whose request failed is not charged for it), tenant weights, the window, URGENT
charged too, and the ``reason`` of each kind of choice."""

from __future__ import annotations

import asyncio

import pytest

from llm_queue_dispatcher import (
    FairPriorityConfig,
    LLMQueueDispatcher,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
)
from tests.policies.support import Limiter, Store, limiter_for, make_dispatcher, make_store, request

STORES = ["memory", "external"]
LIMITERS = ["native", "python"]


class Fair:
    """A fair dispatcher on a roomy limiter, and helpers to drive it.

    Over an external store the prefetch buffer is filled before a selection when it is empty,
    and otherwise in the background after a message leaves it: the tests let that fill land
    after each dequeue, and where a ranking after a mark matters they let the buffer run empty
    first, so that the next selection sees every visible message in both stores.
    """

    def __init__(self, store: Store, limiter: Limiter, **fair: object) -> None:
        self.clock = ManualClock(1_000.0)
        self.dispatcher: LLMQueueDispatcher[str] = make_dispatcher(
            make_store(store, self.clock),
            self.clock,
            policy="fair_priority",
            fair=FairPriorityConfig(reserve_tokens=0, **fair),  # type: ignore[arg-type]
        )
        self.limiter = limiter_for(limiter, LLMThrottle(6_000, 1_000_000, clock=self.clock))

    async def add(self, request_id: str, tenant: str | None, tokens: int, **kwargs: object) -> None:
        self.clock.advance(1.0)  # each request older than the next
        await self.dispatcher.enqueue(request(request_id, tenant=tenant, tokens=tokens, **kwargs))  # type: ignore[arg-type]

    async def next(self) -> ProcessableMessage[str]:
        job = await self.dispatcher.dequeue(self.limiter)
        assert job is not None
        for _ in range(3):
            await asyncio.sleep(0)  # an external store's background fill lands
        return job

    async def usage(self) -> dict[str, float]:
        return {
            name: t.tokens_in_window
            for name, t in (await self.dispatcher.get_queue_metrics()).tenants.items()
        }


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_a_tenant_whose_request_failed_is_not_charged_for_it(store: Store, limiter: Limiter) -> None:
    fair = Fair(store, limiter)
    await fair.add("b0", "b", 10)
    await (await fair.next()).mark_as_processed(actual_tokens=10)
    await fair.add("a1", "a", 1_000)
    first = await fair.next()
    assert first.message.payload.id == "a1"
    assert await fair.usage() == {"a": 1_000, "b": 10}
    await first.mark_as_failed(RuntimeError("retry"))
    assert await fair.usage() == {"a": 0, "b": 10}
    # Uncharged, "a" used less than "b": a1 again, ahead of b1.
    await fair.add("b1", "b", 10)
    again = await fair.next()
    assert again.message.payload.id == "a1"
    await again.mark_as_dead_lettered(RuntimeError("give up"))
    assert await fair.usage() == {"a": 0, "b": 10}
    await (await fair.next()).mark_as_processed(actual_tokens=10)  # b1: "b" used 20
    # Dead-lettered: not charged either; a2 goes ahead of the older b2.
    await fair.add("b2", "b", 10)
    await fair.add("a2", "a", 10)
    assert (await fair.next()).message.payload.id == "a2"
    assert (await fair.next()).message.payload.id == "b2"


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_the_actual_count_at_a_mark_replaces_the_estimate(store: Store, limiter: Limiter) -> None:
    fair = Fair(store, limiter)
    await fair.add("a1", "a", 1_000)
    await fair.add("b1", "b", 10)
    await fair.add("b2", "b", 10)
    await fair.add("a2", "a", 10)
    a1 = await fair.next()
    b1 = await fair.next()
    assert (a1.message.payload.id, b1.message.payload.id) == ("a1", "b1")  # b used less
    assert await fair.usage() == {"a": 1_000, "b": 10}
    await a1.mark_as_processed(actual_tokens=5)
    assert await fair.usage() == {"a": 5, "b": 10}
    # "a" now used less than "b": its a2 goes before the older b2.
    a2 = await fair.next()
    assert a2.message.payload.id == "a2"
    await b1.mark_as_processed(actual_tokens=10_000)  # more than estimated: charged in full
    await a2.mark_as_processed()  # no actual count: the estimate stands
    assert await fair.usage() == {"a": 15, "b": 10_000}


@pytest.mark.parametrize("store", STORES)
async def test_tenants_rank_by_use_per_weight(store: Store) -> None:
    fair = Fair(store, "native", tenant_weights={"gold": 4.0, "": 0.5})
    await fair.add("g1", "gold", 1_000)
    await fair.add("s1", "silver", 300)
    await fair.add("d1", None, 100)
    await fair.add("g2", "gold", 10)
    await fair.add("s2", "silver", 10)
    await fair.add("d2", None, 10)
    # Nobody has used anything: the oldest heads, in turn, while use per weight stays lower.
    order = [(await fair.next()).message.payload.id for _ in range(3)]
    assert order == ["g1", "s1", "d1"]
    # Use per weight: gold 1000/4 = 250, silver 300/1 = 300, default 100/0.5 = 200.
    order = [(await fair.next()).message.payload.id for _ in range(3)]
    assert order == ["d2", "g2", "s2"]


@pytest.mark.parametrize("store", STORES)
async def test_use_leaves_the_ranking_after_the_fairness_window(store: Store) -> None:
    fair = Fair(store, "native", fairness_window=30.0)
    await fair.add("a1", "a", 500)
    assert (await fair.next()).message.payload.id == "a1"
    dispatched = fair.clock.now()
    await fair.add("a2", "a", 10)
    await fair.add("b1", "b", 10)
    fair.clock.set(dispatched + 29.75)
    assert (await fair.usage())["a"] == 500
    b1 = await fair.next()
    assert b1.message.payload.id == "b1"  # "a" still carries a1
    await b1.mark_as_failed(RuntimeError("retry"))
    fair.clock.set(dispatched + 30.0)  # a charge counts for exactly the window
    assert (await fair.usage()).get("a", 0.0) == 0
    assert (await fair.next()).message.payload.id == "a2"  # ties again: the older head


@pytest.mark.parametrize("store", STORES)
async def test_urgent_requests_go_first_and_are_charged(store: Store) -> None:
    fair = Fair(store, "native")
    await fair.add("a-normal", "a", 10)
    await fair.add("b-normal", "b", 10)
    await fair.add("b-urgent", "b", 700, priority=Priority.URGENT)
    await fair.add("a-urgent", "a", 500, priority=Priority.URGENT)
    first, second = await fair.next(), await fair.next()
    assert [first.message.payload.id, second.message.payload.id] == ["b-urgent", "a-urgent"]
    assert "URGENT first" in first.reason
    assert await fair.usage() == {"a": 500, "b": 700}
    assert (await fair.next()).message.payload.id == "a-normal"  # a used less


@pytest.mark.parametrize("store", STORES)
async def test_urgent_first_off_ranks_urgent_inside_its_tenant(store: Store) -> None:
    fair = Fair(store, "native", urgent_first=False)
    await fair.add("a1", "a", 100)
    assert (await fair.next()).message.payload.id == "a1"
    await fair.add("b1", "b", 10)
    await fair.add("a-urgent", "a", 10, priority=Priority.URGENT)
    # "a" has used tokens, "b" has not: b1 first, though a-urgent is URGENT.
    assert (await fair.next()).message.payload.id == "b1"
    assert (await fair.next()).message.payload.id == "a-urgent"


@pytest.mark.parametrize("store", STORES)
async def test_inside_a_tenant_priority_then_deadline_then_age(store: Store) -> None:
    fair = Fair(store, "native")
    t = fair.clock.now()
    await fair.add("low", "a", 10, priority=Priority.LOW)
    await fair.add("normal-late", "a", 10, deadline=t + 500)
    await fair.add("normal-none", "a", 10)
    await fair.add("normal-soon", "a", 10, deadline=t + 100)
    await fair.add("normal-none-2", "a", 10)
    await fair.add("high", "a", 10, priority=Priority.HIGH)
    order = [(await fair.next()).message.payload.id for _ in range(6)]
    assert order == ["high", "normal-soon", "normal-late", "normal-none", "normal-none-2", "low"]


# --------------------------------------------------------------------------------------------
# reason
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_reason_of_an_urgent_choice(store: Store, limiter: Limiter) -> None:
    fair = Fair(store, limiter)
    await fair.add("u", "acme", 10, priority=Priority.URGENT)
    fair.clock.advance(4.5)
    reason = (await fair.next()).reason
    assert reason.startswith("fair_priority:")
    assert "URGENT" in reason
    assert "'acme'" in reason
    assert "waited 4.5 s" in reason


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_reason_of_a_tenant_choice(store: Store, limiter: Limiter) -> None:
    fair = Fair(store, limiter)
    await fair.add("a1", "a", 1_200)
    await (await fair.next()).mark_as_processed(actual_tokens=1_234)
    await fair.add("a2", "a", 10)
    await fair.add("b1", None, 10)
    fair.clock.advance(2.0)
    light = (await fair.next()).reason
    assert "the default tenant" in light
    assert "used 0 tokens" in light
    assert "rank 1 of 2" in light
    assert "NORMAL" in light
    assert "aged" not in light
    assert "waited 2.0 s" in light
    heavy = (await fair.next()).reason
    assert "'a'" in heavy
    assert "used 1,234 tokens in the last 60 s" in heavy
    assert "rank 1 of 1" in heavy
    assert "waited 3.0 s" in heavy


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_reason_of_an_aged_choice(store: Store, limiter: Limiter) -> None:
    fair = Fair(store, limiter, max_wait={Priority.LOW: 10.0})
    await fair.add("old-low", "a", 10, priority=Priority.LOW)
    await fair.add("normal", "a", 10)
    fair.clock.advance(9.0)  # old-low has waited exactly 10 s: not longer than max_wait
    first = await fair.next()
    assert first.message.payload.id == "normal"
    assert "aged" not in first.reason
    await first.mark_as_failed(RuntimeError("retry"))
    fair.clock.advance(0.25)  # now it has: it ranks as HIGH, ahead of the NORMAL one
    aged = await fair.next()
    assert aged.message.payload.id == "old-low"
    assert "HIGH (aged from LOW)" in aged.reason
    assert "waited 10.2 s" in aged.reason


# --------------------------------------------------------------------------------------------
# The reserve
# --------------------------------------------------------------------------------------------


class Tight(Fair):
    """A fair dispatcher on a 6,000-token bucket refilled at 100 tokens per second, without the
    URGENT reserve (these tests are about the tenant reserve; tests/policies/test_urgent.py
    covers the other)."""

    def __init__(self, store: Store, **config: object) -> None:
        super().__init__(store, "native")
        fair = FairPriorityConfig(**config)  # type: ignore[arg-type]
        self.dispatcher = make_dispatcher(
            make_store(store, self.clock),
            self.clock,
            policy="fair_priority",
            fair=fair,
            hold_budget=False,
            urgent_reserve=0,
        )
        self.throttle = LLMThrottle(6_000, 6_000, clock=self.clock)
        self.limiter = self.throttle

    async def maybe(self) -> str | None:
        """A dequeue; when it finds nothing but something changed since (over an external store,
        the background fill brought messages the selection could not see yet), a second one, as
        a loop on `time_until_ready()` would."""
        for _ in range(2):
            job = await self.dispatcher.dequeue(self.limiter)
            for _ in range(3):
                await asyncio.sleep(0)
            if job is not None or self.dispatcher.time_until_ready() > 0:
                break
        return None if job is None else job.message.payload.id


@pytest.mark.parametrize("store", STORES)
async def test_the_reserve_is_kept_back_only_from_a_tenant_that_used_its_fair_share(store: Store) -> None:
    """Backlogged: more than one message waiting, and at least its fair share of the window's
    capacity used (6,000 tokens refilled over the 60 s window, split between the two tenants
    waiting: 3,000 each)."""
    fair = Tight(store, reserve_tokens=500)
    await fair.add("h1", "heavy", 3_000)
    assert await fair.maybe() == "h1"  # alone: no reserve
    await fair.add("l1", "light", 2_800)
    await fair.add("l2", "light", 2_800)
    await fair.add("h2", "heavy", 100)
    await fair.add("h3", "heavy", 100)
    available = fair.throttle.get_metrics().tpm.available
    assert fair.throttle.consume("other traffic", int(available) - 3_000)
    # "light" has two waiting but has used nothing: no backlog to hold back, so l1 goes with
    # 3,000 tokens in the bucket (a backlog would need 2,800 + 500).
    assert await fair.maybe() == "l1"
    # "heavy" has used exactly its share, 3,000, and has two waiting: h2 must leave the
    # reserve, 100 + 500 tokens; l2 (2,800) does not fit at all.
    available = fair.throttle.get_metrics().tpm.available
    assert fair.throttle.consume("other traffic", int(available) - 200)
    assert await fair.maybe() is None
    fair.clock.advance(3.75)  # 575 tokens
    assert await fair.maybe() is None
    fair.clock.advance(0.25)
    assert await fair.maybe() == "h2"


@pytest.mark.parametrize("store", STORES)
async def test_the_automatic_reserve(store: Store) -> None:
    """1.5 times the largest recent estimate, at most a tenth of the capacity (rust/fair.rs,
    `FairRuntime::reserve`), measured as the wait of a backlogged tenant's head on an empty
    bucket: (estimate + reserve) / refill rate. A waiting tenant of weight 1,000 (its request
    can never fit, so it holds nothing) makes the others' fair share a few tokens: "b" is
    backlogged as soon as it has used any and has two waiting."""
    fair = Tight(store, tenant_weights={"z": 1_000.0})
    fair.dispatcher = make_dispatcher(
        make_store(store, fair.clock),
        fair.clock,
        policy="fair_priority",
        fair=FairPriorityConfig(tenant_weights={"z": 1_000.0}),
        prefetch_interval=1_000.0,  # a held wait over an external store is capped by it
        urgent_reserve=0,
    )
    await fair.add("never", "z", 10_000)
    await fair.add("b0", "b", 10)
    assert await fair.maybe() == "b0"

    async def wait_of_a_backlog() -> float:
        await fair.add("b1", "b", 100)
        await fair.add("b2", "b", 100)
        fair.throttle.reset()
        assert fair.throttle.consume("drain", 6_000)
        assert await fair.maybe() is None
        wait = fair.dispatcher.time_until_ready()
        fair.throttle.reset()
        for _ in range(2):
            job = await fair.dispatcher.dequeue(fair.limiter)
            assert job is not None
            await job.mark_as_processed()
        return wait

    assert await wait_of_a_backlog() == pytest.approx((100 + 15) / 100)  # largest so far: 10
    assert await wait_of_a_backlog() == pytest.approx((100 + 150) / 100)  # largest: 100
    await fair.add("big", "c", 300)
    fair.throttle.reset()
    assert await fair.maybe() == "big"
    assert await wait_of_a_backlog() == pytest.approx((100 + 450) / 100)
    await fair.add("huge", "c", 5_000)
    fair.throttle.reset()
    assert await fair.maybe() == "huge"
    assert await wait_of_a_backlog() == pytest.approx((100 + 600) / 100)  # at most 10 %


# The tenant's head and its age, over the in-memory store and an external one alike (the prefetch
# buffer ranks by the message's age, not by when the buffer received it).


def fair_over(store: Store, **settings: object):  # type: ignore[no-untyped-def]
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
    clock, dispatcher, limiter = fair_over(store)
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
    clock, dispatcher, limiter = fair_over(store, max_wait={Priority.NORMAL: 5.0})
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
    clock, dispatcher, limiter = fair_over(store)

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
