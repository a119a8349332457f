"""Several winners per dispatch call of the global choice (``redis/global_choice.py``): a
`Worker`'s free handlers, and the dequeues of several tasks asked at once, each winner the
brute-force reference's (``tests/reference/fair.py``) as if dispatched one at a time."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from llm_queue_dispatcher import LLMRequest, ManualClock, Priority, TokenInfo
from tests.redis.test_global_choice import WEIGHTS, as_reference, fair_dispatcher, workload
from tests.reference.fair import FairMessage, FairModel, FairSettings


def count_dispatches(storage: Any, patch: pytest.MonkeyPatch) -> list[int]:
    """Patches the storage's connection: the winners asked by each ``global_dispatch`` call."""
    connection = storage._connection
    original = connection.run
    asked: list[int] = []

    async def counted(script: Any, keys: Any, args: Any) -> Any:
        if script.name == "global_dispatch":
            asked.append(int(args[4]))
        return await original(script, keys, args)

    patch.setattr(connection, "run", counted)
    return asked


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_winner_of_a_call_for_several_is_the_reference_winner_of_its_turn(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """Calls for one to eight winners over a queue of four tenants (weights, every priority,
    deadlines, aging) on a manual clock, marks correcting the tenants' use between calls: the
    i-th winner of a call is the reference's choice after the i - 1 before it were dispatched,
    with the same instant (the tenant heads and uses one call reads once must follow what each
    winner changes)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1e7, tpm=1e9)
    settings = FairSettings(tenant_weights=WEIGHTS)
    model = FairModel(settings)
    dispatcher = fair_dispatcher(storage, tenant_weights=WEIGHTS)
    rng = random.Random(seed)
    requests = iter(workload(300, seed, deadline_base=clock(), mix=(1, 1, 2, 4)))
    visible: dict[str, FairMessage] = {}
    order = 0
    several = 0
    for _ in range(120):
        for _ in range(rng.choice([0, 2, 4])):
            request = next(requests, None)
            if request is None:
                break
            message = await dispatcher.enqueue(request)
            reference = as_reference(request, order, message.attributes.enqueued_at.timestamp())
            visible[request.id] = reference
            model.observe(reference)
            order += 1
        now = clock()
        jobs = await dispatcher._dequeue_up_to(limiter, rng.randint(1, 8))
        several += len(jobs) > 1
        keys = []
        for job in jobs:
            choice = model.choose(
                list(visible.values()),
                now,
                capacity=1e9,
                refill_rate=1e9 / 60,
                admits=lambda n: True,
                hold=True,
            )
            assert choice is not None
            assert choice.fits
            assert job.message.payload.id == choice.message.id
            keys.append(model.dispatched(visible.pop(job.message.payload.id), now))
        if not jobs:
            assert not visible
        for job, key in zip(jobs, keys, strict=True):
            actual = job.message.payload.payload["actual"]
            await job.mark_as_processed(actual_tokens=actual)
            model.corrected(key, actual)
        clock.advance(rng.choice([1.0, 5.0, 30.0, 120.0]))
    assert several > 30
    await dispatcher.close()


async def test_dequeues_asked_at_once_share_one_call_and_each_gets_its_own_winner(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """Eight tasks dequeue at once from a queue of five: one call asks for eight winners; five
    tasks get one each, in rank order of asking (URGENT first), and the three left dispatch
    alone and get None."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    priorities = [Priority.LOW, Priority.NORMAL, Priority.URGENT, Priority.HIGH, Priority.NORMAL]
    await dispatcher.batch_enqueue(
        [LLMRequest(f"r{n}", "x", p, TokenInfo(100), tenant="A") for n, p in enumerate(priorities)]
    )
    with pytest.MonkeyPatch.context() as patch:
        asked = count_dispatches(storage, patch)
        jobs = await asyncio.gather(*(dispatcher.dequeue(limiter) for _ in range(8)))
    assert asked[0] == 8
    assert [job.message.payload.id if job else None for job in jobs] == ["r2", "r3", "r1", "r4", "r0"] + [
        None
    ] * 3
    for job in jobs[:5]:
        assert job is not None
        await job.mark_as_processed()
    assert await storage.get_approximate_message_count() == 0
    await dispatcher.close()


async def test_a_dequeue_cancelled_while_the_shared_call_is_on_its_way_gives_its_winner_back(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """Three dequeues share a call; one is cancelled before the reply: the other two get their
    winners, and the cancelled one's goes back whole (visible again, no reservation, no charge)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher = fair_dispatcher(storage)
    await dispatcher.batch_enqueue(
        [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(300), tenant="A") for n in range(3)]
    )
    connection = storage._connection
    original = connection.run
    tasks: list[asyncio.Future[Any]] = []
    asked: list[int] = []

    async def cancelled_meanwhile(script: Any, keys: Any, args: Any) -> Any:
        reply = await original(script, keys, args)
        if script.name == "global_dispatch" and not asked:
            asked.append(int(args[4]))
            tasks[1].cancel()  # the script ran: its three winners are leased and reserved
        return reply

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "run", cancelled_meanwhile)
        tasks += [asyncio.ensure_future(dispatcher.dequeue(limiter)) for _ in range(3)]
        first, third = await tasks[0], await tasks[2]
    assert asked == [3]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert first is not None
    assert third is not None
    await dispatcher.close()  # waits for the give-back
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 1
    assert attributes.approximate_number_of_messages_in_flight == 2
    assert await storage.redis.hget(storage._keys[16], "A") == b"600"  # the two handed out
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(600)
    again = fair_dispatcher(storage)
    job = await again.dequeue(limiter)
    assert job is not None
    assert job.message.attributes.receive_count == 1  # the give-back undid that receive
    await job.mark_as_processed()
    await first.mark_as_processed()
    await third.mark_as_processed()
    await again.close()


async def test_a_call_whose_grants_pass_the_history_limit_keeps_what_one_at_a_time_keeps(
    clocked_storage: Any, clocked_throttle: Any, redis_url: str
) -> None:
    """Sixteen winners of one call push eleven records out of a history of five (dropped
    together at the call's end): the limiter then holds what sixteen single dispatches leave,
    the same five newest grants, their ids latest, the same totals; the marks of the eleven
    dropped correct nothing, the five kept are corrected, alike in both."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    found: list[Any] = []
    for batched in (True, False):
        storage = clocked_storage()
        limiter = clocked_throttle(rpm=1e6, tpm=1e9, max_history_records=5)
        dispatcher = fair_dispatcher(storage)
        await dispatcher.batch_enqueue(
            [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(100 + n), tenant="A") for n in range(16)]
        )
        if batched:
            jobs = await dispatcher._dequeue_up_to(limiter, 16)
        else:
            jobs = [job for _ in range(16) if (job := await dispatcher.dequeue(limiter)) is not None]
        assert [job.message.payload.id for job in jobs] == [f"r{n}" for n in range(16)]
        _state, grants, order, latest, _held = limiter._keys
        kept = {
            "order": await client.lrange(order, 0, -1),
            "grants": sorted(await client.hkeys(grants)),
            "latest": await client.hgetall(latest),
            "metrics": (await limiter.get_metrics()).consumption_history,
        }
        for job in jobs:
            await job.mark_as_processed(actual_tokens=50)
        kept["after"] = (await limiter.get_metrics()).consumption_history
        found.append(kept)
        await dispatcher.close()
    await client.aclose()
    batched_kept, single_kept = found
    assert len(batched_kept["order"]) == 5
    assert batched_kept == single_kept
    assert batched_kept["latest"] == {f"r{n}#1".encode(): str(n + 1).encode() for n in range(11, 16)}
    assert batched_kept["after"].count == 5
    assert batched_kept["after"].total_tokens == 5 * 50
