"""The marks of the global choice (``redis/global_choice.py``, ``lua/global_mark.lua``): marks
made together go in one script call, and each caller still gets its own outcome; the limiter's
books after the global scripts' grants and marks are `LLMThrottle`'s."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    RateLimitError,
    ReceiptHandleError,
    StorageError,
    TokenInfo,
    UnknownRequestError,
)
from llm_queue_dispatcher.redis import RedisStorage, global_choice
from tests.redis.conftest import START, fresh_name
from tests.redis.support import ClockedRedisStorage, ClockedRedisThrottle, fair_dispatcher


def count_calls(storage: RedisStorage[Any], patch: pytest.MonkeyPatch) -> list[int]:
    """Patches the storage's connection: the number of marks of each ``global_mark`` call."""
    connection = storage._connection
    original = connection.run
    marks: list[int] = []

    async def counted(script: Any, keys: Any, args: Any) -> Any:
        if script.name == "global_mark":
            marks.append(int(args[4]))
        return await original(script, keys, args)

    patch.setattr(connection, "run", counted)
    return marks


async def enqueue_and_take(dispatcher: LLMQueueDispatcher[Any], limiter: Any, count: int) -> list[Any]:
    await dispatcher.batch_enqueue(
        [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(100), tenant="A") for n in range(count)]
    )
    jobs = []
    for _ in range(count):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        jobs.append(job)
    return jobs


async def test_marks_made_together_go_in_one_call_and_each_caller_gets_its_own_outcome(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """Five marks made at once (processed with and without a count, failed, released, and one
    whose lease another dispatcher took over): one script call; the stale one raises
    `ReceiptHandleError` to its caller alone; the store, the limiter and the tenant's use end
    exactly as five separate marks leave them."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    one, other = fair_dispatcher(storage), fair_dispatcher(storage)
    jobs = await enqueue_and_take(one, limiter, 4)
    await one.enqueue(LLMRequest("late", "x", Priority.NORMAL, TokenInfo(100), tenant="A"))
    clock.advance(20.0)
    late = await one.dequeue(limiter)
    assert late is not None
    clock.advance(15.0)  # the four first leases ran out; the late one's did not
    jobs = [await one.dequeue(limiter) for _ in range(4)]
    assert all(job is not None and job.message.attributes.receive_count == 2 for job in jobs)
    clock.advance(20.0)  # now the late one's ran out too, and the other dispatcher takes it
    fresh = await other.dequeue(limiter)
    assert fresh is not None
    assert fresh.message.payload.id == "late"
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        outcomes = await asyncio.gather(
            jobs[0].mark_as_processed(actual_tokens=250),
            jobs[1].mark_as_processed(),
            jobs[2].mark_as_failed(RuntimeError("provider down")),
            jobs[3].release(),
            late.mark_as_processed(actual_tokens=40),
            return_exceptions=True,
        )
    assert marks == [5]
    assert outcomes[:4] == [None, None, None, None]
    assert isinstance(outcomes[4], ReceiptHandleError)
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 2  # the failed and the released one
    assert attributes.approximate_number_of_messages_in_flight == 1  # the other dispatcher's
    # Tenant use: the four first deliveries, never marked, stay charged for the window (400);
    # then 250 + 100 (processed), 0 (failed, released), 40 (the stale delivery's count) and
    # 100 (the other dispatcher's delivery of it).
    assert await storage.redis.hget(storage._keys[16], "A") == b"890"
    await fresh.mark_as_processed(actual_tokens=100)
    await one.close()
    await other.close()


async def test_a_mark_that_fails_in_the_script_fails_alone(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """One message's stored state is unreadable: its mark fails with `StorageError` (it can be
    marked again), the three marks sent with it land."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    jobs = await enqueue_and_take(dispatcher, limiter, 4)
    member = jobs[1].message.attributes.receipt_handle.split(".")[0]
    state = await storage.redis.hget(storage._keys[4], member)
    await storage.redis.hset(storage._keys[4], member, b"\x9c\x01")  # an array cut short
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        outcomes = await asyncio.gather(
            *(job.mark_as_processed(actual_tokens=50) for job in jobs), return_exceptions=True
        )
    assert marks == [4]
    assert [outcomes[0], outcomes[2], outcomes[3]] == [None, None, None]
    assert isinstance(outcomes[1], StorageError)
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 1
    assert attributes.approximate_number_of_messages == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(3 * 50 + 100)
    await storage.redis.hset(storage._keys[4], member, state)  # readable again: marked again
    await jobs[1].mark_as_processed(actual_tokens=50)
    assert await storage.get_approximate_message_count() == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(4 * 50)
    await dispatcher.close()


