"""`get_queue_metrics().scheduling`: SLO attainment per priority and the binding limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMThrottle,
    ManualClock,
    Priority,
    SchedulingMetrics,
    SloAttainment,
    create_in_memory_queue,
)
from llm_queue_dispatcher.metrics import LIMITS
from tests.dispatcher import support
from tests.dispatcher.support import CountingLimiter, SteppedClock, request, throttle

POLICIES = ["score", "fair_priority"]


def queue(clock: ManualClock, **overrides: Any) -> LLMQueueDispatcher[Any]:
    """A queue whose messages stay leased for an hour (a message handed out and left unmarked
    does not come back while a test lets minutes pass)."""
    return support.queue(clock, **{"visibility_timeout": 3_600.0, **overrides})


async def dispatch_after(
    dispatcher: LLMQueueDispatcher[Any],
    limiter: Any,
    clock: ManualClock,
    name: str,
    priority: Priority,
    wait: float,
) -> None:
    """Enqueues ``name`` alone, lets ``wait`` seconds pass, and dispatches it."""
    await dispatcher.enqueue(request(name, priority))
    clock.advance(wait)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == name
    await job.mark_as_processed()


async def scheduling(dispatcher: LLMQueueDispatcher[Any]) -> SchedulingMetrics:
    return (await dispatcher.get_queue_metrics()).scheduling


@pytest.mark.parametrize("policy", POLICIES)
async def test_slo_attainment_is_the_share_of_each_priority_dispatched_within_its_target(
    clock: ManualClock, policy: str
) -> None:
    dispatcher = queue(
        clock, policy=policy, slo_targets={"URGENT": 1.0, Priority.HIGH: 30.0}, metrics_retention=1_000.0
    )
    limiter = throttle(clock)
    # URGENT: 0.5 s and exactly 1 s meet the target, 2 s misses; HIGH: 30 s meets, 31 s misses.
    for name, priority, wait in [
        ("u1", Priority.URGENT, 0.5),
        ("u2", Priority.URGENT, 2.0),
        ("u3", Priority.URGENT, 1.0),
        ("h1", Priority.HIGH, 31.0),
        ("h2", Priority.HIGH, 30.0),
        ("n1", Priority.NORMAL, 299.0),
    ]:
        await dispatch_after(dispatcher, limiter, clock, name, priority, wait)
    slo = (await scheduling(dispatcher)).slo_attainment
    assert slo == {
        "URGENT": SloAttainment(target=1.0, dispatched=3, met=2, attainment=2 / 3),
        "HIGH": SloAttainment(target=30.0, dispatched=2, met=1, attainment=0.5),
        # Left out of slo_targets: the defaults.
        "NORMAL": SloAttainment(target=300.0, dispatched=1, met=1, attainment=1.0),
        "LOW": SloAttainment(target=1800.0, dispatched=0, met=0, attainment=None),
    }


async def test_slo_attainment_covers_the_metrics_window_only(clock: ManualClock) -> None:
    dispatcher = queue(clock, metrics_retention=100.0)
    limiter = throttle(clock)
    await dispatch_after(dispatcher, limiter, clock, "old", Priority.URGENT, 5.0)
    clock.advance(60.0)
    await dispatch_after(dispatcher, limiter, clock, "new", Priority.URGENT, 0.0)
    assert (await scheduling(dispatcher)).slo_attainment["URGENT"].attainment == 0.5
    clock.advance(50.0)  # "old" was dispatched 110 s ago: out of the 100 s window
    urgent = (await scheduling(dispatcher)).slo_attainment["URGENT"]
    assert (urgent.dispatched, urgent.met, urgent.attainment) == (1, 1, 1.0)
    clock.advance(100.0)
    urgent = (await scheduling(dispatcher)).slo_attainment["URGENT"]
    assert (urgent.dispatched, urgent.met, urgent.attainment) == (0, 0, None)


async def test_every_priority_has_the_default_targets_without_slo_targets(clock: ManualClock) -> None:
    slo = (await scheduling(queue(clock))).slo_attainment
    assert {name: s.target for name, s in slo.items()} == {
        "URGENT": 1.0,
        "HIGH": 30.0,
        "NORMAL": 300.0,
        "LOW": 1800.0,
    }


@pytest.mark.parametrize("policy", POLICIES)
async def test_the_binding_limit_is_tpm_when_tokens_run_out(clock: ManualClock, policy: str) -> None:
    dispatcher = queue(clock, policy=policy)
    limiter = throttle(clock, rpm=600, tpm=1_000)
    await dispatcher.batch_enqueue([request("a", tokens=900), request("b", tokens=900)])
    assert await dispatcher.dequeue(limiter) is not None
    assert (await scheduling(dispatcher)).binding_limit == "none"
    assert await dispatcher.dequeue(limiter) is None  # 100 tokens left
    # Refused, nothing dispatched since: TPM holds the queue now.
    assert (await scheduling(dispatcher)).binding_limit == "TPM"
    clock.advance(60.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "b"
    metrics = await scheduling(dispatcher)
    assert metrics.binding_limit == "TPM"
    assert metrics.waited_by_limit == {**dict.fromkeys(LIMITS, 0), "TPM": 1}


@pytest.mark.parametrize("policy", POLICIES)
async def test_the_binding_limit_is_rpm_when_requests_run_out(clock: ManualClock, policy: str) -> None:
    dispatcher = queue(clock, policy=policy)
    limiter = throttle(clock, rpm=1, tpm=100_000)
    await dispatcher.batch_enqueue([request("a", tokens=10), request("b", tokens=10)])
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "RPM"
    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is not None
    metrics = await scheduling(dispatcher)
    assert metrics.binding_limit == "RPM"
    assert metrics.waited_by_limit["RPM"] == 1


async def test_the_binding_limit_is_concurrency_when_every_slot_is_busy(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = LLMThrottle(600, 100_000, clock=clock, max_concurrent=1)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "concurrency"


@pytest.mark.parametrize(("limits", "binding"), [({"otpm": 1_000}, "OTPM"), ({"rpd": 1}, "RPD")])
async def test_the_binding_limit_names_a_providers_other_limits(
    clock: ManualClock, limits: dict[str, float], binding: str
) -> None:
    dispatcher = queue(clock)
    limiter = LLMThrottle(600, 100_000, clock=clock, **limits)
    await dispatcher.batch_enqueue([request("a", tokens=900), request("b", tokens=900)])
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == binding


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_winner_held_while_a_smaller_message_fits_names_the_token_limit(
    clock: ManualClock, policy: str
) -> None:
    dispatcher = queue(clock, policy=policy)
    limiter = throttle(clock, rpm=600, tpm=1_000)
    await dispatcher.enqueue(request("first", Priority.HIGH, tokens=500))
    assert await dispatcher.dequeue(limiter) is not None  # 500 tokens left
    await dispatcher.batch_enqueue(
        [request("big", Priority.HIGH, tokens=900), request("small", Priority.LOW, 10)]
    )
    # The budget is held for the HIGH winner, though the LOW one would fit.
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "TPM"


async def test_the_binding_limit_is_the_one_most_dispatches_waited_for(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=4, tpm=1_000)
    await dispatcher.batch_enqueue([request(f"t{i}", tokens=500) for i in range(4)])
    # Two fit at once; the others wait for tokens, 30 s each.
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(30.0)
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(30.0)
    assert await dispatcher.dequeue(limiter) is not None
    metrics = await scheduling(dispatcher)
    assert metrics.waited_by_limit["TPM"] == 2
    assert metrics.binding_limit == "TPM"
    # Then the requests run out, for one dispatch only.
    clock.advance(60.0)
    await dispatcher.batch_enqueue([request(f"r{i}", tokens=1) for i in range(5)])
    for _ in range(4):
        assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "RPM"  # refusing now
    clock.advance(15.0)
    assert await dispatcher.dequeue(limiter) is not None
    metrics = await scheduling(dispatcher)
    assert (metrics.waited_by_limit["TPM"], metrics.waited_by_limit["RPM"]) == (2, 1)
    # TPM made the most dispatches wait.
    assert metrics.binding_limit == "TPM"


async def test_no_binding_limit_when_nothing_waited_for_the_limiter(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock)
    for i in range(3):
        await dispatch_after(dispatcher, limiter, clock, f"m{i}", Priority.NORMAL, 1.0)
    # An empty queue is not a refusal.
    assert await dispatcher.dequeue(limiter) is None
    metrics = await scheduling(dispatcher)
    assert metrics.binding_limit == "none"
    assert set(metrics.waited_by_limit.values()) == {0}


@pytest.mark.parametrize("native", [True, False])
async def test_a_request_that_can_never_fit_waits_for_no_limit(clock: ManualClock, native: bool) -> None:
    dispatcher = queue(clock)
    inner = throttle(clock, rpm=600, tpm=1_000)
    limiter = inner if native else CountingLimiter(inner)
    await dispatcher.enqueue(request("huge", tokens=5_000))  # over the 1,000-token capacity
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "none"


async def test_a_dispatch_enqueued_after_the_refusal_did_not_wait_for_the_limit(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=1, tpm=100_000)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None  # RPM refuses b
    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is not None  # b waited for RPM
    clock.advance(60.0)
    await dispatch_after(dispatcher, limiter, clock, "c", Priority.NORMAL, 0.0)  # no refusal since
    assert (await scheduling(dispatcher)).waited_by_limit["RPM"] == 1


async def test_the_binding_limit_leaves_the_window(clock: ManualClock) -> None:
    dispatcher = queue(clock, metrics_retention=100.0)
    limiter = throttle(clock, rpm=1, tpm=100_000)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is not None
    assert (await scheduling(dispatcher)).binding_limit == "RPM"
    clock.advance(101.0)
    metrics = await scheduling(dispatcher)
    assert metrics.binding_limit == "none"
    assert set(metrics.waited_by_limit.values()) == {0}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("hold_budget", [True, False])
async def test_another_limiters_refusal_names_the_binding_limit(
    clock: ManualClock, hold_budget: bool, policy: str
) -> None:
    dispatcher = queue(clock, hold_budget=hold_budget, policy=policy)
    limiter = CountingLimiter(throttle(clock, rpm=600, tpm=1_000))
    await dispatcher.batch_enqueue([request("a", tokens=900), request("b", tokens=900)])
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None
    assert (await scheduling(dispatcher)).binding_limit == "TPM"
    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is not None
    assert (await scheduling(dispatcher)).waited_by_limit["TPM"] == 1


async def test_refusals_keep_the_books_bounded(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = throttle(clock, rpm=1, tpm=100_000)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    assert await dispatcher.dequeue(limiter) is not None
    held = dispatcher._core._samples_held
    for _ in range(1_000):
        assert await dispatcher.dequeue(limiter) is None
    assert dispatcher._core._samples_held == held


async def test_a_clock_stepped_back_never_gives_negative_figures() -> None:
    clock = SteppedClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock, slo_targets={"NORMAL": 0.0})
    limiter = throttle(None, rpm=1)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    clock.now -= 100.0  # stepped back: the wait reads -100 s, counted as 0
    assert await dispatcher.dequeue(limiter) is not None
    assert await dispatcher.dequeue(limiter) is None  # RPM refuses
    clock.now -= 50.0
    metrics = await scheduling(dispatcher)
    normal = metrics.slo_attainment["NORMAL"]
    assert (normal.dispatched, normal.met, normal.attainment) == (1, 1, 1.0)
    assert metrics.binding_limit == "RPM"
    assert all(count >= 0 for count in metrics.waited_by_limit.values())


async def test_scheduling_metrics_are_plain_data(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatch_after(dispatcher, throttle(clock), clock, "m", Priority.HIGH, 3.0)
    data = (await dispatcher.get_queue_metrics()).to_dict()["scheduling"]
    assert data["slo_attainment"]["HIGH"] == {
        "target": 30.0,
        "dispatched": 1,
        "met": 1,
        "attainment": 1.0,
        "oldest_wait": None,
    }
    assert data["binding_limit"] == "none"
    assert list(data["waited_by_limit"]) == list(LIMITS)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(list(Priority)), st.floats(0.0, 40.0), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    targets=st.lists(st.sampled_from([0.0, 0.5, 1.0, 10.0, 30.0]), min_size=4, max_size=4),
)
@settings(max_examples=50, deadline=None)
def test_slo_attainment_matches_the_waits_the_jobs_report(
    steps: list[tuple[Priority, float, bool]], targets: list[float]
) -> None:
    """Against brute force: each priority's attainment is the share of its jobs whose wait, from
    the job's own enqueue and dispatch instants, is at most the target; with none dispatched,
    0.0 when one still waiting has waited past the target, else None."""

    async def run() -> None:
        clock = ManualClock(1_000.0)
        dispatcher = queue(
            clock, metrics_retention=10_000.0, slo_targets=dict(zip(Priority, targets, strict=True))
        )
        limiter = throttle(clock)
        waits: dict[str, list[float]] = {p.name: [] for p in Priority}
        enqueued: dict[str, float] = {}
        priorities: dict[str, Priority] = {}
        dispatched: set[str] = set()
        for index, (priority, seconds, dispatch) in enumerate(steps):
            await dispatcher.enqueue(request(f"m{index}", priority))
            enqueued[f"m{index}"] = clock.now()
            priorities[f"m{index}"] = priority
            clock.advance(seconds)
            if dispatch:
                job = await dispatcher.dequeue(limiter)
                assert job is not None
                name = job.message.payload.id
                dispatched.add(name)
                waits[Priority(job.message.payload.priority).name].append(job.dispatched_at - enqueued[name])
        slo = (await scheduling(dispatcher)).slo_attainment
        for priority, target in zip(Priority, targets, strict=True):
            seen = waits[priority.name]
            met = sum(1 for wait in seen if wait <= target)
            assert (slo[priority.name].dispatched, slo[priority.name].met) == (len(seen), met)
            waiting = [
                clock.now() - at
                for name, at in enqueued.items()
                if name not in dispatched and priorities[name] is priority
            ]
            oldest = max(waiting, default=None)
            assert slo[priority.name].oldest_wait == oldest
            if seen:
                assert slo[priority.name].attainment == met / len(seen)
            else:
                late = oldest is not None and oldest > target
                assert slo[priority.name].attainment == (0.0 if late else None)

    asyncio.run(run())


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_starved_priority_reads_as_missing_its_target_not_as_unknown(
    clock: ManualClock, policy: str
) -> None:
    """A class with nothing dispatched in the window but a message waiting past its target has
    attainment 0.0 (an alert on the ratio fires); one waiting within the target, or with
    nothing waiting, has None. ``oldest_wait`` is the oldest waiting message's wait."""
    dispatcher = queue(clock, policy=policy, slo_targets={"HIGH": 30.0, "LOW": 60.0})
    await dispatcher.enqueue(request("low", Priority.LOW))
    clock.advance(20.0)
    await dispatcher.enqueue(request("high", Priority.HIGH))
    clock.advance(20.0)
    slo = (await scheduling(dispatcher)).slo_attainment
    assert slo["HIGH"] == SloAttainment(30.0, 0, 0, None, oldest_wait=20.0)
    assert slo["LOW"] == SloAttainment(60.0, 0, 0, None, oldest_wait=40.0)
    assert slo["URGENT"].oldest_wait is None
    assert slo["URGENT"].attainment is None
    clock.advance(30.0)  # HIGH has waited 50 s (target 30 s), LOW 70 s (target 60 s)
    slo = (await scheduling(dispatcher)).slo_attainment
    assert slo["HIGH"] == SloAttainment(30.0, 0, 0, 0.0, oldest_wait=50.0)
    assert slo["LOW"] == SloAttainment(60.0, 0, 0, 0.0, oldest_wait=70.0)
    # Once a HIGH request is dispatched, its class's ratio is its dispatches' again.
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "high"
    slo = (await scheduling(dispatcher)).slo_attainment
    assert slo["HIGH"] == SloAttainment(30.0, 1, 0, 0.0, oldest_wait=None)
    assert slo["LOW"].attainment == 0.0
