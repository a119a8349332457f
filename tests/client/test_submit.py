"""`LLMQueueDispatcher.submit` within one process: every submit ends exactly once, with the
handler's value or `RequestFailedError`; a cancelled one is withdrawn."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    DuplicateRequestError,
    ExpiredError,
    HandlerResult,
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageStateError,
    PermanentError,
    ProcessableMessage,
    PurgedError,
    RateLimitError,
    RequestFailedError,
    RetryableError,
    TokenInfo,
    Worker,
    create_in_memory_queue,
)


def request(request_id: str, tokens: int = 10, **fields: Any) -> LLMRequest[Any]:
    return LLMRequest(request_id, {"n": request_id}, token_info=TokenInfo(tokens), **fields)


def limiter() -> LLMThrottle:
    return LLMThrottle(100_000, 10_000_000)


async def settle() -> None:
    """Lets every ready task run (a handful of event-loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_submit_returns_the_value_of_the_handler_a_worker_runs() -> None:
    dispatcher = create_in_memory_queue()
    seen: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> HandlerResult[str]:
        seen.append(job.message.payload.id)
        return HandlerResult(f"answer to {job.message.payload.payload['n']}", actual_tokens=7)

    worker = Worker(dispatcher, limiter(), handle)
    running = asyncio.create_task(worker.run())
    try:
        assert await dispatcher.submit(request("a")) == "answer to a"
    finally:
        worker.stop()
        await running
    assert seen == ["a"]
    assert worker.stats.processed == 1
    assert worker.stats.tokens == 7


async def test_submit_to_a_worker_whose_handler_returns_a_token_count_returns_that_count() -> None:
    dispatcher = create_in_memory_queue()

    async def handle(job: ProcessableMessage[Any]) -> int:
        return 42

    worker = Worker(dispatcher, limiter(), handle)
    running = asyncio.create_task(worker.run())
    try:
        assert await dispatcher.submit(request("a")) == 42
    finally:
        worker.stop()
        await running
    assert worker.stats.tokens == 42


async def test_hundreds_of_concurrent_submits_through_the_pool_are_each_answered_once() -> None:
    dispatcher = create_in_memory_queue()
    calls: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> str:
        calls[job.message.payload.id] += 1
        await asyncio.sleep(0)
        return job.message.payload.id.upper()

    throttle = limiter()
    ids = [f"r{n}" for n in range(300)]
    async with dispatcher:
        answers = await asyncio.gather(
            *(dispatcher.submit(request(i), handle, rate_limiter=throttle, concurrency=8) for i in ids)
        )
        assert answers == [i.upper() for i in ids]
        assert calls == Counter({i: 1 for i in ids})
        metrics = await dispatcher.get_queue_metrics()
        assert metrics.queue.total_messages == 0


async def test_the_pool_keeps_the_estimate_when_the_handler_returns_a_plain_value() -> None:
    throttle = limiter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        return 3  # the submitter's value, not a token count: the pool marks with the estimate

    async with create_in_memory_queue() as dispatcher:
        assert await dispatcher.submit(request("a", tokens=500), handle, rate_limiter=throttle) == 3
    [record] = throttle.get_consumption_history()
    assert record.tokens == 500


async def test_a_permanent_error_reaches_the_caller_as_request_failed() -> None:
    failure = PermanentError("the provider refused it")

    async def handle(job: ProcessableMessage[Any]) -> None:
        raise failure

    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(RequestFailedError) as raised:
            await dispatcher.submit(request("a"), handle, rate_limiter=limiter())
        assert raised.value.request_id == "a"
        assert raised.value.error is failure
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_handler_that_is_not_async_fails_its_submit_at_once_instead_of_running_again() -> None:
    # A plain function given by mistake: its result cannot be awaited. Retrying would call it
    # again and again (with whatever it sends), for ever without max_receive_count.
    calls: list[str] = []

    def handle(job: ProcessableMessage[Any]) -> int:
        calls.append(job.message.payload.id)
        return 5

    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(RequestFailedError) as raised:
            await asyncio.wait_for(dispatcher.submit(request("a"), handle, rate_limiter=limiter()), 5)  # type: ignore[arg-type]
        assert isinstance(raised.value.error, PermanentError)
        assert "async" in str(raised.value.error)
        assert calls == ["a"]
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_the_last_failure_before_max_receive_count_reaches_the_caller() -> None:
    attempts: list[int] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        attempts.append(job.message.attributes.receive_count)
        raise RetryableError(f"busy {len(attempts)}", retry_after=0)

    dead = InMemoryStorage[Any]()
    dispatcher = LLMQueueDispatcher(InMemoryStorage(max_receive_count=3, dead_letter=dead))
    async with dispatcher:
        with pytest.raises(RequestFailedError) as raised:
            await dispatcher.submit(request("a"), handle, rate_limiter=limiter())
    assert attempts == [1, 2, 3]
    assert isinstance(raised.value.error, RetryableError)
    assert str(raised.value.error) == "busy 3"


async def test_an_expired_request_reaches_the_caller() -> None:
    async def handle(job: ProcessableMessage[Any]) -> str:
        raise AssertionError("an expired request is never handled")

    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    async with create_in_memory_queue(drop_expired=True) as dispatcher:
        with pytest.raises(RequestFailedError) as raised:
            await dispatcher.submit(request("a", deadline=past), handle, rate_limiter=limiter())
        assert isinstance(raised.value.error, ExpiredError)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_purge_fails_every_waiting_submit() -> None:
    async with create_in_memory_queue() as dispatcher:
        waiting = [asyncio.create_task(dispatcher.submit(request(f"r{n}"))) for n in range(3)]
        await settle()
        await dispatcher.purge()
        for task in waiting:
            with pytest.raises(RequestFailedError) as raised:
                await task
            assert isinstance(raised.value.error, PurgedError)


async def test_cancelling_a_submit_takes_a_request_not_yet_dispatched_out_of_the_queue() -> None:
    dispatcher = create_in_memory_queue()
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    submit = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    # Gone at once: nothing to dequeue, nothing counted, its id free for a new submit.
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert await dispatcher.dequeue(limiter()) is None
    assert getattr(dispatcher._outcomes().relay, "withdrawn", None) == set()
    again = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    worker = Worker(dispatcher, limiter(), handle)
    stats = await worker.run(stop_when_empty=True)
    assert await again is None
    assert handled == ["a"]
    assert (stats.withdrawn, stats.processed) == (0, 1)
    assert dispatcher._outcomes().waiting == {}


async def test_a_submit_cancelled_after_a_plain_dequeue_took_its_request_is_not_run_by_a_worker() -> None:
    # Received by a dequeue that is no worker's (not yet dispatched to a handler): the worker
    # that later takes it once its lease runs out deletes it unprocessed.
    clock = ManualClock(1_000.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=5)
    )
    throttle = LLMThrottle(1_000, 1_000_000, clock=clock)
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    submit = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    taken = await dispatcher.dequeue(throttle)
    assert taken is not None
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    assert (await storage.get_queue_attributes()).approximate_number_of_messages_in_flight == 1
    clock.advance(6)
    stats = await Worker(dispatcher, throttle, handle).run(stop_when_empty=True)
    assert handled == []
    assert stats.withdrawn == 1
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_cancelling_a_submit_already_dispatched_discards_its_result() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> str:
        started.set()
        await release.wait()
        return "late"

    async with create_in_memory_queue() as dispatcher:
        submit = asyncio.create_task(dispatcher.submit(request("a"), handle, rate_limiter=limiter()))
        await started.wait()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        release.set()
        await settle()
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        assert dispatcher._outcomes().waiting == {}
        assert dispatcher._submissions is not None
        assert dispatcher._submissions.pool is not None
        assert dispatcher._submissions.pool.worker.stats.processed == 1