async def test_a_mark_that_fails_after_its_limiter_correction_keeps_that_correction_whole(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """One delivery's tenant charge is unreadable, so its mark fails after the limiter corrected
    its reservation (Redis keeps that record's change): the limiter's levels and totals keep the
    correction too, as a mark saved on its own would, not the state before it."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    jobs = await enqueue_and_take(dispatcher, limiter, 2)
    await storage.redis.hset(storage._keys[18], "r0#1", b"\x9c\x01")  # an array cut short
    outcomes = await asyncio.gather(
        *(job.mark_as_processed(actual_tokens=50) for job in jobs), return_exceptions=True
    )
    assert isinstance(outcomes[0], StorageError)
    assert outcomes[1] is None
    assert await storage.get_approximate_message_count() == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(2 * 50)
    await dispatcher.close()


async def test_a_call_that_fails_fails_each_of_its_marks_and_they_can_be_made_again(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """The connection fails under a call of three marks: each caller gets a `StorageError` of
    its own, nothing is lost (the messages stay leased), and each mark can be made again."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    jobs = await enqueue_and_take(dispatcher, limiter, 3)
    connection = storage._connection
    original = connection.run

    async def broken(script: Any, keys: Any, args: Any) -> Any:
        if script.name == "global_mark":
            raise redis.exceptions.ConnectionError("connection reset by peer")
        return await original(script, keys, args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "run", broken)
        outcomes = await asyncio.gather(
            *(job.mark_as_processed(actual_tokens=60) for job in jobs), return_exceptions=True
        )
    assert all(isinstance(outcome, StorageError) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == 3
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 3
    await asyncio.gather(*(job.mark_as_processed(actual_tokens=60) for job in jobs))
    assert await storage.get_approximate_message_count() == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(3 * 60)
    await dispatcher.close()


async def test_a_mark_whose_caller_is_cancelled_still_lands_once(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """Callers cancelled while their marks wait for the call: the marks are made all the same,
    once each, with the mark sent beside them (a mark is never left half made)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    jobs = await enqueue_and_take(dispatcher, limiter, 3)
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        cancelled = [asyncio.ensure_future(job.mark_as_processed(actual_tokens=70)) for job in jobs[:2]]
        await asyncio.sleep(0)  # each mark is queued for the call
        for task in cancelled:
            task.cancel()
        await jobs[2].mark_as_processed(actual_tokens=70)
        for task in cancelled:
            with pytest.raises(asyncio.CancelledError):
                await task
        await dispatcher.close()  # waits for the marks in flight
    assert marks == [3]
    assert await storage.get_approximate_message_count() == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(3 * 70)
    assert all(job.settled for job in jobs)


async def test_marks_whose_call_is_cancelled_before_it_goes_out_can_be_made_again(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """The task that sends the marks is cancelled (its event loop shutting down) before their
    call goes out: each caller's mark is cancelled, nothing changed in Redis, and each job can
    be marked again, once, with its reservation corrected whole."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    choice = dispatcher._global
    assert choice is not None
    jobs = await enqueue_and_take(dispatcher, limiter, 2)
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        pending = [job.mark_as_processed(actual_tokens=40) for job in jobs]
        assert choice._sender is not None
        choice._sender.cancel()
        for mark in pending:
            with pytest.raises(asyncio.CancelledError):
                await mark
        assert marks == []
        attributes = await storage.get_queue_attributes()
        assert attributes.approximate_number_of_messages_in_flight == 2
        assert not any(job.settled for job in jobs)
        await asyncio.gather(*(job.mark_as_processed(actual_tokens=40) for job in jobs))
    assert marks == [2]
    assert all(job.settled for job in jobs)
    assert await storage.get_approximate_message_count() == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(2 * 40)
    await dispatcher.close()


async def test_a_mark_cancelled_before_its_call_is_sent_is_left_out_of_it(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """A mark of the script itself cancelled before the call goes out is not in it: its message
    stays leased with its reservation, the marks beside it land."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    choice = dispatcher._global
    assert choice is not None
    jobs = await enqueue_and_take(dispatcher, limiter, 2)

    def fields(job: Any) -> tuple[Any, ...]:
        member, token = storage._handle(job.message.attributes.receipt_handle)
        key = f"{job.message.payload.id}#1"
        return ("delete", member, token, 0, "adjust", key, 30, "warn", "", "")

    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        dropped = asyncio.ensure_future(choice._marked(limiter, fields(jobs[0])))
        kept = asyncio.ensure_future(choice._marked(limiter, fields(jobs[1])))
        await asyncio.sleep(0)
        dropped.cancel()
        assert await kept == (1, [b"ok"])
    assert marks == [1]
    assert dropped.cancelled()
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 1
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(100 + 30)
    await jobs[0].mark_as_processed(actual_tokens=30)
    await dispatcher.close()


async def test_marks_of_one_message_in_one_call_each_see_what_the_one_before_left(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """A call that gives a message back, then deletes it under the same receipt handle (and
    deletes another message): the second mark finds the handle stale (the give-back reset it), so
    the message stays queued, visible and whole, and its reservation was given back once."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    jobs = await enqueue_and_take(dispatcher, limiter, 2)
    member, token = storage._handle(jobs[0].message.attributes.receipt_handle)
    other, other_token = storage._handle(jobs[1].message.attributes.receipt_handle)
    choice = dispatcher._global
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        outcomes = await asyncio.gather(
            choice._marked(limiter, ("release", member, token, 0, "release", "", 0, "", "", "")),
            choice._marked(limiter, ("delete", member, token, 0, "", "", 0, "", "", "")),
            choice._marked(limiter, ("delete", other, other_token, 0, "adjust", "", 100, "warn", "", "")),
        )
    assert marks == [3]
    assert [stored for stored, _ in outcomes] == [1, 0, 1]
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 1
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert (await limiter.get_metrics()).tpm.used == pytest.approx(100)  # the other's alone
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.payload.id == jobs[0].message.payload.id
    await again.mark_as_processed(actual_tokens=100)
    assert await storage.get_approximate_message_count() == 0
    await dispatcher.close()


async def test_marks_made_together_delete_leased_and_lapsed_messages_from_the_set_that_holds_each(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """Processed together: two messages still leased and one whose lease ran out before the call
    (visible again, its receipt handle still its latest): all three leave the queue, none stays
    visible or in flight, and nothing is handed out again."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher = fair_dispatcher(storage)
    lapsed = (await enqueue_and_take(dispatcher, limiter, 1))[0]
    clock.advance(20.0)
    await dispatcher.batch_enqueue(
        [LLMRequest(f"s{n}", "x", Priority.NORMAL, TokenInfo(100), tenant="B") for n in range(2)]
    )
    leased = [await dispatcher.dequeue(limiter) for _ in range(2)]
    assert all(job is not None for job in leased)
    clock.advance(15.0)  # the first lease ran out; the two others did not
    with pytest.MonkeyPatch.context() as patch:
        marks = count_calls(storage, patch)
        outcomes = await asyncio.gather(
            *(job.mark_as_processed(actual_tokens=80) for job in [lapsed, *leased]), return_exceptions=True
        )
    assert marks == [3]
    assert outcomes == [None, None, None]
    attributes = await storage.get_queue_attributes()
    assert attributes.approximate_number_of_messages == 0
    assert attributes.approximate_number_of_messages_in_flight == 0
    assert await dispatcher.dequeue(limiter) is None
    assert await storage.get_approximate_message_count() == 0
    await dispatcher.close()


@pytest.mark.parametrize(
    ("strategy", "max_records", "seed"),
    [("compensate", 10_000, 1), ("warn", 10_000, 2), ("strict", 10_000, 3), ("compensate", 3, 4)],
)
async def test_global_grants_and_marks_leave_the_limiter_as_llm_throttle_does(
    clocked_storage: Any,
    clocked_throttle: Any,
    clock: ManualClock,
    strategy: str,
    max_records: int,
    seed: int,
) -> None:
    """Dispatches of one to four winners per call and marks made together (processed with a
    count above or below the estimate, processed without one, released), on a manual clock with whole-second
    steps and rates a double holds exactly per second: after every step the shared limiter's
    levels, debts and history are what an `LLMThrottle` given the same grants (each winner's
    estimate under its delivery key), adjustments, settlements and releases holds. The global scripts
    grant and correct inside one session per call (``limiter_open``), not through the limiter's
    own scripts, which ``test_decisions_match_llm_throttle`` compares."""
    options: dict[str, Any] = {"adjustment_failure_strategy": strategy, "max_history_records": max_records}
    local = LLMThrottle(120, 1_200, clock=clock, logger=logging.getLogger("quiet"), **options)
    shared = clocked_throttle(rpm=120, tpm=1_200, **options)
    storage = clocked_storage()
    config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=3_600.0, clock=clock)
    rng = random.Random(seed)
    in_flight: list[tuple[Any, str, int]] = []
    handed_out = 0
    async with LLMQueueDispatcher(storage, config) as dispatcher:
        for step in range(80):
            action = rng.random()
            if action < 0.3:
                await dispatcher.batch_enqueue(
                    [
                        LLMRequest(
                            f"s{step}m{n}",
                            "x",
                            Priority.NORMAL,
                            TokenInfo(rng.randint(20, 500)),
                            tenant=rng.choice("AB"),
                        )
                        for n in range(rng.randint(1, 3))
                    ]
                )
            elif action < 0.6:
                for job in await dispatcher._dequeue_up_to(shared, rng.randint(1, 4)):
                    key = f"{job.message.payload.id}#{job.message.attributes.receive_count}"
                    estimate = job.message.payload.token_info.estimated
                    assert local.consume(key, estimate), "the shared limiter granted what LLMThrottle refuses"
                    in_flight.append((job, key, estimate))
                    handed_out += 1
            elif action < 0.85 and in_flight:
                rng.shuffle(in_flight)
                count = rng.randint(1, 4)
                marked, in_flight = in_flight[:count], in_flight[count:]
                marks = []
                for job, key, estimate in marked:
                    if rng.random() < 0.75:
                        actual = rng.choice([0, estimate // 2, estimate, estimate * 2, estimate * 3])
                        with contextlib.suppress(RateLimitError, UnknownRequestError):
                            local.adjust_consumption(key, actual)
                        marks.append(job.mark_as_processed(actual_tokens=actual))
                    elif rng.random() < 0.6:
                        with contextlib.suppress(UnknownRequestError):
                            local.settle(key)
                        marks.append(job.mark_as_processed())
                    else:  # given back whole (the request never reached the provider)
                        with contextlib.suppress(UnknownRequestError):
                            local.release(key)
                        marks.append(job.release())
                await asyncio.gather(*marks)
            else:
                clock.advance(float(rng.choice([1, 3, 20])))
            want, got = local.get_metrics(), await shared.get_metrics()
            assert got.rpm.available == pytest.approx(want.rpm.available, abs=1e-9), step
            assert got.tpm.available == pytest.approx(want.tpm.available, abs=1e-9), step
            assert got.compensation.total_debt == pytest.approx(want.compensation.total_debt, abs=1e-9), step
            assert got.consumption_history.count == want.consumption_history.count, step
            assert got.consumption_history.total_tokens == want.consumption_history.total_tokens, step
    assert handed_out >= 10


def generic_script(name: str) -> Any:
    """The global script ``name`` with its limiter's lean session left out: every grant and
    correction goes through the generic session (``limiter_common.lua``)."""
    script = global_choice._GlobalScript(name)
    source = script.source.replace("if ARGV.lean ~= nil and", "if false and", 1)
    assert source != script.source, "the lean session's guard moved: this test no longer compares"
    script.source = source
    script.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
    return script


async def limiter_books(client: Any, limiter: Any) -> tuple[Any, ...]:
    """Everything a limiter stores, as stored: its state, its records (packed), their order, the
    request ids' latest grants, the grants holding a slot."""
    state, grants, order, latest, held = limiter._keys
    return (
        await client.hgetall(state),
        await client.hgetall(grants),
        await client.lrange(order, 0, -1),
        await client.hgetall(latest),
        await client.zrange(held, 0, -1, withscores=True),
    )


@pytest.mark.parametrize(
    ("strategy", "max_records", "seed"),
    [("compensate", 10_000, 5), ("warn", 4, 6), ("strict", 10_000, 7), ("compensate", 3, 8)],
)
async def test_the_lean_limiter_session_stores_exactly_what_the_generic_one_stores(
    clocked_storage: Any,
    clocked_throttle: Any,
    clock: ManualClock,
    redis_url: str,
    strategy: str,
    max_records: int,
    seed: int,
) -> None:
    """The global scripts grant and correct an RPM + TPM limiter through a lean session; the
    same steps made with the generic session (the lean one left out of the scripts) leave the
    limiter's stored books byte for byte the same after every step: global dispatches of one to
    four winners, marks made together (adjusted, settled, released), the limiter's own
    operations between them on the same grants (a second grant under a delivery's key, its
    adjustment, its release: the generic scripts reading what the lean session wrote, and the
    reverse; a penalty), and clock steps past the history's retention."""
    options: dict[str, Any] = {"adjustment_failure_strategy": strategy, "max_history_records": max_records}
    config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=3_600.0, clock=clock)
    lean_limiter, generic_limiter = (clocked_throttle(rpm=120, tpm=1_200, **options) for _ in range(2))
    lean_storage, generic_storage = clocked_storage(), clocked_storage()
    client = redis.asyncio.Redis.from_url(redis_url)
    rng = random.Random(seed)
    in_flight: list[tuple[Any, Any, str]] = []  # (lean job, generic job, delivery key)
    granted = adjusted = 0
    async with (
        LLMQueueDispatcher(lean_storage, config) as lean,
        LLMQueueDispatcher(generic_storage, config) as generic,
    ):

        @contextlib.asynccontextmanager
        async def generic_scripts() -> Any:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(global_choice, "_script", generic_script)
                yield

        for step in range(90):
            action = rng.random()
            if action < 0.25:
                requests = [
                    LLMRequest(
                        f"s{step}m{n}", "x", Priority.NORMAL, TokenInfo(rng.randint(20, 500)), tenant=tenant
                    )
                    for n, tenant in enumerate(rng.choice("AB") for _ in range(rng.randint(1, 3)))
                ]
                await lean.batch_enqueue(requests)
                await generic.batch_enqueue(requests)
            elif action < 0.5:
                count = rng.randint(1, 4)
                lean_jobs = await lean._dequeue_up_to(lean_limiter, count)
                async with generic_scripts():
                    generic_jobs = await generic._dequeue_up_to(generic_limiter, count)
                lean_ids = [job.message.payload.id for job in lean_jobs]
                assert lean_ids == [job.message.payload.id for job in generic_jobs], step
                for one, other in zip(lean_jobs, generic_jobs, strict=True):
                    key = f"{one.message.payload.id}#{one.message.attributes.receive_count}"
                    in_flight.append((one, other, key))
                granted += len(lean_jobs)
            elif action < 0.75 and in_flight:
                rng.shuffle(in_flight)
                count = rng.randint(1, 4)
                marked, in_flight = in_flight[:count], in_flight[count:]
                lean_marks, generic_marks = [], []
                for one, other, _ in marked:
                    choice = rng.random()
                    if choice < 0.7:
                        actual = rng.choice([0, 10, 100, 400, 900])
                        lean_marks.append(one.mark_as_processed(actual_tokens=actual))
                        generic_marks.append(other.mark_as_processed(actual_tokens=actual))
                        adjusted += 1
                    elif choice < 0.85:
                        lean_marks.append(one.mark_as_processed())
                        generic_marks.append(other.mark_as_processed())
                    else:
                        lean_marks.append(one.release())
                        generic_marks.append(other.release())
                lean_outcomes = await asyncio.gather(*lean_marks, return_exceptions=True)
                async with generic_scripts():
                    generic_outcomes = await asyncio.gather(*generic_marks, return_exceptions=True)
                assert [repr(o) for o in lean_outcomes] == [repr(o) for o in generic_outcomes], step
            elif action < 0.87 and in_flight:
                # The limiter's own scripts on a delivery's key: a second grant, adjusted or given
                # back (the global mark then acts on whichever grant of the key is the latest).
                _, _, key = rng.choice(in_flight)
                tokens, actual = rng.randint(10, 300), rng.choice([0, 50, 600])
                operation = rng.choice(["consume", "adjust", "release", "penalize"])
                for limiter in (lean_limiter, generic_limiter):
                    with contextlib.suppress(RateLimitError, UnknownRequestError):
                        if operation == "consume":
                            await limiter.consume(key, tokens)
                        elif operation == "adjust":
                            await limiter.adjust_consumption(key, actual)
                        elif operation == "penalize":  # a provider's Retry-After: the grants wait
                            await limiter.penalize(2.0)
                        else:
                            await limiter.release(key)
            else:
                clock.advance(float(rng.choice([1, 3, 20, 61])))
            lean_books = await limiter_books(client, lean_limiter)
            generic_books = await limiter_books(client, generic_limiter)
            assert lean_books == generic_books, step
    await client.aclose()
    assert granted >= 10
    assert adjusted >= 5


async def test_the_lean_limiter_session_keeps_a_delivery_keys_earlier_grants_as_the_generic_one(
    redis_url: str,
) -> None:
    """A delivery's key with grants of the limiter's own scripts around the global ones: a grant
    alone follows the key's earlier grant even when that one ages out in the same call (with 40
    others: the lean session drops them a chunk at a time), and a mark that gives a grant back
    makes the key's earlier grant the latest again (the limiter's own adjustment then acts on
    it). The lean session and the generic one store the same."""
    client = redis.asyncio.Redis.from_url(redis_url)
    books = []
    for run in range(2):  # the lean session's, then the generic one's, each on its own clock
        clock = ManualClock(START)
        config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=3_600.0, clock=clock)
        limiter = ClockedRedisThrottle(redis_url, fresh_name("limiter"), clock=clock, rpm=120, tpm=1_200)
        storage: ClockedRedisStorage[Any] = ClockedRedisStorage(redis_url, fresh_name("queue"), clock=clock)
        with pytest.MonkeyPatch.context() as patch:
            if run == 1:
                patch.setattr(global_choice, "_script", generic_script)
            async with LLMQueueDispatcher(storage, config) as dispatcher:
                for n in range(40):  # more than one chunk of the order ages out at once below
                    await limiter.consume(f"bulk{n}", 5)
                await limiter.consume("old#1", 40)  # ages out at the dispatch below
                clock.advance(61.0)
                await dispatcher.enqueue(LLMRequest("old", "x", Priority.NORMAL, TokenInfo(50), tenant="A"))
                await dispatcher.enqueue(LLMRequest("kept", "x", Priority.NORMAL, TokenInfo(70), tenant="A"))
                (first,) = await dispatcher._dequeue_up_to(limiter, 1)
                after_first = await limiter_books(client, limiter)
                (second,) = await dispatcher._dequeue_up_to(limiter, 1)
                assert [first.message.payload.id, second.message.payload.id] == ["old", "kept"]
                await limiter.consume("kept#1", 30)  # a second grant under the delivery's key
                await second.release()  # gives the latest back: the dispatch's grant is latest again
                await limiter.adjust_consumption("kept#1", 90)
                await first.mark_as_processed(actual_tokens=20)
                books.append((after_first, await limiter_books(client, limiter)))
        await limiter.aclose()
        await storage.aclose()
    await client.aclose()
    assert books[0] == books[1]
    _, grants, order, latest, _ = books[0][1]
    # The first grant of old#1 aged out; kept#1's second grant is given back, its first latest.
    assert len(grants) == 3
    assert latest[b"kept#1"] == order[1]
