"""The global choice (``redis/global_choice.py``): `fair_priority` ranked over the whole Redis
queue with one tenant ledger on the server, judged against the brute-force reference
(``tests/reference/fair.py``) at every hand-out, with one process on a manual clock and with
two and four real processes on one queue."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ReceiptHandleError,
    StorageError,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from tests.redis.conftest import Workers, fresh_name
from tests.redis.support import RedisServer, ReplyCutter, fair_dispatcher
from tests.reference.fair import AGED, FairMessage, FairModel, FairSettings, lane

WEIGHTS = {"t0": 2.0, "t3": 0.5}
TENANTS = ["t0", "t1", "t2", "t3"]


def workload(
    count: int, seed: int, *, deadline_base: float, mix: tuple[int, ...] = (1, 1, 1, 1)
) -> list[LLMRequest[Any]]:
    """Requests of four tenants (two weighted), every priority, some deadlines, token counts
    from 50 to 2,000, and the actual count each mark will report (half to one and a half)."""
    rng = random.Random(seed)
    requests = []
    for n in range(count):
        tokens = rng.randint(50, 2000)
        deadline = None
        if rng.random() < 0.2:
            deadline = datetime.fromtimestamp(deadline_base + rng.randint(1, 50) * 10, timezone.utc)
        requests.append(
            LLMRequest(
                f"r{n}",
                {"actual": rng.randint(tokens // 2, tokens * 3 // 2)},
                Priority(rng.choices([0, 1, 2, 3], weights=[1, 4, 10, 5])[0]),
                TokenInfo(tokens),
                tenant=rng.choices(TENANTS, weights=mix)[0],
                deadline=deadline,
            )
        )
    return requests


def as_reference(request: LLMRequest[Any], order: int, enqueued_at: float) -> FairMessage:
    return FairMessage(
        id=request.id,
        tenant=request.tenant or "",
        priority=int(request.priority),
        tokens=request.token_info.estimated,
        enqueued_at=enqueued_at,
        order=order,
        deadline=None if request.deadline is None else request.deadline.timestamp(),
    )


# -- one process, manual clock ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tpm", "mix", "arrivals"),
    [
        (6_000, (1, 1, 1, 1), (0, 0, 1, 3)),  # a backlog: the budget binds, aging
        (6_000, (1, 1, 1, 8), (0, 1, 1, 2)),  # one tenant floods: it is backlogged
        (30_000, (1, 1, 1, 1), (0, 0, 0, 1)),  # sparse: backlogs clear, no reserve kept
    ],
)
async def test_each_hand_out_is_the_reference_winner_as_time_ages_messages_and_empties_the_window(
    clocked_storage: Any,
    clocked_throttle: Any,
    clock: ManualClock,
    tpm: int,
    mix: tuple[int, ...],
    arrivals: tuple[int, ...],
) -> None:
    """Enqueues, hand-outs and marks over 40 minutes of a manual clock, with a budget that binds:
    every decision is the reference's (aging at 300 and 900 s, a 60 s window, corrections at
    the marks, the URGENT and tenant reserves): the message it hands out, or, when the
    reference's winner does not fit with its reserves, nothing (the budget is held for it)."""
    storage = clocked_storage()
    # "warn": a count above the estimate leaves no debt, so what the limiter admits is what its
    # metrics say it holds.
    limiter = clocked_throttle(rpm=600, tpm=tpm, adjustment_failure_strategy="warn")
    settings = FairSettings(tenant_weights=WEIGHTS)
    model = FairModel(settings)
    dispatcher = fair_dispatcher(storage, tenant_weights=WEIGHTS)
    assert dispatcher._global is not None
    rng = random.Random(7)
    requests = iter(workload(400, 1, deadline_base=clock(), mix=mix))
    visible: dict[str, FairMessage] = {}
    order = 0
    handed_out = held = aged = reserved = 0
    for _ in range(600):
        for _ in range(rng.choice(arrivals)):
            request = next(requests, None)
            if request is None:
                break
            message = await dispatcher.enqueue(request)
            reference = as_reference(request, order, message.attributes.enqueued_at.timestamp())
            visible[request.id] = reference
            model.observe(reference)
            order += 1
        now = clock()
        metrics = await limiter.get_metrics()
        tokens, requests_left = metrics.tpm.available, metrics.rpm.available
        choice = model.choose(
            list(visible.values()),
            now,
            capacity=tpm,
            refill_rate=tpm / 60,
            admits=lambda n, tokens=tokens, left=requests_left: n <= tokens and left >= 1,
            hold=True,
        )
        job = await dispatcher.dequeue(limiter)
        if job is None:
            assert choice is None or not choice.fits, f"held, but the reference sends {choice}"
            held += choice is not None
        else:
            assert choice is not None, "a hand-out from an empty reference queue"
            assert choice.fits
            assert job.message.payload.id == choice.message.id
            handed_out += 1
            aged += lane(choice.message, now, settings) == AGED
            reserved += choice.margin > 0
            key = model.dispatched(visible.pop(job.message.payload.id), now)
            actual = job.message.payload.payload["actual"]
            await job.mark_as_processed(actual_tokens=actual)
            model.corrected(key, actual)
        clock.advance(rng.choice([0.5, 2.0, 4.0, 9.0]))
    assert handed_out > 100
    if arrivals == (0, 0, 1, 3):  # the backlog: every path ran often
        assert held > 20
        assert aged > 5
        assert reserved > 20
    await dispatcher.close()