async def test_closing_the_dispatcher_fails_the_submits_still_waiting() -> None:
    dispatcher = create_in_memory_queue()
    waiting = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    await dispatcher.close()
    with pytest.raises(RequestFailedError) as raised:
        await waiting
    assert isinstance(raised.value.error, MessageStateError)


async def test_bad_arguments_raise_at_the_call_and_enqueue_nothing() -> None:
    async def handle(job: ProcessableMessage[Any]) -> None:
        return None

    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(InvalidRequestError, match="request must be an LLMRequest"):
            await dispatcher.submit("a")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="rate_limiter"):
            await dispatcher.submit(request("a"), handle)
        with pytest.raises(InvalidRequestError, match="rate_limiter is only used with a handler"):
            await dispatcher.submit(request("a"), rate_limiter=limiter())
        with pytest.raises(InvalidRequestError, match="concurrency"):
            await dispatcher.submit(request("a"), handle, rate_limiter=limiter(), concurrency=0)
        with pytest.raises(InvalidRequestError, match="handler must be"):
            await dispatcher.submit(request("a"), "nope", rate_limiter=limiter())  # type: ignore[arg-type]
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        assert dispatcher._outcomes().waiting == {}


async def test_a_limiter_class_given_to_submit_is_refused_at_the_call_instead_of_waiting_for_ever() -> None:
    """``rate_limiter=LLMThrottle`` (the class): the pool's worker stopped at its first dequeue
    and the submit, its request enqueued, waited for ever. Refused at the call now; nothing is
    enqueued, and a later submit with a limiter runs."""

    async def handle(job: ProcessableMessage[Any]) -> str:
        return "done"

    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(InvalidRequestError, match="rate_limiter must be a RateLimiter"):
            await asyncio.wait_for(dispatcher.submit(request("a"), handle, rate_limiter=LLMThrottle), 5.0)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        assert dispatcher._outcomes().waiting == {}
        answer = await asyncio.wait_for(dispatcher.submit(request("a"), handle, rate_limiter=limiter()), 5.0)
        assert answer == "done"


