"""URGENT first under both policies, the reserve every non-URGENT dispatch leaves for it, and
priority inside ``fair_priority`` (the README's "How a request is chosen"): over the in-memory
store and an external one (the prefetch buffer), with `LLMThrottle` and a plain-Python
limiter. The exactness of each rule over random runs is in test_exact.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    FairPriorityConfig,
    LLMQueueDispatcher,
    LLMThrottle,
    ManualClock,
    Priority,
    ScoringConfig,
    ScoringWeights,
)
from tests.policies.support import Limiter, Store, limiter_for, make_dispatcher, make_store, request

STORES = ["memory", "external"]
LIMITERS = ["native", "python"]
POLICIES = ["score", "fair_priority"]
# 60,000 tokens a minute: the bucket refills 1,000 tokens a second.
TPM = 60_000


@dataclass
class Queue:
    clock: ManualClock
    throttle: LLMThrottle
    limiter: Any
    dispatcher: LLMQueueDispatcher[str]

    async def add(self, request_id: str, priority: Priority, tokens: int, tenant: str | None = None) -> None:
        await self.dispatcher.enqueue(request(request_id, tenant=tenant, priority=priority, tokens=tokens))

    async def next(self) -> str | None:
        """A dequeue; over an external store the background fill lands before it returns, and
        when it found nothing but that fill changed what it could see, a second one (as a loop
        on `time_until_ready()` would)."""
        for _ in range(2):
            job = await self.dispatcher.dequeue(self.limiter)
            for _ in range(3):
                await asyncio.sleep(0)
            if job is not None or self.dispatcher.time_until_ready() > 0:
                break
        if job is None:
            return None
        await job.mark_as_processed()
        return job.message.payload.id

    def leave(self, tokens: int) -> None:
        """Other traffic takes the bucket down to ``tokens``."""
        available = self.throttle.get_metrics().tpm.available
        assert self.throttle.consume("other traffic", int(available) - tokens)


def queue(policy: str, store: Store = "memory", limiter: Limiter = "native", **config: Any) -> Queue:
    clock = ManualClock(1_000.0)
    throttle = LLMThrottle(6_000, TPM, clock=clock)
    if policy == "score":
        config.setdefault("min_score_threshold", 0.0)
    config.setdefault("prefetch_interval", 1_000.0)  # a held wait over an external store is capped by it
    fair = config.pop("fair_priority", None)
    dispatcher = make_dispatcher(make_store(store, clock), clock, policy=policy, fair=fair, **config)
    return Queue(clock, throttle, limiter_for(limiter, throttle), dispatcher)


# ------------------------------------------------------------------------------------------------
# URGENT first
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_a_fresh_urgent_request_goes_ahead_of_old_high_ones_that_score_more(
    store: Store, limiter: Limiter
) -> None:
    q = queue("score", store, limiter)
    await q.add("old-high", Priority.HIGH, 500)
    q.clock.advance(60.0)  # its wait factor is saturated: it outscores a fresh URGENT request
    await q.add("urgent", Priority.URGENT, 500)
    assert await q.next() == "urgent"
    assert await q.next() == "old-high"


@pytest.mark.parametrize("config", [{"hold_budget": False}, {"urgent_first": False}])
async def test_without_urgent_first_urgent_is_one_weighted_factor(config: dict[str, Any]) -> None:
    """The TypeScript library's rule: ``hold_budget=False`` (and ``urgent_first`` left None), or
    ``urgent_first=False``."""
    q = queue("score", **config)
    await q.add("old-high", Priority.HIGH, 500)
    q.clock.advance(60.0)
    await q.add("urgent", Priority.URGENT, 500)
    assert await q.next() == "old-high"


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
@pytest.mark.parametrize("custom", [False, True])
async def test_an_urgent_request_below_the_threshold_holds_back_no_request_above_it(
    store: Store, limiter: Limiter, custom: bool
) -> None:
    """URGENT ranks first, but one scoring below ``min_score_threshold`` is not sent, and the
    best request above the threshold goes instead of nothing; below it, nothing goes."""
    # Token fit above all, priority a little: a 1-token URGENT request scores about 0.05.
    weights = ScoringWeights(
        priority=0.05, efficiency=0, wait_time=0, retry=0, token_fit=0.5, processing_time=0
    )
    nothing = [CustomScorer("nothing", 0.01, lambda message, context: 0.0)] if custom else []
    scoring = ScoringConfig(weights=weights, custom_scorers=nothing)
    q = queue("score", store, limiter, min_score_threshold=0.1, scoring=scoring)
    await q.add("tiny-urgent", Priority.URGENT, 1)
    await q.add("tiny-normal", Priority.NORMAL, 1)
    await q.add("good-fit", Priority.NORMAL, 30_000)
    assert await q.next() == "good-fit"
    assert await q.next() is None  # the best total left, the URGENT one's, is below the threshold
    # Nothing will cross the threshold (no wait weight); an external store looks again after
    # its prefetch interval.
    assert q.dispatcher.time_until_ready() == (float("inf") if store == "memory" else 1_000.0)


@pytest.mark.parametrize("store", STORES)
async def test_custom_scores_do_not_lift_a_request_above_urgent(store: Store) -> None:
    vip = CustomScorer("vip", 5.0, lambda message, context: 1.0 if message.payload.id == "vip" else 0.0)
    scoring = ScoringConfig(custom_scorers=[vip])
    q = queue("score", store, scoring=scoring, max_candidates_to_evaluate=50)
    await q.add("vip", Priority.LOW, 100)
    await q.add("urgent", Priority.URGENT, 100)
    assert await q.next() == "urgent"
    turned_off = queue("score", store, scoring=scoring, urgent_first=False)
    await turned_off.add("vip", Priority.LOW, 100)
    await turned_off.add("urgent", Priority.URGENT, 100)
    assert await turned_off.next() == "vip"


# ------------------------------------------------------------------------------------------------
# The URGENT reserve
# ------------------------------------------------------------------------------------------------


async def backlog(q: Queue) -> None:
    """An URGENT request of 3,000 tokens sizes the automatic reserve (6,000: room for two), then
    a backlog of two NORMAL requests of 8,000 tokens each, of two tenants that used nothing."""
    await q.add("first-urgent", Priority.URGENT, 3_000, tenant="a")
    assert await q.next() == "first-urgent"
    await q.add("n1", Priority.NORMAL, 8_000, tenant="b")
    await q.add("n2", Priority.NORMAL, 8_000, tenant="c")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("limiter", LIMITERS)
async def test_every_non_urgent_dispatch_leaves_the_urgent_reserve(
    policy: str, store: Store, limiter: Limiter
) -> None:
    q = queue(policy, store, limiter)
    await backlog(q)
    q.leave(10_000)
    # 8,000 fits, but not with the 6,000 left for URGENT requests: held until 14,000 are there.
    assert await q.next() is None
    assert q.dispatcher.time_until_ready() == pytest.approx(4.0)
    # An URGENT request arriving meanwhile finds its budget at once, and so does a second one.
    await q.add("u1", Priority.URGENT, 3_000, tenant="b")
    await q.add("u2", Priority.URGENT, 3_000, tenant="c")
    assert await q.next() == "u1"
    assert await q.next() == "u2"
    q.clock.advance(10.0)
    assert await q.next() == "n1"


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_lone_request_of_a_quiet_tenant_leaves_it_too(policy: str) -> None:
    """Not only a backlogged tenant: a tenant with a single request, that used nothing."""
    q = queue(policy)
    await backlog(q)
    q.leave(10_000)
    for _ in range(2):
        assert await q.next() is None  # held: each of n1 and n2 is its tenant's only request


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_fixed_urgent_reserve_and_none(policy: str) -> None:
    fixed = queue(policy, urgent_reserve=1_000)
    await backlog(fixed)
    fixed.leave(10_000)
    assert await fixed.next() == "n1"  # 8,000 + 1,000 fit
    none = queue(policy, urgent_reserve=0)
    await backlog(none)
    none.leave(8_000)
    assert await none.next() == "n1"


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_clearing_backlog_keeps_no_reserve(policy: str) -> None:
    """When the bucket holds everything waiting and nothing has arrived for as long as the
    reserves take to refill, the last requests go without them."""
    q = queue(
        policy,
        **({"fair_priority": FairPriorityConfig(reserve_tokens=0)} if policy == "fair_priority" else {}),
    )
    await backlog(q)
    q.leave(10_000)
    q.clock.advance(1.0)  # the bucket holds 11,000; waiting: 16,000
    assert await q.next() is None
    q.clock.advance(5.0)  # 16,000: everything waiting fits, and nothing arrived for 6 s
    assert await q.next() == "n1"
    assert await q.next() == "n2"


# ------------------------------------------------------------------------------------------------
# fair_priority: priority keeps its meaning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_with_one_tenant_high_goes_before_normal_before_low(store: Store) -> None:
    q = queue("fair_priority", store)
    await q.add("low", Priority.LOW, 100)
    q.clock.advance(1.0)
    await q.add("normal", Priority.NORMAL, 100)
    q.clock.advance(1.0)
    await q.add("high", Priority.HIGH, 100)
    assert [await q.next() for _ in range(3)] == ["high", "normal", "low"]


@pytest.mark.parametrize("store", STORES)
async def test_a_backlog_of_aged_requests_never_overtakes_fresh_high_ones(store: Store) -> None:
    fair = FairPriorityConfig(max_wait={Priority.NORMAL: 10.0, Priority.LOW: 20.0})
    q = queue("fair_priority", store, fair_priority=fair)
    for i in range(3):
        await q.add(f"old-low{i}", Priority.LOW, 100)
        q.clock.advance(1.0)
        await q.add(f"old-normal{i}", Priority.NORMAL, 100)
        q.clock.advance(1.0)
    q.clock.advance(100.0)  # all aged
    await q.add("fresh-normal", Priority.NORMAL, 100)
    await q.add("fresh-high", Priority.HIGH, 100)
    order = [await q.next() for _ in range(8)]
    assert order[0] == "fresh-high"
    # The aged ones, oldest first, ahead of the fresh NORMAL one.
    assert order[1:] == [
        "old-low0",
        "old-normal0",
        "old-low1",
        "old-normal1",
        "old-low2",
        "old-normal2",
        "fresh-normal",
    ]


@pytest.mark.parametrize("store", STORES)
async def test_a_tenant_below_its_share_is_not_starved_by_anothers_higher_classes(store: Store) -> None:
    q = queue("fair_priority", store, fair_priority=FairPriorityConfig(reserve_tokens=0))
    for i in range(5):
        await q.add(f"heavy-high{i}", Priority.HIGH, 1_000, tenant="heavy")
    await q.add("light-low", Priority.LOW, 1_000, tenant="light")
    # Both used nothing: the HIGH head first. Then "heavy" has used tokens, "light" has not.
    assert await q.next() == "heavy-high0"
    assert await q.next() == "light-low"
    assert await q.next() == "heavy-high1"


@pytest.mark.parametrize("urgent_first", [True, False])
async def test_an_urgent_request_is_exempt_from_the_reserve(urgent_first: bool) -> None:
    """With ``urgent_first`` on or off, an URGENT request of a tenant over its share finds budget
    at once: the reserve is kept for it, not from it."""
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