async def test_a_failed_or_released_job_takes_its_charge_back_and_a_count_corrects_it(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    usage_key = storage._keys[16]
    await dispatcher.batch_enqueue(
        [LLMRequest(f"a{n}", "x", Priority.NORMAL, TokenInfo(100), tenant="A") for n in range(3)]
    )
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert await storage.redis.hget(usage_key, "A") == b"100"
    await first.mark_as_failed(RuntimeError("provider down"))
    assert await storage.redis.hget(usage_key, "A") is None  # taken back whole
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    await second.mark_as_processed(actual_tokens=250)
    assert await storage.redis.hget(usage_key, "A") == b"250"
    third = await dispatcher.dequeue(limiter)
    assert third is not None
    await third.release()
    assert await storage.redis.hget(usage_key, "A") == b"250"
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(250)
    clock.advance(61.0)  # the charge leaves the window with the next dispatch
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert await storage.redis.hget(usage_key, "A") == b"100"
    await again.mark_as_processed(actual_tokens=100)
    await dispatcher.close()


async def test_a_stale_mark_settles_its_own_reservation_and_raises(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A job whose lease ran out and whose message another dispatcher holds: its mark raises
    `ReceiptHandleError`, gives back only its own reservation and charge, and the other
    dispatcher's delivery stands."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    one, other = fair_dispatcher(storage), fair_dispatcher(storage)
    await one.enqueue(LLMRequest("r", "x", Priority.NORMAL, TokenInfo(400), tenant="A"))
    late = await one.dequeue(limiter)
    assert late is not None
    clock.advance(31.0)
    fresh = await other.dequeue(limiter)
    assert fresh is not None
    assert fresh.message.attributes.receive_count == 2
    with pytest.raises(ReceiptHandleError):
        await late.mark_as_processed(actual_tokens=50)
    assert await storage.redis.hget(storage._keys[16], "A") == b"450"  # 50 + the new delivery's 400
    await fresh.mark_as_processed(actual_tokens=400)
    assert await storage.get_approximate_message_count() == 0
    await one.close()
    await other.close()


async def test_a_message_above_the_capacity_is_skipped_and_holds_nothing(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher = fair_dispatcher(storage)
    await dispatcher.enqueue(LLMRequest("huge", "x", Priority.URGENT, TokenInfo(5_000), tenant="A"))
    await dispatcher.enqueue(LLMRequest("small", "x", Priority.LOW, TokenInfo(10), tenant="A"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "small"
    await job.mark_as_processed()
    assert await dispatcher.dequeue(limiter) is None
    assert await storage.get_approximate_message_count() == 1
    await dispatcher.close()


async def test_other_limiters_and_custom_policies_keep_the_per_process_buffer(redis_url: str) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    elsewhere = RedisThrottle(redis_url, fresh_name("limiter"), rpm=60, tpm=1_000, namespace="other")
    async with storage, elsewhere:
        fair = fair_dispatcher(storage)
        assert fair._global is not None
        assert not fair._global.usable_with(LLMThrottle(60, 1_000))
        assert not fair._global.usable_with(elsewhere)  # another hash tag: not co-located
        unheld = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(hold_budget=False))
        assert unheld._global is None
        no_hold = LLMQueueDispatcher(
            storage, LLMQueueDispatcherConfig(policy="fair_priority", hold_budget=False)
        )
        assert no_hold._global is None
        # Through the buffer all the same: the message is handed out.
        await fair.enqueue(LLMRequest("r", "x", Priority.NORMAL, TokenInfo(10)))
        job = await fair.dequeue(LLMThrottle(60, 1_000))
        assert job is not None
        await job.mark_as_processed()
        await fair.close()


# -- real processes ------------------------------------------------------------------------------


def _replay(records: list[dict[str, Any]], requests: list[LLMRequest[Any]], enqueued_at: float) -> list[str]:
    """Replays the processes' hand-outs and marks in the server's order against the reference;
    returns the ids in hand-out order."""
    by_id = {r.id: r for r in requests}
    visible = {r.id: as_reference(r, n, enqueued_at) for n, r in enumerate(requests)}
    events = sorted(
        (r for r in records if r["event"] in ("recv", "ack")), key=lambda r: (r["at"], r["event"] == "recv")
    )
    model = FairModel(FairSettings(tenant_weights=WEIGHTS))
    keys: dict[str, int] = {}
    served: list[str] = []
    for event in events:
        now = event["at"] / 1_000_000
        if event["event"] == "recv":
            expected = model.order(visible.values(), now)[0].message
            assert event["id"] == expected.id, (
                f"hand-out {len(served)}: {event['id']} instead of {expected.id}"
            )
            keys[event["id"]] = model.dispatched(visible.pop(event["id"]), now)
            served.append(event["id"])
        else:
            model.corrected(keys[event["id"]], by_id[event["id"]].payload["actual"])
    return served


def _shares(served: list[str], requests: list[LLMRequest[Any]]) -> dict[str, float]:
    """Each tenant's share of the estimated tokens served by the first half of the hand-outs
    (while every tenant is still backlogged)."""
    by_id = {r.id: r for r in requests}
    tokens: dict[str, int] = defaultdict(int)
    for rid in served[: len(served) // 2]:
        tokens[by_id[rid].tenant or ""] += by_id[rid].token_info.estimated
    total = sum(tokens.values())
    return {tenant: tokens[tenant] / total for tenant in TENANTS}


async def _run_processes(server: RedisServer, workers: Workers, tmp_path: Path, processes: int) -> list[str]:
    queue, limiter = fresh_name("global"), fresh_name("budget")
    storage: RedisStorage[Any] = RedisStorage(server.url, queue)
    requests = workload(240, 3, deadline_base=time.time())
    async with storage:
        messages = await storage.batch_enqueue(requests)
    enqueued_at = messages[0].attributes.enqueued_at.timestamp()
    go = tmp_path / f"go-{queue}"
    options = {
        "url": server.url,
        "queue": queue,
        "limiter": limiter,
        "rpm": 1e7,
        "tpm": 1e9,
        "weights": WEIGHTS,
    }
    for _ in range(processes):
        workers.start("global", go=str(go), max_seconds=60, **options)
    await asyncio.sleep(0.5)  # every process imported and waiting
    go.touch()
    workers.wait(90)
    records = [r for r in workers.records() if r.get("at") is not None]
    received = [r["id"] for r in records if r["event"] == "recv"]
    # Each message handed out once, to one process, and every one of them.
    assert sorted(received) == sorted(r.id for r in requests)
    assert len({r["pid"] for r in records if r["event"] == "recv"}) == processes
    return _replay(records, requests, enqueued_at)


@pytest.mark.parametrize("processes", [2, 4])
async def test_every_hand_out_of_several_processes_is_the_global_winner_of_its_instant(
    private_server: RedisServer, workers: Workers, tmp_path: Path, processes: int
) -> None:
    """Two or four processes drain one queue at once: replayed in the server's order, each
    hand-out is the first message of the reference's order over what was visible then, with
    the tenants' use as the marks so far corrected it; and the tenants' token shares are those
    of one process draining the same queue."""
    several = await _run_processes(private_server, workers, tmp_path, processes)
    alone = tmp_path / "alone"
    alone.mkdir()
    one = await _run_processes(private_server, Workers(alone), tmp_path, 1)
    for tenant, share in _shares(one, workload(240, 3, deadline_base=0)).items():
        assert _shares(several, workload(240, 3, deadline_base=0))[tenant] == pytest.approx(share, abs=0.03)


async def test_a_killed_process_leases_come_back_and_its_tenant_use_expires(
    private_server: RedisServer, workers: Workers, tmp_path: Path
) -> None:
    """``kill -9`` of a process holding three jobs: they are handed out again once their
    visibility runs out, and the charges it made leave the shared record with the window."""
    queue, limiter = fresh_name("global"), fresh_name("budget")
    storage: RedisStorage[Any] = RedisStorage(private_server.url, queue)
    requests = workload(20, 5, deadline_base=time.time())
    async with storage:
        await storage.batch_enqueue(requests)
        options = {"url": private_server.url, "queue": queue, "limiter": limiter, "rpm": 1e6, "tpm": 1e9}
        victim = workers.start("global", hold_jobs=3, visibility=1.0, window=2.0, max_seconds=60, **options)
        deadline = time.monotonic() + 30
        while not any(r["event"] == "holding" for r in workers.records()):
            assert time.monotonic() < deadline, "the victim never took its jobs"
            await asyncio.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        held = {r["id"] for r in workers.records() if r["event"] == "recv"}
        usage = {k.decode(): int(v) for k, v in (await storage.redis.hgetall(storage._keys[16])).items()}
        assert sum(usage.values()) == sum(r.token_info.estimated for r in requests if r.id in held)
        await asyncio.sleep(1.2)  # their visibility ran out
        workers.start("global", visibility=1.0, window=2.0, max_seconds=60, **options)
        workers.wait(60)
        records = workers.records()
        again = [r for r in records if r["event"] == "recv" and r["id"] in held and r["count"] == 2]
        assert {r["id"] for r in again} == held
        assert {r["id"] for r in records if r["event"] == "ack"} == {r.id for r in requests}
        await asyncio.sleep(2.1)  # every charge left the window: the next dispatch drops them
        limiter_client = RedisThrottle(private_server.url, limiter, rpm=1e6, tpm=1e9)
        async with limiter_client:
            assert await fair_dispatcher(storage, fairness_window=2.0).dequeue(limiter_client) is None
        assert await storage.redis.hgetall(storage._keys[16]) == {}
        assert await storage.redis.zcard(storage._keys[17]) == 0
        assert await storage.redis.hlen(storage._keys[18]) == 0


async def test_the_scripts_load_again_after_a_flush_and_a_held_winner_reports_its_wait(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """After ``SCRIPT FLUSH`` (a restarted server) the dispatch and the mark load their scripts
    again by themselves; a winner the limiter cannot admit yet holds the budget: nothing below
    it goes until it fits."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher = fair_dispatcher(storage)
    await dispatcher.batch_enqueue(
        [
            LLMRequest("big", "x", Priority.HIGH, TokenInfo(900), tenant="A"),
            LLMRequest("small", "x", Priority.LOW, TokenInfo(10), tenant="A"),
        ]
    )
    await storage.redis.script_flush()
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert first.message.payload.id == "big"
    await storage.redis.script_flush()
    await first.mark_as_processed(actual_tokens=900)
    await dispatcher.enqueue(LLMRequest("next", "x", Priority.HIGH, TokenInfo(900), tenant="A"))
    assert await dispatcher.dequeue(limiter) is None  # "next" is held for; "small" does not pass it
    # 800 tokens at 1,000 a minute: 48 s; the dispatcher looks again within `prefetch_interval`
    # (other processes may enqueue a message that outranks the held one).
    assert 0 < dispatcher.time_until_ready() <= 5.0
    clock.advance(47.0)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(1.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "next"
    await job.mark_as_processed(actual_tokens=900)
    await dispatcher.close()


async def test_a_worker_takes_a_winner_for_every_free_handler_in_one_script(redis_url: str) -> None:
    """A `Worker` with eight handlers over the global choice: its free handlers' jobs come from
    one script each time (several winners in rank order), and every message is handled once."""
    from llm_queue_dispatcher import Worker
    from llm_queue_dispatcher.redis import global_choice

    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e9)
    requests = workload(120, 9, deadline_base=time.time())
    asked: list[int] = []
    handled: list[str] = []
    original = global_choice.GlobalChoice.attempt_many

    async def counted(self: Any, limiter: Any, count: int) -> Any:
        asked.append(count)
        return await original(self, limiter, count)

    async def handle(job: Any) -> int:
        handled.append(job.message.payload.id)
        await asyncio.sleep(0.002)
        return int(job.message.payload.payload["actual"])

    async with storage, limiter:
        await storage.batch_enqueue(requests)
        dispatcher = fair_dispatcher(storage)
        worker = Worker(dispatcher, limiter, handle, concurrency=8)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(global_choice.GlobalChoice, "attempt_many", counted)
            await worker.run(stop_when_empty=True)
        await dispatcher.close()
        assert sorted(handled) == sorted(r.id for r in requests)
        assert max(asked) > 1
        assert len(asked) < len(requests)
        assert await storage.get_approximate_message_count() == 0


async def test_a_request_id_enqueued_again_within_the_window_is_charged_once(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A request processed, then enqueued again under the same id and dispatched within the
    window: its first charge leaves the record when the second is made (they share the
    delivery key), and the record empties with the window."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    usage_key = storage._keys[16]
    for actual in (300, 200):
        await dispatcher.enqueue(LLMRequest("same", "x", Priority.NORMAL, TokenInfo(100), tenant="A"))
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed(actual_tokens=actual)
        clock.advance(1.0)
    assert await storage.redis.hget(usage_key, "A") == b"200"
    clock.advance(60.0)
    assert await dispatcher.dequeue(limiter) is None
    assert await storage.redis.hgetall(usage_key) == {}
    await dispatcher.close()


async def test_the_global_choice_carries_on_across_a_server_restart(private_server: RedisServer) -> None:
    """``kill -9`` of redis-server and a restart on its append-only file between a dispatch and
    its mark: the mark lands (its scripts load again), the tenant record and the limiter kept
    the charge and the reservation, and the next dispatch is the next winner."""
    storage: RedisStorage[Any] = RedisStorage(private_server.url, "restart")
    limiter = RedisThrottle(private_server.url, "restart-budget", rpm=600, tpm=100_000)
    async with storage, limiter:
        dispatcher = fair_dispatcher(storage)
        await dispatcher.batch_enqueue(
            [
                LLMRequest("a", "x", Priority.NORMAL, TokenInfo(100), tenant="A"),
                LLMRequest("b", "x", Priority.NORMAL, TokenInfo(100), tenant="B"),
                LLMRequest("a2", "x", Priority.NORMAL, TokenInfo(100), tenant="A"),
            ]
        )
        first = await dispatcher.dequeue(limiter)
        assert first is not None
        assert first.message.payload.id == "a"
        private_server.kill()
        private_server.restart()
        await first.mark_as_processed(actual_tokens=150)
        assert await storage.redis.hget(storage._keys[16], "A") == b"150"
        history = (await limiter.get_metrics()).consumption_history
        assert (history.count, history.total_tokens) == (1, 150)  # the reservation, adjusted
        second = await dispatcher.dequeue(limiter)
        assert second is not None
        assert second.message.payload.id == "b"  # A used 150, B nothing
        await second.mark_as_processed(actual_tokens=100)
        await dispatcher.close()


async def test_no_reserve_is_kept_while_a_backlog_clears(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """An URGENT request of 1,000 tokens sizes the URGENT reserve at 1,500. A NORMAL one of
    5,000 must then find 6,000 in the bucket, a full one; but once nothing has arrived for as
    long as the bucket takes to refill both reserves (21 s at 100 tokens/s) and the bucket
    admits everything waiting, it goes with its own 5,000: at 50 s, not 60."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=6_000, adjustment_failure_strategy="warn")
    dispatcher = fair_dispatcher(storage)
    await dispatcher.enqueue(LLMRequest("u", "x", Priority.URGENT, TokenInfo(1_000), tenant="A"))
    urgent = await dispatcher.dequeue(limiter)
    assert urgent is not None
    await urgent.mark_as_processed(actual_tokens=6_000)  # the bucket is empty
    await dispatcher.enqueue(LLMRequest("m", "x", Priority.NORMAL, TokenInfo(5_000), tenant="B"))
    clock.advance(49.9)
    assert await dispatcher.dequeue(limiter) is None  # 4,990 in the bucket
    clock.advance(0.1)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "m"
    await job.mark_as_processed(actual_tokens=5_000)
    await dispatcher.close()


async def test_a_message_dead_lettered_by_its_receives_is_ranked_in_the_dead_letter_queue(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """With ``max_receive_count=1`` a job whose lease runs out is dead-lettered by the next
    script; the dead-letter queue's index holds it, so a global dispatcher on that queue hands
    it out, and the first queue's index no longer does."""
    dead = fresh_name("dead")
    storage = clocked_storage(max_receive_count=1, dead_letter=dead)
    graveyard = clocked_storage(queue=dead)
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher, reader = fair_dispatcher(storage), fair_dispatcher(graveyard)
    await dispatcher.enqueue(LLMRequest("r", "x", Priority.HIGH, TokenInfo(100), tenant="A"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    clock.advance(31.0)
    assert await dispatcher.dequeue(limiter) is None
    assert await storage.redis.zcard(storage._keys[11]) == 0
    again = await reader.dequeue(limiter)
    assert again is not None
    assert again.message.payload.id == "r"
    await again.mark_as_processed()
    await dispatcher.close()
    await reader.close()


async def test_a_call_over_many_tenants_takes_fewer_winners_and_the_next_calls_drain_the_rest(
    redis_url: str,
) -> None:
    """Each winner's lookup reads every tenant with visible messages: a call of 64 winners over
    thousands of tenants held Redis for seconds (past its busy-script limit, BUSY for every
    client). A call's winners are capped by the heads it reads; the next calls take the rest, in
    the same order, each message once."""
    from llm_queue_dispatcher.redis import global_choice

    tenants = 1_000
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e9, tpm=1e12)
    requests = [
        LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(10), tenant=f"tenant-{n}") for n in range(tenants)
    ]
    async with storage, limiter:
        await storage.batch_enqueue(requests)
        dispatcher = fair_dispatcher(storage)
        assert dispatcher._global is not None
        first = await dispatcher._global.attempt_many(limiter, 64)
        assert isinstance(first, list)
        cap = global_choice._HEADS_PER_CALL // tenants
        assert len(first) == cap
        taken = [job.message.payload.id for job in first]
        while len(taken) < tenants:
            more = await dispatcher._global.attempt_many(limiter, 64)
            assert isinstance(more, list)
            assert more
            taken += [job.message.payload.id for job in more]
        # One tenant each, all use zero: the oldest first, enqueue order.
        assert taken == [r.id for r in requests]
        await dispatcher.close()


# What a queue written before the ranking index looks like: states of seven fields, no index,
# no 'indexed' mark in the queue's meta.
_AS_BEFORE_THE_INDEX = """
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  local p, at, rc, first, token, mid, rid = cmsgpack.unpack(raw[i + 1])
  redis.call('HSET', KEYS[1], raw[i], cmsgpack.pack(p, at, rc, first, token, mid, rid))
end
redis.call('HDEL', KEYS[2], 'indexed', 'waiting', 'arrival')
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
"""


async def test_messages_stored_before_the_index_are_indexed_and_handed_out_with_new_ones(
    redis_url: str,
) -> None:
    """A queue filled by a version without the ranking index: its visible messages were never
    handed out by the global choice (visible, counted, yet invisible to every dispatch). The
    first dispatch indexes the queue; old and new messages then go out in the fair order, and
    one that was in flight joins the index when it comes back."""
    queue = fresh_name("queue")
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue)
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e9)
    async with storage, limiter:
        await storage.batch_enqueue(
            [
                LLMRequest("old-low", "x", Priority.LOW, TokenInfo(10), tenant="a"),
                LLMRequest("old-high", "x", Priority.HIGH, TokenInfo(10), tenant="a"),
                LLMRequest("old-held", "x", Priority.HIGH, TokenInfo(10), tenant="b"),
            ]
        )
        held = await storage.dequeue(1, 60.0)
        assert len(held) == 1  # leased by a process of the older version
        prefix = f"{{lqd}}:q:{queue}:"
        index = ("lanes", "tenants", "aging:2", "aging:3", "urgent", "recent-urgent")
        await storage.redis.eval(
            _AS_BEFORE_THE_INDEX,
            2 + len(index),
            prefix + "state",
            prefix + "meta",
            *(prefix + k for k in index),
        )
        await storage.enqueue(LLMRequest("new", "x", Priority.NORMAL, TokenInfo(10), tenant="c"))
        dispatcher = fair_dispatcher(storage)
        taken = []
        for _ in range(3):
            job = await dispatcher.dequeue(limiter, timeout=0)
            assert job is not None
            taken.append(job.message.payload.id)
            await job.mark_as_processed()
        await storage.release_message(held[0].attributes.receipt_handle)
        job = await dispatcher.dequeue(limiter, timeout=0)
        assert job is not None
        taken.append(job.message.payload.id)
        await job.mark_as_processed()
        assert sorted(taken) == sorted(["old-low", "old-high", "old-held", "new"])
        assert taken[-1] == held[0].payload.id
        assert await storage.get_approximate_message_count() == 0
        await dispatcher.close()


async def test_a_dequeue_cancelled_while_its_reply_is_in_flight_gives_back_lease_budget_and_charge(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """The script ran (the winner leased, its budget reserved, its tenant charged) but the
    caller was cancelled before reading the reply: nobody holds the job. Its lease, reservation
    and charge go back at once, as if that receive had not happened, instead of staying out until
    the visibility timeout and the fairness window."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher = fair_dispatcher(storage)
    assert dispatcher._global is not None
    await dispatcher.enqueue(LLMRequest("r", "x", Priority.NORMAL, TokenInfo(1_000), tenant="A"))
    connection = storage._connection
    original = connection.run
    cancelled: list[str] = []

    async def reply_lost_to_cancellation(script: Any, keys: Any, args: Any) -> Any:
        result = await original(script, keys, args)
        if script.name == "global_dispatch" and not cancelled:
            cancelled.append(script.name)
            raise asyncio.CancelledError
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "run", reply_lost_to_cancellation)
        with pytest.raises(asyncio.CancelledError):
            await dispatcher.dequeue(limiter, timeout=0)
        await dispatcher.close()  # waits for the give-back
    assert cancelled == ["global_dispatch"]
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 1
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert await storage.redis.hget(storage._keys[16], "A") is None  # no charge left
    # The whole bucket is back (the clock stands still: nothing refilled).
    again = fair_dispatcher(storage)
    job = await again.dequeue(limiter, timeout=0)
    assert job is not None
    assert job.message.attributes.receive_count == 1
    await job.mark_as_processed()
    await again.close()


async def test_estimates_whose_sum_passes_a_redis_integer_are_enqueued_whole_and_the_queue_stays_usable(
    redis_url: str,
) -> None:
    """The index keeps the visible messages' estimates summed. Estimates each valid (below
    2**53) whose sum passed 2**63 failed the enqueue script midway: part of an all-or-nothing
    batch stored, the caller told it failed, and every later enqueue of the queue refused."""
    biggest = 2**53 - 1
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e6)
    async with storage, limiter:
        await storage.batch_enqueue(
            [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(biggest), tenant="t") for n in range(1_100)]
        )
        assert await storage.get_approximate_message_count() == 1_100
        await storage.enqueue(LLMRequest("small", "x", Priority.NORMAL, TokenInfo(5), tenant="u"))
        dispatcher = fair_dispatcher(storage)
        job = await dispatcher.dequeue(limiter, timeout=0)  # the others never fit: skipped
        assert job is not None
        assert job.message.payload.id == "small"
        await job.mark_as_processed()
        await storage.purge()
        assert await storage.get_approximate_message_count() == 0
        await dispatcher.close()


async def test_a_message_from_before_the_index_dead_lettered_is_handed_out_from_the_dead_letter_queue(
    redis_url: str,
) -> None:
    """An unindexed message whose receives ran out lands in a dead-letter queue this version
    created (marked indexed): the dead-letter queue is indexed again, and a dispatcher over it
    hands the message out."""
    queue, dead = fresh_name("queue"), fresh_name("dead")
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue, max_receive_count=1, dead_letter=dead)
    dead_storage: RedisStorage[Any] = RedisStorage(redis_url, dead)
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e9)
    async with storage, dead_storage, limiter:
        await dead_storage.enqueue(LLMRequest("fresh", "x", Priority.NORMAL, TokenInfo(10), tenant="b"))
        await storage.enqueue(LLMRequest("old", "x", Priority.HIGH, TokenInfo(10), tenant="a"))
        prefix = f"{{lqd}}:q:{queue}:"
        index = ("lanes", "tenants", "aging:2", "aging:3", "urgent", "recent-urgent")
        await storage.redis.eval(
            _AS_BEFORE_THE_INDEX,
            2 + len(index),
            prefix + "state",
            prefix + "meta",
            *(prefix + k for k in index),
        )
        assert len(await storage.dequeue(1, 0.01)) == 1  # an older process's one receive
        await asyncio.sleep(0.05)
        assert await storage.get_approximate_message_count() == 0  # dead-lettered
        dispatcher = fair_dispatcher(dead_storage)
        taken = []
        for _ in range(2):
            job = await dispatcher.dequeue(limiter, timeout=0)
            assert job is not None
            taken.append(job.message.payload.id)
            await job.mark_as_processed()
        assert sorted(taken) == ["fresh", "old"]
        await dispatcher.close()


async def test_a_dispatch_whose_reply_timed_out_gives_back_lease_budget_and_charge(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """The script ran but its reply came too late (the client's timeout): `dequeue` raises
    `StorageError`, and the winner it could not hand out goes back at once with its reservation
    and charge, instead of staying out until its visibility timeout and the fairness window."""
    import redis.exceptions

    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher = fair_dispatcher(storage)
    await dispatcher.enqueue(LLMRequest("r", "x", Priority.NORMAL, TokenInfo(1_000), tenant="A"))
    connection = storage._connection
    original = connection.run
    lost: list[str] = []

    async def reply_too_late(script: Any, keys: Any, args: Any) -> Any:
        result = await original(script, keys, args)
        if script.name == "global_dispatch" and not lost:
            lost.append(script.name)
            raise redis.exceptions.TimeoutError("Timeout reading from the server")
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "run", reply_too_late)
        with pytest.raises(StorageError):
            await dispatcher.dequeue(limiter, timeout=0)
        await dispatcher.close()  # waits for the give-back
    assert lost == ["global_dispatch"]
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 1
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert await storage.redis.hget(storage._keys[16], "A") is None
    again = fair_dispatcher(storage)
    job = await again.dequeue(limiter, timeout=0)
    assert job is not None
    assert job.message.attributes.receive_count == 1
    await job.mark_as_processed()
    await again.close()


async def test_a_dispatch_that_fails_midway_counts_what_it_wrote_before_the_error(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """A dispatch call for three winners fails at its second (that message's stored state is
    unreadable): Redis keeps what the script wrote before the error, so the first winner stays
    leased with its grant, and what counts them must say so: the tenant's visible count and
    the visible estimates' sum lose it, the limiter's bucket holds its reservation and its grant
    counter passed its number (the next grant gets a number of its own, never overwriting it)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    await dispatcher.batch_enqueue(
        [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(100), tenant="A") for n in range(3)]
    )
    member = await storage.redis.hget(storage._keys[2], "r1")
    state = await storage.redis.hget(storage._keys[4], member)
    await storage.redis.hset(storage._keys[4], member, b"\x9c\x01")  # an array cut short
    with pytest.raises(StorageError):
        await dispatcher._dequeue_up_to(limiter, 3)
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 1
    assert attributes.approximate_number_of_messages == 2
    assert await storage.redis.hget(storage._keys[12], "A") == b"2"
    assert float(await storage.redis.hget(storage._keys[0], "waiting")) == pytest.approx(200)
    state_key, grants, order = limiter._keys[0], limiter._keys[1], limiter._keys[2]
    assert await storage.redis.hget(state_key, "grants") == b"1"
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(100)
    await storage.redis.hset(storage._keys[4], member, state)  # readable again
    jobs = await dispatcher._dequeue_up_to(limiter, 3)
    assert sorted(job.message.payload.id for job in jobs) == ["r1", "r2"]
    numbers = await storage.redis.lrange(order, 0, -1)
    assert len(numbers) == len(set(numbers)) == await storage.redis.hlen(grants) == 3
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(300)
    for job in jobs:
        await job.mark_as_processed()
    await dispatcher.close()


async def test_a_window_or_max_wait_too_long_to_count_in_microseconds_is_forever(redis_url: str) -> None:
    """`FairPriorityConfig` takes any finite fairness window and max_wait; beyond about 1e302 s
    their microseconds are inf, and building the dispatcher raised `OverflowError`. They count
    as forever: the dispatcher is built and hands out as usual."""
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e9)
    async with storage, limiter:
        dispatcher = fair_dispatcher(storage, fairness_window=1e308, max_wait={Priority.NORMAL: 1e308})
        assert dispatcher._global is not None
        await storage.batch_enqueue(
            [
                LLMRequest("normal", "x", Priority.NORMAL, TokenInfo(10), tenant="a"),
                LLMRequest("high", "x", Priority.HIGH, TokenInfo(10), tenant="a"),
            ]
        )
        taken = []
        for _ in range(2):
            job = await dispatcher.dequeue(limiter, timeout=0)
            assert job is not None
            taken.append(job.message.payload.id)
            await job.mark_as_processed()
        assert taken == ["high", "normal"]
        await dispatcher.close()


async def test_input_and_output_limits_are_reserved_by_their_parts_and_a_message_that_never_fits_is_skipped(
    redis_url: str,
) -> None:
    """A `RedisThrottle` with ITPM and OTPM: the global choice reserved a message's whole
    estimate from each, so a request of 10 input and 4,000 output tokens never fitted an ITPM
    of 1,000 and held the whole queue for ever. It is reserved by its parts, as the per-process
    path reserves it; a message that can never fit one limit (5,000 input tokens) is skipped
    and holds nothing, as one above the TPM is."""
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1_000, tpm=100_000, itpm=1_000, otpm=5_000)
    async with storage, limiter:
        await storage.batch_enqueue(
            [
                LLMRequest("too-long", "x", Priority.HIGH, TokenInfo(input=5_000, max_output=10), tenant="a"),
                LLMRequest(
                    "long-reply", "x", Priority.HIGH, TokenInfo(input=10, max_output=4_000), tenant="a"
                ),
                LLMRequest("short", "x", Priority.NORMAL, TokenInfo(input=10, max_output=10), tenant="a"),
            ]
        )
        dispatcher = fair_dispatcher(storage)
        taken = []
        for _ in range(2):
            job = await dispatcher.dequeue(limiter, timeout=0)
            assert job is not None
            taken.append(job.message.payload.id)
            await job.mark_as_processed()
        assert taken == ["long-reply", "short"]
        assert await dispatcher.dequeue(limiter, timeout=0) is None
        assert await storage.get_approximate_message_count() == 1  # too-long waits, holding nothing
        await dispatcher.close()


async def test_a_mark_by_input_and_output_parts_corrects_each_limit_with_its_own_count(
    redis_url: str,
) -> None:
    """A job of the global choice marked with the provider's input and output counts: the
    input limit takes the input count and the output limit the output count, as the
    per-process path's mark does (not the whole total each)."""
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    limiter = RedisThrottle(
        redis_url, fresh_name("limiter"), rpm=1_000, tpm=100_000, itpm=10_000, otpm=10_000
    )
    async with storage, limiter:
        await storage.enqueue(
            LLMRequest("r", "x", token_info=TokenInfo(input=1_000, max_output=2_000), tenant="a")
        )
        dispatcher = fair_dispatcher(storage)
        assert dispatcher._global is not None
        assert dispatcher._global.usable_with(limiter)
        job = await dispatcher.dequeue(limiter, timeout=0)
        assert job is not None
        await job.mark_as_processed(input_tokens=1_200, output_tokens=300)
        metrics = await limiter.get_metrics()
        assert metrics.itpm is not None
        assert metrics.otpm is not None
        # Slow refills: what the marks took shows at once (a few tokens refill meanwhile).
        assert 10_000 - 1_200 <= metrics.itpm.available < 10_000 - 1_200 + 50
        assert 10_000 - 300 <= metrics.otpm.available < 10_000 - 300 + 50
        assert 100_000 - 1_500 <= metrics.tpm.available < 100_000 - 1_500 + 100
        await dispatcher.close()


async def test_a_message_past_the_retention_period_is_never_handed_out(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """More messages expire at once than one call drops (1,000): those left wait in the index.
    The global choice handed one of them out, past its retention period; it expires it instead,
    as every reader of the queue does."""
    storage = clocked_storage(message_retention=60.0)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    await storage.batch_enqueue(
        [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(10), tenant=f"t{n % 3}") for n in range(1_100)]
    )
    clock.advance(61.0)
    dispatcher = fair_dispatcher(storage)
    assert await dispatcher.dequeue(limiter, timeout=0) is None
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert attributes.approximate_number_of_messages == 0
    assert attributes.expired == 1_100
    await dispatcher.close()


async def test_a_dispatch_whose_connection_dropped_is_resent_and_hands_its_winner_out_once(
    reply_cutter: ReplyCutter,
) -> None:
    """The connection drops after the script ran: the client sends the call again, which is
    answered from the first run's kept reply. The winner is handed out once, leased once,
    reserved once."""
    storage: RedisStorage[Any] = RedisStorage(reply_cutter.url, fresh_name("queue"))
    limiter = RedisThrottle(reply_cutter.url, fresh_name("limiter"), rpm=600, tpm=1_000)
    async with storage, limiter:
        await storage.batch_enqueue(
            [
                LLMRequest("a", "x", Priority.NORMAL, TokenInfo(600), tenant="A"),
                LLMRequest("b", "x", Priority.NORMAL, TokenInfo(600), tenant="B"),
            ]
        )
        dispatcher = fair_dispatcher(storage)
        reply_cutter.armed = 1
        job = await dispatcher.dequeue(limiter, timeout=0)
        assert reply_cutter.cuts == 1
        assert job is not None
        assert job.message.attributes.receive_count == 1
        attributes = await storage.get_queue_attributes()
        assert attributes.approximate_number_of_messages_in_flight == 1
        # One reservation of 600: the other message (600) does not fit the 1,000 until it ends.
        assert await dispatcher.dequeue(limiter, timeout=0) is None
        await job.mark_as_failed(RuntimeError("x"))
        await dispatcher.close()