async def test_a_refused_submit_leaves_the_pool_free_for_another_limiter() -> None:
    """A submit refused for its request (a field made invalid after construction, an id still
    queued) changes nothing: the dispatcher's pool is not bound
    to the limiter it named, and the next submit may use another one."""

    async def handle(job: ProcessableMessage[Any]) -> str:
        return "done"

    async with create_in_memory_queue() as dispatcher:
        bad = request("bad")
        bad.priority = 9  # type: ignore[assignment]
        with pytest.raises(InvalidRequestError, match="priority"):
            await dispatcher.submit(bad, handle, rate_limiter=limiter())
        await dispatcher.enqueue(request("queued"))
        with pytest.raises(DuplicateRequestError):
            await dispatcher.submit(request("queued"), handle, rate_limiter=limiter())
        assert dispatcher._outcomes().pool is None
        other = limiter()
        answer = await asyncio.wait_for(dispatcher.submit(request("a"), handle, rate_limiter=other), 5.0)
        assert answer == "done"
        with pytest.raises(InvalidRequestError, match="another rate limiter"):
            await dispatcher.submit(request("b"), handle, rate_limiter=limiter())


async def test_a_second_submit_of_a_waiting_id_is_refused_and_the_first_still_answered() -> None:
    async def handle(job: ProcessableMessage[Any]) -> str:
        return "one"

    dispatcher = create_in_memory_queue()
    first = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    with pytest.raises(DuplicateRequestError):
        await dispatcher.submit(request("a"))
    worker = Worker(dispatcher, limiter(), handle)
    await worker.run(stop_when_empty=True)
    assert await first == "one"


async def test_a_failed_enqueue_leaves_nobody_waiting() -> None:
    dispatcher = create_in_memory_queue()
    await dispatcher.enqueue(request("a"))
    with pytest.raises(DuplicateRequestError):
        await dispatcher.submit(request("a"))
    assert dispatcher._outcomes().waiting == {}


ACTIONS = ("ok", "fail", "cancel_early", "cancel_late")


@settings(deadline=None)
@given(st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=25), st.integers(0, 2**32 - 1))
def test_every_submit_ends_exactly_once_and_nothing_is_left_behind(actions: list[str], seed: int) -> None:
    """Random interleavings of completions, failures and cancellations before and during
    handling: each submit ends once, each request is handled at most once, none when withdrawn
    before its dispatch, and the store and the books are empty at the end. (The interleaving's
    random choices come from a seeded `random.Random`: drawing from Hypothesis inside the
    handler's tasks is not allowed.)"""
    asyncio.run(_interleaving(actions, random.Random(seed)))


async def _interleaving(actions: list[str], rng: random.Random) -> None:
    dispatcher = create_in_memory_queue()
    ids = [f"r{n}" for n in range(len(actions))]
    action_of = dict(zip(ids, actions, strict=True))
    tasks = {i: asyncio.create_task(dispatcher.submit(request(i))) for i in ids}
    handled: Counter[str] = Counter()
    await settle()
    early = [i for i in ids if action_of[i] == "cancel_early"]
    rng.shuffle(early)
    for i in early:  # withdrawn in a random order, before any dispatch
        tasks[i].cancel()

    async def handle(job: ProcessableMessage[Any]) -> HandlerResult[str]:
        request_id = job.message.payload.id
        handled[request_id] += 1
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        if action_of[request_id] == "cancel_late":
            tasks[request_id].cancel()
            await asyncio.sleep(0)
        if action_of[request_id] == "fail":
            raise PermanentError(request_id)
        return HandlerResult(request_id)

    worker = Worker(dispatcher, limiter(), handle, concurrency=rng.randint(1, 4))
    running = asyncio.create_task(worker.run())
    await asyncio.wait(tasks.values())
    for _ in range(10_000):  # the withdrawn ones are deleted when the worker takes them
        if not (await dispatcher.get_queue_metrics()).queue.total_messages and not worker.stats.in_flight:
            break
        await asyncio.sleep(0)
    worker.stop()
    await running
    for i in ids:
        task = tasks[i]
        assert task.done()
        if action_of[i] in ("cancel_early", "cancel_late"):
            assert task.cancelled()
        elif action_of[i] == "fail":
            assert isinstance(task.exception(), RequestFailedError)
        else:
            assert task.result() == i
        assert handled[i] == (0 if action_of[i] == "cancel_early" else 1)
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    book = dispatcher._outcomes()
    assert book.waiting == {}
    assert book.handlers == {}
    assert getattr(book.relay, "withdrawn", set()) == set()


