"""``get_queue_metrics().tenants`` under both policies: per tenant, visible and in-flight counts,
token use over the fairness window (charged at dispatch, corrected at the marks), tokens served
and wait-time percentiles."""

from __future__ import annotations

import pytest

from llm_queue_dispatcher import FairPriorityConfig, LLMThrottle, ManualClock, Priority
from tests.policies.support import Store, make_dispatcher, make_store, request

POLICIES = ["score", "fair_priority"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("store", ["memory", "external"])
async def test_tenant_metrics_follow_dispatches_and_marks(policy: str, store: Store) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(
        make_store(store, clock),
        clock,
        policy=policy,
        fair=FairPriorityConfig(fairness_window=60.0) if policy == "fair_priority" else None,
    )
    limiter = LLMThrottle(600, 100_000, clock=clock)
    t0 = clock.now()
    await dispatcher.enqueue(request("a1", tenant="a", priority=Priority.URGENT, tokens=100))
    await dispatcher.enqueue(request("b1", tenant="b", priority=Priority.HIGH, tokens=300))
    await dispatcher.enqueue(request("a2", tenant="a", priority=Priority.NORMAL, tokens=200))
    await dispatcher.enqueue(request("d1", priority=Priority.LOW, tokens=50))
    clock.advance(4.0)
    a1 = await dispatcher.dequeue(limiter)
    clock.advance(2.0)
    b1 = await dispatcher.dequeue(limiter)
    assert a1 is not None
    assert b1 is not None
    assert (a1.message.payload.id, b1.message.payload.id) == ("a1", "b1")

    tenants = (await dispatcher.get_queue_metrics()).tenants
    assert tenants["a"].in_flight == 1
    assert tenants["b"].in_flight == 1
    assert tenants["a"].tokens_in_window == 100
    assert tenants["b"].tokens_in_window == 300
    assert tenants["a"].tokens_served == tenants["b"].tokens_served == 0
    assert tenants["a"].wait_time_percentiles.p50 == pytest.approx(4.0)
    assert tenants["b"].wait_time_percentiles.p99 == pytest.approx(6.0)
    assert tenants.get("") is None or tenants[""].tokens_in_window == 0
    if store == "memory":
        assert (tenants["a"].visible, tenants["b"].visible, tenants[""].visible) == (1, 0, 1)
        assert tenants[""].in_flight == 0

    await a1.mark_as_processed(actual_tokens=80)
    await b1.mark_as_failed(RuntimeError("retry"))
    tenants = (await dispatcher.get_queue_metrics()).tenants
    assert tenants["a"].tokens_in_window == 80
    assert tenants["a"].tokens_served == 80
    assert tenants["b"].tokens_in_window == 0  # not charged for a failed request
    assert tenants["b"].tokens_served == 0
    assert tenants["a"].in_flight == tenants["b"].in_flight == 0
    if store == "memory":
        assert (tenants["a"].visible, tenants["b"].visible) == (1, 1)

    clock.set(t0 + 4.0 + 61.0)  # past the fairness window of every charge
    tenants = (await dispatcher.get_queue_metrics()).tenants
    assert all(t.tokens_in_window == 0 for t in tenants.values()), tenants
    assert tenants["a"].tokens_served == 80


@pytest.mark.parametrize("policy", POLICIES)
async def test_tenant_metrics_count_the_default_tenant_and_every_waiting_tenant(policy: str) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = make_dispatcher(make_store("memory", clock), clock, policy=policy)
    for i, tenant in enumerate([None, "x", "y", "y", "z"]):
        await dispatcher.enqueue(request(f"r{i}", tenant=tenant))
    tenants = (await dispatcher.get_queue_metrics()).tenants
    assert {name: t.visible for name, t in tenants.items()} == {"": 1, "x": 1, "y": 2, "z": 1}
    assert tenants["y"].to_dict()["visible"] == 2


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("reserve", [True, False])
async def test_tokens_in_window_without_a_reservation(policy: str, reserve: bool) -> None:
    """With or without ``reserve_budget``, ``tokens_in_window`` counts a processed request at its
    actual count (not the estimate and the count) and a failed one not at all."""
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


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
@pytest.mark.parametrize("store", ["memory", "external"])
async def test_waiting_tenants_are_reported(policy: str, store: Store) -> None:
    """Tenants with waiting messages are reported, buffered ones of an external store included."""
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