async def test_a_request_larger_than_the_limiter_can_ever_grant_fails_its_submit() -> None:
    async def handle(job: ProcessableMessage[Any]) -> None:
        raise AssertionError("never dispatched")

    async with create_in_memory_queue() as dispatcher:
        throttle = LLMThrottle(60, 1_000)
        with pytest.raises(RequestFailedError) as raised:
            await dispatcher.submit(request("huge", tokens=5_000), handle, rate_limiter=throttle)
        assert isinstance(raised.value.error, RateLimitError)
        assert raised.value.error.available_in == math.inf
        [taken] = await dispatcher.take_unfittable(throttle)  # still queued, for its owner to take out
        assert taken.payload.id == "huge"


async def test_a_submit_cancelled_during_its_enqueue_leaves_no_handler_to_run_it() -> None:
    class SlowStorage(InMemoryStorage[Any]):
        async def enqueue(self, request: LLMRequest[Any]) -> Any:
            message = await super().enqueue(request)  # landed...
            await asyncio.sleep(10)  # ...and the reply is slow: the caller gives up meanwhile
            return message

    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    dispatcher = LLMQueueDispatcher(SlowStorage())
    submit = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    stats = await Worker(dispatcher, limiter(), handle).run(stop_when_empty=True)
    assert handled == []
    assert stats.withdrawn == 0  # taken out of the store at the cancellation
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    await dispatcher.close()


async def test_a_submit_cancelled_while_its_enqueue_is_recorded_leaves_no_handler_to_run_it() -> None:
    """The relay records the enqueue (a round trip to a shared relay) when the submitter gives
    up: the request, already queued, is withdrawn and no handler runs it."""
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    dispatcher = create_in_memory_queue()
    relay = dispatcher._outcomes().relay
    record = relay.enqueued

    async def slow_record(request_id: str) -> None:
        await asyncio.sleep(0.05)  # the caller gives up meanwhile
        await record(request_id)

    relay.enqueued = slow_record  # type: ignore[method-assign]
    submit = asyncio.create_task(dispatcher.submit(request("a")))
    await settle()
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    await asyncio.sleep(0.1)  # the recording and the withdrawal land
    await Worker(dispatcher, limiter(), handle).run(stop_when_empty=True)
    assert handled == []
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    await dispatcher.close()


async def test_a_submit_to_a_closed_dispatcher_raises_and_enqueues_nothing() -> None:
    dispatcher = create_in_memory_queue()
    throttle = limiter()

    async def handle(job: ProcessableMessage[Any]) -> str:
        return "done"

    assert await dispatcher.submit(request("before"), handle, rate_limiter=throttle) == "done"
    await dispatcher.close()
    with pytest.raises(MessageStateError, match="closed"):
        await dispatcher.submit(request("after"), handle, rate_limiter=throttle)
    with pytest.raises(MessageStateError, match="closed"):
        await dispatcher.submit(request("after"))
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_submit_to_a_dispatcher_closed_before_any_submit_raises() -> None:
    dispatcher = create_in_memory_queue()
    await dispatcher.close()
    with pytest.raises(MessageStateError, match="closed"):
        await dispatcher.submit(request("after"))
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_submit_is_answered_by_a_worker_on_another_dispatcher_of_the_same_store() -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage()
    submitting, working = LLMQueueDispatcher(storage), LLMQueueDispatcher(storage)

    async def handle(job: ProcessableMessage[Any]) -> HandlerResult[str]:
        if job.message.payload.id == "refused":
            raise PermanentError("no")
        return HandlerResult(f"answer to {job.message.payload.id}")

    answered = asyncio.create_task(submitting.submit(request("a")))
    refused = asyncio.create_task(submitting.submit(request("refused")))
    await settle()
    stats = await Worker(working, limiter(), handle).run(stop_when_empty=True)
    assert (stats.processed, stats.dead_lettered) == (1, 1)
    # Bounded: the worker's dispatcher did not know the other's submitters, who waited for ever.
    assert await asyncio.wait_for(answered, 10) == "answer to a"
    with pytest.raises(RequestFailedError) as raised:
        await asyncio.wait_for(refused, 10)
    assert isinstance(raised.value.error, PermanentError)


async def test_a_request_withdrawn_on_one_dispatcher_is_not_run_on_another_of_the_same_store() -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage()
    submitting, working = LLMQueueDispatcher(storage), LLMQueueDispatcher(storage)
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    submit = asyncio.create_task(submitting.submit(request("a")))
    await settle()
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    assert (await working.get_queue_metrics()).queue.total_messages == 0
    stats = await Worker(working, limiter(), handle).run(stop_when_empty=True)
    assert handled == []
    assert stats.withdrawn == 0


async def test_a_purge_on_one_dispatcher_fails_the_submits_waiting_on_another_of_the_same_store() -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage()
    submitting, purging = LLMQueueDispatcher(storage), LLMQueueDispatcher(storage)
    submit = asyncio.create_task(submitting.submit(request("a")))
    await settle()
    await purging.purge()
    with pytest.raises(RequestFailedError) as raised:
        await asyncio.wait_for(submit, 10)
    assert isinstance(raised.value.error, PurgedError)


async def test_a_request_enqueued_again_after_its_withdrawn_namesake_left_the_store_is_run() -> None:
    # Withdrawn unsent, then dropped by the store at the end of its retention: the withdrawal
    # lapses with it, and a later plain enqueue of the same id is run, not deleted unrun.
    clock = ManualClock(1_000.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock, message_retention=60)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    limiter = LLMThrottle(1_000, 1_000_000, clock=clock)
    waiting = asyncio.ensure_future(dispatcher.submit(LLMRequest("a", None)))
    for _ in range(20):  # its enqueue done, it waits for its outcome
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    clock.advance(61)
    assert await dispatcher.dequeue(limiter) is None  # dropped by retention, never taken
    await dispatcher.batch_enqueue([LLMRequest("a", None)])
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    stats = await Worker(dispatcher, limiter, handle).run(stop_when_empty=True)
    assert handled == ["a"]
    assert stats.withdrawn == 0


async def test_a_request_the_store_dead_letters_or_expires_itself_reaches_its_submitter() -> None:
    # A consumer that takes a message and never marks it: the store dead-letters it when the
    # lease of its last receive runs out; a request nobody took is dropped past its retention.
    clock = ManualClock(1_000.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(
        clock=clock, max_receive_count=1, dead_letter=InMemoryStorage(clock=clock), message_retention=60
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    dead = asyncio.ensure_future(dispatcher.submit(request("dies-1")))
    for _ in range(20):  # its enqueue done, it waits for its outcome
        await asyncio.sleep(0)
    [taken] = await storage.dequeue(1, 1.0)
    assert taken.payload.id == "dies-1"
    clock.advance(2.0)
    expiring = asyncio.ensure_future(dispatcher.submit(request("old-1")))
    for _ in range(20):
        await asyncio.sleep(0)
    # Any call runs the store's upkeep first: it dead-letters dies-1.
    assert (await storage.get_queue_attributes()).approximate_number_of_messages == 1
    with pytest.raises(RequestFailedError) as dead_lettered:
        await asyncio.wait_for(dead, 5)
    assert isinstance(dead_lettered.value.error, MessageStateError)
    clock.advance(61.0)
    assert (await storage.get_queue_attributes()).approximate_number_of_messages == 0
    with pytest.raises(RequestFailedError) as expired:
        await asyncio.wait_for(expiring, 5)
    assert isinstance(expired.value.error, ExpiredError)
    await dispatcher.close()


async def test_a_submitter_cancelled_after_its_outcome_was_reported_leaves_no_withdrawal() -> None:
    from llm_queue_dispatcher.outcomes import Outcome

    dispatcher = create_in_memory_queue()
    relay = dispatcher._outcomes().relay
    await relay.expect("a")
    await relay.report("a", Outcome(True, "done"), here=True)
    await relay.withdraw("a")  # the submitter's cancellation, processed after the report
    assert getattr(relay, "withdrawn", None) == set()
    # A request of that id enqueued later is not skipped as withdrawn.
    assert await relay.claim("a")
